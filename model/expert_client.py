"""Async client for one node's ExpertService: one channel per endpoint, every call with a deadline.

Requests go over one long-lived connection per node: the node's data port (protocol/framing.py,
plain TCP: a round trip ~0.15-0.2 ms shorter than gRPC's) where it announces one and this client
can connect to it, else a gRPC Stream call, which skips gRPC's per-call setup (about half of a small
call's round trip, and 0.2-0.5 ms of a 1 MiB one's). A request goes unary (gRPC) when that
connection is busy with another one, so concurrent callers never queue behind each other. A request
the node refuses at the transport (over its message size limit) ends the connection with the status
a unary call would get; the next request opens a fresh one.
Requests and responses are written and read by protocol/wire.py: for large payloads, one copy on the
way out and none on the way in.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid

import grpc
import torch

from moeswarm.protocol import codec, expert_pb2, expert_pb2_grpc, wire
from moeswarm.protocol.errors import BadRequest, NodeUnavailable, error_from_rpc, error_from_status
from moeswarm.protocol.framing import PREFACE, BlockingConnection, FrameProtocol, FrameTooLarge

logger = logging.getLogger(__name__)
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20
DATA_CONNECT_TIMEOUT_S = 2.0  # a data port that takes longer (filtered by a firewall?) is given up for gRPC
DEFAULT_MAX_ROWS = 8192  # a node's default limit of rows per expert batch (node config max_rows)
_METHOD = "/moeswarm.ExpertService/"


class ExpertClient:
    """Calls Forward/Backward/Info on one node. Raises our errors (protocol/errors.py) on failure."""

    def __init__(
        self, endpoint: str, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, max_rows: int = DEFAULT_MAX_ROWS,
        data_endpoint: str | None = None,
    ):
        """Calls larger than max_message_bytes / 2 of tensor data, or with more than max_rows rows of
        one expert, are sent as several requests, one after the other.
        data_endpoint: host:port of the node's data port (its records' data_endpoint); None: gRPC only.
        If it cannot be connected to, this client uses gRPC from then on."""
        self.endpoint, self.max_rows, self.data_endpoint = endpoint, max_rows, data_endpoint
        self._max_message_bytes = max_message_bytes
        self._max_payload = max_message_bytes // 2  # headroom for framing, and for a node's answer
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # A connection of its own: a new client to the same endpoint connects afresh instead of
            # sharing the old one's (gRPC's global pool would), which may be dead (Dispatcher._ban).
            ("grpc.use_local_subchannel_pool", 1),
        ]
        self._channel = grpc.aio.insecure_channel(endpoint, options=options)
        # Request ids for logs: a random prefix per client plus a counter (uuid4 per call cost ~10 us).
        prefix = uuid.uuid4().hex[:12]  # a generator expression would call uuid4 again for every id
        self._request_ids = (f"{prefix}-{i}" for i in itertools.count())
        self._stub = expert_pb2_grpc.ExpertServiceStub(self._channel)
        # Data-path methods move bytes (protocol/wire.py does the protobuf encoding).
        self._forward = self._channel.unary_unary(_METHOD + "Forward")
        self._backward = self._channel.unary_unary(_METHOD + "Backward")
        self._stream = None  # the open Stream call, made on first use and dropped on any failure
        self._data: FrameProtocol | None = None  # the open data connection, likewise
        self._blocking: BlockingConnection | None = None  # a second data connection, for blocking callers
        self._blocking_busy = False  # a request on it waits for its answer
        self._blocking_refused = False  # it could not be opened: blocking callers go through the loop
        self._stream_busy = False
        self._closed = False
        self.in_flight = 0  # Forward/Backward calls not finished (a dispatcher closes only idle clients)

    async def forward(
        self, model: str, inputs: dict[str, torch.Tensor], *, timeout_s: float, wire_dtype: torch.dtype | None = None,
        keep_as: str = "",
    ) -> dict[str, torch.Tensor]:
        """Run several experts of this node on their rows: {uid: x_ND} -> {uid: y_ND} (wire dtype).
        keep_as: a training forward's id (unique per client, <= 128 chars): the node keeps what the
        backward of these rows needs under it, for a backward that passes it in forward_ids."""
        return await self._call(model, inputs, None, timeout_s, wire_dtype, keep_as=keep_as)

    async def backward(
        self,
        model: str,
        inputs: dict[str, torch.Tensor],
        grad_outputs: dict[str, torch.Tensor],
        *,
        timeout_s: float,
        wire_dtype: torch.dtype | None = None,
        forward_ids: dict[str, str] | None = None,
        input_grads_only: frozenset[str] | set[str] = frozenset(),
    ) -> dict[str, torch.Tensor]:
        """Send output grads; returns input grads {uid: grad_x_ND}. The node accumulates param grads.
        forward_ids: {uid: keep_as of the forward that computed these rows on this node}; the node
        reuses what it kept if it still can, and recomputes otherwise.
        input_grads_only: experts whose input grads alone are wanted: the node changes nothing for them."""
        return await self._call(
            model, inputs, grad_outputs, timeout_s, wire_dtype, forward_ids=forward_ids, input_grads_only=input_grads_only
        )

    async def info(self, *, timeout_s: float) -> expert_pb2.InfoResponse:
        try:
            return await self._stub.Info(expert_pb2.InfoRequest(), timeout=timeout_s)
        except grpc.RpcError as e:
            raise error_from_rpc(e, self.endpoint) from e

    async def _call(
        self, model: str, inputs: dict, grad_outputs: dict | None, timeout_s: float, wire_dtype, *, keep_as: str = "",
        forward_ids: dict[str, str] | None = None, input_grads_only: frozenset[str] | set[str] = frozenset(),
    ) -> dict[str, torch.Tensor]:
        self.in_flight += 1
        try:
            return await self._call_in_pieces(model, inputs, grad_outputs, timeout_s, wire_dtype, keep_as, forward_ids, input_grads_only)
        finally:
            self.in_flight -= 1

    async def _call_in_pieces(
        self, model: str, inputs: dict, grad_outputs: dict | None, timeout_s: float, wire_dtype, keep_as: str,
        forward_ids: dict[str, str] | None, input_grads_only: frozenset[str] | set[str],
    ) -> dict[str, torch.Tensor]:
        pieces = split_rows(inputs, self._max_payload // (2 if grad_outputs is not None else 1), self.max_rows, wire_dtype)
        if pieces is None:
            return await self._request(model, inputs, grad_outputs, timeout_s, wire_dtype, keep_as, forward_ids, input_grads_only)
        # Several requests: what a node keeps is keyed by request, so none is kept (backward recomputes)
        outputs: dict[str, list[torch.Tensor]] = {uid: [] for uid in inputs}
        for piece in pieces:
            part = {uid: inputs[uid][rows] for uid, rows in piece.items()}
            grads = None if grad_outputs is None else {uid: grad_outputs[uid][rows] for uid, rows in piece.items()}
            answer = await self._request(model, part, grads, timeout_s, wire_dtype, "", None, input_grads_only)
            for uid, tensor in answer.items():
                outputs[uid].append(tensor)
        return {uid: parts[0] if len(parts) == 1 else torch.cat(parts) for uid, parts in outputs.items()}

    async def _request(
        self, model: str, inputs: dict, grad_outputs: dict | None, timeout_s: float, wire_dtype, keep_as: str,
        forward_ids: dict[str, str] | None, input_grads_only: frozenset[str] | set[str],
    ) -> dict[str, torch.Tensor]:
        backward = grad_outputs is not None
        payload = wire.payload_bytes(inputs.values(), wire_dtype) * (2 if backward else 1)
        on_stream = not self._stream_busy
        request = wire.write_request(
            model, keep_as or next(self._request_ids), inputs, grad_outputs, backward=backward and on_stream,
            wire_dtype=wire_dtype, keep_activations=bool(keep_as), forward_ids=forward_ids, input_grads_only=input_grads_only,
            payload=payload,
        )
        if on_stream:
            data = await self._call_on_stream(request, timeout_s)
        else:
            try:
                data = await (self._backward if backward else self._forward)(request, timeout=timeout_s)
            except grpc.RpcError as e:
                raise error_from_rpc(e, self.endpoint) from e
            except grpc.aio.UsageError as e:  # closed under a call of several requests (Dispatcher._ban)
                raise NodeUnavailable(f"{self.endpoint}: this client was closed ({e})") from e
        return self._answer(data, inputs)

    def _answer(self, data: bytes | memoryview, inputs: dict) -> dict[str, torch.Tensor]:
        """The node's answer to a request for `inputs`, decoded; its error as ours."""
        response = self._parse(data, len(inputs))
        if response.error_code:
            raise error_from_status(response.error_code, response.error_message, self.endpoint)
        if len(response.tensors) != len(inputs):
            raise NodeUnavailable(f"{self.endpoint}: answered {len(response.tensors)} tensors for {len(inputs)} expert batches")
        return {uid: self._decode(tensor) for uid, tensor in zip(inputs, response.tensors)}

    # ---- the blocking connection: a forward sent and answered on the caller's thread (Dispatcher.forward_blocking)

    def can_call_blocking(self) -> bool:
        """Whether forward_send() can be used now: the node has a data port and the blocking connection
        is open or opens now (in at most DATA_CONNECT_TIMEOUT_S; if it cannot, never again: callers
        go through the loop, which falls back to gRPC itself)."""
        if self._blocking is None and self.data_endpoint and not self._closed and not self._blocking_refused:
            host, port = self.data_endpoint.rsplit(":", 1)
            try:
                self._blocking = BlockingConnection.connect(
                    host.strip("[]"), int(port), timeout_s=DATA_CONNECT_TIMEOUT_S, max_frame_bytes=self._max_message_bytes
                )
            except OSError as e:
                logger.info("cannot connect to the data port %s of %s (%r): calling through the event loop", self.data_endpoint, self.endpoint, e)
                self._blocking_refused = True
        return self._blocking is not None and not self._blocking_busy and not self._closed

    def forward_send(self, model: str, inputs: dict[str, torch.Tensor], *, timeout_s: float, wire_dtype=None) -> None:
        """Send a forward of these experts on the blocking connection (can_call_blocking() first); read
        its answer with forward_receive() or forward_receive_async(). Raises NodeUnavailable."""
        request = wire.write_request(model, next(self._request_ids), inputs, None, wire_dtype=wire_dtype)
        self._blocking_busy = True
        self.in_flight += 1
        try:
            self._blocking.send(request, timeout_s)
        except OSError as e:
            self._blocking_done(failed=True)
            raise self._broken(e) from e

    def forward_receive(self, inputs: dict[str, torch.Tensor], timeout_s: float) -> dict[str, torch.Tensor] | None:
        """The answer to forward_send(inputs), or None if it has not come within timeout_s (the request
        is still in flight: call again, or forward_receive_async()). Raises our errors."""
        try:
            data = self._blocking.receive(timeout_s)
        except (OSError, FrameTooLarge) as e:
            self._blocking_done(failed=True)
            raise self._broken(e) from e
        except BaseException:  # Ctrl-C: the answer would be read as the next request's
            self._blocking_done(failed=True)
            raise
        if data is None:
            return None
        self._blocking_done(failed=False)
        return self._answer(data, inputs)

    async def forward_receive_async(self, inputs: dict[str, torch.Tensor], timeout_s: float) -> dict[str, torch.Tensor]:
        """forward_receive() on the event loop, for an answer that did not come on the caller's thread
        in time for its hedge: waits up to timeout_s more, then raises DEADLINE_EXCEEDED."""
        try:
            data = await asyncio.wait_for(self._blocking.receive_async(), max(timeout_s, 0.0))
        except asyncio.TimeoutError:
            self._blocking_done(failed=True)
            raise NodeUnavailable(f"{self.endpoint}: DEADLINE_EXCEEDED: no answer in time") from None
        except (OSError, FrameTooLarge) as e:
            self._blocking_done(failed=True)
            raise self._broken(e) from e
        except BaseException:  # cancelled (a hedge won): its answer must not pair with the next request
            self._blocking_done(failed=True)
            raise
        self._blocking_done(failed=False)
        return self._answer(data, inputs)

    def forward_abandon(self) -> None:
        """Give up a forward_send() whose answer is no longer wanted (its deadline passed, the caller
        failed): the connection closes, so that answer never pairs with a later request."""
        self._blocking_done(failed=True)

    def interrupt_blocking(self) -> None:
        """From any thread: a forward_receive() blocked on this client returns at once (NodeUnavailable)."""
        connection = self._blocking
        if connection is not None:
            connection.interrupt()

    def _blocking_done(self, *, failed: bool) -> None:
        if not self._blocking_busy:  # (abandoning a request already answered or failed changes nothing)
            return
        self._blocking_busy = False
        self.in_flight -= 1
        if (failed or self._closed) and self._blocking is not None:
            self._blocking.close()
            self._blocking = None

    async def _call_on_stream(self, request: bytes, timeout_s: float) -> bytes:
        """One request on the open connection (at most one in flight, so answers pair with requests in
        order): the data connection, or the Stream call. A timeout, cancellation or broken connection
        drops it; the next call opens a fresh one."""
        if self._closed:
            raise NodeUnavailable(f"{self.endpoint}: this client was closed")
        self._stream_busy = True
        exchange = self._exchange_on_data if self.data_endpoint else self._exchange_on_stream
        try:
            if _timeout is not None:
                async with _timeout(timeout_s):
                    response = await exchange(request)
            else:  # Python 3.10
                response = await asyncio.wait_for(exchange(request), timeout_s)
        except asyncio.TimeoutError:
            self._drop_stream()
            raise NodeUnavailable(f"{self.endpoint}: DEADLINE_EXCEEDED: no answer within {timeout_s:.3g} s") from None
        except grpc.RpcError as e:
            self._drop_stream()
            raise error_from_rpc(e, self.endpoint) from e
        except (ConnectionError, FrameTooLarge) as e:
            self._drop_stream()
            raise self._broken(e) from e
        except (asyncio.InvalidStateError, grpc.aio.UsageError) as e:  # the stream ended between our check
            self._drop_stream()  # and the write, or the client was closed under a call of several requests
            raise NodeUnavailable(f"{self.endpoint}: the stream ended ({e})") from e
        except BaseException:  # cancelled (a hedge won), or the stream broke in a way grpc does not type
            self._drop_stream()
            raise
        finally:
            self._stream_busy = False
            if self._closed:  # closed with a grace period while this call ran
                self._drop_stream()
        if response is grpc.aio.EOF:
            self._drop_stream()
            raise NodeUnavailable(f"{self.endpoint}: closed the stream (shutting down)")
        return response

    async def _exchange_on_stream(self, request: bytes) -> bytes:
        if self._stream is None or self._stream.done():  # done: the node ended it (shutdown)
            self._stream = self._channel.stream_stream(_METHOD + "Stream")()
        await self._stream.write(request)
        return await self._stream.read()

    async def _exchange_on_data(self, request: bytes) -> bytes:
        if self._data is None:
            try:
                self._data = await asyncio.wait_for(self._connect_data(), DATA_CONNECT_TIMEOUT_S)
            except (OSError, asyncio.TimeoutError) as e:
                logger.info("cannot connect to the data port %s of %s (%r): using gRPC", self.data_endpoint, self.endpoint, e)
                self.data_endpoint = None
                return await self._exchange_on_stream(request)
        await self._data.send(request)
        return await self._data.next_frame()

    async def _connect_data(self) -> FrameProtocol:
        host, port = self.data_endpoint.rsplit(":", 1)
        _, connection = await asyncio.get_running_loop().create_connection(
            lambda: FrameProtocol(self._max_message_bytes), host.strip("[]"), int(port)
        )
        connection.transport.write(PREFACE)
        return connection

    def _broken(self, error: BaseException) -> NodeUnavailable:
        return NodeUnavailable(f"{self.endpoint}: the data connection to {self.data_endpoint} broke ({error!r})")

    def _parse(self, data: bytes, tensors: int):
        try:
            return wire.read_response(data, tensors)
        except BadRequest as e:  # the node's fault, not ours: retried elsewhere like any node failure
            raise NodeUnavailable(f"{self.endpoint}: answered a malformed response ({e})") from e

    def _decode(self, tensor) -> torch.Tensor:
        try:
            return codec.decode(tensor)
        except BadRequest as e:
            raise NodeUnavailable(f"{self.endpoint}: answered a malformed tensor ({e})") from e

    def _drop_stream(self) -> None:
        if self._stream is not None:
            self._stream.cancel()
            self._stream = None
        if self._data is not None:
            self._data.close()
            self._data = None

    async def close(self, grace_s: float | None = None) -> None:
        """grace_s: let calls in flight end by themselves for up to this long (a busy stream included),
        then cancel them; None: cancel them now."""
        self._closed = True
        if grace_s is None or not self._stream_busy:
            self._drop_stream()
        if self._blocking is not None and not self._blocking_busy:  # else its reader closes it when done
            self._blocking.close()
            self._blocking = None
        await self._channel.close(grace_s)


