"""gRPC handlers: decode + validate, hand rows to the batcher, encode. Errors become statuses."""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

import grpc
from google.protobuf.message import DecodeError

from moeswarm.node.batcher import Batcher
from moeswarm.node.validation import ExpertWork, Limits, validate_request
from moeswarm.protocol import codec, expert_pb2
from moeswarm.protocol.errors import BadRequest, MoeSwarmError, status_of

logger = logging.getLogger(__name__)
SERVICE_NAME = "moeswarm.ExpertService"


class ExpertServicer:
    """Handlers of moeswarm.ExpertService. Requests arrive as raw bytes and are parsed here, so a
    message that is not valid protobuf gets INVALID_ARGUMENT instead of gRPC's generic INTERNAL."""

    def __init__(self, batcher: Batcher, limits: Limits, info: Callable[[], expert_pb2.InfoResponse]):
        self._batcher, self._limits, self._info = batcher, limits, info

    def generic_handler(self) -> grpc.GenericRpcHandler:
        def unary(behavior):
            return grpc.unary_unary_rpc_method_handler(behavior, response_serializer=lambda message: message.SerializeToString())

        return grpc.method_handlers_generic_handler(
            SERVICE_NAME, {"Forward": unary(self.Forward), "Backward": unary(self.Backward), "Info": unary(self.Info)}
        )

    async def Forward(self, data: bytes, context: grpc.aio.ServicerContext) -> expert_pb2.ExpertResponse:
        return await self._handle(data, context, backward=False)

    async def Backward(self, data: bytes, context: grpc.aio.ServicerContext) -> expert_pb2.ExpertResponse:
        return await self._handle(data, context, backward=True)

    async def Info(self, data: bytes, context: grpc.aio.ServicerContext) -> expert_pb2.InfoResponse:
        return self._info()

    async def _handle(self, data: bytes, context, *, backward: bool) -> expert_pb2.ExpertResponse:
        request = expert_pb2.ExpertRequest()
        try:
            request = _parse_request(data)
            work = validate_request(request, self._limits, backward=backward)
            outputs = await asyncio.gather(*(self._submit(item, backward) for item in work))
            response = expert_pb2.ExpertResponse(request_id=request.request_id)
            for item, out in zip(work, outputs):
                # In place (see codec.encode_into), in the caller's wire dtype (fp32 unless it opted in).
                codec.encode_into(response.tensors.add(), out, item.x_ND.dtype)
        except MoeSwarmError as e:
            logger.debug("rejected request %.64s: %s", request.request_id, e)
            await context.abort(status_of(e), str(e))
        except Exception:  # process boundary: a bug must not take the node down
            logger.error("request %.64s failed", request.request_id, exc_info=True)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error in the expert node (see its log)")
        return response

    def _submit(self, item: ExpertWork, backward: bool):
        """One expert's rows to the batcher; returns an awaitable of its output rows."""
        return self._batcher.submit(item.uid, "backward" if backward else "forward", item.x_ND, item.g_ND)


def _parse_request(data: bytes) -> expert_pb2.ExpertRequest:
    try:
        return expert_pb2.ExpertRequest.FromString(data)
    except DecodeError as e:
        raise BadRequest(f"request is not a valid ExpertRequest message ({e})") from e
