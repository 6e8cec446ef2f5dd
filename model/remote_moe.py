"""RemoteMoE: a drop-in MoE FFN block whose experts run on the swarm, forward and backward.

    moe = RemoteMoE(model="tiny-moe", layer=0, d_model=256, n_experts=8, k=2, initial_peers=[MADDR])
    y = moe(x)            # x: [..., 256] -> y: [..., 256]; gradients reach x, the router and the experts
    moe.close()

Legend: T tokens, K experts per token, D model dim, E experts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from moeswarm.model.directory import ExpertDirectory
from moeswarm.model.dispatcher import DispatchConfig, Dispatcher, DispatchResult
from moeswarm.model.local_moe import combine, expert_uids, make_shared, with_shared_outputs
from moeswarm.model.routing import Routing, TopKGate
from moeswarm.protocol.client_dht import IsolatedDHT
from moeswarm.protocol.errors import AllReplicasFailed
from moeswarm.protocol.malloc import keep_freed_memory


class SwarmClient:
    """One process's connection to a swarm: a DHT peer, the expert directory and the dispatcher.
    Share it between the MoE layers of a model."""

    def __init__(
        self,
        initial_peers: list[str] | str,
        *,
        model: str,
        swarm: str = "default",
        config: DispatchConfig = DispatchConfig(),
        refresh_s: float = 2.0,
        tune_allocator: bool = True,
        dht: IsolatedDHT | None = None,
    ):
        """initial_peers: multiaddrs of swarm peers (one may be given as a plain string).
        dht: share one DHT peer between clients of several models (it stays open when this closes);
        by default the client starts its own from initial_peers."""
        if tune_allocator:
            keep_freed_memory()  # see protocol/malloc.py: ~1 ms per MiB of payload otherwise
        self._owns_dht = dht is None
        peers = [initial_peers] if isinstance(initial_peers, str) else list(initial_peers)
        self.dht = dht or IsolatedDHT(peers)  # spawned, never forked from the user's process
        self.directory = ExpertDirectory(self.dht, swarm, refresh_s=refresh_s)
        self.dispatcher = Dispatcher(self.directory, model, config)
        self.expert_wait_s = 0.0  # time callers spent waiting for expert round trips (for profiling)
        self._closed = False

    def dispatch(
        self, uids: list[str], x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, *, keep_activations: bool | None = None
    ) -> DispatchResult:
        """One layer call's forward over the swarm (ids < 0: slots not sent); blocks; counts the wait.
        keep_activations (default: whether grad is enabled): a forward a backward will follow, so
        nodes keep what it can reuse."""
        started = time.perf_counter()
        keep = torch.is_grad_enabled() if keep_activations is None else keep_activations
        try:
            if not keep:  # sent and answered on this thread where it can: Dispatcher.forward_blocking
                return self.dispatcher.forward_blocking(uids, x_TD.detach(), topk_ids_TK)
            return self.dispatcher.run(self.dispatcher.forward(uids, x_TD.detach(), topk_ids_TK, keep_activations=True))
        finally:
            self.expert_wait_s += time.perf_counter() - started

    def __enter__(self) -> "SwarmClient":
        return self

    def __deepcopy__(self, memo) -> "SwarmClient":
        return self  # a copy of a model (an EMA copy) shares the process's connection to the swarm

    def __reduce__(self):
        raise TypeError(
            "a SwarmClient (a RemoteMoE's connection to the swarm) cannot be pickled; save the model's "
            "state_dict() and build the model again where it is loaded"
        )

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Idempotent: closes channels, stops the directory thread and the DHT peer."""
        if self._closed:
            return
        self._closed = True
        self.dispatcher.close()
        self.directory.close()
        if self._owns_dht:
            self.dht.close()


