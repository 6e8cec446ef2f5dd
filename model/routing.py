"""Every routing mode as a small gate module (x_TD -> Routing), its config, and the auxiliary losses.
Pure torch. Fine-grained MoE (many small experts, k of 8 or more) is mode "topk" with a large E.

Legend: T tokens, D model dim, E routed experts, K slots per token (shared included),
G groups, M experts per group, A groups chosen per token, B experts chosen per chosen group.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from moeswarm.protocol.errors import ConfigError

MODES = ("topk", "switch", "soft", "hierarchical")


def _require(condition: bool, key: str, value: object, rule: str) -> None:
    if not condition:
        raise ConfigError(f"{key}={value!r}: {rule}")


def _mean_over_tokens(values: torch.Tensor) -> torch.Tensor:
    # [T] or [T, E] -> mean over tokens; an empty batch gives 0 rather than the NaN of an empty mean.
    return values.sum(dim=0) / max(values.shape[0], 1)


def _balance(probs_TE: torch.Tensor, topk_ids_TK: torch.Tensor) -> torch.Tensor:
    n_experts = probs_TE.shape[-1]
    counts_E = torch.bincount(topk_ids_TK.reshape(-1), minlength=n_experts).to(probs_TE.dtype)
    fraction_E = counts_E / max(topk_ids_TK.numel(), 1)
    return n_experts * torch.sum(fraction_E * _mean_over_tokens(probs_TE))


def load_balancing_loss(logits_TE: torch.Tensor, topk_ids_TK: torch.Tensor) -> torch.Tensor:
    """Switch Transformer loss E * sum_e f_e * P_e: f_e the fraction of slots sent to e, P_e the mean
    softmax probability of e. Equals 1 when routing is uniform; 0 for an empty batch. fp32 scalar."""
    return _balance(F.softmax(logits_TE, dim=-1, dtype=torch.float32), topk_ids_TK)


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss: mean over tokens of logsumexp(logits)^2; keeps gate logits small. fp32 scalar."""
    return _mean_over_tokens(torch.logsumexp(logits_TE.float(), dim=-1).square())


@dataclasses.dataclass(frozen=True)
class Routing:
    """What a gate decided for T tokens. Slot order: routed slots by gate order, then the shared ones."""

    topk_ids_TK: torch.Tensor  # long; routed ids in [0, E), shared ids in [E, E + n_shared)
    weights_TK: torch.Tensor  # fp32 combine weights, differentiable; exactly 0 where mask_TK is False
    logits_TE: torch.Tensor  # raw gate logits over the E routed experts (hierarchical: level 2)
    probs_TE: torch.Tensor  # fp32 routing probability of each routed expert (rows sum to 1)
    mask_TK: torch.Tensor  # bool; False = dropped by capacity, the residual carries that slot
    n_shared: int = 0  # the last n_shared slots are always-on shared experts (weight 1, mask True)
    dropped_fraction: float = 0.0  # dropped routed (token, slot) assignments / all routed ones
    group_logits_TG: torch.Tensor | None = None  # hierarchical only: level-1 gate logits

    def load_balancing_loss(self) -> torch.Tensor:
        """E * sum_e f_e * P_e over routed slots (f_e counted before capacity drops); 1 if uniform."""
        n_routed = self.topk_ids_TK.shape[1] - self.n_shared
        return _balance(self.probs_TE, self.topk_ids_TK[:, :n_routed])

    def z_loss(self) -> torch.Tensor:
        """ST-MoE z-loss of the routed gate logits; hierarchical adds the z-loss of the group logits."""
        loss = router_z_loss(self.logits_TE)
        return loss if self.group_logits_TG is None else loss + router_z_loss(self.group_logits_TG)


def _renormalize(weights_TK: torch.Tensor) -> torch.Tensor:
    return weights_TK / weights_TK.sum(dim=-1, keepdim=True)


def _all_kept(ids_TK: torch.Tensor) -> torch.Tensor:
    return torch.ones(ids_TK.shape, dtype=torch.bool, device=ids_TK.device)


