"""protocol/wire.py against protobuf itself: the same bytes out, the same messages in, BadRequest on junk."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from google.protobuf.message import DecodeError

from moeswarm.protocol import codec, expert_pb2, wire
from moeswarm.protocol.errors import BadRequest


def _protobuf_request(model, request_id, inputs, grads=None, backward=False, wire_dtype=None) -> bytes:
    request = expert_pb2.ExpertRequest(model=model, request_id=request_id, backward=backward)
    for uid, x in inputs.items():
        batch = request.batches.add(uid=uid)
        codec.encode_into(batch.inputs, x, wire_dtype)
        if grads is not None:
            codec.encode_into(batch.grad_outputs, grads[uid], wire_dtype)
    return request.SerializeToString()


CASES = {
    "one row": ({"m.L0.E1": torch.randn(1, 8)}, None, False, None),
    "two experts, grads, backward": (
        {"m.L0.E1": torch.randn(3, 8), "m.L2.E0": torch.randn(5, 8)},
        {"m.L0.E1": torch.randn(3, 8), "m.L2.E0": torch.randn(5, 8)},
        True,
        None,
    ),
    "bf16 wire": ({"m.L0.E1": torch.randn(4, 8)}, None, False, torch.bfloat16),
    "non-contiguous": ({"m.L0.E1": torch.randn(8, 6).t()}, None, False, None),
    "empty batch": ({"m.L0.E1": torch.randn(0, 8)}, None, False, None),
    "unicode model name": ({"m.L0.E1": torch.randn(2, 8)}, None, False, torch.float16),
}


def _without_pads(message):
    for tensor in getattr(message, "tensors", []):
        tensor.ClearField("pad")
    for batch in getattr(message, "batches", []):
        batch.inputs.ClearField("pad")
        if batch.HasField("grad_outputs"):
            batch.grad_outputs.ClearField("pad")
    return message


def _payload_offsets(data: bytes, views) -> list[int]:
    start = np.frombuffer(data, dtype=np.uint8).ctypes.data
    return [np.frombuffer(view.data, dtype=np.uint8).ctypes.data - start for view in views if len(view.data)]


@pytest.mark.parametrize("name", CASES)
def test_protobuf_reads_our_requests_as_its_own_and_payloads_are_aligned(name):
    inputs, grads, backward, wire_dtype = CASES[name]
    model = "modèle" if "unicode" in name else "m"
    ours, payload = wire.encode_request(model, "id-7", inputs, grads, backward=backward, wire_dtype=wire_dtype)
    expected = _protobuf_request(model, "id-7", inputs, grads, backward, wire_dtype)
    assert _without_pads(expert_pb2.ExpertRequest.FromString(ours)) == expert_pb2.ExpertRequest.FromString(expected)
    itemsize = (wire_dtype or torch.float32).itemsize
    assert payload == sum(t.numel() for t in inputs.values()) * itemsize * (2 if grads else 1)
    view = wire.parse_request(ours)
    tensors = [b.inputs for b in view.batches] + [b.grad_outputs for b in view.batches if b.grad_outputs]
    assert all(offset % codec.ALIGN == 0 for offset in _payload_offsets(ours, tensors))


@pytest.mark.parametrize("id_length", range(0, 40, 3))
def test_every_header_length_still_aligns_every_payload(id_length):
    inputs = {f"m.L{i}.E{i * 7}": torch.randn(i + 1, 5) for i in range(4)}
    ours, _ = wire.encode_request("m", "x" * id_length, inputs, inputs, backward=True)
    view = wire.parse_request(ours)
    tensors = [t for b in view.batches for t in (b.inputs, b.grad_outputs)]
    assert all(offset % codec.ALIGN == 0 for offset in _payload_offsets(ours, tensors))
    for batch, x in zip(view.batches, inputs.values()):
        assert torch.equal(codec.decode(batch.inputs), x)


@pytest.mark.parametrize("boundary", [128, 128**2])
def test_sizes_around_varint_boundaries_still_parse_and_align(boundary):
    """A tensor's or a batch's size crossing 128**k bytes changes its length prefix, which moves every
    payload after it (and so the pads, and so the size again): each payload must still land aligned,
    and protobuf must read the same message. Sweeps sizes, header lengths and with/without grads."""
    for elements in range((boundary - 110) // 2, (boundary + 20) // 2):
        for id_length in range(0, 16, 1 if boundary == 128 else 5):
            for uid, grads in (("m.L0.E9", False), ("m.L0.E99999", True), ("m.L0.E999999999999", False)):
                inputs = {uid: torch.randn(elements, 1).half(), "m.L1.E2": torch.randn(1, 1).half()}
                ours, _ = wire.encode_request("m", "i" * id_length, inputs, inputs if grads else None, backward=grads)
                expected = _protobuf_request("m", "i" * id_length, inputs, inputs if grads else None, backward=grads)
                assert _without_pads(expert_pb2.ExpertRequest.FromString(ours)) == expert_pb2.ExpertRequest.FromString(expected)
                view = wire.parse_request(ours)
                tensors = [t for b in view.batches for t in (b.inputs, b.grad_outputs) if t is not None]
                assert all(offset % codec.ALIGN == 0 for offset in _payload_offsets(ours, tensors)), (elements, id_length, uid)
                response = wire.encode_response("i" * id_length, [(x, x.dtype) for x in inputs.values()])
                parsed = wire.parse_response(response)
                assert all(offset % codec.ALIGN == 0 for offset in _payload_offsets(response, parsed.tensors))


def test_response_parses_as_protobufs_own():
    outputs = [(torch.randn(3, 8), torch.float32), (torch.randn(2, 8), torch.bfloat16), (torch.randn(0, 8), torch.float32)]
    expected = expert_pb2.ExpertResponse(request_id="r")
    for tensor, wire_dtype in outputs:
        codec.encode_into(expected.tensors.add(), tensor, wire_dtype)
    ours = wire.encode_response("r", outputs)
    assert _without_pads(expert_pb2.ExpertResponse.FromString(ours)) == expected
    assert all(offset % codec.ALIGN == 0 for offset in _payload_offsets(ours, wire.parse_response(ours).tensors))


def test_decode_copies_a_misaligned_payload_and_keeps_it_exact():
    x = torch.randn(3, 4)
    data = b"\0" * 3 + x.numpy().tobytes()
    tensor = codec.decode(wire.TensorView("float32", [3, 4], memoryview(data)[3:]))
    assert tensor.data_ptr() % codec.ALIGN == 0 and torch.equal(tensor, x)


def _same_tensor(view: wire.TensorView, message: expert_pb2.Tensor) -> bool:
    return view.dtype == message.dtype and list(view.shape) == list(message.shape) and bytes(view.data) == message.data


def _same_request(view: wire.RequestView, message: expert_pb2.ExpertRequest) -> bool:
    if (view.model, view.request_id, view.backward, view.keep_activations, len(view.batches)) != (
        message.model, message.request_id, message.backward, message.keep_activations, len(message.batches)
    ):
        return False
    for ours, theirs in zip(view.batches, message.batches):
        if (ours.uid, ours.forward_id, ours.input_grads_only) != (theirs.uid, theirs.forward_id, theirs.input_grads_only):
            return False
        if not _same_tensor(ours.inputs, theirs.inputs):
            return False
        if ours.HasField("grad_outputs") != theirs.HasField("grad_outputs"):
            return False
        if ours.HasField("grad_outputs") and not _same_tensor(ours.grad_outputs, theirs.grad_outputs):
            return False
    return True


@pytest.mark.parametrize("name", CASES)
def test_parse_request_reads_what_protobuf_reads(name):
    inputs, grads, backward, wire_dtype = CASES[name]
    data = _protobuf_request("m", "id", inputs, grads, backward, wire_dtype)
    view = wire.parse_request(data)
    assert _same_request(view, expert_pb2.ExpertRequest.FromString(data))
    for batch, (uid, x) in zip(view.batches, inputs.items()):
        decoded = codec.decode(batch.inputs)
        assert torch.equal(decoded, x.to(wire_dtype or x.dtype))


def test_parse_skips_unknown_fields_and_reads_unpacked_shapes():
    tensor = expert_pb2.Tensor(dtype="float32", data=torch.arange(6.0).numpy().tobytes())
    # shape [2, 3] unpacked (field 2 as two varints), plus unknown fields of every wire type.
    unknown = bytes([9 << 3 | 0, 5, 10 << 3 | 1]) + b"\0" * 8 + bytes([11 << 3 | 5]) + b"\0" * 4 + bytes([12 << 3 | 2, 2, 1, 2])
    tensor_bytes = tensor.SerializeToString() + bytes([2 << 3 | 0, 2, 2 << 3 | 0, 3]) + unknown
    batch_bytes = expert_pb2.ExpertBatch(uid="m.L0.E0").SerializeToString() + bytes([2 << 3 | 2, len(tensor_bytes)]) + tensor_bytes
    data = expert_pb2.ExpertRequest(model="m").SerializeToString() + bytes([3 << 3 | 2, len(batch_bytes)]) + batch_bytes + unknown
    view = wire.parse_request(data)
    assert _same_request(view, expert_pb2.ExpertRequest.FromString(data))
    assert torch.equal(codec.decode(view.batches[0].inputs), torch.arange(6.0).view(2, 3))


def test_decoded_tensors_share_the_received_bytes():
    data, _ = wire.encode_request("m", "id", {"m.L0.E0": torch.randn(4, 8)})
    x = codec.decode(wire.parse_request(data).batches[0].inputs)
    assert np.shares_memory(x.numpy(), np.frombuffer(data, dtype=np.uint8)), "decode copied the payload"


def test_response_round_trip_with_errors():
    message = expert_pb2.ExpertResponse(request_id="e", error_code=-3, error_message="nope ✗")
    view = wire.parse_response(message.SerializeToString())
    assert (view.request_id, view.error_code, view.error_message, view.tensors) == ("e", -3, "nope ✗", [])
    data = wire.encode_response("ok", [(torch.randn(2, 4), torch.float16)])
    (tensor,) = wire.parse_response(data).tensors
    assert codec.decode(tensor).dtype == torch.float16


@pytest.mark.parametrize("junk", [b"\xff" * 12, b"\x1a\x05ab", b"\x0a\x80", bytes([3 << 3 | 3]), bytes([0]), b"\x0a\x02\xff\xfe"])
def test_malformed_bytes_raise_bad_request(junk):
    with pytest.raises(BadRequest):
        wire.parse_request(junk)


def test_field_counts_are_capped_so_a_message_of_tiny_fields_is_refused_at_once():
    x = {f"m.L0.E{i}": torch.randn(1, 4) for i in range(3)}
    data = wire.encode_request("m", "id", x)[0]
    assert len(wire.parse_request(data, max_batches=3).batches) == 3
    with pytest.raises(BadRequest, match="more than 2 expert batches"):
        wire.parse_request(data, max_batches=2)
    response = wire.encode_response("id", [(t, torch.float32) for t in x.values()])
    assert len(wire.parse_response(response, max_tensors=3).tensors) == 3
    with pytest.raises(BadRequest, match="more than 2 tensors"):
        wire.parse_response(response, max_tensors=2)
    unknown = b"\x48\x00"  # field 9, varint 0: skipped like any unknown field, but counted
    assert wire.parse_request(unknown * wire.MAX_FIELDS, max_batches=0).batches == []
    with pytest.raises(BadRequest, match="ExpertRequest has more than"):
        wire.parse_request(unknown * 200_000)
    for shape in ([1] * (wire.MAX_DIMS + 1), [1] * 100_000):  # packed, as protobuf writes it
        tensor = expert_pb2.Tensor(dtype="float32", shape=shape).SerializeToString()
        with pytest.raises(BadRequest, match=f"more than {wire.MAX_DIMS} dimensions"):
            wire.parse_response(b"\x12" + _varint(len(tensor)) + tensor)
    unpacked = b"".join(b"\x10\x01" for _ in range(wire.MAX_DIMS + 1))  # field 2 as single varints
    with pytest.raises(BadRequest, match="dimensions"):
        wire.parse_response(b"\x12" + _varint(len(unpacked)) + unpacked)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes(out + bytes([value]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_corruptions_never_escape_as_other_errors_and_agree_with_protobuf(seed):
    rng = random.Random(seed)
    inputs, grads, backward, _ = CASES["two experts, grads, backward"]
    good = _protobuf_request("m", "id", inputs, grads, backward)
    accepted = 0
    for _ in range(3000):
        data = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            action = rng.random()
            if not data:
                break
            if action < 0.6:
                data[rng.randrange(len(data))] = rng.randrange(256)
            elif action < 0.8:
                del data[rng.randrange(len(data)) :]
            else:
                data.insert(rng.randrange(len(data) + 1), rng.randrange(256))
        data = bytes(data)
        try:
            view = wire.parse_request(data)
        except BadRequest:
            continue
        accepted += 1
        try:
            theirs = expert_pb2.ExpertRequest.FromString(data)
        except DecodeError:
            pytest.fail(f"wire accepted bytes protobuf rejects: {data[:64]!r}")
        assert _same_request(view, theirs)
    assert accepted > 100  # many corruptions only touch payload bytes: those must still parse


@pytest.mark.parametrize("rows", [1, 100, 2000])  # 1 KiB, 100 KiB and 2 MiB payloads around SMALL_PAYLOAD_BYTES
def test_write_and_read_pick_either_encoder_and_agree(rows):
    x, g = torch.randn(rows, 256), torch.randn(rows, 256)
    request = wire.read_request(wire.write_request("m", "id", {"m.L0.E0": x}, {"m.L0.E0": g}, backward=True))
    (batch,) = request.batches
    assert request.backward and torch.equal(codec.decode(batch.inputs), x) and torch.equal(codec.decode(batch.grad_outputs), g)
    (tensor,) = wire.read_response(wire.write_response("id", [(x, torch.float32)])).tensors
    assert torch.equal(codec.decode(tensor), x)
    with pytest.raises(BadRequest):
        wire.read_request(b"\xff" * (rows * 1024))


@pytest.mark.parametrize("rows", [2, 200])  # through protobuf's encoder, and through ours
def test_keep_activations_and_forward_ids_cross_both_encoders(rows):
    x = {"m.L0.E1": torch.randn(rows, 64), "m.L1.E0": torch.randn(rows, 64)}
    data = wire.write_request("m", "f-1", x, keep_activations=True)
    for message in (wire.read_request(data), expert_pb2.ExpertRequest.FromString(data)):
        assert message.keep_activations and [b.forward_id for b in message.batches] == ["", ""]
    ids = {"m.L1.E0": "f-1"}  # one batch names its forward, the other does not
    data = wire.write_request("m", "b-2", x, {uid: -t for uid, t in x.items()}, forward_ids=ids)
    view, message = wire.parse_request(data), expert_pb2.ExpertRequest.FromString(data)
    assert _same_request(view, _without_pads(message))
    assert not view.keep_activations and [b.forward_id for b in view.batches] == ["", "f-1"]


@pytest.mark.parametrize("rows", [2, 200])  # through protobuf's encoder, and through ours
def test_input_grads_only_is_per_batch_and_crosses_both_encoders(rows):
    x = {"m.L0.E1": torch.randn(rows, 64), "m.L1.E0": torch.randn(rows, 64)}
    data = wire.write_request("m", "b-3", x, {uid: -t for uid, t in x.items()}, backward=True, input_grads_only={"m.L0.E1"})
    view, message = wire.read_request(data), expert_pb2.ExpertRequest.FromString(data)
    assert [b.input_grads_only for b in view.batches] == [b.input_grads_only for b in message.batches] == [True, False]
