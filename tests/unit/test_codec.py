"""protocol/codec.py: bit-exact round trips, raw little-endian bytes, zero-copy decode, bad messages rejected."""

import pickle
import types

import numpy as np
import pytest
import torch

from moeswarm.protocol import codec, expert_pb2
from moeswarm.protocol.errors import BadRequest


def _random(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "make",
    [
        lambda: _random(7, 16),
        lambda: _random(16, 7).t(),  # transposed: not contiguous
        lambda: _random(8, 32)[::2, 3:19],  # strided slice
        lambda: _random(1, 1),
        lambda: _random(()),  # 0-d
    ],
    ids=["contiguous", "transposed", "strided", "single", "scalar"],
)
def test_fp32_round_trip_is_bit_exact(make):
    x = make()
    y = codec.decode(codec.encode(x))
    assert y.dtype == torch.float32
    assert y.shape == x.shape
    assert torch.equal(y, x)


def test_fp32_round_trip_keeps_special_values_and_signed_zero():
    x = torch.tensor([[0.0, -0.0, float("inf"), -float("inf")], [1e-45, -3.4e38, 1.0, float("nan")]])
    y = codec.decode(codec.encode(x))
    # Compare bit patterns: NaN != NaN and 0.0 == -0.0 would hide a lossy codec.
    assert torch.equal(y.view(torch.int32), x.view(torch.int32))


def test_empty_batch_round_trip():
    x = torch.empty(0, 12)
    message = codec.encode(x)
    assert list(message.shape) == [0, 12] and message.data == b""
    y = codec.decode(message)
    assert y.shape == (0, 12) and y.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_round_trip_equals_cast(dtype):
    x = _random(5, 9, seed=1)
    y = codec.decode(codec.encode(x.to(dtype)))
    assert y.dtype == dtype
    assert torch.equal(y, x.to(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_wire_dtype_argument_casts(dtype):
    x = _random(4, 6, seed=2)
    message = codec.encode(x, dtype)
    assert message.dtype == codec.WIRE_NAME_OF[dtype]
    assert len(message.data) == x.numel() * 2
    assert torch.equal(codec.decode(message), x.to(dtype))


def test_wire_dtype_float32_upcasts_half_exactly():
    x = _random(3, 3, seed=3).to(torch.bfloat16)
    y = codec.decode(codec.encode(x, torch.float32))
    assert y.dtype == torch.float32 and torch.equal(y, x.float())


def test_encode_rejects_dtype_that_has_no_wire_name():
    with pytest.raises(TypeError, match="float64"):
        codec.encode(torch.zeros(2, 2, dtype=torch.float64))


def test_encode_detaches_tensors_that_require_grad():
    x = _random(2, 3, seed=4).requires_grad_(True)
    y = codec.decode(codec.encode(x * 1))
    assert not y.requires_grad and torch.equal(y, x.detach())


def test_wire_bytes_are_raw_little_endian_without_pickle(monkeypatch):
    def no_pickle(*args, **kwargs):
        raise AssertionError("the codec must not unpickle")

    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "Unpickler", no_pickle)
    x = _random(3, 5, seed=5)
    message = codec.encode(x)
    assert message.data == x.numpy().astype("<f4").tobytes()
    assert torch.equal(codec.decode(message), x)


def test_decode_same_message_twice_gives_equal_values():
    message = codec.encode(_random(6, 4, seed=6))
    assert torch.equal(codec.decode(message), codec.decode(message))


def test_decode_is_a_view_of_the_message_bytes():
    # decode only reads .dtype, .shape and .data, so a plain object lets us hold the exact bytes object.
    data = _random(4, 8, seed=7).numpy().tobytes()
    message = types.SimpleNamespace(dtype="float32", shape=[4, 8], data=data)
    y = codec.decode(message)
    assert y.data_ptr() == np.frombuffer(data, dtype=np.uint8).ctypes.data


def test_decode_checks_max_elements_before_byte_count():
    message = codec.encode(torch.zeros(10, 10))
    assert codec.decode(message, max_elements=100).shape == (10, 10)
    with pytest.raises(BadRequest, match="over the limit of 99"):
        codec.decode(message, max_elements=99)
    # A shape claiming a huge tensor is refused by the limit, without needing its bytes.
    huge = expert_pb2.Tensor(dtype="float32", shape=[1 << 40, 1 << 20], data=b"")
    with pytest.raises(BadRequest, match="over the limit"):
        codec.decode(huge, max_elements=1 << 20)


@pytest.mark.parametrize("delta", [-1, 1, -4, 4])
def test_decode_rejects_wrong_byte_count(delta):
    message = codec.encode(torch.zeros(2, 3))
    message.data = message.data[:delta] if delta < 0 else message.data + b"\0" * delta
    with pytest.raises(BadRequest, match="needs 24 bytes"):
        codec.decode(message)


@pytest.mark.parametrize("name", ["float64", "int32", "", "FLOAT32", "torch.float32"])
def test_decode_rejects_unknown_dtype(name):
    message = expert_pb2.Tensor(dtype=name, shape=[1], data=b"\0" * 8)
    with pytest.raises(BadRequest, match="unsupported tensor dtype"):
        codec.decode(message)


def test_decode_rejects_negative_dimension():
    # [-2, -3] has a positive product: the byte count alone would not catch it.
    message = expert_pb2.Tensor(dtype="float32", shape=[-2, -3], data=b"\0" * 24)
    with pytest.raises(BadRequest, match="negative dimension"):
        codec.decode(message)