class TopKGate(nn.Module):
    """Token-choice top-k (Shazeer et al. 2017; GShard; Mixtral; GLaM; fine-grained MoE as in
    DeepSeekMoE): linear gate D -> E, fp32 softmax, top-k per token, by default renormalised over
    the k chosen. Ids are in torch.topk order (descending probability). No capacity limit."""

    def __init__(self, d_model: int, n_experts: int, k: int, *, renormalize: bool = True):
        super().__init__()
        _require(1 <= k <= n_experts, "k", k, f"must be between 1 and n_experts={n_experts}")
        self.n_experts, self.n_shared, self.n_total, self.k = n_experts, 0, n_experts, k
        self.renormalize = renormalize
        self.gate = nn.Linear(d_model, n_experts, bias=False)

    def forward(self, x_TD: torch.Tensor) -> Routing:
        logits_TE = self.gate(x_TD)
        probs_TE = F.softmax(logits_TE, dim=-1, dtype=torch.float32)
        weights_TK, topk_ids_TK = torch.topk(probs_TE, self.k, dim=-1)
        if self.renormalize:
            weights_TK = _renormalize(weights_TK)
        return Routing(topk_ids_TK, weights_TK, logits_TE, probs_TE, _all_kept(topk_ids_TK))


def admit_in_token_order(ids_T: torch.Tensor, n_experts: int, capacity: int) -> torch.Tensor:
    """[T] bool: token t is admitted iff fewer than `capacity` earlier tokens chose the same expert."""
    onehot_TE = F.one_hot(ids_T, n_experts)
    position_T = (torch.cumsum(onehot_TE, dim=0) * onehot_TE).sum(dim=-1) - 1
    return position_T < capacity


class SwitchGate(nn.Module):
    """Switch Transformer (Fedus et al. 2021): top-1 with weight = the chosen softmax probability
    (not renormalised). Each expert takes at most max(1, ceil(capacity_factor * T / E)) tokens of
    this batch, admitted in token order; the rest are dropped (mask False, weight 0) and ride the
    residual. capacity_factor=None never drops."""

    def __init__(self, d_model: int, n_experts: int, *, capacity_factor: float | None = 1.25):
        super().__init__()
        _require(n_experts >= 1, "n_experts", n_experts, "must be >= 1")
        _require(capacity_factor is None or capacity_factor > 0, "capacity_factor", capacity_factor,
                 "must be > 0, or None to never drop tokens")
        self.n_experts, self.n_shared, self.n_total, self.k = n_experts, 0, n_experts, 1
        self.capacity_factor = capacity_factor
        self.gate = nn.Linear(d_model, n_experts, bias=False)

    def capacity(self, n_tokens: int) -> int:
        """Most tokens one expert takes from a batch of n_tokens (n_tokens if capacity is unlimited)."""
        if self.capacity_factor is None:
            return n_tokens
        return max(1, math.ceil(self.capacity_factor * n_tokens / self.n_experts))

    def forward(self, x_TD: torch.Tensor) -> Routing:
        logits_TE = self.gate(x_TD)
        probs_TE = F.softmax(logits_TE, dim=-1, dtype=torch.float32)
        weights_TK, topk_ids_TK = torch.topk(probs_TE, 1, dim=-1)
        n_tokens = x_TD.shape[0]
        mask_TK = admit_in_token_order(topk_ids_TK[:, 0], self.n_experts, self.capacity(n_tokens))[:, None]
        dropped = n_tokens - int(mask_TK.sum())
        return Routing(topk_ids_TK, weights_TK.masked_fill(~mask_TK, 0.0), logits_TE, probs_TE, mask_TK,
                       dropped_fraction=dropped / max(n_tokens, 1))


class SoftGate(nn.Module):
    """Dense soft gating (Jacobs, Jordan, Nowlan & Hinton 1991, "Adaptive Mixtures of Local
    Experts"): every token goes to all E experts (k = E, ids = arange(E)), weights = full softmax."""

    def __init__(self, d_model: int, n_experts: int):
        super().__init__()
        _require(n_experts >= 1, "n_experts", n_experts, "must be >= 1")
        self.n_experts, self.n_shared, self.n_total, self.k = n_experts, 0, n_experts, n_experts
        self.gate = nn.Linear(d_model, n_experts, bias=False)

    def forward(self, x_TD: torch.Tensor) -> Routing:
        logits_TE = self.gate(x_TD)
        probs_TE = F.softmax(logits_TE, dim=-1, dtype=torch.float32)
        ids_TE = torch.arange(self.n_experts, device=x_TD.device).expand(x_TD.shape[0], -1).contiguous()
        return Routing(ids_TE, probs_TE, logits_TE, probs_TE, _all_kept(ids_TE))


