"""model/routing.py: every gate against a hand-written reference formula, capacity drops, shared
slots, the auxiliary losses, gradients, config validation and edge shapes.

Legend: T tokens, D model dim, E routed experts, K slots per token, G groups, M experts per group.
"""

import math
import re

import pytest
import torch
from torch.nn import functional as F

from moeswarm.model.router import Router, RouterOutput
from moeswarm.model.routing import (
    HierarchicalGate,
    Routing,
    RoutingConfig,
    SharedGate,
    SoftGate,
    SwitchGate,
    TopKGate,
    load_balancing_loss,
    make_gate,
    router_z_loss,
)
from moeswarm.protocol.errors import ConfigError

T, D = 12, 8

CONFIGS = {
    "topk": RoutingConfig(n_experts=8, k=2),
    "topk-raw": RoutingConfig(n_experts=8, k=3, renormalize=False),
    "fine-grained": RoutingConfig(n_experts=64, k=8),
    "switch": RoutingConfig(mode="switch", n_experts=4, k=1, capacity_factor=1.0),
    "switch-nodrop": RoutingConfig(mode="switch", n_experts=4, k=1, capacity_factor=None),
    "soft": RoutingConfig(mode="soft", n_experts=4),
    "hierarchical": RoutingConfig(mode="hierarchical", n_experts=12, n_groups=3, k_groups=2, k=2),
    "hierarchical-raw": RoutingConfig(mode="hierarchical", n_experts=8, n_groups=4, k_groups=2, k=1,
                                      renormalize=False),
    "shared-topk": RoutingConfig(n_experts=8, k=2, n_shared=2),
    "shared-switch": RoutingConfig(mode="switch", n_experts=4, k=1, capacity_factor=1.0, n_shared=1),
    "shared-hierarchical": RoutingConfig(mode="hierarchical", n_experts=8, n_groups=2, k_groups=1, k=2,
                                         n_shared=1),
}


def _x_TD(t: int = T, seed: int = 0) -> torch.Tensor:
    return torch.randn(t, D, generator=torch.Generator().manual_seed(seed))


