"""model/experts.py (SwiGLU expert, init, forward/backward) and node/registry.py (optimizer schedule, state)."""

import dataclasses
import math
import re

import pytest
import torch

from moeswarm.model.experts import expert_backward, expert_forward, init_expert
from moeswarm.node.config import OptimizerConfig
from moeswarm.node.registry import ExpertRegistry
from moeswarm.protocol.spec import ModelSpec

SPEC = ModelSpec(name="tiny", d_model=8, d_ff=16, n_layers=1, n_experts=2)
UID, OTHER_UID = "tiny.L0.E0", "tiny.L0.E1"


def _rows(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, SPEC.d_model, generator=torch.Generator().manual_seed(seed))


def _weights(module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# ---------------------------------------------------------------- experts


def test_init_is_deterministic_per_seed_and_uid():
    a = init_expert(8, 16, seed=3, uid=UID)
    b = init_expert(8, 16, seed=3, uid=UID)
    _assert_same_weights(_weights(a), _weights(b))
    for other in (init_expert(8, 16, seed=3, uid=OTHER_UID), init_expert(8, 16, seed=4, uid=UID)):
        for name, weight in _weights(other).items():
            assert not torch.equal(weight, _weights(a)[name]), name


def test_init_scale_is_fan_in_based():
    expert = init_expert(256, 512, seed=0, uid=UID)
    for linear in (expert.w1, expert.w3, expert.w2):
        expected_std = linear.weight.shape[1] ** -0.5
        assert abs(linear.weight.std().item() / expected_std - 1) < 0.05


def test_expert_forward_equals_module_forward():
    expert = init_expert(8, 16, seed=0, uid=UID)
    x_ND = _rows(5, seed=1)
    y_ND = expert_forward(expert, x_ND)
    assert not y_ND.requires_grad
    assert torch.equal(y_ND, expert(x_ND).detach())
    w1, w3, w2 = expert.w1.weight, expert.w3.weight, expert.w2.weight
    manual = (torch.nn.functional.silu(x_ND @ w1.T) * (x_ND @ w3.T)) @ w2.T
    torch.testing.assert_close(y_ND, manual.detach())


def test_expert_forward_casts_input_to_expert_dtype():
    expert = init_expert(8, 16, seed=0, uid=UID)
    x_ND = _rows(3, seed=2).to(torch.bfloat16)
    y_ND = expert_forward(expert, x_ND)
    assert y_ND.dtype == torch.float32
    assert torch.equal(y_ND, expert(x_ND.float()).detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 6, 64])
def test_expert_backward_equals_autograd_bit_for_bit_and_accumulates(rows, dtype):
    """The hand-written SwiGLU backward runs autograd's operations: same bits, not only close."""
    expert = init_expert(8, 16, seed=0, uid=UID).to(dtype)
    reference = init_expert(8, 16, seed=0, uid=UID).to(dtype)
    x_ND, grad_y_ND = _rows(rows, seed=3), _rows(rows, seed=4)
    x_ref = x_ND.to(dtype, copy=True).requires_grad_(True)
    for call in (1, 2):  # the second call adds to the grads of the first, as autograd does
        reference(x_ref).backward(grad_y_ND.to(dtype))
        grad_x_ND = expert_backward(expert, x_ND, grad_y_ND)
        assert grad_x_ND.shape == x_ND.shape and grad_x_ND.dtype == dtype and not x_ND.requires_grad
        assert torch.equal(grad_x_ND, x_ref.grad)
        for (name, p), q in zip(expert.named_parameters(), reference.parameters()):
            assert torch.equal(p.grad, q.grad), (call, name)
        x_ref.grad = None


