"""Experts on a compute device (node/node.py compute_device, node/registry.py). The CUDA cases run
only where torch sees a GPU; on CPU-only machines the checks of the device name still run."""

import pytest
import torch

from moeswarm.model.experts import expert_backward, expert_forward, init_expert
from moeswarm.node.config import OptimizerConfig
from moeswarm.node.node import compute_device
from moeswarm.node.registry import ExpertRegistry
from moeswarm.protocol.errors import ConfigError
from moeswarm.protocol.spec import ModelSpec

SPEC = ModelSpec(name="tiny", d_model=16, d_ff=32, n_layers=1, n_experts=2)
UIDS = ("tiny.L0.E0", "tiny.L0.E1")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device")


def test_cpu_device_is_accepted():
    assert compute_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_without_a_gpu_is_a_config_error_naming_the_device():
    with pytest.raises(ConfigError, match="device='cuda': torch sees no CUDA device"):
        compute_device("cuda")


@needs_cuda
def test_cuda_index_past_the_last_device_is_a_config_error():
    with pytest.raises(ConfigError, match="numbered from 0"):
        compute_device(f"cuda:{torch.cuda.device_count()}")


def _rows(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, SPEC.d_model, generator=torch.Generator().manual_seed(seed))


@needs_cuda
def test_cuda_registry_matches_cpu_and_keeps_io_and_checkpoints_on_cpu():
    optimizer = OptimizerConfig(name="adam", lr=1e-2, update_every=1)
    gpu = ExpertRegistry(SPEC, UIDS, seed=3, optimizer=optimizer, device="cuda")
    cpu = ExpertRegistry(SPEC, UIDS, seed=3, optimizer=optimizer)
    assert all(p.is_cuda for hosted in gpu.experts.values() for p in hosted.module.parameters())
    x_ND, g_ND = _rows(5, seed=1), _rows(5, seed=2)
    for step in range(3):
        y_gpu, y_cpu = gpu.forward(UIDS[0], x_ND), cpu.forward(UIDS[0], x_ND)
        assert y_gpu.device.type == "cpu"
        torch.testing.assert_close(y_gpu, y_cpu, rtol=1e-4, atol=1e-5)
        gx_gpu, gx_cpu = gpu.backward(UIDS[0], x_ND, g_ND), cpu.backward(UIDS[0], x_ND, g_ND)
        assert gx_gpu.device.type == "cpu"
        torch.testing.assert_close(gx_gpu, gx_cpu, rtol=1e-4, atol=1e-5)
    state = gpu.state_dict()
    leaves = [t for expert in state["experts"].values() for t in expert["weights"].values()]
    leaves += [t for t in state["experts"][UIDS[0]]["optimizer"]["state"][0].values() if isinstance(t, torch.Tensor)]
    assert leaves and all(t.device.type == "cpu" for t in leaves)
    # a GPU checkpoint resumes on a CPU node and the other way round, Adam state included
    resumed = ExpertRegistry(SPEC, UIDS, seed=0, optimizer=optimizer)
    resumed.load_state_dict(state)
    back = ExpertRegistry(SPEC, UIDS, seed=0, optimizer=optimizer, device="cuda")
    from_cpu = resumed.state_dict()
    for group in from_cpu["experts"][UIDS[0]]["optimizer"]["param_groups"]:
        group["fused"] = None  # as a CPU node without fused Adam writes it: step counters stay on the CPU
    back.load_state_dict(from_cpu)
    for registry in (resumed, back):
        torch.testing.assert_close(registry.forward(UIDS[0], x_ND), gpu.forward(UIDS[0], x_ND), rtol=1e-4, atol=1e-5)
    back.backward(UIDS[0], x_ND, g_ND)  # the restored (fused) Adam state steps on the GPU
    assert back.experts[UIDS[0]].version == 4


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_expert_math_matches_cpu(dtype):
    cpu = init_expert(16, 32, seed=0, uid=UIDS[0]).to(dtype)
    gpu = init_expert(16, 32, seed=0, uid=UIDS[0]).to(dtype).cuda()
    x_ND, g_ND = _rows(7, seed=3), _rows(7, seed=4)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(expert_forward(gpu, x_ND.cuda()).cpu(), expert_forward(cpu, x_ND), **tol)
    torch.testing.assert_close(expert_backward(gpu, x_ND.cuda(), g_ND.cuda()).cpu(), expert_backward(cpu, x_ND, g_ND), **tol)
    for p_gpu, p_cpu in zip(gpu.parameters(), cpu.parameters()):
        torch.testing.assert_close(p_gpu.grad.cpu(), p_cpu.grad, **tol)
