"""`moeswarm generate` for a Hugging Face MoE checkpoint: transformers' own `generate()` over the model
`moeswarm.model.from_pretrained` builds (routed experts on the swarm), with the checkpoint's tokenizer.
Needs transformers (`pip install 'moeswarm[hf]'`); nodes serving the checkpoint do not."""

from __future__ import annotations

import sys
import time

from moeswarm.deploy.stop_signals import exit_at_once_on_ctrl_c
from moeswarm.protocol.errors import ConfigError


def generate_hf(args, dht, started: float) -> int:
    """Stream the continuation of args.prompt to stdout; statistics to stderr. Returns the exit code."""
    import torch

    from moeswarm.model.hf_swarm import checkpoint_dtype

    transformers = _import_transformers(args.model)
    # Our own reading of config.json first: a bad field there is one line naming it, where transformers'
    # config classes raise tracebacks (or fail later, in the model).
    dtype = None if args.local else checkpoint_dtype(args.model)
    config = _load_config(transformers, args.model)  # before the tokenizer, which reads it too
    tokenizer = _load_tokenizer(transformers, args.model)
    encoded = tokenizer(args.prompt, return_tensors="pt")
    _check_length(config, encoded.input_ids.shape[1], args.max_new_tokens)
    torch.set_num_threads(args.threads)
    model = _load_model(transformers, args, dht, dtype)
    client = getattr(model, "moeswarm_client", None)  # None with --local
    try:
        print(f"[loaded in {time.monotonic() - started:.1f} s]", file=sys.stderr, flush=True)
        sys.stdout.write(args.prompt)
        streamer = _TimedStreamer(transformers, tokenizer)
        if args.seed is not None:
            torch.manual_seed(args.seed)
        sampling = dict(do_sample=True, temperature=args.temperature, top_p=args.top_p) if args.temperature > 0 else dict(do_sample=False)
        eos = tokenizer.eos_token_id
        waited_before = client.expert_wait_s if client is not None else 0.0
        with torch.inference_mode():
            model.generate(
                **encoded, max_new_tokens=args.max_new_tokens, streamer=streamer,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos, **sampling,
            )
        waited_s = client.expert_wait_s - waited_before if client is not None else None
        print(streamer.summary(waited_s), file=sys.stderr, flush=True)
        sys.stdout.flush()
        exit_at_once_on_ctrl_c()  # all is said: a Ctrl-C while the client closes just ends the process
    finally:
        if client is not None:
            client.close()
    return 0


def _import_transformers(model_dir: str):
    try:
        import transformers
    except ImportError as e:
        raise ConfigError(f"{model_dir} is a Hugging Face checkpoint: running it needs transformers (pip install 'moeswarm[hf]')") from e
    transformers.logging.set_verbosity_error()  # generation-config notes are not the user's business here
    return transformers


def _load_tokenizer(transformers, model_dir: str):
    try:
        return transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        first_line = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"{model_dir}: transformers cannot load its tokenizer ({first_line}); copy the checkpoint's tokenizer "
            "files (tokenizer.json, tokenizer_config.json, ...) into the folder"
        ) from e


def _load_config(transformers, model_dir: str):
    try:
        return transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except Exception as e:  # ValueError, TypeError, huggingface_hub's validation errors, ...
        text = " ".join(str(e).split())[:300] or type(e).__name__  # validation errors put the why on line 2
        raise ConfigError(f"{model_dir}: transformers cannot read its config.json ({text})") from e


def _check_length(config, prompt_tokens: int, max_new_tokens: int) -> None:
    limit = getattr(config, "max_position_embeddings", None)
    if limit is None or prompt_tokens + max_new_tokens <= limit:
        return
    if prompt_tokens >= limit:
        raise ConfigError(f"--prompt is {prompt_tokens} tokens, and this model takes at most {limit} (max_position_embeddings); shorten the prompt")
    raise ConfigError(
        f"--max-new-tokens {max_new_tokens}: the {prompt_tokens}-token prompt leaves room for at most "
        f"{limit - prompt_tokens} (the model's max_position_embeddings is {limit})"
    )


def _load_model(transformers, args, dht, dtype):
    """dtype: the checkpoint's torch dtype (None with --local)."""
    if args.local:
        return transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype="auto", local_files_only=True).eval()
    from moeswarm.model.dispatcher import DispatchConfig
    from moeswarm.model.hf_swarm import from_pretrained, wire_dtype_of

    wire_dtype = args.wire_dtype or wire_dtype_of(dtype)  # default: the checkpoint's
    dispatch = DispatchConfig(timeout_s=args.timeout, wire_dtype=wire_dtype)
    return from_pretrained(
        args.model, initial_peers=args.initial_peers, name=args.model_name, swarm=args.swarm, dispatch=dispatch, dht=dht,
    ).eval()


class _TimedStreamer:
    """A transformers TextStreamer that also times the prompt (to the first new token) and decoding."""

    def __init__(self, transformers, tokenizer):
        self._text = transformers.TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self._started = time.monotonic()
        self._first = self._last = None
        self._tokens = 0
        self._prompt_seen = False

    def put(self, ids) -> None:
        if self._prompt_seen:  # the first put is the prompt
            now = time.monotonic()
            self._first = self._first or now
            self._last = now
            self._tokens += ids.numel()
        self._prompt_seen = True
        self._text.put(ids)

    def end(self) -> None:
        self._text.end()

    def summary(self, expert_wait_s: float | None) -> str:
        """One line, as `generate` prints for moeswarm models; expert_wait_s: None when run locally."""
        if not self._tokens:
            return "[0 tokens]"
        prompt_ms = (self._first - self._started) * 1e3
        decode_s = self._last - self._first
        rate = f"{(self._tokens - 1) / decode_s:.1f} tokens/s decoding" if self._tokens > 1 and decode_s > 0 else "no decoding step"
        waited = "" if expert_wait_s is None else f"; {expert_wait_s / max(self._last - self._started, 1e-9):.0%} of the time waiting for experts"
        return f"[{self._tokens} tokens; prompt {prompt_ms:.0f} ms; {rate}{waited}]"