def _gate(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return make_gate(CONFIGS[name], D)


def _routed_gates(gate):
    """The Linear layers whose weights decide routing."""
    inner = gate.inner if isinstance(gate, SharedGate) else gate
    return [m for m in (getattr(inner, "group_gate", None), inner.gate) if m is not None]


# ---------------------------------------------------------------- topk


@pytest.mark.parametrize("E,k", [(4, 1), (8, 2), (64, 8), (8, 8)])
@pytest.mark.parametrize("renormalize", [True, False])
def test_topk_equals_the_reference_softmax_topk_renormalise(E, k, renormalize):
    torch.manual_seed(0)
    gate = TopKGate(D, E, k, renormalize=renormalize)
    x_TD = _x_TD()
    out = gate(x_TD)
    probs_TE = F.softmax(x_TD @ gate.gate.weight.T, dim=-1, dtype=torch.float32)
    ref_weights_TK, ref_ids_TK = torch.topk(probs_TE, k, dim=-1)
    mass_T = ref_weights_TK.sum(-1)
    if renormalize:
        ref_weights_TK = ref_weights_TK / ref_weights_TK.sum(-1, keepdim=True)
    assert torch.equal(out.topk_ids_TK, ref_ids_TK)
    torch.testing.assert_close(out.weights_TK, ref_weights_TK)
    torch.testing.assert_close(out.probs_TE, probs_TE)
    expected_sum_T = torch.ones(T) if renormalize else mass_T  # without: the top-k probability mass
    torch.testing.assert_close(out.weights_TK.sum(-1), expected_sum_T)
    assert bool(out.mask_TK.all()) and out.n_shared == 0 and out.dropped_fraction == 0.0
    assert (gate.n_experts, gate.n_shared, gate.n_total, gate.k) == (E, 0, E, k)


def test_router_shim_is_the_topk_gate_and_loads_its_checkpoints():
    assert Router is TopKGate and RouterOutput is Routing
    torch.manual_seed(0)
    old_state = {"gate.weight": torch.randn(8, D)}  # what today's Router saves
    router, gate = Router(D, 8, 2), TopKGate(D, 8, 2)
    router.load_state_dict(old_state)
    gate.load_state_dict(old_state)
    a, b = router(_x_TD()), gate(_x_TD())
    assert torch.equal(a.topk_ids_TK, b.topk_ids_TK) and torch.equal(a.weights_TK, b.weights_TK)


# ---------------------------------------------------------------- switch


def _collapse_onto(gate, expert: int) -> None:
    """Make `expert` the argmax for every input with x[:, 0] > 0."""
    with torch.no_grad():
        gate.gate.weight.zero_()
        gate.gate.weight[expert, 0] = 1.0


def test_switch_weight_is_the_unrenormalised_probability_of_the_argmax():
    out = _gate("switch-nodrop")(_x_TD())
    probs_TE = torch.softmax(out.logits_TE.double(), -1)
    assert torch.equal(out.topk_ids_TK[:, 0], out.logits_TE.argmax(-1))
    torch.testing.assert_close(out.weights_TK[:, 0].double(), probs_TE.max(-1).values)
    assert bool((out.weights_TK < 1).all()) and bool(out.mask_TK.all()) and out.dropped_fraction == 0.0


def test_switch_drops_tokens_beyond_capacity_in_token_order():
    gate = SwitchGate(D, 4, capacity_factor=1.0)  # T=10, E=4: capacity ceil(2.5) = 3
    _collapse_onto(gate, 2)
    x_TD = _x_TD(10).abs() + 0.1
    out = gate(x_TD)
    assert gate.capacity(10) == 3
    assert out.topk_ids_TK[:, 0].tolist() == [2] * 10
    assert out.mask_TK[:, 0].tolist() == [True] * 3 + [False] * 7
    assert out.dropped_fraction == pytest.approx(0.7)
    assert bool((out.weights_TK[3:] == 0).all())
    p_2 = torch.softmax(x_TD[:, 0:1] * torch.tensor([0.0, 0.0, 1.0, 0.0]), -1)[:, 2]
    torch.testing.assert_close(out.weights_TK[:3, 0], p_2[:3])
    # counted before drops: f_2 = 1, so the loss is E * mean P_2
    torch.testing.assert_close(out.load_balancing_loss(), 4 * p_2.mean())


@pytest.mark.parametrize("n_tokens,cf,capacity", [(10, 1.25, 4), (1, 1.0, 1), (3, 0.01, 1), (8, 2.0, 4)])
def test_switch_capacity_formula(n_tokens, cf, capacity):
    gate = SwitchGate(D, 4, capacity_factor=cf)
    _collapse_onto(gate, 0)
    out = gate(_x_TD(n_tokens).abs() + 0.1)
    assert gate.capacity(n_tokens) == capacity == int(out.mask_TK.sum())
    assert out.dropped_fraction == pytest.approx((n_tokens - capacity) / n_tokens)


def test_switch_mask_matches_a_first_come_first_served_loop():
    torch.manual_seed(3)
    gate = SwitchGate(D, 4, capacity_factor=0.75)
    out = gate(_x_TD(40, seed=3))
    capacity, taken, expected = gate.capacity(40), [0] * 4, []
    for e in out.topk_ids_TK[:, 0].tolist():
        expected.append(taken[e] < capacity)
        taken[e] += 1
    assert out.mask_TK[:, 0].tolist() == expected and not all(expected)
    assert out.dropped_fraction == pytest.approx(expected.count(False) / 40)
    assert bool((out.weights_TK[~out.mask_TK] == 0).all()) and bool((out.weights_TK[out.mask_TK] > 0).all())


def test_switch_without_capacity_drops_nothing_even_when_collapsed():
    gate = SwitchGate(D, 4, capacity_factor=None)
    _collapse_onto(gate, 1)
    out = gate(_x_TD(10).abs() + 0.1)
    assert bool(out.mask_TK.all()) and out.dropped_fraction == 0.0 and bool((out.weights_TK > 0).all())


# ---------------------------------------------------------------- soft


def test_soft_gate_sends_every_token_to_every_expert_with_the_full_softmax():
    gate = SoftGate(D, 5)
    x_TD = _x_TD()
    out = gate(x_TD)
    assert gate.k == 5 and torch.equal(out.topk_ids_TK, torch.arange(5).repeat(T, 1))
    torch.testing.assert_close(out.weights_TK, torch.softmax(x_TD @ gate.gate.weight.T, -1))
    torch.testing.assert_close(out.weights_TK.sum(-1), torch.ones(T))
    assert bool(out.mask_TK.all())


# ---------------------------------------------------------------- hierarchical


def _hierarchical_reference(gate: HierarchicalGate, x_TD: torch.Tensor):
    """Per token, the list of (expert id, weight) by a plain loop over groups, and probs [T, E]."""
    G, M = gate.n_groups, gate.experts_per_group
    p_group_TG = torch.softmax((x_TD @ gate.group_gate.weight.detach().T).double(), -1)
    p_expert_TGM = torch.softmax((x_TD @ gate.gate.weight.detach().T).double().reshape(-1, G, M), -1)
    slots = []
    for p_G, p_GM in zip(p_group_TG, p_expert_TGM):
        groups = p_G.topk(gate.k_groups).indices.tolist()
        g_norm = sum(p_G[g] for g in groups) if gate.renormalize else 1.0
        token = []
        for g in groups:
            members = p_GM[g].topk(gate.k_per_group).indices.tolist()
            m_norm = sum(p_GM[g, m] for m in members) if gate.renormalize else 1.0
            token += [(g * M + m, float(p_G[g] / g_norm * p_GM[g, m] / m_norm)) for m in members]
        slots.append(token)
    return slots, (p_group_TG[:, :, None] * p_expert_TGM).reshape(-1, G * M)


@pytest.mark.parametrize("renormalize", [False, True])
def test_hierarchical_equals_the_two_level_product_computed_by_hand(renormalize):
    torch.manual_seed(1)
    gate = HierarchicalGate(D, 4, 3, k_groups=2, k_per_group=2, renormalize=renormalize)
    x_TD = _x_TD()
    out = gate(x_TD)
    slots, probs_TE = _hierarchical_reference(gate, x_TD)
    assert out.topk_ids_TK.tolist() == [[e for e, _ in token] for token in slots]
    ref_weights_TK = torch.tensor([[w for _, w in token] for token in slots], dtype=torch.float64)
    torch.testing.assert_close(out.weights_TK.double(), ref_weights_TK)
    torch.testing.assert_close(out.probs_TE.double(), probs_TE)
    torch.testing.assert_close(out.probs_TE.sum(-1), torch.ones(T))
    chosen_groups_TA = torch.topk(out.group_logits_TG, 2, -1).indices
    assert bool((out.topk_ids_TK // 3)[:, :, None].eq(chosen_groups_TA[:, None, :]).any(-1).all())
    if renormalize:  # (sum of renormalised p(g)) * (sum of renormalised p(m|g)) = 1
        torch.testing.assert_close(out.weights_TK.sum(-1), torch.ones(T))


@pytest.mark.parametrize("renormalize", [False, True])
def test_hierarchical_choosing_everything_is_the_full_mixture(renormalize):
    gate = HierarchicalGate(D, 3, 4, k_groups=3, k_per_group=4, renormalize=renormalize)
    out = gate(_x_TD())
    assert torch.equal(out.topk_ids_TK.sort(-1).values, torch.arange(12).repeat(T, 1))
    dense_TE = torch.zeros(T, 12).scatter(1, out.topk_ids_TK, out.weights_TK)
    torch.testing.assert_close(dense_TE, out.probs_TE)
    torch.testing.assert_close(out.weights_TK.sum(-1), torch.ones(T))


@pytest.mark.parametrize("renormalize", [False, True])
def test_hierarchical_with_one_group_is_topk(renormalize):
    torch.manual_seed(2)
    hier = HierarchicalGate(D, 1, 8, k_groups=1, k_per_group=3, renormalize=renormalize)
    flat = TopKGate(D, 8, 3, renormalize=renormalize)
    flat.gate.load_state_dict(hier.gate.state_dict())
    a, b = hier(_x_TD()), flat(_x_TD())
    assert torch.equal(a.topk_ids_TK, b.topk_ids_TK)
    torch.testing.assert_close(a.weights_TK, b.weights_TK)
    torch.testing.assert_close(a.load_balancing_loss(), b.load_balancing_loss())


# ---------------------------------------------------------------- shared


@pytest.mark.parametrize("name", ["topk", "switch", "hierarchical"])
def test_shared_gate_appends_always_on_slots_and_keeps_the_routed_part(name):
    inner = _gate(name)
    gate = SharedGate(inner, 2)
    E, K = inner.n_experts, inner.k
    x_TD = _x_TD(seed=5)
    out, ref = gate(x_TD), inner(x_TD)
    assert (gate.n_experts, gate.n_shared, gate.n_total, gate.k) == (E, 2, E + 2, K + 2)
    assert out.n_shared == 2 and out.topk_ids_TK.shape == (T, K + 2)
    assert torch.equal(out.topk_ids_TK[:, K:], torch.tensor([[E, E + 1]] * T))
    assert torch.equal(out.weights_TK[:, K:], torch.ones(T, 2)) and bool(out.mask_TK[:, K:].all())
    assert torch.equal(out.topk_ids_TK[:, :K], ref.topk_ids_TK)
    assert torch.equal(out.weights_TK[:, :K], ref.weights_TK) and torch.equal(out.mask_TK[:, :K], ref.mask_TK)
    assert out.dropped_fraction == ref.dropped_fraction
    torch.testing.assert_close(out.load_balancing_loss(), ref.load_balancing_loss())
    torch.testing.assert_close(out.z_loss(), ref.z_loss())


# ---------------------------------------------------------------- losses


def test_balancing_loss_is_one_for_uniform_routing_and_ignores_shared_slots():
    E, n_shared = 4, 2
    ids_TK = torch.stack([torch.arange(8) % E, (torch.arange(8) + 1) % E, torch.full((8,), E),
                          torch.full((8,), E + 1)], dim=1)
    routing = Routing(ids_TK, torch.ones(8, 4), torch.zeros(8, E), torch.full((8, E), 1 / E),
                      torch.ones(8, 4, dtype=torch.bool), n_shared=n_shared)
    torch.testing.assert_close(routing.load_balancing_loss(), torch.tensor(1.0))
    gate = TopKGate(D, E, 2)  # a zero gate is uniform too: P_e = 1/E whatever the ids
    torch.nn.init.zeros_(gate.gate.weight)
    torch.testing.assert_close(gate(_x_TD()).load_balancing_loss(), torch.tensor(1.0))


@pytest.mark.parametrize("name", ["topk", "fine-grained", "hierarchical", "shared-hierarchical"])
def test_balancing_loss_matches_a_hand_computation(name):
    out = _gate(name)(_x_TD())
    E, n_routed = out.probs_TE.shape[1], out.topk_ids_TK.shape[1] - out.n_shared
    routed = out.topk_ids_TK[:, :n_routed].tolist()
    expected = sum(sum(row.count(e) for row in routed) / (T * n_routed) * out.probs_TE[:, e].mean().item()
                   for e in range(E))
    assert out.load_balancing_loss().item() == pytest.approx(E * expected, rel=1e-5)
    if name == "topk":  # the module function over logits agrees with the method
        torch.testing.assert_close(load_balancing_loss(out.logits_TE, out.topk_ids_TK), out.load_balancing_loss())


def test_balancing_loss_exceeds_one_when_routing_collapses():
    gate = TopKGate(D, 4, 1)
    _collapse_onto(gate, 3)
    with torch.no_grad():
        gate.gate.weight[3, 0] = 5.0
    assert gate(_x_TD().abs() + 0.1).load_balancing_loss() > 3.0  # at most E = 4


@pytest.mark.parametrize("name", ["topk", "switch", "soft", "hierarchical", "shared-hierarchical"])
def test_z_loss_is_mean_logsumexp_squared_per_level(name):
    out = _gate(name)(_x_TD())
    expected = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in out.logits_TE.tolist()) / T
    if out.group_logits_TG is not None:
        expected += sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in out.group_logits_TG.tolist()) / T
    assert out.z_loss().item() == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("name", list(CONFIGS))
def test_weights_are_differentiable_for_every_mode(name):
    gate = _gate(name)
    out = gate(_x_TD())
    coef_TK = torch.randn(out.weights_TK.shape, generator=torch.Generator().manual_seed(7))
    (out.weights_TK * coef_TK).sum().backward()  # a plain sum is constant when weights renormalise
    for linear in _routed_gates(gate):
        assert linear.weight.grad is not None and linear.weight.grad.abs().sum() > 0
    assert not out.topk_ids_TK.requires_grad and not out.mask_TK.requires_grad


@pytest.mark.parametrize("name", list(CONFIGS))
def test_both_losses_reach_every_gate_parameter(name):
    gate = _gate(name)
    out = gate(_x_TD())
    out.load_balancing_loss().backward(retain_graph=True)
    for linear in _routed_gates(gate):  # soft routing has f_e = 1/E: its loss is constant, grad ~0
        assert linear.weight.grad is not None and bool(torch.isfinite(linear.weight.grad).all())
        if name != "soft":
            assert linear.weight.grad.abs().sum() > 0
        linear.weight.grad = None
    out.z_loss().backward()
    for linear in _routed_gates(gate):
        assert linear.weight.grad is not None and linear.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- shapes and dtypes


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("n_tokens,dtype", [(0, torch.float32), (1, torch.float32), (5, torch.bfloat16)])
def test_shapes_and_dtypes_including_empty_and_single_token_batches(name, n_tokens, dtype):
    gate = _gate(name).to(dtype)
    out = gate(_x_TD(n_tokens).to(dtype))
    E, K = gate.n_experts, gate.k
    assert out.topk_ids_TK.shape == out.weights_TK.shape == out.mask_TK.shape == (n_tokens, K)
    assert out.logits_TE.shape == out.probs_TE.shape == (n_tokens, E) and out.logits_TE.dtype == dtype
    assert (out.topk_ids_TK.dtype, out.weights_TK.dtype, out.probs_TE.dtype, out.mask_TK.dtype) == (
        torch.long, torch.float32, torch.float32, torch.bool)
    assert bool((out.topk_ids_TK[:, : K - gate.n_shared] < E).all()) and bool((out.topk_ids_TK < gate.n_total).all())
    torch.testing.assert_close(out.probs_TE.sum(-1), torch.ones(n_tokens))
    for loss in (out.load_balancing_loss(), out.z_loss()):
        assert loss.shape == () and loss.dtype == torch.float32 and bool(torch.isfinite(loss))
    if n_tokens == 0:
        assert out.load_balancing_loss().item() == out.z_loss().item() == out.dropped_fraction == 0.0
    if n_tokens == 1:  # one token never exceeds a capacity of at least 1
        assert bool(out.mask_TK.all())


def test_module_losses_of_an_empty_batch_are_zero_not_nan():
    assert load_balancing_loss(torch.zeros(0, 4), torch.zeros(0, 2, dtype=torch.long)).item() == 0.0
    assert router_z_loss(torch.zeros(0, 4)).item() == 0.0


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("kwargs,message", [
    (dict(mode="expert-choice", n_experts=8), "routing.mode='expert-choice'"),
    (dict(n_experts=0), "routing.n_experts=0"),
    (dict(n_experts=8, k=9), "routing.k=9: must be between 1 and n_experts=8"),
    (dict(n_experts=8, k=0), "routing.k=0"),
    (dict(mode="switch", n_experts=8, k=2), "routing.k=2: switch"),
    (dict(mode="switch", n_experts=8, k=1, capacity_factor=0.0), "routing.capacity_factor=0.0"),
    (dict(n_experts=8, n_shared=-1), "routing.n_shared=-1"),
    (dict(n_experts=8, n_groups=2), "routing.n_groups=2: groups are only used by mode='hierarchical'"),
    (dict(mode="hierarchical", n_experts=8, n_groups=3), "routing.n_groups=3: must be >= 1 and divide n_experts=8"),
    (dict(mode="hierarchical", n_experts=8, n_groups=2, k_groups=3, k=1), "routing.k_groups=3"),
    (dict(mode="hierarchical", n_experts=8, n_groups=4, k=3), "routing.k=3: experts per chosen group"),
])
def test_config_errors_name_the_key_and_the_rule(kwargs, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        RoutingConfig(**kwargs)


def test_soft_config_ignores_k_and_make_gate_builds_each_mode():
    assert isinstance(make_gate(RoutingConfig(mode="soft", n_experts=4, k=99), D), SoftGate)
    assert type(_gate("topk")) is TopKGate and type(_gate("switch")) is SwitchGate
    hier = _gate("hierarchical")
    assert (hier.n_groups, hier.experts_per_group, hier.k_groups, hier.k_per_group, hier.k) == (3, 4, 2, 2, 4)
    shared = _gate("shared-topk")
    assert isinstance(shared.inner, TopKGate) and (shared.n_total, shared.k) == (10, 4)
    assert [name for name, _ in _gate("hierarchical").named_parameters()] == ["group_gate.weight", "gate.weight"]


def test_gate_constructor_errors_are_config_errors():
    with pytest.raises(ConfigError, match="k_groups=5"):
        HierarchicalGate(D, 4, 2, k_groups=5, k_per_group=1)
    with pytest.raises(ConfigError, match="n_shared=0"):
        SharedGate(TopKGate(D, 4, 1), 0)
    with pytest.raises(ConfigError, match="inner.n_shared=1"):
        SharedGate(SharedGate(TopKGate(D, 4, 1), 1), 1)
