"""node/activations.py and its use by the registry: a training forward keeps (h1, h3) for its
backward, which then skips recomputing them; any miss falls back to recomputing, with the same math."""

import pytest
import torch

from moeswarm.model.experts import expert_backward, expert_forward, init_expert
from moeswarm.node.activations import ENTRY_OVERHEAD_BYTES, ActivationCache
from moeswarm.node.config import OptimizerConfig
from moeswarm.node.registry import ExpertRegistry
from moeswarm.protocol.spec import ModelSpec

SPEC = ModelSpec(name="tiny", d_model=8, d_ff=16, n_layers=1, n_experts=2)
UID = "tiny.L0.E0"


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _t(rows: int, cols: int = 4) -> torch.Tensor:
    return torch.zeros(rows, cols)  # 16 bytes per row


def test_cache_gives_each_entry_once_and_only_to_the_same_revision_and_rows():
    cache = ActivationCache(1 << 20)
    kept = (_t(3), _t(3))
    cache.put("f1", UID, revision=2, tensors=kept)
    assert cache.take("f1", UID, revision=2, rows=3) is kept
    assert cache.take("f1", UID, revision=2, rows=3) is None  # used up
    cache.put("f2", UID, revision=2, tensors=kept)
    assert cache.take("f2", UID, revision=3, rows=3) is None  # the weights stepped since
    cache.put("f3", UID, revision=2, tensors=kept)
    assert cache.take("f3", UID, revision=2, rows=4) is None
    assert cache.take("f3", "tiny.L0.E1", revision=2, rows=3) is None and cache.bytes == 0 and len(cache) == 0


def test_cache_evicts_oldest_over_its_budget_and_drops_expired_entries():
    clock = Clock()
    entry = ENTRY_OVERHEAD_BYTES + 3 * 16  # an entry of 3 rows of _t
    cache = ActivationCache(3 * entry + 10, keep_s=60, clock=clock)  # room for 3 of them
    for i in range(4):
        cache.put(f"f{i}", UID, 0, (_t(3),))
        clock.now += 1
    assert len(cache) == 3 and cache.bytes == 3 * entry  # f0 went to make room for f3
    assert cache.take("f0", UID, 0, 3) is None and cache.take("f1", UID, 0, 3) is not None
    cache.put("huge", UID, 0, (_t(3 * entry // 16),))  # larger than the whole budget: not kept, nothing evicted
    assert len(cache) == 2
    clock.now += 61
    assert cache.take("f3", UID, 0, 3) is None and len(cache) == 0 and cache.bytes == 0
    cache.put("", UID, 0, (_t(1),))  # no id: nothing to key it by
    assert len(cache) == 0


def test_entries_of_zero_rows_are_not_kept_and_tiny_ones_cannot_outgrow_the_budget():
    cache = ActivationCache(1 << 20)
    cache.put("empty", UID, 0, (_t(0), _t(0)))
    assert len(cache) == 0
    for i in range(10_000):  # 1 row each: their data alone would fit 16 thousand times over
        cache.put(f"f{i}", UID, 0, (_t(1),))
    assert len(cache) == (1 << 20) // (ENTRY_OVERHEAD_BYTES + 16) and cache.bytes <= 1 << 20


def _registry(cache_bytes: int = 1 << 20) -> ExpertRegistry:
    no_step = OptimizerConfig(name="sgd", lr=0.1, update_every=1 << 30)
    return ExpertRegistry(SPEC, (UID,), seed=0, optimizer=no_step, activation_cache_bytes=cache_bytes)


def _rows(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, SPEC.d_model, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("sizes", [[5], [2, 3, 1]])  # one caller, or callers merged into one batch
def test_backward_from_kept_activations_equals_recomputing(sizes):
    kept, recomputed = _registry(), _registry()
    x_ND, g_ND = _rows(sum(sizes), seed=1), _rows(sum(sizes), seed=2)
    tags = [(f"f{i}", rows) for i, rows in enumerate(sizes)]
    y_ND = kept.forward(UID, x_ND, tags)
    assert torch.equal(y_ND, expert_forward(init_expert(8, 16, seed=0, uid=UID), x_ND))
    assert len(kept.kept) == len(sizes)
    grad_kept = kept.backward(UID, x_ND, g_ND, tags)
    grad_recomputed = recomputed.backward(UID, x_ND, g_ND)
    assert torch.equal(grad_kept, grad_recomputed)
    for p, q in zip(kept.experts[UID].module.parameters(), recomputed.experts[UID].module.parameters()):
        assert torch.equal(p.grad, q.grad)
    assert kept.kept.reused_rows == sum(sizes) and len(kept.kept) == 0


def test_backward_recomputes_when_any_caller_missed_or_the_weights_changed():
    registry = _registry()
    x_ND, g_ND = _rows(3, seed=3), _rows(3, seed=4)
    registry.forward(UID, x_ND, [("f1", 3)])
    expected = expert_backward(init_expert(8, 16, seed=0, uid=UID), x_ND, g_ND)
    assert torch.equal(registry.backward(UID, x_ND, g_ND, [("f1", 2), ("other", 1)]), expected)
    assert registry.kept.reused_rows == 0
    registry.forward(UID, x_ND, [("f2", 3)])
    peer = {name: torch.zeros_like(p) for name, p in registry.experts[UID].module.named_parameters()}
    registry.average_with(UID, peer)  # the weights changed between forward and backward: an averaging round
    registry.backward(UID, x_ND, g_ND, [("f2", 3)])
    assert registry.kept.reused_rows == 0 and len(registry.kept) == 0


def test_nothing_is_kept_without_an_id_or_with_the_cache_off():
    for registry, tags in ((_registry(), [("", 4)]), (_registry(cache_bytes=0), [("f1", 4)])):
        registry.forward(UID, _rows(4, seed=5), tags)
        assert len(registry.kept) == 0
