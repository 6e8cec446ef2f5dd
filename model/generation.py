"""Autoregressive generation for MoETransformer: a client-side KV cache, so each decoding step runs one
position through the model and calls each MoE layer's experts once (one RPC per node per layer).

Legend: B sequences, T prompt length, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import torch

from moeswarm.model.transformer import KVCache, MoETransformer


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    max_new_tokens: int = 64  # tokens generated per sequence at most
    temperature: float = 0.0  # 0 = greedy; otherwise logits are divided by it before sampling
    top_p: float = 1.0  # nucleus sampling: keep the smallest set of tokens with this much probability
    seed: int | None = None  # sampling seed (None: nondeterministic)
    eos_id: int | None = None  # stop a sequence when it emits this token (None: never)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: must be >= 0")
        if not self.temperature >= 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1]")


@dataclasses.dataclass
class GenerationResult:
    tokens: list[list[int]]  # the new tokens of each sequence (EOS included when it stopped there)
    prefill_s: float  # time to run the prompt
    decode_s: float  # time of the decoding steps after the first token
    steps: int  # decoding steps (model calls after the prompt)
    expert_wait_s: float  # part of the total spent waiting for remote experts (0 for a local model)
    prefill_expert_wait_s: float = 0.0  # the part of expert_wait_s spent on the prompt

    @property
    def decode_expert_wait_s(self) -> float:
        """Expert wait of the decoding steps (compare with decode_s / steps)."""
        return self.expert_wait_s - self.prefill_expert_wait_s

    @property
    def decode_tokens_per_s(self) -> float:
        return len(self.tokens) * self.steps / self.decode_s if self.decode_s > 0 else float("nan")


def pick_next(logits_BV: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Next token of each sequence: argmax when temperature is 0, else top-p sampling. Pure."""
    if sampling.temperature == 0:
        return logits_BV.argmax(dim=-1)
    probs_BV = torch.softmax(logits_BV.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        sorted_BV, order_BV = probs_BV.sort(dim=-1, descending=True)
        before_BV = sorted_BV.cumsum(dim=-1) - sorted_BV  # mass of the tokens ranked above each one
        sorted_BV = sorted_BV.masked_fill(before_BV >= sampling.top_p, 0.0)  # the top token always stays
        probs_BV = torch.zeros_like(probs_BV).scatter(-1, order_BV, sorted_BV)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: MoETransformer,
    prompt_BT: torch.Tensor,
    sampling: SamplingConfig = SamplingConfig(),
    *,
    on_tokens: Callable[[list[int]], None] | None = None,
    use_cache: bool = True,
) -> GenerationResult:
    """Continue each prompt (equal lengths, B x T token ids). `on_tokens` gets each step's B new tokens
    as they are produced (for streaming). use_cache=False recomputes the whole sequence every step."""
    if prompt_BT.dim() != 2 or prompt_BT.shape[1] == 0:
        raise ValueError(f"prompt must be [batch, length >= 1] token ids, got shape {list(prompt_BT.shape)}")
    B, T = prompt_BT.shape
    total = T + sampling.max_new_tokens
    if total > model.config.max_seq_len:
        raise ValueError(f"prompt ({T}) + max_new_tokens ({sampling.max_new_tokens}) exceeds max_seq_len={model.config.max_seq_len}")
    generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
    cache = KVCache.empty(model.config, B, total) if use_cache else None
    clients = {id(m.client): m.client for m in model.modules() if hasattr(m, "client") and hasattr(m.client, "expert_wait_s")}
    wait_before = sum(c.expert_wait_s for c in clients.values())
    was_training = model.training
    model.eval()  # the caller's mode comes back after (a sample taken mid-training)
    try:
        tokens: list[list[int]] = [[] for _ in range(B)]
        finished = torch.zeros(B, dtype=torch.bool)
        sequence_BT, step_input_BT = prompt_BT, prompt_BT
        started = time.perf_counter()
        prefill_s, prefill_wait_s, steps = 0.0, 0.0, 0
        for i in range(sampling.max_new_tokens):
            logits_BTV = model(step_input_BT if use_cache else sequence_BT, cache)
            if i == 0:
                prefill_s = time.perf_counter() - started
                prefill_wait_s = sum(c.expert_wait_s for c in clients.values()) - wait_before
            else:
                steps += 1
            next_B = pick_next(logits_BTV[:, -1], sampling, generator)
            if sampling.eos_id is not None:
                next_B = next_B.masked_fill(finished, sampling.eos_id)
            new = next_B.tolist()
            for b in range(B):
                if not finished[b]:
                    tokens[b].append(new[b])
            if on_tokens is not None:
                on_tokens([t if not f else -1 for t, f in zip(new, finished.tolist())])
            if sampling.eos_id is not None:
                finished |= next_B == sampling.eos_id
                if bool(finished.all()):
                    break
            step_input_BT = next_B[:, None]
            sequence_BT = torch.cat([sequence_BT, step_input_BT], dim=1)
        total_s = time.perf_counter() - started
        wait_s = sum(c.expert_wait_s for c in clients.values()) - wait_before
        return GenerationResult(tokens, prefill_s, total_s - prefill_s, steps, wait_s, prefill_wait_s)
    finally:
        model.train(was_training)
