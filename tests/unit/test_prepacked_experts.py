"""Prepacked expert weights (node config prepack_weights): the plain forward's results to fp32
rounding, never stale after the weights change, and the backward recomputes with the same kernel."""

from __future__ import annotations

import copy

import pytest
import torch

from moeswarm.model.experts import (
    PREPACK_MIN_ROWS,
    check_prepacking,
    expert_backward,
    expert_forward,
    expert_forward_keep,
    init_expert,
    prepack_weights,
)
from moeswarm.model.hf_experts import GptOssExpert
from moeswarm.node.config import NodeConfig, OptimizerConfig
from moeswarm.node.registry import ExpertRegistry
from moeswarm.protocol.errors import ConfigError
from moeswarm.protocol.spec import ModelSpec

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
D, F = 32, 64


def packed_and_plain(d_model: int = D, d_ff: int = F) -> tuple[torch.nn.Module, torch.nn.Module]:
    plain = init_expert(d_model, d_ff, seed=3, uid="m.L0.E0")
    packed = copy.deepcopy(plain)
    assert prepack_weights(packed)
    return packed, plain


@pytest.mark.parametrize("rows", [1, PREPACK_MIN_ROWS - 1, PREPACK_MIN_ROWS, 64, 300])
def test_prepacked_forward_equals_the_plain_one_to_fp32_rounding(rows):
    packed, plain = packed_and_plain()
    x = torch.randn(rows, D)
    y_packed, y_plain = expert_forward(packed, x), expert_forward(plain, x)
    if rows < PREPACK_MIN_ROWS:  # a few rows take the plain kernel: identical
        assert torch.equal(y_packed, y_plain)
    else:
        torch.testing.assert_close(y_packed, y_plain, atol=1e-5, rtol=1e-5)


def test_prepacked_weights_follow_every_change_of_the_weights():
    packed, plain = packed_and_plain()
    x = torch.randn(16, D)
    before = expert_forward(packed, x)
    expert_forward(packed, x)
    assert packed.packed.packs == 1
    with torch.no_grad():  # in place, as an optimizer step does
        for expert in (packed, plain):
            expert.w1.weight.mul_(0.5)
    after = expert_forward(packed, x)
    assert packed.packed.packs == 2 and not torch.equal(after, before)
    torch.testing.assert_close(after, expert_forward(plain, x), atol=1e-5, rtol=1e-5)
    other = init_expert(D, F, seed=4, uid="m.L0.E0")
    packed.load_state_dict(other.state_dict())  # a checkpoint load copies into the same tensors
    torch.testing.assert_close(expert_forward(packed, x), expert_forward(other, x), atol=1e-5, rtol=1e-5)
    packed.w2.weight = torch.nn.Parameter(torch.zeros(D, F))  # a replaced tensor (as an HF import does)
    assert torch.equal(expert_forward(packed, x), torch.zeros(16, D))


def test_backward_recomputes_the_forward_with_the_kernel_the_forward_used():
    packed, _ = packed_and_plain(256, 1024)  # at this size the two kernels' hidden activations differ
    twin = copy.deepcopy(packed)
    x, g = torch.randn(24, 256), torch.randn(24, 256)
    _, kept = expert_forward_keep(packed, x)
    grad_kept = expert_backward(packed, x, g, kept)
    grad_recomputed = expert_backward(twin, x, g)
    assert torch.equal(grad_kept, grad_recomputed)
    for name in ("w1", "w2", "w3"):
        assert torch.equal(getattr(packed, name).weight.grad, getattr(twin, name).weight.grad)


def test_only_fp32_and_bf16_swiglu_experts_on_the_cpu_are_prepacked():
    assert prepack_weights(init_expert(D, F, seed=0, uid="m.L0.E0").to(torch.bfloat16))
    assert not prepack_weights(init_expert(D, F, seed=0, uid="m.L0.E0").to(torch.float16))
    assert not prepack_weights(GptOssExpert(D, F))
    registry = ExpertRegistry(
        ModelSpec(name="m", d_model=D, d_ff=F, n_layers=1, n_experts=2), ("m.L0.E0", "m.L0.E1"),
        seed=0, optimizer=OptimizerConfig(), prepack_weights=True,
    )
    assert all(hosted.module.packed is not None for hosted in registry.experts.values())


@pytest.mark.parametrize("rows", [1, 4, 64])
def test_bf16_experts_use_their_packed_weights_at_any_row_count(rows):
    plain = init_expert(256, 1024, seed=3, uid="m.L0.E0").to(torch.bfloat16)
    packed = copy.deepcopy(plain)
    try:
        check_prepacking(torch.bfloat16)
    except Exception as e:  # a CPU without bf16 kernels: the registry leaves such experts unpacked
        if "wrong result" in str(e):  # packing ran and computed wrongly: a failure, not a missing kernel
            raise
        pytest.skip(f"no oneDNN bf16 packing here ({e})")
    assert prepack_weights(packed)
    x = torch.randn(rows, 256)
    y_packed = expert_forward(packed, x)
    assert packed.packed.packs == 1  # one row too: unlike fp32, packed bf16 is faster there
    assert y_packed.dtype == torch.bfloat16
    torch.testing.assert_close(y_packed.float(), expert_forward(plain, x).float(), atol=2e-2, rtol=2e-2)
    expert_forward(packed, x)
    assert packed.packed.packs == 1  # and not again while the weights stay the same


def test_prepack_weights_is_a_cpu_option():
    spec = ModelSpec(name="m", d_model=D, d_ff=F, n_layers=1, n_experts=2)
    with pytest.raises(ConfigError, match="prepack_weights.*CPU nodes"):
        NodeConfig(model=spec, device="cuda", prepack_weights=True)


def test_a_torch_that_cannot_prepack_is_a_config_error_at_start(monkeypatch):
    import moeswarm.node.registry as registry_module

    def missing_op(dtype):
        raise RuntimeError("no kernel for mkldnn::_reorder_linear_weight on this CPU")

    monkeypatch.setattr(registry_module, "check_prepacking", missing_op)
    spec = ModelSpec(name="m", d_model=D, d_ff=F, n_layers=1, n_experts=1)
    with pytest.raises(ConfigError, match="cannot pack weights with oneDNN .no kernel"):
        ExpertRegistry(spec, ("m.L0.E0",), seed=0, optimizer=OptimizerConfig(), prepack_weights=True)