class RemoteExperts(torch.autograd.Function):
    """Ties an already-dispatched forward (DispatchResult) into autograd: backward sends the output
    grads through the dispatcher. The network logic lives in Dispatcher, not here.
    train_experts: the nodes apply the gradients to their experts; else they return input grads alone
    (an eval-mode or frozen layer: a saliency map must not train experts that every client shares)."""

    @staticmethod
    def forward(ctx, x_TD, anchor, dispatcher: Dispatcher, result: DispatchResult, train_experts: bool = True):
        # ctx keeps the routing, not the outputs: the returned y_TKD gets ctx as its grad_fn, so ctx
        # holding it would be a reference cycle, and every layer's outputs and rows would wait for a
        # full garbage collection (minutes apart; a soak's client grew ~120 MiB between two).
        ctx.dispatcher, ctx.train_experts = dispatcher, train_experts
        ctx.result = dataclasses.replace(result, y_TKD=result.y_TKD.new_empty(0))
        ctx.save_for_backward(x_TD)
        return result.y_TKD

    @staticmethod
    @once_differentiable  # the nodes compute first-order grads only: a double backward raises, never wrong
    def backward(ctx, grad_y_TKD):
        (x_TD,) = ctx.saved_tensors
        if not bool(torch.isfinite(grad_y_TKD).all()):
            # fp16 loss scaling overflowed (GradScaler skips this step when it sees inf/NaN grads):
            # pass that on, and send nodes nothing they would refuse or apply
            return torch.full_like(x_TD, math.nan), None, None, None, None
        work = ctx.dispatcher.backward(ctx.result, x_TD.detach(), grad_y_TKD.contiguous(), apply=ctx.train_experts)
        return ctx.dispatcher.run(work).to(x_TD.dtype), None, None, None, None


def check_min_experts(
    result: DispatchResult, topk_ids_TK: torch.Tensor, uids: list[str], min_experts: int, sent_TK: torch.Tensor | None = None
) -> None:
    """Raise AllReplicasFailed (naming the expert and endpoints tried) if a token kept too few of the
    experts it was sent to (slots not sent, e.g. dropped by capacity, do not count)."""
    sent_TK = torch.ones_like(result.served_TK) if sent_TK is None else sent_TK
    served_TK = result.served_TK & sent_TK
    short_T = served_TK.sum(dim=-1) < sent_TK.sum(dim=-1).clamp(max=min_experts)
    if bool(short_T.any()):
        token = int(torch.nonzero(short_T)[0])
        slot = int(torch.nonzero(sent_TK[token] & ~served_TK[token])[0])
        uid = uids[int(topk_ids_TK[token, slot])]
        raise AllReplicasFailed(uid, result.attempts.get(uid, []))


