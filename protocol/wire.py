"""ExpertRequest / ExpertResponse bytes with one payload copy per direction, byte-compatible with expert.proto.

protobuf's Python runtime copies a `bytes` field on assignment, again on SerializeToString, again on
parse and again on every read of the field: five to six passes over each tensor per hop, which at
1 MiB cost more than gRPC's own transfer. Here the sender writes the protobuf wire format itself,
copying each tensor's memory once into the message (`b"".join`), placing each payload at a 16-byte
aligned offset (with Tensor.pad), and the receiver parses it into read-only views of the received
bytes (no copy at all). protobuf parses what we write into the same message, and our parser accepts
what protobuf writes for these messages (unknown fields skipped, packed or unpacked shapes), so any
gRPC client generated from expert.proto interoperates; tests/unit/test_wire.py checks both ways.

The parser reads untrusted bytes: every length is bounds-checked, varints are at most 10 bytes, and
anything malformed raises BadRequest.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from google.protobuf.message import DecodeError

from moeswarm.protocol import expert_pb2
from moeswarm.protocol.codec import ALIGN, encode_into, tensor_payload
from moeswarm.protocol.errors import BadRequest

# Wire types (protobuf encoding spec).
_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5

# The parser below is Python, so its time grows with the number of fields, not bytes: a message made of
# millions of tiny fields (or shape entries) would hold the node's event loop for seconds. Every
# message type has a cap on its fields, unknown ones included; ours write at most 6 per sub-message.
MAX_DIMS = 8  # shape entries of a Tensor
MAX_FIELDS = 32  # fields of a Tensor or an ExpertBatch, and top-level fields besides batches/tensors
MAX_ITEMS = 4096  # batches of a request, tensors of a response, unless the reader knows better


# ---------------------------------------------------------------------------------------------- write

_PAD_TAG = 15 << 3 | _LEN  # Tensor.pad


def _varint(value: int) -> bytes:
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _varint_len(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


def _key(field: int, wire: int) -> bytes:
    return bytes([field << 3 | wire])


def _pad_to_align(offset: int) -> int:
    """Bytes of Tensor.pad field (0, or a 2-byte field header plus zeros) that move `offset` to an
    ALIGN boundary: sizes 0 and 2..17 cover every residue."""
    shift = -offset % ALIGN
    return 0 if shift == 0 else (ALIGN + 1 if shift == 1 else shift)


@dataclasses.dataclass
class _TensorPart:
    """A Tensor sub-message: header (dtype, shape), `pad` bytes of padding field, then data."""

    field: int
    header: bytes
    data: memoryview
    pad: int = 0  # total bytes of the pad field: 0, or 2..129 (a 1-byte length)
    size: int = 0  # of the sub-message, set by place()
    extra_pad: int = 0  # a multiple of ALIGN added to the pad (see _assemble)

    def place(self, position: int) -> int:
        """Choose the pad so the data starts ALIGN-aligned when this field starts at `position`;
        returns the position after the field. The size's varint length depends on the pad and the
        pad on that length: try the shorter length, then the longer one, whose pad can grow by
        ALIGN until the size really needs the longer varint (at a 128**k boundary)."""
        n = self.data.nbytes
        if n == 0:
            self.pad, self.size = 0, len(self.header)
            return position + 1 + _varint_len(self.size) + self.size
        bare = len(self.header) + 1 + _varint_len(n) + n  # the size without a pad field
        shortest = _varint_len(bare)
        for length in (shortest, shortest + 1):
            pad = _pad_to_align(position + 1 + length + len(self.header) + 1 + _varint_len(n)) + self.extra_pad
            while _varint_len(bare + pad) < length:
                pad += ALIGN
            if _varint_len(bare + pad) == length:
                self.pad, self.size = pad, bare + pad
                return position + 1 + length + self.size
        raise AssertionError("unreachable: the longer varint always fits")  # pragma: no cover

    def chunks(self) -> tuple[bytes, memoryview | None]:
        """The field's bytes: everything before the payload, then the payload (None if empty)."""
        opening = _key(self.field, _LEN) + _varint(self.size) + self.header
        if self.pad:
            opening += bytes([_PAD_TAG, self.pad - 2]) + bytes(self.pad - 2)
        if not self.data.nbytes:
            return opening, None
        return opening + _key(3, _LEN) + _varint(self.data.nbytes), self.data


def _tensor_part(field: int, tensor: torch.Tensor, wire_dtype: torch.dtype | None) -> _TensorPart:
    dtype_name, shape, data = tensor_payload(tensor, wire_dtype)
    return _TensorPart(field, expert_pb2.Tensor(dtype=dtype_name, shape=shape).SerializeToString(), data)