def test_expert_backward_of_other_expert_kinds_uses_autograd():
    module = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Tanh(), torch.nn.Linear(4, 8))
    x_ND, grad_y_ND = _rows(5, seed=1), _rows(5, seed=2)
    x_ref = x_ND.clone().requires_grad_(True)
    module(x_ref).backward(grad_y_ND)
    expected = {name: p.grad.clone() for name, p in module.named_parameters()}
    module.zero_grad(set_to_none=True)
    assert torch.equal(expert_backward(module, x_ND, grad_y_ND), x_ref.grad)
    for name, p in module.named_parameters():
        assert torch.equal(p.grad, expected[name]), name


@pytest.mark.parametrize("kind", ["swiglu", "autograd"])
def test_input_grads_alone_equal_the_full_backwards_and_touch_no_parameter(kind):
    make = (lambda: init_expert(8, 16, seed=0, uid=UID)) if kind == "swiglu" else (
        lambda: torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Tanh(), torch.nn.Linear(4, 8)))
    torch.manual_seed(0)
    full, alone = make(), make()
    alone.load_state_dict(full.state_dict())
    x_ND, grad_y_ND = _rows(5, seed=11), _rows(5, seed=12)
    assert torch.equal(expert_backward(alone, x_ND, grad_y_ND, param_grads=False), expert_backward(full, x_ND, grad_y_ND))
    assert all(p.grad is None for p in alone.parameters()) and all(p.grad is not None for p in full.parameters())


def test_registry_input_grad_changes_no_state():
    registry = _registry(name="sgd", lr=0.1, update_every=1)
    hosted = registry.experts[UID]
    before = _weights(hosted.module)
    x_ND, grad_y_ND = _rows(3, seed=13), _rows(3, seed=14)
    expected = expert_backward(init_expert(8, 16, seed=0, uid=UID), x_ND, grad_y_ND)
    assert torch.equal(registry.input_grad(UID, x_ND, grad_y_ND), expected)
    assert (hosted.version, hosted.rows_since_step, hosted.step_due, hosted.optimizer) == (0, 0, False, None)
    assert all(p.grad is None for p in hosted.module.parameters())
    _assert_same_weights(before, _weights(hosted.module))


def test_expert_backward_does_not_change_weights():
    expert = init_expert(8, 16, seed=0, uid=UID)
    before = _weights(expert)
    expert_backward(expert, _rows(4, seed=5), _rows(4, seed=6))
    _assert_same_weights(before, _weights(expert))


# ---------------------------------------------------------------- registry


def _registry(seed=0, **optimizer) -> ExpertRegistry:
    return ExpertRegistry(SPEC, (UID, OTHER_UID), seed=seed, optimizer=OptimizerConfig(**optimizer))


def test_registry_forward_uses_seeded_expert():
    registry = _registry(seed=7)
    x_ND = _rows(4, seed=8)
    expected = expert_forward(init_expert(8, 16, seed=7, uid=UID), x_ND)
    assert torch.equal(registry.forward(UID, x_ND), expected)
    assert registry.experts[UID].rows_served == 4 and registry.experts[OTHER_UID].rows_served == 0


def test_registry_backward_returns_grad_x():
    registry = _registry()
    x_ND, grad_y_ND = _rows(3, seed=9), _rows(3, seed=10)
    expected = expert_backward(init_expert(8, 16, seed=0, uid=UID), x_ND, grad_y_ND)
    torch.testing.assert_close(registry.backward(UID, x_ND, grad_y_ND), expected)


