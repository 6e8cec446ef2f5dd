"""`moeswarm model init` (write a fresh model directory) and `moeswarm generate` (stream text from a
model whose experts run on a swarm)."""

from __future__ import annotations

import dataclasses
import math
import pathlib
import sys
import time

from moeswarm.deploy.stop_signals import exit_at_once_on_ctrl_c
from moeswarm.protocol.errors import ConfigError

# Routing presets after the systems they come from; every other key can be changed with --set.
ROUTING_PRESETS: dict[str, dict] = {
    "topk": dict(mode="topk", n_experts=8, k=2),  # Mixtral 8x7B, GShard, GLaM
    "switch": dict(mode="switch", n_experts=8, k=1, capacity_factor=1.25),  # Switch Transformer
    "shared": dict(mode="topk", n_experts=8, k=2, n_shared=1),  # DeepSpeed PR-MoE, Qwen-MoE
    "fine-grained": dict(mode="topk", n_experts=32, k=6, n_shared=2),  # DeepSeekMoE, DBRX (many small experts)
    "soft": dict(mode="soft", n_experts=4, k=4),  # the 1991 mixture of experts: dense soft gating
    "hierarchical": dict(mode="hierarchical", n_experts=16, n_groups=4, k_groups=2, k=1),  # 1994 hierarchical ME
}
SIZE_PRESETS: dict[str, dict] = {
    "tiny": dict(d_model=128, n_layers=4, n_heads=4, d_ff=256, d_ff_dense=512, max_seq_len=1024),
    "small": dict(d_model=256, n_layers=4, n_heads=4, d_ff=512, d_ff_dense=1024, max_seq_len=2048),
}


def config_from_args(name: str, size: str, routing: str, overrides: list[str]):
    from moeswarm.deploy.configfile import apply_overrides
    from moeswarm.model.lm_config import MoELMConfig
    from moeswarm.protocol.typed_config import build

    data = {"name": name, **SIZE_PRESETS[size], "routing": dict(ROUTING_PRESETS[routing])}
    if routing == "fine-grained":
        data["d_ff"] = data["d_ff"] // 4  # a quarter-width expert, as DeepSeekMoE splits experts
    return build(MoELMConfig, apply_overrides(data, overrides))


def model_init(args) -> int:
    path = pathlib.Path(args.dir)
    check_init_target(path, args.force)  # first: before torch loads (about 1 s)
    import torch

    from moeswarm.model.lm import build_local_model, save_model

    config = config_from_args(args.name, args.size, args.routing, args.set)
    model = build_local_model(config)
    try:
        save_model(model, path)
    except OSError as e:
        raise ConfigError(f"cannot write the model directory {path}: {e.strerror or e}") from e
    expert_params = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n or ".shared." in n)
    dense_params = sum(p.numel() for p in model.parameters()) - expert_params
    print(f"wrote {path}: model {config.name!r}, {config.n_layers} layers, MoE layers {list(config.moe_layers())}", flush=True)
    print(f"  routing {dataclasses.asdict(config.routing)}")
    print(f"  {dense_params / 1e6:.2f} M dense parameters (client), {expert_params / 1e6:.2f} M in experts (nodes)")
    print(f"  weights are random (seed {config.seed}); torch {torch.__version__}")
    print(f"next:  moeswarm swarm up --model {path}")
    return 0


def check_init_target(path: pathlib.Path, force: bool) -> None:
    """ConfigError unless `model init` may write to `path`: a new or empty folder, or with --force one
    that holds a model (or anything else). A checkpoint folder taken by mistake would otherwise serve
    the new random model from then on."""
    from moeswarm.model.model_dir import MANIFEST

    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path} exists and is not a folder; give a new or empty folder")
    if force or not path.exists():
        return
    if (path / MANIFEST).exists():
        raise ConfigError(f"{path} already holds a model; pass --force to overwrite it")
    try:
        found = sorted(entry.name for entry in path.iterdir())
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror or e}") from e
    if found:
        what = "a Hugging Face checkpoint" if "config.json" in found else ", ".join(found[:3]) + (", ..." if found[3:] else "")
        raise ConfigError(
            f"{path} is not empty and holds no moeswarm model (it holds {what}); give a new or empty folder, "
            "or pass --force to write into it anyway"
        )


