"""The experts a node hosts, with their optimizers: forward, backward + scheduled optimizer step.

Not thread-safe: the node runs every call on its single compute thread.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Callable

import torch
from torch import nn

from moeswarm.model.experts import (
    PACKABLE_DTYPES, SwiGLUExpert, add_grads, check_prepacking, expert_backward, expert_forward, expert_forward_keep,
    expert_param_grads, init_expert, module_origin, prepack_weights,
)
from moeswarm.model.hf_experts import GptOssExpert, gpt_oss_forward
from moeswarm.node.activations import ActivationCache
from moeswarm.node.config import OptimizerConfig
from moeswarm.node.optimizers import NodeAdam, NodeOptimizer, NodeSGD
from moeswarm.node.validation import all_finite
from moeswarm.protocol.errors import ConfigError
from moeswarm.protocol.spec import ModelSpec

logger = logging.getLogger(__name__)
Tags = tuple[tuple[str, int], ...] | list[tuple[str, int]]  # (forward_id or "", rows) per caller of a batch


@dataclasses.dataclass
class HostedExpert:
    module: nn.Module  # SwiGLUExpert, or GptOssExpert for GPT-OSS checkpoints
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] = expert_forward  # no-grad inference of this kind
    optimizer: NodeOptimizer | None = None  # made at the first step (see _optimizer)
    version: int = 0  # optimizer steps applied (a replica started from a peer's weights takes the peer's count)
    revision: int = 0  # weight changes in this process (steps, averaging, loads): kept activations hold for one
    rows_since_step: int = 0  # gradient rows accumulated since the last step
    rows_served: int = 0  # forward + backward rows, for load reporting
    step_due: bool = False  # a deferred step (backward(defer_step=True)) not yet applied
    averaged: int = 0  # averaging rounds with peer replicas applied in this process
    origin: str = ""  # the weights its line of training started from (ExpertRecord.origin); "" unknown

    @property
    def visible_version(self) -> int:
        """The version every later request computes with: a due step is applied before any of them."""
        return self.version + self.step_due


def can_prepack(dtype: torch.dtype) -> bool:
    """Whether this torch and CPU can pack `dtype` weights with oneDNN (see check_prepacking)."""
    try:
        check_prepacking(dtype)
    except Exception:  # e.g. no bf16 kernels on this CPU: those experts stay unpacked
        return False
    return True


def make_optimizer(params, config: OptimizerConfig) -> NodeOptimizer:
    if config.name == "sgd":
        return NodeSGD(params, lr=config.lr)
    # fused: one kernel over all tensors; on CPU a step of a 256x1024 SwiGLU expert takes 0.24 ms, not 1.3
    return NodeAdam(params, lr=config.lr, fused=True)


class ExpertRegistry:
    """Owns the hosted experts' weights and optimizer state."""

    def __init__(
        self, spec: ModelSpec, uids: tuple[str, ...], *, seed: int, optimizer: OptimizerConfig,
        modules: dict[str, nn.Module] | None = None, device: torch.device | str = "cpu", activation_cache_bytes: int = 0,
        prepack_weights: bool = False, origins: dict[str, str] | None = None,
    ):
        """modules: uid -> expert module for the experts that start from given weights (a model
        directory or checkpoint); the others start from the deterministic (seed, uid) SwiGLU init,
        made on the CPU, so replicas on any device start from the same weights.
        device: where the weights, grads and optimizer state live and the experts compute; inputs
        arrive and outputs leave on the CPU (they come from and go to the wire).
        activation_cache_bytes: memory (on `device`) for what training forwards keep for their backward.
        prepack_weights: fp32 and bf16 SwiGLU experts on the CPU compute their forward with prepacked
        weights (model/experts.py PackedWeights); ConfigError where torch has no oneDNN.
        origins: uid -> origin of the given modules' weights ("" or absent: unknown); the seed's init
        has the origin of its weights, the one a model directory written from it has too."""
        self.spec, self.optimizer_config, self.device = spec, optimizer, torch.device(device)
        self._on_cpu = self.device.type == "cpu"
        self.kept = ActivationCache(activation_cache_bytes)
        self.experts: dict[str, HostedExpert] = {}
        modules = modules or {}
        for uid in uids:
            if uid in modules:
                module, origin = modules[uid], (origins or {}).get(uid, "")
            else:
                module = init_expert(spec.d_model, spec.d_ff, seed=seed, uid=uid)
                origin = module_origin(uid, module)
            module = module.to(self.device)
            forward = gpt_oss_forward if isinstance(module, GptOssExpert) else expert_forward
            self.experts[uid] = HostedExpert(module, forward=forward, origin=origin)
        if prepack_weights:
            self._prepack()

    def _prepack(self) -> None:
        if not torch.backends.mkldnn.is_available():
            raise ConfigError("prepack_weights=true needs a torch built with oneDNN (mkldnn); this one has none")
        try:  # at start, not at the first request: some builds (CPUs) have oneDNN without these ops
            check_prepacking(torch.float32)
        except Exception as e:
            raise ConfigError(f"prepack_weights=true: this torch cannot pack weights with oneDNN ({e})") from e
        dtypes = (torch.float32,) + tuple(dtype for dtype in PACKABLE_DTYPES if dtype != torch.float32 and can_prepack(dtype))
        unpacked = [uid for uid, hosted in self.experts.items() if not prepack_weights(hosted.module, dtypes)]
        logger.info("prepacked the weights of %d of %d experts", len(self.experts) - len(unpacked), len(self.experts))
        if unpacked:
            names = " or ".join(str(dtype).removeprefix("torch.") for dtype in dtypes)
            logger.warning(
                "prepack_weights: %d of %d experts are not %s SwiGLU experts on the CPU and compute unpacked (first: %s)",
                len(unpacked), len(self.experts), names, unpacked[0],
            )

    def forward(self, uid: str, x_ND: torch.Tensor, keep_for: Tags = ()) -> torch.Tensor:
        """keep_for: (forward_id, rows) per caller whose rows make up x_ND, in order; rows of a
        non-empty forward_id keep their activations for a Backward that names it."""
        hosted = self.experts[uid]
        if hosted.step_due:
            self._apply_due_step(hosted)
        hosted.rows_served += x_ND.shape[0]
        on_cpu = self._on_cpu  # (each skipped no-op torch call saves a few us when decoding)
        if not on_cpu:
            x_ND = x_ND.to(self.device)
        training = self.kept.max_bytes > 0 and any(forward_id for forward_id, _ in keep_for)
        if not training or not isinstance(hosted.module, SwiGLUExpert):  # others recompute for a backward
            y_ND = hosted.forward(hosted.module, x_ND)
            return y_ND if on_cpu else y_ND.cpu()
        y_ND, kept = expert_forward_keep(hosted.module, x_ND)
        offset = 0
        for forward_id, rows in keep_for:
            if forward_id:  # a slice of a merged batch is copied, so it does not pin the whole batch
                part = tuple(t if rows == t.shape[0] else t[offset : offset + rows].clone() for t in kept)
                self.kept.put(forward_id, uid, hosted.revision, part)
            offset += rows
        return y_ND.cpu()

    def backward(
        self, uid: str, x_ND: torch.Tensor, grad_y_ND: torch.Tensor, forward_ids: Tags = (), *, defer_step: bool = False,
    ) -> torch.Tensor:
        """Return grad_x; accumulate parameter grads and step every `update_every` rows.
        forward_ids: (forward_id, rows) per caller, as in forward(); kept activations are used when
        every caller's are still held, else the forward is recomputed.
        defer_step: leave a step that falls due for apply_due_step (the node runs it after answering,
        so the caller does not wait for the optimizer); any later call on this expert applies it
        first, so no request ever computes with the weights before it."""
        hosted = self.experts[uid]
        self._apply_due_step(hosted)
        kept = self._take_kept(uid, hosted.revision, forward_ids) if forward_ids else None
        x_ND, grad_y_ND = x_ND.to(self.device), grad_y_ND.to(self.device)
        grad_x_ND, grads = expert_param_grads(hosted.module, x_ND, grad_y_ND, kept)
        if kept is not None:
            self.kept.reused_rows += x_ND.shape[0]
        hosted.rows_served += x_ND.shape[0]
        if _all_finite(grad_x_ND, grads):
            self._accumulate(hosted, grads, x_ND.shape[0], defer_step)
        else:  # some rows overflow: only they are refused (merged callers each on their own)
            grad_x_ND = self._accumulate_finite_callers(hosted, x_ND, grad_y_ND, forward_ids, defer_step)
        return grad_x_ND.cpu()

    def _accumulate(self, hosted: HostedExpert, grads: dict, rows: int, defer_step: bool) -> None:
        add_grads(grads)
        hosted.rows_since_step += rows
        if hosted.rows_since_step >= self.optimizer_config.update_every:
            hosted.step_due = True
            if not defer_step:
                self._apply_due_step(hosted)

    def _accumulate_finite_callers(self, hosted: HostedExpert, x_ND, grad_y_ND, callers: Tags, defer_step: bool) -> torch.Tensor:
        """A backward whose grads overflow: accumulate each caller's rows whose grads are finite; the
        others add nothing and get NaN input grads, which the service answers with an overflow error.
        A refused request changes nothing, and one caller's huge grad_outputs never poison the rest's."""
        parts, offset = [], 0
        for _, rows in callers or [("", x_ND.shape[0])]:
            grad_x_ND, grads = expert_param_grads(hosted.module, x_ND[offset : offset + rows], grad_y_ND[offset : offset + rows])
            if _all_finite(grad_x_ND, grads):
                self._accumulate(hosted, grads, rows, defer_step=True)  # every caller's grads from the same weights
            else:
                grad_x_ND = torch.full_like(grad_x_ND, math.nan)
            parts.append(grad_x_ND)
            offset += rows
        if not defer_step:
            self._apply_due_step(hosted)
        return torch.cat(parts)

    def input_grad(self, uid: str, x_ND: torch.Tensor, grad_y_ND: torch.Tensor) -> torch.Tensor:
        """A backward's input grads alone: no parameter grads, no step, no state touched (the rows of
        a retried backward that another replica may already have applied)."""
        hosted = self.experts[uid]
        self._apply_due_step(hosted)
        hosted.rows_served += x_ND.shape[0]
        return expert_backward(hosted.module, x_ND.to(self.device), grad_y_ND.to(self.device), param_grads=False).cpu()

    def apply_due_step(self, uid: str) -> bool:
        """Apply the expert's deferred optimizer step, if one is due; returns whether it did."""
        return self._apply_due_step(self.experts[uid])

    def _apply_due_step(self, hosted: HostedExpert) -> bool:
        """The due step, with step_due cleared only once it is done: visible_version and fingerprint,
        read from other threads meanwhile, see the step as applied, never the state before it."""
        if not hosted.step_due:
            return False
        optimizer = self._optimizer(hosted)
        grads = [param.grad for param in hosted.module.parameters() if param.grad is not None]
        norm = float(torch.stack([grad.norm() for grad in grads]).norm()) if grads else 0.0
        if not math.isfinite(norm):  # finite inputs and grads can still overflow: never write inf/NaN into weights
            logger.warning("dropped an optimizer step whose gradient norm is %s (gradients of %d rows)", norm, hosted.rows_since_step)
            optimizer.zero_grad(set_to_none=True)
            hosted.rows_since_step, hosted.step_due = 0, False
            return False
        max_norm = self.optimizer_config.max_grad_norm
        if max_norm and norm > max_norm:  # as torch.nn.utils.clip_grad_norm_ scales
            for grad in grads:
                grad.mul_(max_norm / (norm + 1e-6))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        hosted.revision += 1
        hosted.rows_since_step, hosted.version, hosted.step_due = 0, hosted.version + 1, False
        return True

    # ---- replicas (node/replica_sync.py): on the compute thread, like every other use of the weights

    def parameter_specs(self, uid: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """name -> (shape, dtype) of an expert's parameters: what a peer's weights must match."""
        return {name: (tuple(param.shape), param.dtype) for name, param in self.experts[uid].module.named_parameters()}

    def export_state(self, uid: str) -> tuple[int, dict[str, torch.Tensor]]:
        """(version, name -> CPU copy of each parameter) of one expert, for a replica to start from or average with."""
        hosted = self.experts[uid]
        self._apply_due_step(hosted)
        return hosted.version, {name: _cpu_copy(param) for name, param in hosted.module.named_parameters()}

    def adopt_state(self, uid: str, version: int, tensors: dict[str, torch.Tensor]) -> None:
        """Start this replica from a peer's weights (parameter_specs-checked): take them and the peer's
        version; optimizer state and accumulated gradients start empty."""
        hosted = self.experts[uid]
        with torch.no_grad():
            for name, param in hosted.module.named_parameters():
                param.copy_(tensors[name])
                param.grad = None
        hosted.optimizer, hosted.version, hosted.rows_since_step, hosted.step_due = None, version, 0, False
        hosted.revision += 1

    def average_with(self, uid: str, tensors: dict[str, torch.Tensor], *, take: bool = False) -> None:
        """One averaging round with a peer replica: weights := (own + peer's) / 2, the same on both
        sides bit for bit; take=True: weights := the peer's (replicas settling once training stopped).
        Optimizer state and accumulated gradients stay; the version (optimizer steps) stays too, so
        rounds without training in between find nothing new to average."""
        hosted = self.experts[uid]
        self._apply_due_step(hosted)
        with torch.no_grad():
            for name, param in hosted.module.named_parameters():
                if take:
                    param.copy_(tensors[name])
                else:
                    param.add_(tensors[name].to(param.device)).mul_(0.5)
        hosted.averaged += 1
        hosted.revision += 1

    def _take_kept(self, uid: str, revision: int, forward_ids: Tags) -> tuple[torch.Tensor, ...] | None:
        parts = [self.kept.take(forward_id, uid, revision, rows) if forward_id else None for forward_id, rows in forward_ids]
        if any(part is None for part in parts):
            return None
        return parts[0] if len(parts) == 1 else tuple(torch.cat(tensors) for tensors in zip(*parts))

    def _optimizer(self, hosted: HostedExpert) -> NodeOptimizer:
        # Lazily, so a node that only serves inference never holds optimizer state.
        if hosted.optimizer is None:
            hosted.optimizer = make_optimizer(hosted.module.parameters(), self.optimizer_config)
        return hosted.optimizer

    def state_dict(self, uids=None) -> dict:
        """A deep copy on the CPU of everything a restart needs, of `uids` (default: every hosted
        expert); taken on the compute thread, so consistent. A checkpoint written on any device
        loads on any other."""
        state = {}
        for uid in self.experts if uids is None else uids:
            hosted = self.experts[uid]
            self._apply_due_step(hosted)
            state[uid] = {
                "weights": {k: _cpu_copy(v) for k, v in hosted.module.state_dict().items()},
                "optimizer": _clone_tree(hosted.optimizer.state_dict()) if hosted.optimizer else None,
                "grads": {n: _cpu_copy(p.grad) for n, p in hosted.module.named_parameters() if p.grad is not None},
                "version": hosted.version,
                "rows_since_step": hosted.rows_since_step,
            }
        return {"model": dataclasses.asdict(self.spec), "experts": state}

    def load_state_dict(self, state: dict) -> list[str]:
        """Restore experts found in `state`; returns the UIDs restored. Shape mismatches raise ValueError."""
        if not _same_spec(state.get("model"), self.spec):
            raise ValueError(f"checkpoint is for model {state.get('model')}, but this node serves {self.spec}")
        restored = []
        for uid, hosted in self.experts.items():
            saved = state["experts"].get(uid)
            if saved is None:
                continue
            hosted.module.load_state_dict(saved["weights"])
            if saved["optimizer"] is not None:
                self._optimizer(hosted).load_state_dict(saved["optimizer"])
            for name, param in hosted.module.named_parameters():
                grad = saved["grads"].get(name)
                param.grad = None if grad is None else grad.to(param.device, copy=True)
            hosted.version, hosted.rows_since_step = saved["version"], saved["rows_since_step"]
            hosted.step_due = False
            hosted.revision += 1
            restored.append(uid)
        return restored

    def fingerprint(self, uids=None) -> dict[str, tuple[int, int, int]]:
        """Per expert of `uids` (default: all), changes whenever its weights, optimizer state or
        accumulated grads change (a due step counts as applied: state_dict applies it)."""
        experts = self.experts if uids is None else {uid: self.experts[uid] for uid in uids}
        return {uid: (h.visible_version, 0 if h.step_due else h.rows_since_step, h.averaged) for uid, h in experts.items()}


def _all_finite(grad_x_ND: torch.Tensor, grads: dict) -> bool:
    return all_finite(grad_x_ND) and all(all_finite(grad) for grad in grads.values())


def _same_spec(saved, spec: ModelSpec) -> bool:
    """Compare a checkpoint's model dict with the spec; fields added since it was written take defaults."""
    try:
        return isinstance(saved, dict) and ModelSpec(**saved) == spec
    except (TypeError, ValueError):
        return False


def _cpu_copy(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu", copy=True)


def _clone_tree(tree):
    if isinstance(tree, torch.Tensor):
        return _cpu_copy(tree)
    if isinstance(tree, dict):
        return {k: _clone_tree(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_clone_tree(v) for v in tree]
    return tree