def test_sgd_steps_exactly_every_update_every_rows():
    lr = 0.1
    registry = _registry(name="sgd", lr=lr, update_every=4)
    hosted = registry.experts[UID]
    reference = init_expert(8, 16, seed=0, uid=UID)
    start = _weights(hosted.module)

    for step in range(1, 3):
        before = _weights(hosted.module)
        for half in range(2):  # two batches of 2 rows make one update
            seed = 100 * step + 10 * half
            x_ND, grad_y_ND = _rows(2, seed), _rows(2, seed + 1)
            registry.backward(UID, x_ND, grad_y_ND)
            expert_backward(reference, x_ND, grad_y_ND)
            if half == 0:
                assert hosted.version == step - 1 and hosted.rows_since_step == 2
                _assert_same_weights(before, _weights(hosted.module))
        assert hosted.version == step and hosted.rows_since_step == 0
        with torch.no_grad():  # plain SGD on the summed grads of both batches
            for p in reference.parameters():
                p -= lr * p.grad
                p.grad = None
        for name, weight in _weights(hosted.module).items():
            torch.testing.assert_close(weight, dict(reference.named_parameters())[name].detach())
        assert all(p.grad is None for p in hosted.module.parameters())
    assert not torch.equal(start["w1.weight"], hosted.module.w1.weight)
    assert registry.experts[OTHER_UID].version == 0
    untouched = init_expert(8, 16, seed=0, uid=OTHER_UID)
    _assert_same_weights(_weights(registry.experts[OTHER_UID].module), _weights(untouched))


def test_adam_step_equals_torch_adam():
    registry = _registry(name="adam", lr=1e-2, update_every=4)  # two calls of 2 rows per step
    reference = init_expert(8, 16, seed=0, uid=UID)
    adam = torch.optim.Adam(reference.parameters(), lr=1e-2, foreach=False)  # the plain per-tensor loop
    for step in range(3):
        for half in range(2):
            x_ND, grad_y_ND = _rows(2, seed=10 * step + half), _rows(2, seed=10 * step + half + 5)
            registry.backward(UID, x_ND, grad_y_ND)
            expert_backward(reference, x_ND, grad_y_ND)
        adam.step()
        adam.zero_grad(set_to_none=True)
    for name, weight in _weights(registry.experts[UID].module).items():
        torch.testing.assert_close(weight, dict(reference.named_parameters())[name].detach(), rtol=1e-6, atol=1e-7)


def test_adam_stays_fused_after_loading_a_checkpoint_written_without_it():
    source = _registry(name="adam", lr=1e-2, update_every=1)
    _train(source, range(2))
    state = source.state_dict()
    for group in state["experts"][UID]["optimizer"]["param_groups"]:
        group["fused"] = None  # as written by the default (foreach) Adam
    target = _registry(name="adam", lr=1e-2, update_every=1)
    target.load_state_dict(state)
    assert target.experts[UID].optimizer.fused  # the writer's flag is not copied in
    _train(source, range(5, 7))
    _train(target, range(5, 7))
    for name, weight in _weights(source.experts[UID].module).items():
        torch.testing.assert_close(weight, _weights(target.experts[UID].module)[name], rtol=1e-6, atol=1e-7)


def test_adam_steps_every_call_with_update_every_one():
    registry = _registry(name="adam", lr=1e-2, update_every=1)
    before = _weights(registry.experts[UID].module)
    for i in range(3):
        registry.backward(UID, _rows(1, seed=i), _rows(1, seed=i + 50))
    assert registry.experts[UID].version == 3
    assert not torch.equal(before["w2.weight"], registry.experts[UID].module.w2.weight)


