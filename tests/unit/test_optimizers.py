"""node/optimizers.py: torch.optim's arithmetic and state-dict layout, without importing torch._dynamo."""

import copy
import subprocess
import sys

import pytest
import torch

from moeswarm.node.optimizers import NodeAdam, NodeSGD


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(16, 8, generator=generator)), torch.nn.Parameter(torch.randn(8, generator=generator))]


def _set_grads(params, step: int, skip_last: bool = False) -> None:
    generator = torch.Generator().manual_seed(100 + step)
    for i, param in enumerate(params):
        param.grad = None if (skip_last and i == len(params) - 1) else torch.randn(param.shape, generator=generator)


def _run(optimizer, params, steps: range, skip_last_at: int = -1) -> None:
    for step in steps:
        _set_grads(params, step, skip_last=step == skip_last_at)
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("fused", [True, False])
def test_adam_equals_torch_adam_bit_for_bit(fused):
    ours, theirs = _params(), _params()
    node_adam = NodeAdam(ours, lr=1e-2, fused=fused)
    torch_adam = torch.optim.Adam(theirs, lr=1e-2, fused=fused or None, foreach=None if fused else False)
    _run(node_adam, ours, range(4), skip_last_at=1)  # a parameter without a grad is left alone that step
    _run(torch_adam, theirs, range(4), skip_last_at=1)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


def test_adam_state_dicts_load_both_ways_with_torch_adam():
    ours, theirs = _params(), _params()
    node_adam, torch_adam = NodeAdam(ours, lr=1e-2), torch.optim.Adam(theirs, lr=1e-2, fused=True)
    _run(node_adam, ours, range(3))
    _run(torch_adam, theirs, range(3))
    swapped_ours, swapped_theirs = _params(), _params()
    with torch.no_grad():
        for a, b, c, d in zip(swapped_ours, swapped_theirs, theirs, ours):
            a.copy_(c), b.copy_(d)
    resumed_ours = NodeAdam(swapped_ours, lr=1e-2)
    resumed_ours.load_state_dict(torch_adam.state_dict())  # torch's checkpoint into ours
    resumed_theirs = torch.optim.Adam(swapped_theirs, lr=1e-2, fused=True)
    resumed_theirs.load_state_dict(copy.deepcopy(node_adam.state_dict()))  # ours into torch's (which keeps what it is given)
    for optimizer, params in ((node_adam, ours), (torch_adam, theirs), (resumed_ours, swapped_ours), (resumed_theirs, swapped_theirs)):
        _run(optimizer, params, range(3, 5))
    for a, b, c, d in zip(ours, theirs, swapped_ours, swapped_theirs):
        assert torch.equal(a, b) and torch.equal(c, a) and torch.equal(d, a)


def test_adam_refuses_state_that_does_not_fit_and_keeps_its_own_lr():
    params = _params()
    source = NodeAdam(params, lr=0.5)
    _run(source, params, range(1))
    state = source.state_dict()
    target = NodeAdam(_params(), lr=1e-3)
    target.load_state_dict(state)
    assert target.lr == 1e-3 and float(target.state[0]["step"]) == 1.0
    with pytest.raises(ValueError, match="not one parameter group of 3"):
        NodeAdam(_params() + [torch.nn.Parameter(torch.zeros(2))], lr=1e-3).load_state_dict(state)
    with pytest.raises(ValueError, match="does not fit parameter 0"):
        NodeAdam([torch.nn.Parameter(torch.zeros(3, 3)), torch.nn.Parameter(torch.zeros(8))], lr=1e-3).load_state_dict(state)


def test_sgd_equals_torch_sgd():
    ours, theirs = _params(), _params()
    _run(NodeSGD(ours, lr=0.1), ours, range(3), skip_last_at=2)
    _run(torch.optim.SGD(theirs, lr=0.1), theirs, range(3), skip_last_at=2)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
    NodeSGD(ours, lr=0.1).load_state_dict(torch.optim.SGD(theirs, lr=0.1).state_dict())


def test_stepping_imports_no_torch_dynamo():
    """torch.optim.Optimizer imports torch._dynamo (1.3 s, +71 MiB) at its first use; a node's
    first training step must not pay that. Fails if a torch upgrade brings the import back."""
    script = (
        "import sys, torch\n"
        "from moeswarm.node.optimizers import NodeAdam, NodeSGD\n"
        "p = [torch.nn.Parameter(torch.randn(4, 4))]\n"
        "for opt in (NodeAdam(p, lr=1e-3), NodeAdam(p, lr=1e-3, fused=False), NodeSGD(p, lr=1e-3)):\n"
        "    p[0].grad = torch.ones(4, 4); opt.step(); opt.zero_grad(); opt.load_state_dict(opt.state_dict())\n"
        "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_zero_grad_drops_or_zeroes_grads_like_torch():
    params = _params(0)
    for param in params:
        param.grad = torch.ones_like(param)
    optimizer = NodeSGD(params, lr=0.1)
    grads = [param.grad for param in params]
    optimizer.zero_grad(set_to_none=False)
    assert all(param.grad is grad and not grad.any() for param, grad in zip(params, grads))  # same tensors, zeroed
    optimizer.zero_grad()
    assert all(param.grad is None for param in params)
    optimizer.zero_grad(set_to_none=False)  # no grads: nothing to zero
    assert all(param.grad is None for param in params)
