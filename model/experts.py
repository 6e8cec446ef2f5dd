"""SwiGLU expert FFN (Mixtral's), its deterministic init, and the forward/backward a node runs.

Shapes: N rows routed to this expert, D model dim, F expert hidden dim.
"""

from __future__ import annotations

import hashlib
import zlib

import torch
from torch import nn
from torch.nn import functional as F


class SwiGLUExpert(nn.Module):
    """y = w2(silu(w1 x) * w3 x), as Mixtral's block_sparse_moe experts (no biases)."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff, bias=False)  # gate
        self.w3 = nn.Linear(d_model, d_ff, bias=False)  # up
        self.w2 = nn.Linear(d_ff, d_model, bias=False)  # down
        self.packed: PackedWeights | None = None  # set by prepack_weights(): expert_forward's weights on a CPU node

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x_ND)) * self.w3(x_ND))


EXPERT_PARAMS = ("w1.weight", "w2.weight", "w3.weight")  # a SwiGLU expert's tensors, as saved


def tensor_crc32(tensor: torch.Tensor) -> int:
    """CRC-32 of a CPU tensor's bytes in memory order (what safetensors writes for a contiguous one)."""
    return zlib.crc32(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


def expert_origin(uid: str, crcs: list[int]) -> str:
    """16 hex digits naming an expert's weights by its UID and the CRC-32 of each of its tensors
    (EXPERT_PARAMS order, bytes as saved). Two independent inits or imports differ in it; weights
    trained from the same start keep the start's (ExpertRecord.origin)."""
    text = uid + "".join(f";{name}={crc:08x}" for name, crc in zip(EXPERT_PARAMS, crcs, strict=True))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def module_origin(uid: str, module: torch.nn.Module) -> str:
    """expert_origin of a SwiGLU expert module's weights as they are now (fp32 init: as saved)."""
    state = module.state_dict()
    return expert_origin(uid, [tensor_crc32(state[name]) for name in EXPERT_PARAMS])


def expert_seed(seed: int, uid: str) -> int:
    """A stable 63-bit seed for one expert: same (seed, uid) gives the same weights on any machine."""
    digest = hashlib.sha256(f"{seed}:{uid}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def init_expert(d_model: int, d_ff: int, *, seed: int, uid: str) -> SwiGLUExpert:
    """Create an expert whose weights depend only on (d_model, d_ff, seed, uid)."""
    expert = SwiGLUExpert(d_model, d_ff)
    generator = torch.Generator().manual_seed(expert_seed(seed, uid))
    with torch.no_grad():
        for linear in (expert.w1, expert.w3, expert.w2):
            fan_in = linear.weight.shape[1]
            linear.weight.normal_(0.0, fan_in**-0.5, generator=generator)
    return expert


def expert_forward(expert: SwiGLUExpert, x_ND: torch.Tensor) -> torch.Tensor:
    """Inference forward in the expert's dtype; returns y_ND (a new tensor). Calls F.linear directly
    and enters no_grad itself (the decorator's per-call copy of the context costs more): for the small
    batches of decoding, Python overhead is a visible part of a node's time."""
    with torch.no_grad():
        return _swiglu_forward(expert, x_ND)[0]


@torch.no_grad()
def expert_forward_keep(expert: SwiGLUExpert, x_ND: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """expert_forward (the same operations, so the same output) that also returns what
    expert_backward needs to skip recomputing the forward: the two hidden projections (h1, h3)."""
    return _swiglu_forward(expert, x_ND)


def _swiglu_forward(expert: SwiGLUExpert, x_ND: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    w1, w3, w2 = _weights(expert)
    if x_ND.dtype != w1.dtype:
        x_ND = x_ND.to(w1.dtype)
    packed = _packed_for(expert, x_ND)
    h1_NF, h3_NF = _hidden(x_ND, w1, w3, packed)
    a_NF = F.silu(h1_NF) * h3_NF
    y_ND = F.linear(a_NF, w2) if packed is None else _packed_linear(a_NF, packed[2])
    return y_ND, (h1_NF, h3_NF)


def _weights(expert: SwiGLUExpert) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w1, w3, w2) weights, read from the module's dicts: `expert.w1.weight` goes through
    nn.Module.__getattr__ twice per weight, ~2 us a forward, which a node decoding feels."""
    modules = expert._modules
    return modules["w1"]._parameters["weight"], modules["w3"]._parameters["weight"], modules["w2"]._parameters["weight"]


def _hidden(x_ND: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, packed: tuple[torch.Tensor, ...] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(w1 x, w3 x): the two hidden projections, with the kernel the forward uses for these rows."""
    if packed is None:
        return F.linear(x_ND, w1), F.linear(x_ND, w3)
    return _packed_linear(x_ND, packed[0]), _packed_linear(x_ND, packed[1])


# ---- prepacked weights (node config `prepack_weights`) ------------------------------------------

PREPACK_MIN_ROWS = 4  # fp32: below this MKL's plain matmul is faster (1 row of a 256x1024 expert: 102 vs 135 us)
_PACK_ROWS_HINT = 64  # oneDNN's reorder takes a batch size hint; any gives the same results
PACKABLE_DTYPES = (torch.float32, torch.bfloat16)


class PackedWeights:
    """oneDNN-prepacked copies of a SwiGLU expert's weights, for its forward on a CPU node. A
    plain matmul repacks the weight matrix every time; these are packed once and again only after
    a weight changed (an optimizer step or a load bumps its version). Forward through
    ExpertRegistry, 1 thread: fp32 at 4-512 rows 1.3-1.8x faster for a 1024x4096 expert, 1.1-1.4x
    for 256x1024, with results that differ from MKL's in the last bits (about 2e-6 on outputs of
    size 1); bf16 at any row count, 1.4-1.5x for 1024x4096 at 1-16 rows and 1.2-1.3x for 256x1024
    at 1-64 rows (about 1.05x at 256), with the plain path's results (its CPU bf16 matmul is
    oneDNN's too). Costs a second copy of the weights in memory, and a
    repack after every optimizer step (18 ms for fp32 1024x4096, 1.1 ms for 256x1024): for
    serving, not for a node stepping after every batch."""

    def __init__(self) -> None:
        self._key: tuple = ()
        self._packed: tuple[torch.Tensor, ...] = ()
        self.packs = 0  # times the weights were (re)packed

    def of(self, *weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
        key = tuple((id(w), w.data_ptr(), w._version) for w in weights)
        if key != self._key:
            self._packed = tuple(torch.ops.mkldnn._reorder_linear_weight(w.detach(), _PACK_ROWS_HINT) for w in weights)
            self._key = key
            self.packs += 1
        return self._packed


def prepack_weights(expert: nn.Module, dtypes: tuple[torch.dtype, ...] = PACKABLE_DTYPES) -> bool:
    """Give a SwiGLU expert on the CPU whose weights are of one of `dtypes` PackedWeights for
    expert_forward (and the backward's recomputed forward); returns False and changes nothing for
    any other expert."""
    weight = getattr(getattr(expert, "w1", None), "weight", None)
    if not isinstance(expert, SwiGLUExpert) or weight.dtype not in dtypes or weight.device.type != "cpu":
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    expert.packed = PackedWeights()
    return True


def check_prepacking(dtype: torch.dtype = torch.float32) -> None:
    """Pack and use a tiny weight: raises where this torch's oneDNN lacks the ops PackedWeights uses
    for `dtype` (some CPUs have no bf16 kernels)."""
    weight, x = torch.ones(2, 3, dtype=dtype), torch.ones(_PACK_ROWS_HINT, 3, dtype=dtype)
    if not torch.equal(_packed_linear(x, torch.ops.mkldnn._reorder_linear_weight(weight, _PACK_ROWS_HINT)), x @ weight.t()):
        raise RuntimeError("oneDNN's packed matmul gave a wrong result")


def _packed_for(expert: SwiGLUExpert, x_ND: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
    packed = getattr(expert, "packed", None)
    if packed is None or x_ND.device.type != "cpu" or (x_ND.dtype == torch.float32 and x_ND.shape[0] < PREPACK_MIN_ROWS):
        return None
    return packed.of(expert.w1.weight, expert.w3.weight, expert.w2.weight)


def _packed_linear(x_NK: torch.Tensor, packed_weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x_NK.contiguous(), packed_weight, None, "none", [], "")


def expert_backward(
    expert: nn.Module, x_ND: torch.Tensor, grad_y_ND: torch.Tensor, kept: tuple[torch.Tensor, torch.Tensor] | None = None,
    *, param_grads: bool = True,
) -> torch.Tensor:
    """Recompute the forward from x, backpropagate grad_y; returns grad_x_ND and ADDS param grads
    (param_grads=False: returns grad_x_ND alone and leaves every parameter's grad as it was).

    Stateless about the forward, so any replica holding the same weights can serve the backward.
    SwiGLU experts take a hand-written backward (below), which uses `kept` (expert_forward_keep's
    (h1, h3) for these rows) instead of recomputing them when given; other kinds go through autograd.
    """
    if not param_grads:
        if isinstance(expert, SwiGLUExpert):
            return _swiglu_backward(expert, x_ND, grad_y_ND, kept, param_grads=False)[0]
        x_ND = x_ND.to(next(expert.parameters()).dtype).detach().requires_grad_(True)
        with torch.enable_grad():
            return torch.autograd.grad(expert(x_ND), x_ND, grad_y_ND.to(x_ND.dtype))[0]
    grad_x_ND, grads = expert_param_grads(expert, x_ND, grad_y_ND, kept)
    add_grads(grads)
    return grad_x_ND


def expert_param_grads(
    expert: nn.Module, x_ND: torch.Tensor, grad_y_ND: torch.Tensor, kept: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[nn.Parameter, torch.Tensor]]:
    """expert_backward's results without adding them: (grad_x_ND, {parameter: its gradient from
    these rows}), so a caller can check them before they reach the accumulated grads (add_grads)."""
    if isinstance(expert, SwiGLUExpert):
        return _swiglu_backward(expert, x_ND, grad_y_ND, kept)
    params = [param for param in expert.parameters() if param.requires_grad]
    x_ND = x_ND.to(params[0].dtype).detach().requires_grad_(True)
    with torch.enable_grad():
        grad_x_ND, *grads = torch.autograd.grad(expert(x_ND), [x_ND, *params], grad_y_ND.to(x_ND.dtype))
    return grad_x_ND, dict(zip(params, grads))


def add_grads(grads: dict[nn.Parameter, torch.Tensor]) -> None:
    """param.grad += grad for each (the gradient becomes param.grad where there is none yet)."""
    for param, grad in grads.items():
        if param.grad is None:
            param.grad = grad
        else:
            param.grad.add_(grad)


@torch.no_grad()
def _swiglu_backward(
    expert: SwiGLUExpert, x_ND: torch.Tensor, grad_y_ND: torch.Tensor, kept=None, *, param_grads: bool = True,
) -> tuple[torch.Tensor, dict[nn.Parameter, torch.Tensor]]:
    """The same operations autograd runs for SwiGLUExpert.forward, minus the output projection that a
    recomputed forward does not need: 8 matmuls instead of 9 (6 with `kept`), no graph. Results equal
    autograd's. Returns (grad_x_ND, {parameter: gradient}), the dict empty for param_grads=False."""
    w1, w3, w2 = expert.w1.weight, expert.w3.weight, expert.w2.weight
    x_ND, g_ND = x_ND.to(w1.dtype), grad_y_ND.to(w1.dtype)
    h1_NF, h3_NF = kept if kept is not None else _hidden(x_ND, w1, w3, _packed_for(expert, x_ND))
    a_NF = F.silu(h1_NF)
    g_h_NF = g_ND.mm(w2)  # d loss / d (silu(h1) * h3)
    g_h3_NF = g_h_NF * a_NF
    g_h1_NF = torch.ops.aten.silu_backward(g_h_NF * h3_NF, h1_NF)
    grad_x_ND = g_h1_NF.mm(w1) + g_h3_NF.mm(w3)
    if not param_grads:  # input grads alone: 3 matmuls fewer, no parameter touched
        return grad_x_ND, {}
    grad_w2 = g_ND.t().mm(a_NF * h3_NF)
    return grad_x_ND, {w1: g_h1_NF.t().mm(x_ND), w3: g_h3_NF.t().mm(x_ND), w2: grad_w2}
    grad_w2 = g_ND.t().mm(a_NF * h3_NF)
    grads = {w1: g_h1_NF.t().mm(x_ND), w3: g_h3_NF.t().mm(x_ND), w2: grad_w2}
    for param, grad in grads.items():
        if param.grad is None:
            param.grad = grad
        else:
            param.grad.add_(grad)
    return g_h1_NF.mm(w1) + g_h3_NF.mm(w3)