def test_a_deferred_step_is_applied_before_anything_else_touches_the_expert():
    """backward(defer_step=True) answers before stepping; the next forward, backward or state_dict
    applies the step first, so results equal stepping at once, bit for bit."""
    deferred, direct = _registry(name="adam", lr=1e-2, update_every=2), _registry(name="adam", lr=1e-2, update_every=2)
    outputs = {}
    for name, registry, defer in (("deferred", deferred, True), ("direct", direct, False)):
        out = []
        for i in range(4):
            out.append(registry.backward(UID, _rows(1, seed=i), _rows(1, seed=i + 50), defer_step=defer))
            out.append(registry.forward(UID, _rows(3, seed=100 + i)))
        outputs[name] = out
    for got, want in zip(outputs["deferred"], outputs["direct"]):
        assert torch.equal(got, want)
    hosted = deferred.experts[UID]
    deferred.backward(UID, _rows(1, seed=7), _rows(1, seed=8), defer_step=True)
    deferred.backward(UID, _rows(1, seed=9), _rows(1, seed=10), defer_step=True)  # falls due here
    assert hosted.step_due and hosted.visible_version == hosted.version + 1 == 3
    fingerprint = deferred.fingerprint()
    state = deferred.state_dict()  # applies the due step: a checkpoint holds what requests see
    assert not hosted.step_due and state["experts"][UID]["version"] == 3 and deferred.fingerprint() == fingerprint
    assert not deferred.apply_due_step(UID)  # nothing left to apply
    direct.backward(UID, _rows(1, seed=7), _rows(1, seed=8))
    direct.backward(UID, _rows(1, seed=9), _rows(1, seed=10))
    _assert_same_weights(_weights(hosted.module), _weights(direct.experts[UID].module))


def _train(registry: ExpertRegistry, seeds) -> None:
    for seed in seeds:
        registry.backward(UID, _rows(1, seed), _rows(1, seed + 1000))


def test_state_dict_round_trip_restores_weights_optimizer_grads_and_version():
    source = _registry(name="adam", lr=1e-2, update_every=3)
    _train(source, range(7))  # two steps, then one row of accumulated grads
    state = source.state_dict()
    assert source.experts[UID].version == 2 and source.experts[UID].rows_since_step == 1

    target = _registry(seed=99, name="adam", lr=1e-2, update_every=3)
    assert sorted(target.load_state_dict(state)) == sorted([UID, OTHER_UID])
    for uid in (UID, OTHER_UID):
        _assert_same_weights(_weights(source.experts[uid].module), _weights(target.experts[uid].module))
    assert target.fingerprint() == source.fingerprint() == {UID: (2, 1, 0), OTHER_UID: (0, 0, 0)}
    assert torch.equal(target.experts[UID].module.w1.weight.grad, source.experts[UID].module.w1.weight.grad)

    # Identical Adam moments and step counts are what keep the two in lockstep from here on.
    _train(source, range(10, 15))
    _train(target, range(10, 15))
    _assert_same_weights(_weights(source.experts[UID].module), _weights(target.experts[UID].module))
    assert target.experts[UID].version == source.experts[UID].version == 4


def test_state_dict_is_a_snapshot():
    registry = _registry(name="sgd", lr=0.5, update_every=1)
    state = registry.state_dict()
    saved = state["experts"][UID]["weights"]["w1.weight"].clone()
    _train(registry, range(2))
    assert torch.equal(state["experts"][UID]["weights"]["w1.weight"], saved)
    assert state["experts"][UID]["version"] == 0


def test_load_state_dict_restores_only_saved_uids():
    source = ExpertRegistry(SPEC, (UID,), seed=5, optimizer=OptimizerConfig(name="sgd", lr=0.5))
    _train(source, range(2))
    target = _registry(seed=0, name="sgd", lr=0.5)
    assert target.load_state_dict(source.state_dict()) == [UID]
    _assert_same_weights(_weights(source.experts[UID].module), _weights(target.experts[UID].module))
    untouched = init_expert(8, 16, seed=0, uid=OTHER_UID)
    _assert_same_weights(_weights(target.experts[OTHER_UID].module), _weights(untouched))


@pytest.mark.parametrize("change", [{"d_model": 4}, {"name": "other"}, {"n_experts": 3}])
def test_load_state_dict_for_another_model_raises(change):
    source = ExpertRegistry(dataclasses.replace(SPEC, **change), (), seed=0, optimizer=OptimizerConfig())
    with pytest.raises(ValueError, match="checkpoint is for model"):
        _registry().load_state_dict(source.state_dict())


