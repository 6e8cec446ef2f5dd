"""An expert's weights in chunks (the ExportState RPC) and their checked reassembly by the receiver.

A node that starts a new replica, or averages with one, pulls a peer's weights this way
(node/replica_sync.py). What arrives is untrusted: the receiver knows the names, shapes and dtypes
its own module has, and accepts nothing else: no unknown or repeated parameter, no byte beyond a
parameter's size, no gap, no change of version mid-stream, no NaN or infinity.
"""

from __future__ import annotations

import asyncio
import math
from typing import Iterator

import torch

from moeswarm.protocol import expert_pb2
from moeswarm.protocol.codec import WIRE_NAME_OF, decode, tensor_payload
from moeswarm.protocol.errors import AllReplicasFailed, BadRequest, MoeSwarmError, NodeUnavailable, error_from_rpc
from moeswarm.protocol.records import ExpertRecord
from moeswarm.protocol.wire import TensorView

FETCH_TIMEOUT_S = 120.0  # one expert's weights; a 336 MiB Mixtral expert at 10 MB/s takes 35 s
# Connecting to the peer, within FETCH_TIMEOUT_S. A peer gone off the network (no RST) leaves gRPC's
# connect waiting 20 s; a reachable one connects in a few round trips.
CONNECT_TIMEOUT_S = 10.0
CHUNK_BYTES = 4 << 20  # data bytes per chunk, unless either side's message limit asks for less
CHUNK_HEADER_BYTES = 1024  # room for a chunk's other fields under a message limit
# A caller that asks for smaller chunks gets these (unless the sender's own message limit is lower):
# 1-byte chunks made the sender do a message's work per byte, 3M messages for the default 3 MiB expert.
MIN_CHUNK_BYTES = 64 << 10
# The slowest an export may go on average: past export_time_limit_s the sender ends it, so a reader
# that takes a chunk now and then cannot hold one of the sender's few export slots for long.
EXPORT_MIN_BYTES_PER_S = 1 << 20


def chunk_bytes_for(max_message_bytes: int, asked: int = 0) -> int:
    """Data bytes per chunk: CHUNK_BYTES, or what the caller asked for (`asked`, 0: no wish) but at
    least MIN_CHUNK_BYTES; never more than the sender's message limit allows."""
    limit = min(CHUNK_BYTES, max_message_bytes - CHUNK_HEADER_BYTES)
    return min(limit, max(asked, MIN_CHUNK_BYTES)) if asked > 0 else limit


def export_time_limit_s(total_bytes: int, chunk_timeout_s: float) -> float:
    """How long the sender lets an export of `total_bytes` run: the time a reader may take for one
    chunk, plus the whole at EXPORT_MIN_BYTES_PER_S (a 350 MB expert: 30 + 334 s; it takes 35 s at 10 MB/s)."""
    return chunk_timeout_s + total_bytes / EXPORT_MIN_BYTES_PER_S


def state_chunks(uid: str, version: int, tensors: dict[str, torch.Tensor], chunk_bytes: int = CHUNK_BYTES) -> Iterator[expert_pb2.StateChunk]:
    """The chunks of `tensors` (CPU copies, taken consistently), parameter by parameter, in order.
    A parameter with no elements still sends one (empty) chunk, so the receiver sees every name."""
    for name, tensor in tensors.items():
        dtype_name, shape, data = tensor_payload(tensor)
        for offset in range(0, max(data.nbytes, 1), chunk_bytes):
            yield expert_pb2.StateChunk(
                uid=uid, version=version, name=name, dtype=dtype_name, shape=shape, offset=offset,
                data=data[offset : offset + chunk_bytes].tobytes(),
            )


class StateAssembler:
    """Collects the chunks of one expert's weights; `result()` once the stream ended.
    expected: parameter name -> (shape, dtype) of the receiver's own module."""

    def __init__(self, uid: str, expected: dict[str, tuple[tuple[int, ...], torch.dtype]]):
        self.uid, self.expected = uid, expected
        self.version: int | None = None
        self._buffers: dict[str, bytearray] = {}
        self._sizes = {name: math.prod(shape) * dtype.itemsize for name, (shape, dtype) in expected.items()}

    def add(self, chunk: expert_pb2.StateChunk) -> None:
        """Take one chunk; BadRequest names what is wrong with it."""
        if chunk.uid != self.uid:
            raise BadRequest(f"sent a chunk of expert {chunk.uid[:96]!r}, asked for {self.uid}")
        if chunk.version < 0 or (self.version is not None and chunk.version != self.version):
            raise BadRequest(f"{self.uid}: chunk version {chunk.version} after version {self.version}")
        self.version = chunk.version
        spec = self.expected.get(chunk.name)
        if spec is None:
            raise BadRequest(f"{self.uid}: unknown parameter {chunk.name[:64]!r}; expected {sorted(self.expected)}")
        shape, dtype = spec
        if tuple(chunk.shape) != shape or chunk.dtype != WIRE_NAME_OF[dtype]:
            raise BadRequest(
                f"{self.uid}.{chunk.name}: sent {chunk.dtype[:32]} {list(chunk.shape)[:8]}, this node has {WIRE_NAME_OF[dtype]} {list(shape)}"
            )
        buffer = self._buffers.setdefault(chunk.name, bytearray())
        size = self._sizes[chunk.name]
        if chunk.offset != len(buffer) or (len(buffer) == size and size > 0):
            raise BadRequest(f"{self.uid}.{chunk.name}: chunk at byte {chunk.offset}, expected byte {len(buffer)} of {size}")
        if not chunk.data and size > 0:  # it would never end the stream: a loop until the deadline
            raise BadRequest(f"{self.uid}.{chunk.name}: empty chunk at byte {len(buffer)} of {size}")
        if len(buffer) + len(chunk.data) > size:
            raise BadRequest(f"{self.uid}.{chunk.name}: {len(buffer) + len(chunk.data)} bytes, the parameter has {size}")
        buffer += chunk.data

    def result(self) -> tuple[int, dict[str, torch.Tensor]]:
        """(version, name -> tensor) once every parameter arrived whole and finite."""
        incomplete = [name for name, size in self._sizes.items() if len(self._buffers.get(name, b"")) != size or name not in self._buffers]
        if incomplete:
            raise BadRequest(f"{self.uid}: the stream ended before all of {sorted(incomplete)} arrived")
        tensors = {}
        for name, (shape, dtype) in self.expected.items():
            tensor = decode(TensorView(WIRE_NAME_OF[dtype], list(shape), memoryview(self._buffers[name])))
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise BadRequest(f"{self.uid}.{name}: contains NaN or infinite values")
            tensors[name] = tensor
        return self.version, tensors


