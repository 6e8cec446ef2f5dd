"""Async client for one node's ExpertService: one channel per endpoint, every call with a deadline.

Small requests go over one long-lived Stream call per node, which skips gRPC's per-call setup
(about half of a small call's round trip); a request goes unary when the stream is busy with
another one (so concurrent callers never queue behind each other) or when it is large (its time
is in the bytes, and a message over the node's size limit would end the whole stream).
"""

from __future__ import annotations

import asyncio
import itertools
import uuid

import grpc
import torch

from moeswarm.protocol import codec, expert_pb2, expert_pb2_grpc
from moeswarm.protocol.errors import NodeUnavailable, error_from_rpc, error_from_status

DEFAULT_MAX_MESSAGE_BYTES = 64 << 20
STREAM_MAX_BYTES = 256 << 10  # requests up to this payload use the stream


class ExpertClient:
    """Calls Forward/Backward/Info on one node. Raises our errors (protocol/errors.py) on failure."""

    def __init__(self, endpoint: str, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        self.endpoint = endpoint
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        self._channel = grpc.aio.insecure_channel(endpoint, options=options)
        # Request ids for logs: a random prefix per client plus a counter (uuid4 per call cost ~10 us).
        self._request_ids = (f"{uuid.uuid4().hex[:12]}-{i}" for i in itertools.count())
        self._stub = expert_pb2_grpc.ExpertServiceStub(self._channel)
        self._stream = None  # the open Stream call, made on first use and dropped on any failure
        self._stream_busy = False

    async def forward(
        self, model: str, inputs: dict[str, torch.Tensor], *, timeout_s: float, wire_dtype: torch.dtype | None = None
    ) -> dict[str, torch.Tensor]:
        """Run several experts of this node on their rows: {uid: x_ND} -> {uid: y_ND} (wire dtype)."""
        request, nbytes = _request(model, next(self._request_ids), inputs, None, wire_dtype)
        return await self._call(self._stub.Forward, request, nbytes, list(inputs), timeout_s)

    async def backward(
        self,
        model: str,
        inputs: dict[str, torch.Tensor],
        grad_outputs: dict[str, torch.Tensor],
        *,
        timeout_s: float,
        wire_dtype: torch.dtype | None = None,
    ) -> dict[str, torch.Tensor]:
        """Send output grads; returns input grads {uid: grad_x_ND}. The node accumulates param grads."""
        request, nbytes = _request(model, next(self._request_ids), inputs, grad_outputs, wire_dtype)
        return await self._call(self._stub.Backward, request, nbytes, list(inputs), timeout_s)

    async def info(self, *, timeout_s: float) -> expert_pb2.InfoResponse:
        try:
            return await self._stub.Info(expert_pb2.InfoRequest(), timeout=timeout_s)
        except grpc.RpcError as e:
            raise error_from_rpc(e, self.endpoint) from e

    async def _call(self, method, request, nbytes: int, uids: list[str], timeout_s: float) -> dict[str, torch.Tensor]:
        if nbytes <= STREAM_MAX_BYTES and not self._stream_busy:
            response = await self._call_on_stream(request, method is self._stub.Backward, timeout_s)
        else:
            try:
                response = await method(request, timeout=timeout_s)
            except grpc.RpcError as e:
                raise error_from_rpc(e, self.endpoint) from e
        if len(response.tensors) != len(uids):
            raise NodeUnavailable(f"{self.endpoint}: answered {len(response.tensors)} tensors for {len(uids)} expert batches")
        return {uid: codec.decode(tensor) for uid, tensor in zip(uids, response.tensors)}

    async def _call_on_stream(self, request, backward: bool, timeout_s: float) -> expert_pb2.ExpertResponse:
        """One request on the stream (at most one in flight, so answers pair with requests in order).
        A timeout, cancellation or broken stream drops it; the next call opens a fresh one."""
        request.backward = backward
        self._stream_busy = True
        try:
            if self._stream is None or self._stream.done():  # done: the node ended it (shutdown)
                self._stream = self._stub.Stream()
            if _timeout is not None:
                async with _timeout(timeout_s):
                    response = await _exchange(self._stream, request)
            else:  # Python 3.10
                response = await asyncio.wait_for(_exchange(self._stream, request), timeout_s)
        except asyncio.TimeoutError:
            self._drop_stream()
            raise NodeUnavailable(f"{self.endpoint}: DEADLINE_EXCEEDED: no answer within {timeout_s:.3g} s") from None
        except grpc.RpcError as e:
            self._drop_stream()
            raise error_from_rpc(e, self.endpoint) from e
        except asyncio.InvalidStateError as e:  # the stream ended between our check and the write
            self._drop_stream()
            raise NodeUnavailable(f"{self.endpoint}: the stream ended ({e})") from e
        except BaseException:  # cancelled (a hedge won), or the stream broke in a way grpc does not type
            self._drop_stream()
            raise
        finally:
            self._stream_busy = False
        if response is grpc.aio.EOF:
            self._drop_stream()
            raise NodeUnavailable(f"{self.endpoint}: closed the stream (shutting down)")
        if response.error_code:
            raise error_from_status(response.error_code, response.error_message, self.endpoint)
        return response

    def _drop_stream(self) -> None:
        if self._stream is not None:
            self._stream.cancel()
            self._stream = None

    async def close(self) -> None:
        self._drop_stream()
        await self._channel.close()



_timeout = getattr(asyncio, "timeout", None)  # Python 3.11+: a deadline without a task


async def _exchange(stream, request) -> expert_pb2.ExpertResponse:
    await stream.write(request)
    return await stream.read()


def _request(model: str, request_id: str, inputs: dict, grad_outputs: dict | None, wire_dtype):
    """The request message and its payload size in bytes."""
    request = expert_pb2.ExpertRequest(model=model, request_id=request_id)
    nbytes = 0
    for uid, x in inputs.items():
        batch = request.batches.add(uid=uid)  # filled in place: no extra payload copies
        nbytes += codec.encode_into(batch.inputs, x, wire_dtype)
        if grad_outputs is not None:
            nbytes += codec.encode_into(batch.grad_outputs, grad_outputs[uid], wire_dtype)
    return request, nbytes
