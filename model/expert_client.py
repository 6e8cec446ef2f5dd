"""Async client for one node's ExpertService: one channel per endpoint, every call with a deadline."""

from __future__ import annotations

import itertools
import uuid

import grpc
import torch

from moeswarm.protocol import codec, expert_pb2, expert_pb2_grpc
from moeswarm.protocol.errors import NodeUnavailable, error_from_rpc

DEFAULT_MAX_MESSAGE_BYTES = 64 << 20


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

    async def forward(
        self, model: str, inputs: dict[str, torch.Tensor], *, timeout_s: float, wire_dtype: torch.dtype | None = None
    ) -> dict[str, torch.Tensor]:
        """Run several experts of this node on their rows: {uid: x_ND} -> {uid: y_ND} (wire dtype)."""
        request = _request(model, next(self._request_ids), inputs, None, wire_dtype)
        return await self._call(self._stub.Forward, request, list(inputs), timeout_s)

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
        request = _request(model, next(self._request_ids), inputs, grad_outputs, wire_dtype)
        return await self._call(self._stub.Backward, request, list(inputs), timeout_s)

    async def info(self, *, timeout_s: float) -> expert_pb2.InfoResponse:
        try:
            return await self._stub.Info(expert_pb2.InfoRequest(), timeout=timeout_s)
        except grpc.RpcError as e:
            raise error_from_rpc(e, self.endpoint) from e

    async def _call(self, method, request, uids: list[str], timeout_s: float) -> dict[str, torch.Tensor]:
        try:
            response = await method(request, timeout=timeout_s)
        except grpc.RpcError as e:
            raise error_from_rpc(e, self.endpoint) from e
        if len(response.tensors) != len(uids):
            raise NodeUnavailable(f"{self.endpoint}: answered {len(response.tensors)} tensors for {len(uids)} expert batches")
        return {uid: codec.decode(tensor) for uid, tensor in zip(uids, response.tensors)}

    async def close(self) -> None:
        await self._channel.close()



def _request(model: str, request_id: str, inputs: dict, grad_outputs: dict | None, wire_dtype) -> expert_pb2.ExpertRequest:
    request = expert_pb2.ExpertRequest(model=model, request_id=request_id)
    for uid, x in inputs.items():
        batch = request.batches.add(uid=uid)  # filled in place: no extra payload copies
        codec.encode_into(batch.inputs, x, wire_dtype)
        if grad_outputs is not None:
            codec.encode_into(batch.grad_outputs, grad_outputs[uid], wire_dtype)
    return request