def check_generate_flags(args) -> None:
    """ConfigError naming the flag, for `generate` flags out of range (before anything starts)."""
    if not args.local and not args.initial_peers:
        raise ConfigError("--initial-peers is required (or --local to run every expert in this process)")
    if args.threads < 1:
        raise ConfigError(f"--threads {args.threads}: must be at least 1")
    if not 0 < args.timeout < math.inf:
        raise ConfigError(f"--timeout {args.timeout}: must be a positive number of seconds")
    if args.max_new_tokens < 0:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens}: must be at least 0")
    if not 0 <= args.temperature < math.inf:
        raise ConfigError(f"--temperature {args.temperature}: must be a number >= 0 (0: greedy)")
    if not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p {args.top_p}: must be in (0, 1]")


def check_length(prompt_tokens: int, max_new_tokens: int, max_seq_len: int) -> None:
    """ConfigError where the prompt plus --max-new-tokens do not fit the model's max_seq_len."""
    if prompt_tokens + max_new_tokens <= max_seq_len:
        return
    if prompt_tokens >= max_seq_len:
        raise ConfigError(
            f"--prompt is {prompt_tokens} tokens (one per UTF-8 byte, plus one), and this model takes at most "
            f"{max_seq_len} (max_seq_len: prompt and new tokens together); shorten the prompt"
        )
    raise ConfigError(
        f"--max-new-tokens {max_new_tokens}: the {prompt_tokens}-token prompt leaves room for at most "
        f"{max_seq_len - prompt_tokens} (the model's max_seq_len is {max_seq_len})"
    )


def start_client_dht(args):
    """`generate`'s client DHT peer (None with --local), after checking every flag. Its process starts
    at once and imports and joins while the caller goes on: start it before importing torch."""
    check_generate_flags(args)
    if args.local:
        return None
    from moeswarm.protocol.client_dht import IsolatedDHT

    return IsolatedDHT(args.initial_peers, wait=False)


def run_generate(args) -> int:
    """args.client_dht: the client DHT peer, where the CLI started it before importing torch."""
    started = time.monotonic()
    dht = args.client_dht if "client_dht" in vars(args) else start_client_dht(args)
    try:
        return _generate(args, dht, started)
    finally:
        if dht is not None:
            dht.close()


def _generate(args, dht, started: float) -> int:
    from moeswarm.deploy.hf_generate import generate_hf
    from moeswarm.node.model_source import is_hf_checkpoint

    if is_hf_checkpoint(args.model):
        return generate_hf(args, dht, started)
    import torch

    from moeswarm.model.dispatcher import DispatchConfig
    from moeswarm.model.generation import SamplingConfig, generate
    from moeswarm.model.lm import open_model
    from moeswarm.model.model_dir import read_manifest

    torch.set_num_threads(args.threads)
    dispatch = DispatchConfig(timeout_s=args.timeout, wire_dtype=args.wire_dtype or "float32")
    manifest = read_manifest(args.model)  # before waiting for the swarm: the prompt must fit the model
    if args.model_name is not None and args.model_name != manifest.config.name:
        raise ConfigError(f"--model-name {args.model_name}: {args.model} holds model {manifest.config.name!r} "
                          "(--model-name is for Hugging Face checkpoints served under another name)")
    check_length(len(manifest.tokenizer.encode(args.prompt)), args.max_new_tokens, manifest.config.max_seq_len)
    peers = None if args.local else args.initial_peers
    with open_model(args.model, initial_peers=peers, swarm=args.swarm, dispatch=dispatch, dht=dht) as lm:
        tokenizer = lm.tokenizer
        prompt = torch.tensor([tokenizer.encode(args.prompt)])
        sampling = SamplingConfig(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
            eos_id=tokenizer.eos_id,
        )
        print(f"[loaded in {time.monotonic() - started:.1f} s]", file=sys.stderr, flush=True)
        decoder = tokenizer.stream_decoder()
        sys.stdout.write(args.prompt)

        def stream(tokens: list[int]) -> None:
            sys.stdout.write(decoder.push(tokens[0]))
            sys.stdout.flush()

        result = generate(lm.model, prompt, sampling, on_tokens=stream)
        sys.stdout.write(decoder.flush() + "\n")
        sys.stdout.flush()
        n_new = len(result.tokens[0])
        print(
            f"[{n_new} tokens; prompt {result.prefill_s * 1e3:.0f} ms; {result.decode_tokens_per_s:.1f} tokens/s decoding; "
            f"{result.expert_wait_s / max(result.prefill_s + result.decode_s, 1e-9):.0%} of the time waiting for experts]",
            file=sys.stderr, flush=True,
        )
        exit_at_once_on_ctrl_c()  # all is said: a Ctrl-C while the client closes just ends the process
    return 0
