"""Tensor codec: dtype + shape + raw little-endian bytes. No pickle; decoding does not copy."""

from __future__ import annotations

import math
import sys
import warnings

import torch

from moeswarm.protocol import expert_pb2
from moeswarm.protocol.errors import BadRequest

# Wire dtypes we accept, by their wire name. fp32 is the default (bit-exact); the others are opt-in.
WIRE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
WIRE_NAME_OF: dict[torch.dtype, str] = {dtype: name for name, dtype in WIRE_DTYPES.items()}
# Same-width integer views, used to byte-swap on big-endian hosts.
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_LITTLE_ENDIAN = sys.byteorder == "little"
_NUMPY_DTYPES = frozenset({torch.float32, torch.float16})  # wire dtypes numpy has (bfloat16 it has not)
# Decoded tensors start at a multiple of this: torch's CPU kernels give bit-identical fp32 results
# from 16-byte-aligned inputs, not from arbitrary ones (protocol/wire.py pads payloads to it).
ALIGN = 16

# Decoded tensors are read-only views of the message bytes; torch warns about that once. We never
# write into them (the node and client only read inputs), so the warning carries no information.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)


def encode(tensor: torch.Tensor, wire_dtype: torch.dtype | None = None) -> expert_pb2.Tensor:
    """Serialise a tensor (any layout, any device) as `wire_dtype` (default: its own dtype)."""
    message = expert_pb2.Tensor()
    encode_into(message, tensor, wire_dtype)
    return message


def encode_into(message: expert_pb2.Tensor, tensor: torch.Tensor, wire_dtype: torch.dtype | None = None) -> None:
    """Fill a Tensor message in place. Prefer this inside a parent
    message (`parent.field`, `repeated.add()`): with protobuf's upb runtime, passing a built
    sub-message to a parent's constructor copies its payload again, which cost ~2 ms per MiB.
    The data path itself writes messages with protocol/wire.py, which copies the payload once."""
    dtype_name, shape, data = tensor_payload(tensor, wire_dtype)
    message.dtype = dtype_name
    message.shape[:] = shape
    message.data = data.tobytes()


def tensor_payload(tensor: torch.Tensor, wire_dtype: torch.dtype | None = None) -> tuple[str, list[int], memoryview]:
    """(wire dtype name, shape, little-endian bytes) of a tensor; the bytes are a view of its memory
    when it is already a contiguous CPU tensor of the wire dtype (on a little-endian host)."""
    tensor = tensor.detach()
    if wire_dtype is not None and tensor.dtype != wire_dtype:
        tensor = tensor.to(wire_dtype)
    if tensor.dtype not in WIRE_NAME_OF:
        raise TypeError(f"cannot send dtype {tensor.dtype}; wire dtypes are {sorted(WIRE_DTYPES)}")
    if tensor.dtype in _NUMPY_DTYPES and _LITTLE_ENDIAN and tensor.is_cpu and tensor.is_contiguous():
        # The common case (fp32/fp16 rows on a little-endian CPU) in two torch calls, not six: on the
        # data path each torch call between two RPCs runs with cold caches and costs several us.
        return WIRE_NAME_OF[tensor.dtype], list(tensor.shape), memoryview(tensor.numpy().reshape(-1)).cast("B")
    flat = tensor.cpu().contiguous().reshape(-1)
    as_ints = flat.view(_INT_VIEW[flat.element_size()]).numpy()
    if not _LITTLE_ENDIAN:
        as_ints = as_ints.byteswap()
    return WIRE_NAME_OF[tensor.dtype], list(tensor.shape), memoryview(as_ints).cast("B")


def decode(message: expert_pb2.Tensor, *, max_elements: int | None = None) -> torch.Tensor:
    """Read a Tensor message without copying its bytes (the result is a read-only view).

    Checks dtype, shape and byte count before torch sees the data; raises BadRequest otherwise.
    """
    name = message.dtype  # protobuf builds a new str (and bytes, below) on every access: read each once
    dtype = WIRE_DTYPES.get(name)
    if dtype is None:
        raise BadRequest(f"unsupported tensor dtype {name[:32]!r}; wire dtypes are {sorted(WIRE_DTYPES)}")
    shape = tuple(message.shape)
    if shape and min(shape) < 0:
        raise BadRequest(f"negative dimension in tensor shape {list(shape)}")
    numel = math.prod(shape)
    if max_elements is not None and numel > max_elements:
        raise BadRequest(f"tensor of shape {list(shape)} has {numel} elements, over the limit of {max_elements}")
    itemsize = dtype.itemsize
    data = message.data
    if len(data) != numel * itemsize:
        raise BadRequest(f"tensor of shape {list(shape)} and dtype {name} needs {numel * itemsize} bytes, got {len(data)}")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    if _LITTLE_ENDIAN:
        flat = torch.frombuffer(data, dtype=dtype)
        tensor = flat.view(*shape) if shape else flat.view(())  # view(*dims): half the cost of view(tuple)
        if tensor.data_ptr() % ALIGN:  # a payload at an odd offset (a sender that does not pad): copy
            tensor = torch.frombuffer(bytes(data), dtype=dtype).view(shape)
        return tensor
    swapped = torch.frombuffer(data, dtype=_INT_VIEW[itemsize]).numpy().byteswap()
    return torch.from_numpy(swapped).view(dtype).view(shape)
