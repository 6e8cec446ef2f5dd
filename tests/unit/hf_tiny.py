"""Tiny random-initialised Hugging Face MoE checkpoints, built and saved locally (no network).

One builder per supported family (hidden 64, 8 experts, top-2, vocab 256, 4 heads) and `save_tiny`,
which writes a checkpoint in either on-disk expert layout, in a chosen dtype, optionally sharded.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss")

# Routed-expert width F = 96: every matrix is non-square (a transposed read fails on shape), and F is a
# multiple of 32 like every released checkpoint's. (For other F, torch's CPU SiLU takes a scalar tail on
# transformers' strided gate half but not on our contiguous one, so fp32 differs in the last bit.)
_COMMON: dict[str, Any] = dict(
    vocab_size=256,
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    num_experts_per_tok=2,
    initializer_range=0.08,  # larger than the 0.02 default, so one expert visibly moves the logits
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
_CONFIGS: dict[str, dict[str, Any]] = {
    "mixtral": dict(num_hidden_layers=2, intermediate_size=96, num_local_experts=8),
    "qwen2_moe": dict(
        num_hidden_layers=2,
        intermediate_size=128,
        moe_intermediate_size=96,
        shared_expert_intermediate_size=40,
        num_experts=8,
    ),
    # Layer 1 dense: exercises `mlp_only_layers`; True as the released Qwen3 checkpoints have it.
    "qwen3_moe": dict(
        num_hidden_layers=3,
        intermediate_size=128,
        moe_intermediate_size=96,
        num_experts=8,
        mlp_only_layers=[1],
        norm_topk_prob=True,
    ),
    "olmoe": dict(num_hidden_layers=2, intermediate_size=96, num_experts=8),
    "deepseek_v3": dict(
        num_hidden_layers=3,
        first_k_dense_replace=1,
        intermediate_size=128,
        moe_intermediate_size=96,
        n_routed_experts=8,
        n_shared_experts=1,
        n_group=4,
        topk_group=2,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        num_key_value_heads=4,  # MLA needs as many KV heads as query heads
        q_lora_rank=32,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
    ),
    # swiglu_limit 0.5 (released: 7.0) so the clamps actually bite on tiny random weights.
    "gpt_oss": dict(
        num_hidden_layers=2,
        intermediate_size=96,
        num_local_experts=8,
        head_dim=16,
        sliding_window=8,
        swiglu_limit=0.5,
        max_position_embeddings=131072,  # YaRN's factor 32 x original 4096; anything else warns
    ),
}


def tiny_config(family: str, **overrides: Any):
    """The transformers config of the tiny model of `family`, with `overrides` applied."""
    return AutoConfig.for_model(family, **{**_COMMON, **_CONFIGS[family], **overrides})


def build_tiny(family: str, *, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A tiny random-initialised model of `family` in fp32, the same for the same seed and overrides."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides))
    if family == "deepseek_v3":
        # Zero after init; a non-zero bias makes selection differ from the weights that are applied.
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(8) * 0.1)
    return model.eval()


def save_tiny(
    family: str,
    directory: str | Path,
    *,
    layout: str = "per_expert",
    dtype: torch.dtype = torch.float32,
    shards: int = 1,
    seed: int = 0,
    **overrides: Any,
) -> PreTrainedModel:
    """Build the tiny `family` model, save it to `directory` and return the saved model (in `dtype`).

    layout: "per_expert" (one tensor per expert, `save_pretrained`'s default) or "fused" (3-D tensors,
    `save_original_format=False`). shards > 1 splits the weights over about that many files.
    overrides: config fields to change (e.g. intermediate_size=24).
    """
    if layout not in ("per_expert", "fused"):
        raise ValueError(f"layout must be 'per_expert' or 'fused', not {layout!r}")
    model = build_tiny(family, seed=seed, **overrides).to(dtype)
    total_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    max_shard_size = max(total_bytes // shards, 1) if shards > 1 else "50GB"
    model.save_pretrained(directory, max_shard_size=max_shard_size, save_original_format=layout == "per_expert")
    return model


def save_tiny_tokenizer(directory: str | Path) -> None:
    """A byte-level tokenizer for the tiny models' 256-token vocabulary, built here (no download):
    ids 0-2 are <pad>, <s>, </s> (the configs' special ids), then one token per byte symbol (the 3 rarest
    of the 256 byte symbols left out), no merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet())[: 256 - len(vocab)]:
        vocab[symbol] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(directory)


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run tiny models on one intra-op thread: on a busy 2-core machine OpenMP's spinning threads made
    these tests 5x slower (43 s instead of 9 s). Results are the same either way (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
