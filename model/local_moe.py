"""An MoE FFN block computed in one process: the reference RemoteMoE must match. Pure torch."""

from __future__ import annotations

import torch
from torch import nn

from moeswarm.model.experts import init_expert
from moeswarm.model.router import Router
from moeswarm.protocol.spec import format_uid


class LocalMoE(nn.Module):
    """Router + SwiGLU experts. With the same (model, layer, seed) its experts equal what nodes host."""

    def __init__(self, *, model: str, layer: int, d_model: int, d_ff: int, n_experts: int, k: int, seed: int = 0):
        super().__init__()
        self.router = Router(d_model, n_experts, k)
        self.uids = [format_uid(model, layer, e) for e in range(n_experts)]
        self.experts = nn.ModuleList(init_expert(d_model, d_ff, seed=seed, uid=uid) for uid in self.uids)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_TD = x.reshape(-1, x.shape[-1])
        routing = self.router(x_TD)
        T, K = routing.topk_ids_TK.shape
        y_TKD = torch.zeros(T, K, x_TD.shape[-1], dtype=torch.float32)
        for e, expert in enumerate(self.experts):
            token_idx, slot_idx = torch.where(routing.topk_ids_TK == e)
            if token_idx.numel():
                y_TKD = y_TKD.index_put((token_idx, slot_idx), expert(x_TD[token_idx]).float())
        served_TK = torch.ones(T, K, dtype=torch.bool)
        return combine(y_TKD, routing.weights_TK, served_TK).to(x.dtype).reshape(x.shape)


def combine(y_TKD: torch.Tensor, weights_TK: torch.Tensor, served_TK: torch.Tensor) -> torch.Tensor:
    """Gate-weighted sum of expert outputs in fp32. Where an expert was dropped (all its replicas
    failed) the token's remaining weights are rescaled to the token's original total weight. Pure."""
    weights_TK = weights_TK.float()
    if not bool(served_TK.all()):
        kept_TK = weights_TK * served_TK
        scale_T1 = weights_TK.sum(dim=-1, keepdim=True) / kept_TK.sum(dim=-1, keepdim=True).clamp_min(1e-30)
        weights_TK = kept_TK * scale_T1
    return torch.einsum("tk,tkd->td", weights_TK, y_TKD.float())