class HierarchicalGate(nn.Module):
    """Hierarchical mixture of experts (Jordan & Jacobs 1994), two levels, sparse. Level 1:
    group_gate D -> G, softmax, top-k_groups groups. Level 2: gate D -> E (E = G*M), softmax within
    each group's M logits, top-k_per_group inside each chosen group. Expert id = g*M + m, weight =
    p(g) * p(m|g), each level renormalised over its chosen entries when renormalize=True.
    Slots are group-major: chosen groups by descending p(g), experts by descending p(m|g)."""

    def __init__(self, d_model: int, n_groups: int, experts_per_group: int, *, k_groups: int,
                 k_per_group: int, renormalize: bool = True):
        super().__init__()
        _require(1 <= k_groups <= n_groups, "k_groups", k_groups, f"must be between 1 and n_groups={n_groups}")
        _require(1 <= k_per_group <= experts_per_group, "k_per_group", k_per_group,
                 f"must be between 1 and experts_per_group={experts_per_group}")
        self.n_groups, self.experts_per_group = n_groups, experts_per_group
        self.k_groups, self.k_per_group, self.renormalize = k_groups, k_per_group, renormalize
        self.n_experts = self.n_total = n_groups * experts_per_group
        self.n_shared, self.k = 0, k_groups * k_per_group
        self.group_gate = nn.Linear(d_model, n_groups, bias=False)
        self.gate = nn.Linear(d_model, self.n_experts, bias=False)

    def forward(self, x_TD: torch.Tensor) -> Routing:
        T, G, M, A = x_TD.shape[0], self.n_groups, self.experts_per_group, self.k_groups
        group_logits_TG, logits_TE = self.group_gate(x_TD), self.gate(x_TD)
        p_group_TG = F.softmax(group_logits_TG, dim=-1, dtype=torch.float32)
        p_expert_TGM = F.softmax(logits_TE.reshape(T, G, M), dim=-1, dtype=torch.float32)
        w_group_TA, group_ids_TA = torch.topk(p_group_TG, A, dim=-1)
        p_chosen_TAM = p_expert_TGM.gather(1, group_ids_TA[:, :, None].expand(T, A, M))
        w_expert_TAB, expert_ids_TAB = torch.topk(p_chosen_TAM, self.k_per_group, dim=-1)
        if self.renormalize:
            w_group_TA, w_expert_TAB = _renormalize(w_group_TA), _renormalize(w_expert_TAB)
        weights_TK = (w_group_TA[:, :, None] * w_expert_TAB).reshape(T, self.k)
        topk_ids_TK = (group_ids_TA[:, :, None] * M + expert_ids_TAB).reshape(T, self.k)
        probs_TE = (p_group_TG[:, :, None] * p_expert_TGM).reshape(T, G * M)
        return Routing(topk_ids_TK, weights_TK, logits_TE, probs_TE, _all_kept(topk_ids_TK),
                       group_logits_TG=group_logits_TG)


