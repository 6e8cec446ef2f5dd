"""Decoder-only MoE transformer: RMSNorm, rotary attention with a KV cache, and an FFN per block that
is dense or an MoE layer (LocalMoE in one process, RemoteMoE on the swarm: same weights, same logits).

Legend: B batch, T new positions, S cached + new positions, D model dim, H heads, G key/value heads,
C head dim, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from moeswarm.model.experts import SwiGLUExpert
from moeswarm.model.lm_config import MoELMConfig

MoEFactory = Callable[[int], nn.Module]  # layer index -> MoE FFN module ([..., D] -> [..., D])


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_f = x.float()
        return (x_f * torch.rsqrt(x_f.square().mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rotary_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [max_len, head_dim/2] (rotate-half convention, as Llama / Mixtral in transformers)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x_BHTC: torch.Tensor, cos_TC2: torch.Tensor, sin_TC2: torch.Tensor) -> torch.Tensor:
    half = x_BHTC.shape[-1] // 2
    x1, x2 = x_BHTC[..., :half], x_BHTC[..., half:]
    cos, sin = cos_TC2.to(x_BHTC.dtype), sin_TC2.to(x_BHTC.dtype)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


@dataclasses.dataclass
class KVCache:
    """Keys and values of every layer for the positions seen so far; preallocated to max_len."""

    k_LBGSC: list[torch.Tensor]
    v_LBGSC: list[torch.Tensor]
    length: int = 0

    @classmethod
    def empty(cls, config: MoELMConfig, batch: int, max_len: int, dtype=torch.float32) -> "KVCache":
        shape = (batch, config.kv_heads, max_len, config.head_dim)
        return cls([torch.zeros(shape, dtype=dtype) for _ in range(config.n_layers)],
                   [torch.zeros(shape, dtype=dtype) for _ in range(config.n_layers)])

    @property
    def capacity(self) -> int:
        return self.k_LBGSC[0].shape[2]


class Attention(nn.Module):
    def __init__(self, config: MoELMConfig):
        super().__init__()
        self.n_heads, self.kv_heads, self.head_dim = config.n_heads, config.kv_heads, config.head_dim
        self.wq = nn.Linear(config.d_model, config.n_heads * config.head_dim, bias=False)
        self.wk = nn.Linear(config.d_model, config.kv_heads * config.head_dim, bias=False)
        self.wv = nn.Linear(config.d_model, config.kv_heads * config.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * config.head_dim, config.d_model, bias=False)

    def forward(self, x_BTD, cos_TC2, sin_TC2, start: int, cache: tuple[torch.Tensor, torch.Tensor] | None):
        B, T, _ = x_BTD.shape
        q = self.wq(x_BTD).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x_BTD).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x_BTD).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos_TC2, sin_TC2), apply_rotary(k, cos_TC2, sin_TC2)
        if cache is not None:  # write the new positions, attend over everything cached so far
            cache_k, cache_v = cache
            cache_k[:, :, start : start + T] = k
            cache_v[:, :, start : start + T] = v
            k, v = cache_k[:, :, : start + T], cache_v[:, :, : start + T]
        if self.kv_heads != self.n_heads:
            k = k.repeat_interleave(self.n_heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.n_heads // self.kv_heads, dim=1)
        S = k.shape[2]
        # query i (absolute position start+i) sees keys 0..start+i
        mask_TS = torch.arange(S)[None, :] <= torch.arange(start, start + T)[:, None]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None if T == 1 else mask_TS)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class Block(nn.Module):
    def __init__(self, config: MoELMConfig, ffn: nn.Module):
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = Attention(config)
        self.ffn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.ffn = ffn

    def forward(self, x_BTD, cos_TC2, sin_TC2, start: int, cache) -> torch.Tensor:
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), cos_TC2, sin_TC2, start, cache)
        return x_BTD + self.ffn(self.ffn_norm(x_BTD))


class MoETransformer(nn.Module):
    """Token ids [B, T] -> logits [B, T, V]. `moe_factory(layer)` builds each MoE FFN (local or remote);
    every other parameter is the model's own ("dense"), initialised deterministically from config.seed."""

    def __init__(self, config: MoELMConfig, moe_factory: MoEFactory):
        super().__init__()
        self.config = config
        moe_layers = set(config.moe_layers())
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(
            Block(config, moe_factory(i) if i in moe_layers else SwiGLUExpert(config.d_model, config.d_ff_dense))
            for i in range(config.n_layers)
        )
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.head = None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        cos, sin = rotary_tables(config.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        init_dense_weights(self, config.seed)

    def moe_layers(self) -> list[nn.Module]:
        return [self.blocks[i].ffn for i in self.config.moe_layers()]

    def forward(self, ids_BT: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        start = cache.length if cache is not None else 0
        T = ids_BT.shape[1]
        if start + T > self.config.max_seq_len or (cache is not None and start + T > cache.capacity):
            limit = min(self.config.max_seq_len, cache.capacity if cache is not None else self.config.max_seq_len)
            raise ValueError(f"sequence of {start + T} positions exceeds the limit of {limit} (max_seq_len / cache size)")
        cos, sin = self.rope_cos[start : start + T], self.rope_sin[start : start + T]
        x_BTD = self.embed(ids_BT)
        for i, block in enumerate(self.blocks):
            layer_cache = (cache.k_LBGSC[i], cache.v_LBGSC[i]) if cache is not None else None
            x_BTD = block(x_BTD, cos, sin, start, layer_cache)
        if cache is not None:
            cache.length = start + T
        x_BTD = self.norm(x_BTD)
        head_weight = self.embed.weight if self.head is None else self.head.weight
        return F.linear(x_BTD, head_weight).float()

    def aux_losses(self) -> dict[str, torch.Tensor]:
        """Mean load-balancing loss, router z-loss and capacity-dropped fraction over the MoE layers,
        from the last forward."""
        routings = [moe.last_routing for moe in self.moe_layers() if moe.last_routing is not None]
        if not routings:
            return {}
        return {
            "load_balancing": torch.stack([r.load_balancing_loss() for r in routings]).mean(),
            "z_loss": torch.stack([r.z_loss() for r in routings]).mean(),
            "dropped_fraction": torch.tensor(sum(r.dropped_fraction for r in routings) / len(routings)),
        }


def is_expert_param(name: str) -> bool:
    """Parameters that belong to experts (hosted by nodes or created from (seed, uid)), not the dense part."""
    return ".experts." in name or ".shared." in name


@torch.no_grad()
def init_dense_weights(model: nn.Module, seed: int) -> None:
    """GPT-2 style init of every non-expert parameter, drawn in sorted-name order from one generator,
    so a local and a remote model built from the same config get identical dense weights."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        if is_expert_param(name):
            continue
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        elif param.dim() >= 2:
            param.normal_(0.0, 0.02, generator=generator)
        else:
            param.zero_()
