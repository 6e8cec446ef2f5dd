"""The optimizers a node steps its experts with: torch's Adam and SGD arithmetic without torch.optim.Optimizer.

torch.optim.Optimizer imports torch._dynamo the first time one is built and stepped: 1.3 s and
+71 MiB on the CPU build, seconds more on CUDA builds, spent on the compute thread at a node's first
training step, so every request behind it waited (and on a loaded machine ran past its 5 s
deadline). These classes call torch's functional Adam (`torch.optim.adam.adam`, the same kernels:
fused where the device has one) and SGD's own update, and import nothing more. Their state dicts
use torch.optim's layout, so checkpoints written by either load in either; the node's configured
hyperparameters win over a checkpoint's (a restart with `--set optimizer.lr=...` takes effect).
"""

from __future__ import annotations

import torch
from torch.optim.adam import adam as functional_adam


class NodeOptimizer:
    """A fixed list of parameters in one param group; subclasses define step and their state."""

    def __init__(self, params, *, lr: float):
        self.params: list[torch.nn.Parameter] = list(params)
        self.lr = lr

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch.optim.Optimizer.zero_grad: drop the grads, or zero them in place (set_to_none=False)."""
        for param in self.params:
            if set_to_none:
                param.grad = None
            elif param.grad is not None:
                param.grad.detach_().zero_()


class NodeAdam(NodeOptimizer):
    """Adam (no weight decay, no amsgrad)."""

    def __init__(self, params, *, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, fused: bool = True):
        super().__init__(params, lr=lr)
        self.betas, self.eps = tuple(betas), eps
        self.fused = fused  # cleared at the first step where the device has no fused kernel
        self.state: list[dict[str, torch.Tensor]] = [{} for _ in self.params]  # made at each parameter's first step

    @torch.no_grad()
    def step(self) -> None:
        live = [(p, s) for p, s in zip(self.params, self.state) if p.grad is not None]
        for param, state in live:
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=self._step_device(param))
                state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        if not live:
            return
        if self.fused:
            try:
                return self._update(live, fused=True)
            except RuntimeError:  # no fused kernel for this device or dtype (nothing was updated)
                self.fused = False
                for state in self.state:
                    if state:
                        state["step"] = state["step"].cpu()
        self._update(live, fused=False)

    def _update(self, live, *, fused: bool) -> None:
        states = [state for _, state in live]
        functional_adam(
            [param for param, _ in live], [param.grad for param, _ in live], [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states], [], [s["step"] for s in states],
            foreach=None if fused else False, fused=fused or None, amsgrad=False, beta1=self.betas[0],
            beta2=self.betas[1], lr=self.lr, weight_decay=0.0, eps=self.eps, maximize=False,
        )

    def _step_device(self, param: torch.Tensor) -> torch.device:
        return param.device if self.fused else torch.device("cpu")  # torch keeps non-fused step counters on the CPU

    def state_dict(self) -> dict:
        group = {"lr": self.lr, "betas": self.betas, "eps": self.eps, "weight_decay": 0.0, "amsgrad": False,
                 "maximize": False, "foreach": None, "capturable": False, "differentiable": False,
                 "fused": self.fused or None, "params": list(range(len(self.params)))}
        return {"state": {i: dict(s) for i, s in enumerate(self.state) if s}, "param_groups": [group]}

    def load_state_dict(self, state_dict: dict) -> None:
        """Moments and step counts from a state dict in torch.optim.Adam's layout (ours or torch's);
        raises ValueError if they do not fit these parameters."""
        saved = _check_layout(state_dict, len(self.params))
        new_state = []
        for index, param in enumerate(self.params):
            entry = saved.get(index) or {}
            if not entry:
                new_state.append({})
                continue
            moments = [entry.get(name) for name in ("exp_avg", "exp_avg_sq")]
            if any(not isinstance(m, torch.Tensor) or m.shape != param.shape for m in moments):
                raise ValueError(f"optimizer state {index} does not fit parameter {index} of shape {list(param.shape)}")
            step = entry.get("step")
            step = float(step) if isinstance(step, (torch.Tensor, int, float)) else 0.0
            new_state.append({
                "step": torch.tensor(step, dtype=torch.float32, device=self._step_device(param)),
                "exp_avg": moments[0].to(param.device, param.dtype, copy=True),
                "exp_avg_sq": moments[1].to(param.device, param.dtype, copy=True),
            })
        self.state = new_state


class NodeSGD(NodeOptimizer):
    """Plain SGD (no momentum, no weight decay): torch.optim.SGD's update, param -= lr * grad."""

    @torch.no_grad()
    def step(self) -> None:
        for param in self.params:
            if param.grad is not None:
                param.add_(param.grad, alpha=-self.lr)

    def state_dict(self) -> dict:
        group = {"lr": self.lr, "momentum": 0, "dampening": 0, "weight_decay": 0, "nesterov": False, "maximize": False,
                 "foreach": None, "differentiable": False, "fused": None, "params": list(range(len(self.params)))}
        return {"state": {}, "param_groups": [group]}

    def load_state_dict(self, state_dict: dict) -> None:
        _check_layout(state_dict, len(self.params))  # plain SGD keeps no state


def _check_layout(state_dict: dict, n_params: int) -> dict:
    """The per-parameter state of a one-group torch.optim state dict for n_params parameters."""
    groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
    if not isinstance(groups, list) or len(groups) != 1 or len(groups[0].get("params", ())) != n_params:
        raise ValueError(f"optimizer state is not one parameter group of {n_params} parameters")
    state = state_dict.get("state", {})
    if not isinstance(state, dict):
        raise ValueError("optimizer state has no per-parameter state mapping")
    return state
