"""gRPC handlers: decode + validate, hand rows to the batcher, encode. Errors become statuses."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator, Awaitable, Callable

import grpc
import torch
from google.protobuf.message import DecodeError

from moeswarm.node.batcher import Batcher
from moeswarm.node.busy_poll import BusyPoller
from moeswarm.node.validation import Limits, all_finite, check_hosted, validate_request
from moeswarm.protocol import expert_pb2, wire
from moeswarm.protocol.errors import BadRequest, MoeSwarmError, NotTrainable, Overloaded, TooSlow, status_of
from moeswarm.protocol.state_transfer import EXPORT_MIN_BYTES_PER_S, chunk_bytes_for, export_time_limit_s, state_chunks

logger = logging.getLogger(__name__)
SERVICE_NAME = "moeswarm.ExpertService"
MAX_EXPORTS = 2  # ExportState calls served at once; more get RESOURCE_EXHAUSTED (each holds a copy of an expert)
# uid -> (version, parameter name -> CPU copy), taken on the compute thread
ExportFn = Callable[[str], Awaitable[tuple[int, dict[str, torch.Tensor]]]]


class ExpertServicer:
    """Handlers of moeswarm.ExpertService. Requests arrive as raw bytes and are parsed here (by
    protocol/wire.py, without copying their tensors), so a message that is not valid protobuf gets
    INVALID_ARGUMENT instead of gRPC's generic INTERNAL; answers leave as bytes written by wire.py."""

    def __init__(
        self, batcher: Batcher, limits: Limits, info: Callable[[], expert_pb2.InfoResponse], *, trainable: bool = True,
        export: ExportFn | None = None, max_message_bytes: int = 64 << 20, export_chunk_timeout_s: float = 30.0,
        poller: BusyPoller | None = None,
    ):
        """trainable=False: Backward is refused (PERMISSION_DENIED) and a training Forward keeps nothing.
        export: an expert's current weights, for ExportState (None: the call is refused), whose reader
        must take each chunk within export_chunk_timeout_s (config.py).
        poller: kicked at every Forward/Backward answer (node config busy_poll_us)."""
        self._batcher, self._limits, self._info, self._trainable = batcher, limits, info, trainable
        self._poller = poller or BusyPoller(0.0)
        self._export, self._max_message_bytes, self._exports = export, max_message_bytes, 0
        self._chunk_timeout_s = export_chunk_timeout_s
        self._streams: dict[asyncio.Task, bool] = {}  # open Stream calls -> whether one is mid-request
        self._closing = False

    def generic_handler(self) -> grpc.GenericRpcHandler:
        def serialize(message) -> bytes:
            return message if isinstance(message, bytes) else message.SerializeToString()

        def unary(behavior):
            return grpc.unary_unary_rpc_method_handler(behavior, response_serializer=serialize)

        return grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                "Forward": unary(self.Forward),
                "Backward": unary(self.Backward),
                "Info": unary(self.Info),
                "Stream": grpc.stream_stream_rpc_method_handler(self.Stream, response_serializer=serialize),
                "ExportState": grpc.unary_stream_rpc_method_handler(self.ExportState, response_serializer=serialize),
            },
        )

    async def Forward(self, data: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return await self._unary(data, context, backward=False)

    async def Backward(self, data: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return await self._unary(data, context, backward=True)

    async def Info(self, data: bytes, context: grpc.aio.ServicerContext) -> expert_pb2.InfoResponse:
        return self._info()

    async def Stream(self, requests: AsyncIterator[bytes], context) -> AsyncIterator[bytes | expert_pb2.ExpertResponse]:
        """Answer each request in order; errors go in the response, so one bad request does not end
        the stream. A message that is not protobuf at all is answered too (it has no request_id)."""
        task = asyncio.current_task()
        self._streams[task] = False
        try:
            async for data in requests:
                self._streams[task] = True
                request_id = ""
                try:
                    request = _parse_request(data, len(self._limits.hosted))
                    request_id = request.request_id
                    response = await self._respond(request, backward=request.backward)
                except Exception as e:
                    code, message = _failure(e, request_id)
                    response = expert_pb2.ExpertResponse(request_id=request_id, error_code=code.value[0], error_message=message)
                self._streams[task] = False
                self._poller.kick()
                yield response
                if self._closing:
                    return
        finally:
            del self._streams[task]

    async def ExportState(self, data: bytes, context) -> None:
        """One hosted expert's weights, in chunks that fit both sides' message limits (at least
        MIN_CHUNK_BYTES). A reader that takes no chunk for export_chunk_timeout_s, or is slower than
        export_time_limit_s, gets DEADLINE_EXCEEDED and its slot is freed; a caller that goes away
        ends the call with at most a debug line."""
        try:
            request = self._export_request(data)
        except Exception as e:  # process boundary: a bug must not take the node down
            await context.abort(*_failure(e, ""))
        self._exports += 1
        try:
            late = await self._send_state(request.uid, request.max_chunk_bytes, context)
        except grpc.aio.InternalError:  # a send failed: the caller cancelled, its deadline passed or its connection broke
            logger.debug("ExportState of %s to %s ended: the caller went away", request.uid, context.peer())
            # How grpc ends a call whose caller left (it logs that at debug); returning instead would
            # send a status on the dead call and log its failure at ERROR with a traceback.
            raise asyncio.CancelledError from None
        finally:
            self._exports -= 1
        if late is not None:
            try:
                await context.abort(*_failure(late, ""))
            except grpc.aio.InternalError:  # the status waited behind unread chunks, and the caller left
                raise asyncio.CancelledError from None

    def _export_request(self, data: bytes) -> expert_pb2.StateRequest:
        try:
            request = expert_pb2.StateRequest.FromString(data)
        except DecodeError as e:
            raise BadRequest(f"request is not a valid StateRequest message ({e})") from e
        check_hosted(request.uid, self._limits)
        if self._export is None:
            raise BadRequest("this node does not export expert state")
        if self._exports >= MAX_EXPORTS:
            raise Overloaded(f"already sending the state of {self._exports} experts; try again in a few seconds")
        return request

    async def _send_state(self, uid: str, asked_chunk_bytes: int, context) -> TooSlow | None:
        """Send uid's weights; None once the reader took every chunk, else the limit it missed. The
        expert's copy lives as long as this call, not while a late reader's status waits."""
        version, tensors = await self._export(uid)
        total_bytes = sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())
        limit_s = export_time_limit_s(total_bytes, self._chunk_timeout_s)
        deadline = time.monotonic() + limit_s
        # Headers now, not with the first chunk: a status must be able to follow a chunk that never left.
        await context.send_initial_metadata(())
        sent_bytes = 0
        for chunk in state_chunks(uid, version, tensors, chunk_bytes_for(self._max_message_bytes, asked_chunk_bytes)):
            left_s = deadline - time.monotonic()
            try:
                await asyncio.wait_for(context.write(chunk), min(self._chunk_timeout_s, left_s))
            except asyncio.TimeoutError:
                if left_s > self._chunk_timeout_s:
                    return TooSlow(
                        f"{uid}: the reader took no chunk for {self._chunk_timeout_s:g} s (the node's export_chunk_timeout_s) "
                        f"after {sent_bytes} of {total_bytes} bytes; read the stream as it arrives"
                    )
                return TooSlow(
                    f"{uid}: {sent_bytes} of {total_bytes} bytes taken in {limit_s:.0f} s, the most the node allows for them "
                    f"(export_chunk_timeout_s + {EXPORT_MIN_BYTES_PER_S >> 20} MiB/s); pull from a replica over a faster link"
                )
            sent_bytes += len(chunk.data)
        return None

    def close_idle_streams(self) -> None:
        """Node shutdown: end streams that wait for their next request now (a stream mid-request
        ends after answering it), so the server's grace period is not spent on idle clients."""
        self._closing = True
        self._poller.close()
        for task, busy in list(self._streams.items()):
            if not busy:
                task.cancel()

    async def _unary(self, data: bytes, context, *, backward: bool) -> bytes:
        request_id = ""
        try:
            request = _parse_request(data, len(self._limits.hosted))
            request_id = request.request_id
            if request.backward:
                raise BadRequest("the backward field is for Stream requests; call Backward instead")
            return await self._respond(request, backward=backward)
        except Exception as e:  # process boundary: a bug must not take the node down
            await context.abort(*_failure(e, request_id))
        finally:
            self._poller.kick()

    async def _respond(self, request: wire.RequestView, *, backward: bool) -> bytes:
        work = validate_request(request, self._limits, backward=backward)
        if backward and not self._trainable and not all(item.input_grads_only for item in work):
            raise NotTrainable("this node serves inference only (trainable: false) and accepts no gradients; send them to another replica")
        keep_as = request.request_id if request.keep_activations and self._trainable else ""
        op = "backward" if backward else "forward"
        # op per batch: input grads alone ("input_grad") never merge with rows that accumulate.
        # The tag: the Forward whose activations a backward may reuse, or under which a forward keeps them.
        jobs = [
            (item.uid, "input_grad" if item.input_grads_only else op, item.x_ND, item.g_ND, item.forward_id if backward else keep_as)
            for item in work
        ]
        if len(work) == 1 or all(self._batcher.runs_inline(uid, job_op, x.shape[0]) for uid, job_op, x, _, _ in jobs):
            # decoding: one expert, or a few tiny batches each computed at once: no futures, no tasks
            outputs = [await self._batcher.submit(*job) for job in jobs]
        else:  # queued together: one round trip to the compute thread for all of them
            outputs = await asyncio.gather(*(self._batcher.enqueue(*job) for job in jobs))
        # In the caller's wire dtype (fp32 unless it opted in), checked there: fp32 results can overflow fp16.
        outputs = [out if out.dtype == item.x_ND.dtype else out.to(item.x_ND.dtype) for item, out in zip(work, outputs)]
        for item, out in zip(work, outputs):  # inputs are finite, weights too (registry): this is overflow
            if not all_finite(out):
                raise BadRequest(f"{item.uid}: the {op} overflowed to inf/NaN in {out.dtype}; these inputs are too large")
        return wire.write_response(request.request_id, [(out, out.dtype) for out in outputs])


def _parse_request(data: bytes, max_batches: int) -> wire.RequestView | expert_pb2.ExpertRequest:
    try:
        return wire.read_request(data, max_batches)
    except BadRequest as e:
        raise BadRequest(f"request is not a valid ExpertRequest message ({e})") from e


def _failure(error: Exception, request_id: str) -> tuple[grpc.StatusCode, str]:
    """The status a failed request is answered with (aborting a unary call, or inside a Stream
    response); our errors keep their message, anything else is a bug: logged, INTERNAL."""
    if isinstance(error, MoeSwarmError):
        logger.debug("rejected request %.64s: %s", request_id, error)
        return status_of(error), str(error)
    logger.error("request %.64s failed", request_id, exc_info=error)
    return grpc.StatusCode.INTERNAL, "internal error in the expert node (see its log)"