def _assemble(head: bytes, groups: list[tuple[bytes | None, list[_TensorPart]]], tail: bytes = b"") -> bytes:
    """head, then per group either a batch sub-message (field 3: prefix bytes + its tensors) or, for
    prefix None, bare tensor fields; then tail. Pads each tensor so its data lands ALIGN-aligned.

    One pass places every tensor given the assumed varint length of each batch's size; a batch whose
    size needs a longer varint (at 128**k bytes) is placed again with it, and one that comes out
    shorter than assumed has its last tensor's pad grown by ALIGN (alignment unchanged)."""
    size_lengths = [1] * len(groups)
    batch_sizes = [0] * len(groups)
    for _ in range(4 * len(groups) + 4):
        position, settled = len(head), True
        for g, (prefix, parts) in enumerate(groups):
            start = position
            if prefix is not None:
                position += 1 + size_lengths[g] + len(prefix)
            for part in parts:
                position = part.place(position)
            if prefix is None:
                continue
            batch_sizes[g] = position - start - 1 - size_lengths[g]
            needed = _varint_len(batch_sizes[g])
            if needed > size_lengths[g]:
                size_lengths[g], settled = needed, False
            elif needed < size_lengths[g]:  # only after a grow, placed right at the boundary
                # (sizes depend on positions only through pads, so some tensor here has data)
                [part for part in parts if part.data.nbytes][-1].extra_pad += ALIGN
                settled = False
        if settled:
            break
    else:  # pragma: no cover
        raise AssertionError("tensor layout did not settle")
    chunks = [head]
    for g, (prefix, parts) in enumerate(groups):
        if prefix is not None:
            chunks.append(_key(3, _LEN) + _varint(batch_sizes[g]) + prefix)
        for part in parts:
            opening, data = part.chunks()
            chunks.append(opening)
            if data is not None:
                chunks.append(data)
    chunks.append(tail)
    return b"".join(chunks)  # the one copy of each payload


def encode_request(
    model: str,
    request_id: str,
    inputs: dict[str, torch.Tensor],
    grad_outputs: dict[str, torch.Tensor] | None = None,
    *,
    backward: bool = False,
    wire_dtype: torch.dtype | None = None,
    keep_activations: bool = False,
    forward_ids: dict[str, str] | None = None,
    input_grads_only: frozenset[str] | set[str] = frozenset(),
) -> tuple[bytes, int]:
    """A serialized ExpertRequest and its tensor payload in bytes."""
    groups = []
    forward_ids = forward_ids or {}
    for uid, x in inputs.items():
        parts = [_tensor_part(2, x, wire_dtype)]
        if grad_outputs is not None:
            parts.append(_tensor_part(3, grad_outputs[uid], wire_dtype))
        batch = expert_pb2.ExpertBatch(uid=uid, forward_id=forward_ids.get(uid, ""), input_grads_only=uid in input_grads_only)
        groups.append((batch.SerializeToString(), parts))
    head = expert_pb2.ExpertRequest(model=model, request_id=request_id, keep_activations=keep_activations).SerializeToString()
    data = _assemble(head, groups, _key(4, _VARINT) + b"\x01" if backward else b"")
    return data, sum(part.data.nbytes for _, parts in groups for part in parts)


def encode_response(request_id: str, outputs: list[tuple[torch.Tensor, torch.dtype]]) -> bytes:
    """A serialized ExpertResponse carrying (tensor, wire dtype) pairs, in order."""
    parts = [_tensor_part(2, tensor, wire_dtype) for tensor, wire_dtype in outputs]
    return _assemble(expert_pb2.ExpertResponse(request_id=request_id).SerializeToString(), [(None, parts)])


# Below this many payload bytes protobuf's own (C) encoder and parser win: their copies cost less
# than this module's Python-level framing (measured: 12 vs 37 us to encode a 1 KiB request).
SMALL_PAYLOAD_BYTES = 64 << 10


def payload_bytes(tensors, wire_dtype: torch.dtype | None = None) -> int:
    """Bytes the tensors take on the wire (each in `wire_dtype`, or its own dtype)."""
    return sum(t.numel() * (wire_dtype or t.dtype).itemsize for t in tensors)


