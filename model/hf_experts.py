"""The routed-expert computations a node runs for Hugging Face checkpoints: SwiGLU experts (reusing
experts.py) and GPT-OSS experts (biases, clamped gated activation), built from `ExpertWeights`.

Shapes: N rows routed to this expert, H hidden size, F expert hidden size.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from moeswarm.model.experts import SwiGLUExpert, expert_forward
from moeswarm.model.hf_checkpoint import ExpertWeights
from moeswarm.protocol.errors import ConfigError


def _assign(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """Give `linear` these tensors as its parameters (no copy; the dtype is the tensors')."""
    linear.weight = nn.Parameter(weight)
    if bias is not None:
        linear.bias = nn.Parameter(bias)


def swiglu_from_weights(w: ExpertWeights) -> SwiGLUExpert:
    """A SwiGLU expert (w1 = gate, w3 = up, w2 = down) holding `w`'s tensors, in their dtype."""
    f, h = w.gate.shape
    with torch.device("meta"):  # nothing to initialise: every parameter is replaced below
        expert = SwiGLUExpert(h, f)
    _assign(expert.w1, w.gate)
    _assign(expert.w3, w.up)
    _assign(expert.w2, w.down)
    return expert


class GptOssExpert(nn.Module):
    """One GPT-OSS expert: y = down((up + 1) * g * sigmoid(alpha * g)) with g, up clamped to the limit.

    As transformers 5.23 `GptOssExperts._apply_gate`: gate clamped above at `limit`, up clamped to
    [-limit, limit]. Each bias is added after its matmul, as transformers' grouped matmul does.
    """

    def __init__(self, d_model: int, d_ff: int, *, limit: float = 7.0, alpha: float = 1.702):
        super().__init__()
        self.gate = nn.Linear(d_model, d_ff)
        self.up = nn.Linear(d_model, d_ff)
        self.down = nn.Linear(d_ff, d_model)
        self.limit, self.alpha = limit, alpha

    def forward(self, x_NH: torch.Tensor) -> torch.Tensor:
        return _gpt_oss_math(self, x_NH)


def _gpt_oss_math(expert: GptOssExpert, x_NH: torch.Tensor) -> torch.Tensor:
    gate_NF = (F.linear(x_NH, expert.gate.weight) + expert.gate.bias).clamp(max=expert.limit)
    up_NF = (F.linear(x_NH, expert.up.weight) + expert.up.bias).clamp(min=-expert.limit, max=expert.limit)
    h_NF = (up_NF + 1) * (gate_NF * torch.sigmoid(gate_NF * expert.alpha))
    return F.linear(h_NF, expert.down.weight) + expert.down.bias


@torch.no_grad()
def gpt_oss_forward(expert: GptOssExpert, x_NH: torch.Tensor) -> torch.Tensor:
    """Inference forward in the expert's dtype; returns y_NH (a new tensor). The node's no-grad path."""
    return _gpt_oss_math(expert, x_NH.to(expert.gate.weight.dtype))


def _checkpoint_order(weight_OI: torch.Tensor) -> torch.Tensor:
    """The same [out, in] matrix stored as GPT-OSS checkpoints store it: [in, out] row-major. With this
    layout F.linear takes the BLAS path transformers' matmul on the transposed experts takes; with the
    usual layout small batches differed by about 1e-7 in fp32."""
    return weight_OI.T.contiguous().T


def gpt_oss_from_weights(w: ExpertWeights, *, limit: float, alpha: float) -> GptOssExpert:
    """A GPT-OSS expert holding `w`'s values (biases required), in their dtype; weights are stored in
    the checkpoint's memory order (see `_checkpoint_order`), biases as they are."""
    if w.gate_bias is None or w.up_bias is None or w.down_bias is None:
        raise ConfigError("a GPT-OSS expert needs gate, up and down biases; these weights have none")
    f, h = w.gate.shape
    with torch.device("meta"):
        expert = GptOssExpert(h, f, limit=limit, alpha=alpha)
    _assign(expert.gate, _checkpoint_order(w.gate), w.gate_bias)
    _assign(expert.up, _checkpoint_order(w.up), w.up_bias)
    _assign(expert.down, _checkpoint_order(w.down), w.down_bias)
    return expert


def expert_from_weights(
    kind: Literal["swiglu", "gpt_oss"], w: ExpertWeights, **family_params: float
) -> SwiGLUExpert | GptOssExpert:
    """The expert module of `kind` (HFFamily.expert_kind) holding `w`; family_params = HFFamily.expert_params()."""
    if kind == "swiglu":
        if family_params:
            raise ConfigError(f"SwiGLU experts take no parameters; got {sorted(family_params)}")
        return swiglu_from_weights(w)
    if kind == "gpt_oss":
        return gpt_oss_from_weights(w, **family_params)
    raise ConfigError(f"unknown expert kind {kind!r}; known: 'swiglu', 'gpt_oss'")


def hf_expert_forward(expert: SwiGLUExpert | GptOssExpert, x_NH: torch.Tensor) -> torch.Tensor:
    """No-grad inference of either kind: `expert_forward` for SwiGLU, `gpt_oss_forward` for GPT-OSS."""
    if isinstance(expert, GptOssExpert):
        return gpt_oss_forward(expert, x_NH)
    return expert_forward(expert, x_NH)