class SharedGate(nn.Module):
    """Always-on shared experts next to a routed gate (DeepSpeed-MoE PR-MoE, Qwen-MoE, DeepSeekMoE):
    appends n_shared slots with ids E..E+n_shared-1, weight 1.0 and mask True to every token. The
    routed slots, and the losses (computed over routed slots only), are the inner gate's."""

    def __init__(self, inner: nn.Module, n_shared: int):
        super().__init__()
        _require(n_shared >= 1, "n_shared", n_shared, "must be >= 1 (use the inner gate alone for none)")
        _require(inner.n_shared == 0, "inner.n_shared", inner.n_shared, "must be 0: wrap a routed gate once")
        self.inner, self.n_shared = inner, n_shared
        self.n_experts, self.k = inner.n_experts, inner.k + n_shared
        self.n_total = inner.n_experts + n_shared

    def forward(self, x_TD: torch.Tensor) -> Routing:
        routed = self.inner(x_TD)
        shape = (x_TD.shape[0], self.n_shared)
        ids_TS = torch.arange(self.n_experts, self.n_total, device=x_TD.device).expand(shape)
        weights_TS = torch.ones(shape, dtype=torch.float32, device=x_TD.device)
        return dataclasses.replace(
            routed,
            topk_ids_TK=torch.cat([routed.topk_ids_TK, ids_TS], dim=1),
            weights_TK=torch.cat([routed.weights_TK, weights_TS], dim=1),
            mask_TK=torch.cat([routed.mask_TK, _all_kept(ids_TS)], dim=1),
            n_shared=self.n_shared,
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class RoutingConfig:
    """How one MoE layer routes tokens. Keys are reported as routing.<field> in errors."""

    mode: Literal["topk", "switch", "soft", "hierarchical"] = "topk"  # gate family, see the gates above
    n_experts: int  # routed experts E (hierarchical: all groups together)
    k: int = 2  # topk: experts per token; switch: must be 1; soft: ignored (k = E); hierarchical: per chosen group
    renormalize: bool = True  # topk/hierarchical: renormalise the chosen probabilities to sum to 1
    capacity_factor: float | None = 1.25  # switch only: expert capacity = ceil(cf * T / E); None never drops
    n_shared: int = 0  # always-on shared experts appended after the routed ones (ids E..E+n_shared-1)
    n_groups: int = 1  # hierarchical only: groups G; n_experts must be divisible by it
    k_groups: int = 1  # hierarchical only: groups chosen per token

    def __post_init__(self) -> None:
        _require(self.mode in MODES, "routing.mode", self.mode, f"one of {', '.join(map(repr, MODES))}")
        _require(self.n_experts >= 1, "routing.n_experts", self.n_experts, "must be >= 1")
        _require(self.n_shared >= 0, "routing.n_shared", self.n_shared, "must be >= 0")
        _require(self.capacity_factor is None or self.capacity_factor > 0, "routing.capacity_factor",
                 self.capacity_factor, "must be > 0, or null to never drop tokens")
        _require(self.mode == "hierarchical" or self.n_groups == 1, "routing.n_groups", self.n_groups,
                 "groups are only used by mode='hierarchical'; leave it at 1")
        _require(self.n_groups >= 1 and self.n_experts % self.n_groups == 0, "routing.n_groups", self.n_groups,
                 f"must be >= 1 and divide n_experts={self.n_experts}")
        _require(1 <= self.k_groups <= self.n_groups, "routing.k_groups", self.k_groups,
                 f"must be between 1 and n_groups={self.n_groups}")
        if self.mode == "topk":
            _require(1 <= self.k <= self.n_experts, "routing.k", self.k,
                     f"must be between 1 and n_experts={self.n_experts}")
        elif self.mode == "switch":
            _require(self.k == 1, "routing.k", self.k, "switch routes each token to one expert; set k: 1")
        elif self.mode == "hierarchical":
            per_group = self.n_experts // self.n_groups
            _require(1 <= self.k <= per_group, "routing.k", self.k,
                     f"experts per chosen group: must be between 1 and n_experts/n_groups={per_group}")


def make_gate(config: RoutingConfig, d_model: int) -> nn.Module:
    """The gate `config` describes, wrapped in SharedGate when config.n_shared > 0."""
    if config.mode == "topk":
        gate = TopKGate(d_model, config.n_experts, config.k, renormalize=config.renormalize)
    elif config.mode == "switch":
        gate = SwitchGate(d_model, config.n_experts, capacity_factor=config.capacity_factor)
    elif config.mode == "soft":
        gate = SoftGate(d_model, config.n_experts)
    else:
        gate = HierarchicalGate(d_model, config.n_groups, config.n_experts // config.n_groups,
                                k_groups=config.k_groups, k_per_group=config.k, renormalize=config.renormalize)
    return SharedGate(gate, config.n_shared) if config.n_shared else gate