def _sgd_registry(**optimizer) -> ExpertRegistry:
    spec = ModelSpec(name="m", d_model=16, d_ff=32, n_layers=1, n_experts=1)
    return ExpertRegistry(spec, ("m.L0.E0",), seed=0, optimizer=OptimizerConfig(**{"name": "sgd", "lr": 1.0, "update_every": 1, **optimizer}))


def test_a_backward_whose_grads_overflow_is_refused_and_adds_nothing():
    registry = _sgd_registry(update_every=8)
    hosted = registry.experts["m.L0.E0"]
    x, huge = torch.randn(4, 16), torch.full((4, 16), 3e38)  # finite, as validation lets through; products overflow
    assert torch.isnan(registry.backward("m.L0.E0", x, huge)).all()  # NaN: the service answers an overflow error
    assert all(param.grad is None for param in hosted.module.parameters()) and hosted.rows_since_step == 0


def test_merged_callers_with_overflowing_grads_are_refused_alone():
    merged, alone = _sgd_registry(update_every=100), _sgd_registry(update_every=100)
    x, g, huge = torch.randn(3, 16), torch.randn(3, 16), torch.full((2, 16), 3e38)
    grad_x = merged.backward("m.L0.E0", torch.cat([x, x[:2]]), torch.cat([g, huge]), [("a", 3), ("b", 2)])
    expected = alone.backward("m.L0.E0", x, g)
    assert torch.equal(grad_x[:3], expected) and torch.isnan(grad_x[3:]).all()
    for got, want in zip(merged.experts["m.L0.E0"].module.parameters(), alone.experts["m.L0.E0"].module.parameters()):
        assert torch.equal(got.grad, want.grad)
    assert merged.experts["m.L0.E0"].rows_since_step == 3


def test_a_step_whose_accumulated_gradient_is_not_finite_is_dropped_not_written_into_the_weights(caplog):
    registry = _sgd_registry()  # each request's grads are checked; their sum can still overflow
    hosted = registry.experts["m.L0.E0"]
    before = {k: v.clone() for k, v in hosted.module.state_dict().items()}
    hosted.module.w1.weight.grad = torch.full_like(hosted.module.w1.weight, math.inf)
    hosted.rows_since_step, hosted.step_due = 2, True
    assert not registry.apply_due_step("m.L0.E0")
    after = hosted.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and hosted.version == 0 and not hosted.step_due
    assert re.search(r"dropped an optimizer step whose gradient norm is (inf|nan)", caplog.text), caplog.text
    x = torch.randn(4, 16)
    registry.backward("m.L0.E0", x, torch.randn(4, 16))  # the next sane gradient steps as usual
    assert hosted.version == 1


def test_a_step_in_progress_already_counts_as_applied_for_other_threads():
    registry = _sgd_registry(update_every=1)
    hosted = registry.experts["m.L0.E0"]
    registry.backward("m.L0.E0", torch.randn(2, 16), torch.randn(2, 16), defer_step=True)
    due = registry.fingerprint()
    optimizer = registry._optimizer(hosted)
    seen = []
    step = optimizer.step
    optimizer.step = lambda: (seen.append((registry.fingerprint(), hosted.visible_version)), step())[1]
    assert registry.apply_due_step("m.L0.E0")
    # A checkpoint or Info reading mid-step must not see the state from before the step
    assert seen == [(due, 1)] and registry.fingerprint() == due and hosted.visible_version == 1


def test_max_grad_norm_clips_each_expert_gradient_as_torch_does():
    registry, reference = _sgd_registry(max_grad_norm=0.5), init_expert(16, 32, seed=0, uid="m.L0.E0")
    x, g = torch.randn(4, 16), 100 * torch.randn(4, 16)
    registry.backward("m.L0.E0", x, g)
    reference(x).backward(g)
    assert torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5) > 0.5  # it did need clipping
    torch.optim.SGD(reference.parameters(), lr=1.0).step()
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(registry.experts["m.L0.E0"].module.state_dict()[name], value, atol=1e-6, rtol=1e-6)
