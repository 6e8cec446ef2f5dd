"""RemoteMoE: a drop-in MoE FFN block whose experts run on the swarm, forward and backward.

    moe = RemoteMoE(model="tiny-moe", layer=0, d_model=256, n_experts=8, k=2, initial_peers=[MADDR])
    y = moe(x)            # x: [..., 256] -> y: [..., 256]; gradients reach x, the router and the experts
    moe.close()

Legend: T tokens, K experts per token, D model dim, E experts.
"""

from __future__ import annotations

import asyncio

import torch
from torch import nn

from moeswarm.model.directory import ExpertDirectory
from moeswarm.model.dispatcher import DispatchConfig, Dispatcher, DispatchResult
from moeswarm.model.local_moe import combine
from moeswarm.model.router import Router, RouterOutput
from moeswarm.protocol.dht import IsolatedDHT
from moeswarm.protocol.errors import AllReplicasFailed
from moeswarm.protocol.malloc import keep_freed_memory
from moeswarm.protocol.spec import format_uid


class SwarmClient:
    """One process's connection to a swarm: a DHT peer, the expert directory and the dispatcher.
    Share it between the MoE layers of a model."""

    def __init__(
        self,
        initial_peers: list[str],
        *,
        model: str,
        swarm: str = "default",
        config: DispatchConfig = DispatchConfig(),
        refresh_s: float = 2.0,
        tune_allocator: bool = True,
    ):
        if tune_allocator:
            keep_freed_memory()  # see protocol/malloc.py: ~1 ms per MiB of payload otherwise
        self.dht = IsolatedDHT(initial_peers)  # spawned, never forked from the user's process
        self.directory = ExpertDirectory(self.dht, swarm, refresh_s=refresh_s)
        self.dispatcher = Dispatcher(self.directory, model, config)
        self._closed = False

    def __enter__(self) -> "SwarmClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Idempotent: closes channels, stops the directory thread and the DHT peer."""
        if self._closed:
            return
        self._closed = True
        self.dispatcher.close()
        self.directory.close()
        self.dht.close()


class _RemoteExperts(torch.autograd.Function):
    """Ties an already-dispatched forward (DispatchResult) into autograd: backward sends the output
    grads through the dispatcher. The network logic lives in Dispatcher, not here."""

    @staticmethod
    def forward(ctx, x_TD, anchor, dispatcher: Dispatcher, result: DispatchResult):
        ctx.dispatcher, ctx.result = dispatcher, result
        ctx.save_for_backward(x_TD)
        return result.y_TKD

    @staticmethod
    def backward(ctx, grad_y_TKD):
        (x_TD,) = ctx.saved_tensors
        grad_x_TD = ctx.dispatcher.run(ctx.dispatcher.backward(ctx.result, x_TD.detach(), grad_y_TKD.contiguous()))
        return grad_x_TD.to(x_TD.dtype), None, None, None


def check_min_experts(result: DispatchResult, topk_ids_TK: torch.Tensor, uids: list[str], min_experts: int) -> None:
    """Raise AllReplicasFailed (naming the expert and endpoints tried) if a token kept too few experts."""
    served_TK = result.served_TK
    short_T = served_TK.sum(dim=-1) < min(min_experts, served_TK.shape[1])
    if bool(short_T.any()):
        token = int(torch.nonzero(short_T)[0])
        slot = int(torch.nonzero(~served_TK[token])[0])
        uid = uids[int(topk_ids_TK[token, slot])]
        raise AllReplicasFailed(uid, result.attempts.get(uid, []))


class RemoteMoE(nn.Module):
    def __init__(
        self,
        *,
        model: str,
        layer: int,
        d_model: int,
        n_experts: int,
        k: int,
        initial_peers: list[str] = (),
        swarm: str = "default",
        client: SwarmClient | None = None,
        config: DispatchConfig = DispatchConfig(),
        min_experts: int = 1,
    ):
        """min_experts: a token may lose experts whose replicas all failed (its remaining gate weights
        are renormalised) as long as it keeps this many; otherwise forward raises AllReplicasFailed.
        config applies when this layer creates its own SwarmClient; a shared client has its own."""
        super().__init__()
        if not 1 <= min_experts <= k:
            raise ValueError(f"min_experts={min_experts}: must be between 1 and k={k}")
        self.min_experts = min_experts
        self.d_model, self.k = d_model, k
        self.router = Router(d_model, n_experts, k)
        self.uids = [format_uid(model, layer, e) for e in range(n_experts)]
        self._owns_client = client is None
        self.client = client or SwarmClient(list(initial_peers), model=model, swarm=swarm, config=config)
        self.config = self.client.dispatcher.config
        self.client.directory.track(self.uids)
        self.last_routing: RouterOutput | None = None  # for load-balancing / z losses
        self._anchor = torch.empty(0, requires_grad=True)  # not a Parameter: nothing to optimise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.d_model:
            raise ValueError(f"RemoteMoE expects [..., {self.d_model}] inputs, got {list(x.shape)}")
        x_TD = x.reshape(-1, self.d_model)
        routing = self.router(x_TD)
        self.last_routing = routing
        if x_TD.shape[0] == 0:
            return torch.zeros_like(x)
        dispatcher = self.client.dispatcher
        result = dispatcher.run(dispatcher.forward(self.uids, x_TD.detach(), routing.topk_ids_TK))
        check_min_experts(result, routing.topk_ids_TK, self.uids, self.min_experts)
        # The anchor requires grad, so backward reaches the remote experts even when neither the
        # input nor anything before this layer requires grad (the experts' weights live on nodes).
        anchor = self._anchor if self.training and torch.is_grad_enabled() else self._anchor.detach()
        y_TKD = _RemoteExperts.apply(x_TD, anchor, dispatcher, result)
        out_TD = combine(y_TKD, routing.weights_TK, result.served_TK)
        return out_TD.to(x.dtype).reshape(x.shape)

    async def forward_async(self, x: torch.Tensor) -> torch.Tensor:
        """Inference from an asyncio program: awaits the dispatch without blocking the caller's loop."""
        loop = asyncio.get_running_loop()
        with torch.no_grad():
            return await loop.run_in_executor(None, self.forward, x)

    def __enter__(self) -> "RemoteMoE":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release the swarm connection this layer created (a shared client is its owner's to close)."""
        if self._owns_client:
            self.client.close()