def write_request(
    model, request_id, inputs, grad_outputs=None, *, backward=False, wire_dtype=None, keep_activations=False, forward_ids=None,
    input_grads_only=frozenset(), payload: int | None = None,
) -> bytes:
    """encode_request, through protobuf itself for small payloads. payload: the tensor bytes, if the
    caller has counted them already (payload_bytes of inputs, twice for a backward)."""
    if payload is None:
        payload = payload_bytes(inputs.values(), wire_dtype) * (2 if grad_outputs is not None else 1)
    if payload > SMALL_PAYLOAD_BYTES:
        return encode_request(
            model, request_id, inputs, grad_outputs, backward=backward, wire_dtype=wire_dtype,
            keep_activations=keep_activations, forward_ids=forward_ids, input_grads_only=input_grads_only,
        )[0]
    # Only the fields that are set, each on its own: this runs once per RPC, with cold caches
    # (decoding), where every call costs several times what it does in a loop.
    request = expert_pb2.ExpertRequest(model=model, request_id=request_id)
    if backward:
        request.backward = True
    if keep_activations:
        request.keep_activations = True
    for uid, x in inputs.items():
        batch = request.batches.add(uid=uid)  # filled in place: no payload copies
        if forward_ids and uid in forward_ids:
            batch.forward_id = forward_ids[uid]
        if input_grads_only and uid in input_grads_only:
            batch.input_grads_only = True
        encode_into(batch.inputs, x, wire_dtype)
        if grad_outputs is not None:
            encode_into(batch.grad_outputs, grad_outputs[uid], wire_dtype)
    return request.SerializeToString()


def write_response(request_id: str, outputs: list[tuple[torch.Tensor, torch.dtype]]) -> bytes:
    """encode_response, through protobuf itself for small payloads."""
    if sum(tensor.numel() * (wire_dtype or tensor.dtype).itemsize for tensor, wire_dtype in outputs) > SMALL_PAYLOAD_BYTES:
        return encode_response(request_id, outputs)
    response = expert_pb2.ExpertResponse(request_id=request_id)
    for tensor, wire_dtype in outputs:
        encode_into(response.tensors.add(), tensor, wire_dtype)
    return response.SerializeToString()


def read_request(data: bytes, max_batches: int = MAX_ITEMS) -> RequestView | expert_pb2.ExpertRequest:
    """parse_request, through protobuf itself for small messages (same attributes either way)."""
    return _read(data, functools.partial(parse_request, max_batches=max_batches), expert_pb2.ExpertRequest)


def read_response(data: bytes, max_tensors: int = MAX_ITEMS) -> ResponseView | expert_pb2.ExpertResponse:
    """parse_response, through protobuf itself for small messages."""
    return _read(data, functools.partial(parse_response, max_tensors=max_tensors), expert_pb2.ExpertResponse)


def _read(data: bytes, parse, message_class):
    if len(data) > SMALL_PAYLOAD_BYTES:
        return parse(data)  # in Python: bounded field counts keep a hostile message from holding the loop
    try:
        return message_class.FromString(data)
    except DecodeError as e:
        raise BadRequest(str(e)) from e


# ----------------------------------------------------------------------------------------------- read


@dataclasses.dataclass
class TensorView:
    """A parsed Tensor: the same attributes as expert_pb2.Tensor; `data` is a view of the message."""

    dtype: str = ""
    shape: list[int] = dataclasses.field(default_factory=list)
    data: memoryview | bytes = b""


@dataclasses.dataclass
class BatchView:
    uid: str = ""
    inputs: TensorView = dataclasses.field(default_factory=TensorView)
    grad_outputs: TensorView | None = None
    forward_id: str = ""
    input_grads_only: bool = False

    def HasField(self, name: str) -> bool:  # noqa: N802  (protobuf's spelling, used by validation)
        if name != "grad_outputs":
            raise ValueError(f"HasField({name!r}) is not supported")
        return self.grad_outputs is not None


@dataclasses.dataclass
class RequestView:
    model: str = ""
    request_id: str = ""
    batches: list[BatchView] = dataclasses.field(default_factory=list)
    backward: bool = False
    keep_activations: bool = False


@dataclasses.dataclass
class ResponseView:
    request_id: str = ""
    tensors: list[TensorView] = dataclasses.field(default_factory=list)
    error_code: int = 0
    error_message: str = ""


def parse_request(data: bytes, max_batches: int = MAX_ITEMS) -> RequestView:
    """Parse an ExpertRequest; BadRequest if it is not one, or has over `max_batches` batches."""
    view = memoryview(data)
    request = RequestView()
    for field, wire, value in _fields(view, 0, len(view), "ExpertRequest", MAX_FIELDS + max_batches):
        if field == 1 and wire == _LEN:
            request.model = _text(view, value, "model")
        elif field == 2 and wire == _LEN:
            request.request_id = _text(view, value, "request_id")
        elif field == 3 and wire == _LEN:
            if len(request.batches) == max_batches:
                raise BadRequest(f"ExpertRequest has more than {max_batches} expert batches")
            request.batches.append(_batch(view, *value))
        elif field == 4 and wire == _VARINT:
            request.backward = value != 0
        elif field == 5 and wire == _VARINT:
            request.keep_activations = value != 0
        elif field in (1, 2, 3, 4, 5):
            raise BadRequest(f"ExpertRequest field {field} has wire type {wire}")
    return request


