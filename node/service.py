"""gRPC handlers: decode + validate, hand rows to the batcher, encode. Errors become statuses."""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

import grpc

from moeswarm.node.batcher import Batcher
from moeswarm.node.validation import ExpertWork, Limits, validate_request
from moeswarm.protocol import codec, expert_pb2, expert_pb2_grpc
from moeswarm.protocol.errors import MoeSwarmError, status_of

logger = logging.getLogger(__name__)


class ExpertServicer(expert_pb2_grpc.ExpertServiceServicer):
    def __init__(self, batcher: Batcher, limits: Limits, info: Callable[[], expert_pb2.InfoResponse]):
        self._batcher, self._limits, self._info = batcher, limits, info

    async def Forward(self, request: expert_pb2.ExpertRequest, context: grpc.aio.ServicerContext) -> expert_pb2.ExpertResponse:
        return await self._handle(request, context, backward=False)

    async def Backward(self, request: expert_pb2.ExpertRequest, context: grpc.aio.ServicerContext) -> expert_pb2.ExpertResponse:
        return await self._handle(request, context, backward=True)

    async def Info(self, request: expert_pb2.InfoRequest, context: grpc.aio.ServicerContext) -> expert_pb2.InfoResponse:
        return self._info()

    async def _handle(self, request, context, *, backward: bool) -> expert_pb2.ExpertResponse:
        try:
            work = validate_request(request, self._limits, backward=backward)
            outputs = await asyncio.gather(*(self._submit(item, backward) for item in work))
            # Answer in the caller's wire dtype (fp32 unless it opted into compression).
            tensors = [codec.encode(out, item.x_ND.dtype) for item, out in zip(work, outputs)]
        except MoeSwarmError as e:
            logger.debug("rejected request %.64s: %s", request.request_id, e)
            await context.abort(status_of(e), str(e))
        except Exception:  # process boundary: a bug must not take the node down
            logger.error("request %.64s failed", request.request_id, exc_info=True)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error in the expert node (see its log)")
        return expert_pb2.ExpertResponse(request_id=request.request_id, tensors=tensors)

    def _submit(self, item: ExpertWork, backward: bool):
        return self._batcher.submit(item.uid, "backward" if backward else "forward", item.x_ND, item.g_ND)