async def fetch_state(
    endpoint: str, uid: str, expected: dict[str, tuple[tuple[int, ...], torch.dtype]], *, max_message_bytes: int,
    timeout_s: float = FETCH_TIMEOUT_S, connect_timeout_s: float = CONNECT_TIMEOUT_S,
) -> tuple[int, dict[str, torch.Tensor]]:
    """(version, name -> tensor) of the replica of `uid` at `endpoint`, checked against `expected`
    (the caller's own parameter names, shapes and dtypes). Raises our errors (protocol/errors.py);
    a malformed stream is BadRequest."""
    import grpc

    # Senders send chunks of at least MIN_CHUNK_BYTES. This node's max_message_bytes guards what it
    # serves; a chunk that size from a peer it chose to pull from is no risk.
    message_bytes = max(max_message_bytes, MIN_CHUNK_BYTES + CHUNK_HEADER_BYTES)
    options = [("grpc.max_receive_message_length", message_bytes), ("grpc.max_send_message_length", message_bytes)]
    request = expert_pb2.StateRequest(uid=uid, max_chunk_bytes=message_bytes - CHUNK_HEADER_BYTES)
    assembler = StateAssembler(uid, expected)
    async with grpc.aio.insecure_channel(endpoint, options=options) as channel:
        await _connect(channel, endpoint, connect_timeout_s)
        call = channel.unary_stream(
            "/moeswarm.ExpertService/ExportState", request_serializer=expert_pb2.StateRequest.SerializeToString,
            response_deserializer=expert_pb2.StateChunk.FromString,
        )
        try:
            async for chunk in call(request, timeout=timeout_s):
                assembler.add(chunk)
        except grpc.RpcError as e:
            raise error_from_rpc(e, endpoint) from e
    return assembler.result()


async def _connect(channel, endpoint: str, timeout_s: float) -> None:
    """Wait until the channel is connected; NodeUnavailable once a connect attempt fails (a refused
    connection: the node is gone, its records outlive it) or after timeout_s (no answer at all: its
    machine is off the network, where gRPC's own connect waits 20 s). channel_ready() alone would
    wait out timeout_s on a refused connection too, retrying it: 10 s per start beside a dead replica."""
    import grpc

    async def connected() -> None:
        state = channel.get_state(try_to_connect=True)
        while state != grpc.ChannelConnectivity.READY:
            if state == grpc.ChannelConnectivity.TRANSIENT_FAILURE:
                raise NodeUnavailable(f"{endpoint}: connection failed")
            await channel.wait_for_state_change(state)
            state = channel.get_state(try_to_connect=True)

    try:
        await asyncio.wait_for(connected(), timeout_s)
    except asyncio.TimeoutError:
        raise NodeUnavailable(f"{endpoint}: could not connect within {timeout_s:.0f} s") from None


async def fetch_newest(
    uid: str, replicas: list[ExpertRecord], expected: dict[str, tuple[tuple[int, ...], torch.dtype]], *, max_message_bytes: int,
    unreachable: set[str] | None = None,
) -> tuple[ExpertRecord, int, dict[str, torch.Tensor]]:
    """(record, version, weights) of the replica with the most optimizer steps that answers, trying
    them in that order; AllReplicasFailed names every endpoint tried and why.
    unreachable: endpoints that did not answer (skipped here, and those that fail now are added).
    Share one set between the experts of a pass, so that a peer gone off the network costs its
    connect timeout once, not once per expert."""
    attempts: list[tuple[str, str]] = []
    unreachable = set() if unreachable is None else unreachable
    for record in sorted(replicas, key=lambda r: -r.version):
        if record.endpoint in unreachable:
            attempts.append((record.endpoint, "did not answer for another expert just before; skipped"))
            continue
        try:
            version, tensors = await fetch_state(record.endpoint, uid, expected, max_message_bytes=max_message_bytes)
        except MoeSwarmError as e:
            attempts.append((record.endpoint, str(e)))
            if isinstance(e, NodeUnavailable):
                unreachable.add(record.endpoint)
            continue
        return record, version, tensors
    raise AllReplicasFailed(uid, attempts)