class RemoteMoE(nn.Module):
    def __init__(
        self,
        *,
        model: str,
        layer: int,
        d_model: int,
        n_experts: int = 0,
        k: int = 0,
        initial_peers: list[str] | str = (),
        swarm: str = "default",
        client: SwarmClient | None = None,
        config: DispatchConfig = DispatchConfig(),
        min_experts: int = 1,
        gate: nn.Module | None = None,
        local_shared: tuple[int, int] | None = None,
        train_experts: bool = True,
    ):
        """gate: any routing module of model/routing.py (default: top-k softmax over n_experts).
        train_experts: a backward in train mode updates the remote experts (on their nodes). They
        are never updated in eval mode or while the layer is frozen (requires_grad_(False) on it or
        a parent: its router's weights tell); the backward then returns input grads alone.
        local_shared=(d_ff, seed): compute the gate's shared experts here instead of on the swarm.
        min_experts: a token may lose experts whose replicas all failed (its remaining gate weights
        are renormalised) as long as it keeps this many; otherwise forward raises AllReplicasFailed.
        config applies when this layer creates its own SwarmClient; a shared client has its own."""
        super().__init__()
        self.router = gate if gate is not None else TopKGate(d_model, n_experts, k)
        if not 1 <= min_experts <= self.router.k:
            raise ValueError(f"min_experts={min_experts}: must be between 1 and k={self.router.k}")
        self.min_experts, self.train_experts = min_experts, train_experts
        self.d_model, self.k = d_model, self.router.k
        self.uids = expert_uids(model, layer, self.router)
        self.shared = make_shared(self.uids, self.router, d_model, *local_shared) if local_shared else nn.ModuleList()
        self._owns_client = client is None
        self.client = client or SwarmClient(initial_peers, model=model, swarm=swarm, config=config)
        self.config = self.client.dispatcher.config
        remote_uids = self.uids[: len(self.uids) - len(self.shared)]
        self.client.directory.track(remote_uids)
        self.client.directory.warn_if_missing(remote_uids)
        self.last_routing: Routing | None = None  # for load-balancing / z losses
        self._anchor = torch.empty(0, requires_grad=True)  # not a Parameter: nothing to optimise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.d_model:
            raise ValueError(f"RemoteMoE expects [..., {self.d_model}] inputs, got {list(x.shape)}")
        x_TD = x.reshape(-1, self.d_model)
        routing = self.router(x_TD)
        self.last_routing = routing
        if x_TD.shape[0] == 0:
            return x * 0  # empty, and in the graph like a local layer's output
        n_remote_slots = routing.topk_ids_TK.shape[1] - len(self.shared)
        remote = self._remote_experts
        if torch.compiler.is_compiling():  # torch.compile: network I/O on another thread stays out of the graph
            remote = torch.compiler.disable(remote)  # (not a decorator: that imports torch._dynamo, ~1 s, for everyone)
        y_TKD, served_TK = remote(x_TD, routing.topk_ids_TK[:, :n_remote_slots], routing.mask_TK[:, :n_remote_slots])
        y_TKD = with_shared_outputs(y_TKD, self.shared, x_TD)
        if served_TK is not None and len(self.shared):
            served_TK = torch.cat([served_TK, torch.ones_like(routing.mask_TK[:, n_remote_slots:])], dim=1)
        out_TD = combine(y_TKD, routing.weights_TK, served_TK)
        return out_TD.to(x.dtype).reshape(x.shape)

    def _remote_experts(self, x_TD: torch.Tensor, ids_TK: torch.Tensor, sent_TK: torch.Tensor):
        """(y_TKD, served_TK or None when every slot was served) of the routed slots, over the swarm."""
        all_sent = bool(sent_TK.all())  # False only where a capacity limit dropped slots
        train_experts = torch.is_grad_enabled() and self.trains_experts()
        result = self.client.dispatch(
            self.uids, x_TD, ids_TK if all_sent else ids_TK.masked_fill(~sent_TK, -1), keep_activations=train_experts
        )
        # capacity drops carry weight 0 already: count them as served
        served_TK = result.served_TK if all_sent else result.served_TK | ~sent_TK
        all_served = bool(served_TK.all())
        if not all_served:
            check_min_experts(result, ids_TK, self.uids, self.min_experts, sent_TK)
        if not torch.is_grad_enabled():
            return result.y_TKD, None if all_served else served_TK  # inference: no autograd node (decoding calls this per token)
        # The anchor requires grad, so backward reaches the remote experts even when neither the
        # input nor anything before this layer requires grad (the experts' weights live on nodes).
        anchor = self._anchor if train_experts else self._anchor.detach()
        y_TKD = RemoteExperts.apply(x_TD, anchor, self.client.dispatcher, result, train_experts)
        return y_TKD, None if all_served else served_TK

    def trains_experts(self) -> bool:
        """Whether a backward now updates the remote experts (see train_experts)."""
        return self.training and self.train_experts and all(p.requires_grad for p in self.router.parameters())

    async def forward_async(self, x: torch.Tensor) -> torch.Tensor:
        """Inference from an asyncio program: awaits the dispatch without blocking the caller's loop."""
        return await asyncio.get_running_loop().run_in_executor(None, self._infer, x)

    def _infer(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # grad mode is per thread: set here, on the thread that computes
            return self.forward(x)

    def __enter__(self) -> "RemoteMoE":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release the swarm connection this layer created (a shared client is its owner's to close)."""
        if self._owns_client:
            self.client.close()
