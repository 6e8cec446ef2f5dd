"""An MoE FFN block computed in one process: the reference RemoteMoE must match. Pure torch.

Legend: T tokens, K slots per token (routed + shared), D model dim, E routed experts, S shared experts.
"""

from __future__ import annotations

import torch
from torch import nn

from moeswarm.model.experts import init_expert
from moeswarm.model.routing import Routing, TopKGate
from moeswarm.protocol.spec import format_uid


def expert_uids(model: str, layer: int, gate: nn.Module) -> list[str]:
    """UIDs of one layer's experts: routed 0..E-1, then shared E..E+S-1 (the ids a gate emits)."""
    return [format_uid(model, layer, e) for e in range(gate.n_experts + gate.n_shared)]


def make_shared(uids: list[str], gate: nn.Module, d_model: int, d_ff: int, seed: int) -> nn.ModuleList:
    """The always-on experts, created exactly as a node would create them from (seed, uid)."""
    return nn.ModuleList(init_expert(d_model, d_ff, seed=seed, uid=uid) for uid in uids[gate.n_experts :])


class LocalMoE(nn.Module):
    """Gate + SwiGLU experts. With the same (model, layer, seed) its experts equal what nodes host.

    `gate` is any routing module of model/routing.py; by default top-k softmax over n_experts."""

    def __init__(
        self, *, model: str, layer: int, d_model: int, d_ff: int, n_experts: int = 0, k: int = 0, seed: int = 0,
        gate: nn.Module | None = None,
    ):
        super().__init__()
        self.router = gate if gate is not None else TopKGate(d_model, n_experts, k)
        self.uids = expert_uids(model, layer, self.router)
        n_routed = self.router.n_experts
        self.experts = nn.ModuleList(init_expert(d_model, d_ff, seed=seed, uid=uid) for uid in self.uids[:n_routed])
        self.shared = make_shared(self.uids, self.router, d_model, d_ff, seed)
        self.last_routing: Routing | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_TD = x.reshape(-1, x.shape[-1])
        routing = self.router(x_TD)
        self.last_routing = routing
        T, K = routing.topk_ids_TK.shape
        n_routed_slots = K - routing.n_shared
        y_TKD = torch.zeros(T, n_routed_slots, x_TD.shape[-1], dtype=torch.float32)
        sent_TK = routing.mask_TK[:, :n_routed_slots]
        for e, expert in enumerate(self.experts):
            token_idx, slot_idx = torch.where((routing.topk_ids_TK[:, :n_routed_slots] == e) & sent_TK)
            if token_idx.numel():
                y_TKD = y_TKD.index_put((token_idx, slot_idx), expert(x_TD[token_idx]).float())
        y_TKD = with_shared_outputs(y_TKD, self.shared, x_TD)
        return combine(y_TKD, routing.weights_TK).to(x.dtype).reshape(x.shape)


def with_shared_outputs(y_TKD: torch.Tensor, shared: nn.ModuleList, x_TD: torch.Tensor) -> torch.Tensor:
    """Append the shared experts' outputs as the last S slots."""
    if len(shared) == 0:
        return y_TKD
    y_TSD = torch.stack([expert(x_TD).float() for expert in shared], dim=1)
    return torch.cat([y_TKD, y_TSD], dim=1)


def combine(y_TKD: torch.Tensor, weights_TK: torch.Tensor, served_TK: torch.Tensor | None = None) -> torch.Tensor:
    """Gate-weighted sum of expert outputs in fp32. Where an expert was dropped (all its replicas
    failed; served_TK False) the token's remaining weights are rescaled to the token's original total
    weight. served_TK=None: every slot served. Pure. (Capacity-dropped slots are not "dropped
    experts": their weight is already 0 and they count as served.)"""
    weights_TK = weights_TK.float()
    if served_TK is not None and not bool(served_TK.all()):
        kept_TK = weights_TK * served_TK
        scale_T1 = weights_TK.sum(dim=-1, keepdim=True) / kept_TK.sum(dim=-1, keepdim=True).clamp_min(1e-30)
        weights_TK = kept_TK * scale_T1
    return torch.einsum("tk,tkd->td", weights_TK, y_TKD.float())