def split_rows(
    inputs: dict[str, torch.Tensor], max_bytes: int, max_rows: int, wire_dtype: torch.dtype | None = None
) -> list[dict[str, slice]] | None:
    """None if one request can carry `inputs`; else the rows of each request ({uid: slice}, in order):
    each under max_bytes of tensor data (at least one row) and max_rows rows of one expert. Pure."""
    row_bytes = {uid: max(1, x.shape[1] * (wire_dtype or x.dtype).itemsize) for uid, x in inputs.items()}
    if all(x.shape[0] <= max_rows for x in inputs.values()) and sum(x.shape[0] * row_bytes[uid] for uid, x in inputs.items()) <= max_bytes:
        return None
    pieces, current, used = [], {}, 0
    for uid, x in inputs.items():
        start, rows = 0, x.shape[0]
        while True:
            take = min(rows - start, max_rows, (max_bytes - used) // row_bytes[uid])
            if take <= 0 and current and start < rows:  # this request is full
                pieces.append(current)
                current, used = {}, 0
                continue
            take = max(take, min(1, rows - start))  # a row larger than max_bytes still goes, alone
            current[uid] = slice(start, start + take)
            used, start = used + take * row_bytes[uid], start + take
            if start >= rows:
                break
            pieces.append(current)  # the rest of this expert goes in the next request
            current, used = {}, 0
    if current:
        pieces.append(current)
    return pieces


_timeout = getattr(asyncio, "timeout", None)  # Python 3.11+: a deadline without a task

