"""Token-choice top-k router (Mixtral, GShard) and its auxiliary losses. Pure torch.

Legend: T tokens, D model dim, E experts, K experts per token.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.nn import functional as F


@dataclasses.dataclass(frozen=True)
class RouterOutput:
    topk_ids_TK: torch.Tensor  # long, the chosen experts of each token
    weights_TK: torch.Tensor  # combine weights (differentiable)
    logits_TE: torch.Tensor  # raw gate logits, for the auxiliary losses


class Router(nn.Module):
    """Linear gate D -> E, softmax, top-k per token; weights renormalised over the k chosen."""

    def __init__(self, d_model: int, n_experts: int, k: int, *, renormalize: bool = True):
        super().__init__()
        if not 1 <= k <= n_experts:
            raise ValueError(f"k={k}: must be between 1 and n_experts={n_experts}")
        self.n_experts, self.k, self.renormalize = n_experts, k, renormalize
        self.gate = nn.Linear(d_model, n_experts, bias=False)

    def forward(self, x_TD: torch.Tensor) -> RouterOutput:
        logits_TE = self.gate(x_TD)
        probs_TE = F.softmax(logits_TE, dim=-1, dtype=torch.float32)
        weights_TK, topk_ids_TK = torch.topk(probs_TE, self.k, dim=-1)
        if self.renormalize:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        return RouterOutput(topk_ids_TK, weights_TK, logits_TE)


def load_balancing_loss(logits_TE: torch.Tensor, topk_ids_TK: torch.Tensor) -> torch.Tensor:
    """Switch Transformer loss E * sum_e f_e * P_e: f_e the fraction of routed slots sent to e,
    P_e the mean router probability of e. Equals 1 when routing is uniform."""
    n_experts = logits_TE.shape[-1]
    probs_E = F.softmax(logits_TE, dim=-1, dtype=torch.float32).mean(dim=0)
    counts_E = torch.bincount(topk_ids_TK.reshape(-1), minlength=n_experts).to(probs_E.dtype)
    fraction_E = counts_E / topk_ids_TK.numel()
    return n_experts * torch.sum(fraction_E * probs_E)


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss: mean over tokens of logsumexp(logits)^2; keeps gate logits small."""
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()