def parse_response(data: bytes, max_tensors: int = MAX_ITEMS) -> ResponseView:
    """Parse an ExpertResponse; BadRequest if it is not one, or has over `max_tensors` tensors."""
    view = memoryview(data)
    response = ResponseView()
    for field, wire, value in _fields(view, 0, len(view), "ExpertResponse", MAX_FIELDS + max_tensors):
        if field == 1 and wire == _LEN:
            response.request_id = _text(view, value, "request_id")
        elif field == 2 and wire == _LEN:
            if len(response.tensors) == max_tensors:
                raise BadRequest(f"ExpertResponse has more than {max_tensors} tensors")
            response.tensors.append(_tensor(view, *value))
        elif field == 3 and wire == _VARINT:
            response.error_code = _int32(value)
        elif field == 4 and wire == _LEN:
            response.error_message = _text(view, value, "error_message")
        elif field in (1, 2, 3, 4):
            raise BadRequest(f"ExpertResponse field {field} has wire type {wire}")
    return response


def _batch(view: memoryview, start: int, end: int) -> BatchView:
    batch, seen = BatchView(), set()
    for field, wire, value in _fields(view, start, end, "ExpertBatch", MAX_FIELDS):
        if field == 1 and wire == _LEN:
            batch.uid = _text(view, value, "uid")
        elif field in (2, 3) and wire == _LEN:
            # protobuf would merge a repeated sub-message field; nobody sends that: refuse it
            if field in seen:
                raise BadRequest(f"ExpertBatch field {field} appears twice")
            seen.add(field)
            if field == 2:
                batch.inputs = _tensor(view, *value)
            else:
                batch.grad_outputs = _tensor(view, *value)
        elif field == 4 and wire == _LEN:
            batch.forward_id = _text(view, value, "forward_id")
        elif field == 5 and wire == _VARINT:
            batch.input_grads_only = value != 0
        elif field in (1, 2, 3, 4, 5):
            raise BadRequest(f"ExpertBatch field {field} has wire type {wire}")
    return batch


def _tensor(view: memoryview, start: int, end: int) -> TensorView:
    tensor = TensorView()
    for field, wire, value in _fields(view, start, end, "Tensor", MAX_FIELDS):
        if field == 1 and wire == _LEN:
            tensor.dtype = _text(view, value, "dtype")
        elif field == 2 and wire == _LEN:  # packed
            pos, stop = value
            while pos < stop:
                dim, pos = _read_varint(view, pos, stop)
                _add_dim(tensor.shape, dim)
        elif field == 2 and wire == _VARINT:  # unpacked, also valid proto3
            _add_dim(tensor.shape, value)
        elif field == 3 and wire == _LEN:
            tensor.data = view[value[0] : value[1]]
        elif field in (1, 2, 3):
            raise BadRequest(f"Tensor field {field} has wire type {wire}")
    return tensor


def _add_dim(shape: list[int], dim: int) -> None:
    if len(shape) == MAX_DIMS:
        raise BadRequest(f"Tensor shape has more than {MAX_DIMS} dimensions")
    shape.append(_int64(dim))


def _fields(view: memoryview, pos: int, end: int, what: str, max_fields: int):
    """Yield (field number, wire type, value): an int for varints, (start, end) for length-delimited.
    BadRequest after `max_fields` fields."""
    for _ in range(max_fields):
        if pos >= end:
            return
        key, pos = _read_varint(view, pos, end)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise BadRequest(f"{what}: field number 0 is invalid")
        if wire == _VARINT:
            value, pos = _read_varint(view, pos, end)
        elif wire == _LEN:
            size, pos = _read_varint(view, pos, end)
            if size > end - pos:
                raise BadRequest(f"{what}: field {field} claims {size} bytes, {end - pos} left")
            value, pos = (pos, pos + size), pos + size
        elif wire in (_FIXED64, _FIXED32):
            width = 8 if wire == _FIXED64 else 4
            if width > end - pos:
                raise BadRequest(f"{what}: field {field} is truncated")
            value, pos = None, pos + width
        else:  # groups (3, 4) are not proto3; 6 and 7 do not exist
            raise BadRequest(f"{what}: unsupported wire type {wire} (field {field})")
        yield field, wire, value
    if pos < end:
        raise BadRequest(f"{what} has more than {max_fields} fields")


def _read_varint(view: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    for i in range(10):
        if pos + i >= end:
            raise BadRequest("message is truncated inside a varint")
        byte = view[pos + i]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value & (2**64 - 1), pos + i + 1
        shift += 7
    raise BadRequest("varint longer than 10 bytes")


def _int64(value: int) -> int:
    return value - 2**64 if value >= 2**63 else value


def _int32(value: int) -> int:
    value &= 2**32 - 1
    return value - 2**32 if value >= 2**31 else value


def _text(view: memoryview, span: tuple[int, int], what: str) -> str:
    try:
        return str(view[span[0] : span[1]], "utf-8")
    except UnicodeDecodeError as e:
        raise BadRequest(f"{what} is not valid UTF-8") from e
