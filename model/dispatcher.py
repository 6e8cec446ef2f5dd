"""Sends a layer's routed rows to expert replicas: one RPC per node, all nodes at once, each with a
deadline; falls back to other replicas, bans failing ones and hedges slow forwards (never a backward:
both replicas would apply its gradients).

Owns the client's single event loop, run by the threads that call it (`run`, model/loop_runner.py).
An inference forward's first round skips the loop: the calling thread sends it and reads the answers
on blocking data connections (`forward_blocking`); the loop takes over only what that round leaves.
Row bookkeeping is in model/expert_rows.py, replica choice in model/replicas.py.
Legend: T tokens, K experts per token, D model dim, N rows of one expert.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import itertools
import logging
import math
import os
import time
import uuid

import torch

from moeswarm.model.client_pool import ClientPool
from moeswarm.model.expert_client import ExpertClient
from moeswarm.model.directory import ExpertDirectory
from moeswarm.model.expert_rows import ExpertRows, gather_at, gather_rows, group_rows, scatter_outputs
from moeswarm.model.loop_runner import LoopRunner, new_event_loop
from moeswarm.model.replicas import AFFINITY_MAX_ROWS, ReplicaPicker, candidates, pick_endpoint
from moeswarm.protocol import wire
from moeswarm.protocol.codec import WIRE_DTYPES
from moeswarm.protocol.errors import (
    AllReplicasFailed, BadRequest, ConfigError, ExpertNotFound, MoeSwarmError, NodeUnavailable, NotTrainable,
)

logger = logging.getLogger(__name__)
Attempts = dict[str, list[tuple[str, str]]]  # uid -> [(endpoint, reason)]
# An inference forward carrying at most this much goes out from the calling thread (forward_blocking).
BLOCKING_MAX_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True, kw_only=True)
class DispatchConfig:
    timeout_s: float = 5.0  # deadline of one RPC
    max_attempts: int = 3  # replicas tried per expert within one layer call
    hedge_floor_s: float = 0.05  # never hedge a call younger than this
    wire_dtype: str = "float32"  # activations on the wire; bfloat16/float16 halve the bytes

    def __post_init__(self) -> None:
        if not (0 < self.timeout_s < math.inf) or self.max_attempts < 1 or not (0 <= self.hedge_floor_s < math.inf):
            raise ConfigError(f"invalid dispatch config {self}")
        if self.wire_dtype not in WIRE_DTYPES:
            raise ConfigError(f"wire_dtype={self.wire_dtype!r}: one of {sorted(WIRE_DTYPES)}")


@dataclasses.dataclass
class DispatchResult:
    y_TKD: torch.Tensor  # expert output per (token, slot), zeros where dropped
    served_TK: torch.Tensor  # bool: slot has an expert output
    rows: dict[str, ExpertRows]
    endpoints: dict[str, str]  # uid -> endpoint that served the forward (backward goes there first)
    attempts: Attempts  # failed tries, for error messages
    forward_ids: dict[str, str] = dataclasses.field(default_factory=dict)  # uid -> id its node kept activations under


@dataclasses.dataclass(frozen=True)
class _Job:
    """One layer call's work for _run_experts: what every RPC of it sends."""

    op: str  # "forward" or "backward"
    inputs: dict[str, torch.Tensor]
    grads: dict[str, torch.Tensor] | None = None
    keep: bool = False  # forward: nodes keep activations for the backward (training)
    kept_on: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)  # backward: uid -> (endpoint, forward id)
    # backward: experts a failed call may still have applied on its node (a deadline, a lost answer):
    # their retries ask for input grads alone, so no replica applies the same gradients twice
    maybe_applied: set[str] = dataclasses.field(default_factory=set)

    @property
    def trains(self) -> bool:
        """A backward that applies grads, or the forward of a training step (its backward should go to
        the same node). Input grads alone (every expert in maybe_applied) any replica serves."""
        return self.op == "backward" and not self.maybe_applied.issuperset(self.inputs) or self.keep


@dataclasses.dataclass(frozen=True)
class _Sent:
    """A forward the calling thread sent (forward_blocking), its answer not read yet."""

    endpoint: str
    uids: list[str]
    client: ExpertClient
    started: float  # time.monotonic() when sent


class Dispatcher:
    def __init__(self, directory: ExpertDirectory, model: str, config: DispatchConfig, picker: ReplicaPicker | None = None):
        self.directory, self.model, self.config = directory, model, config
        self.picker = picker or ReplicaPicker()
        self._wire_dtype = WIRE_DTYPES[config.wire_dtype]
        # ids under which nodes keep a training forward's activations: unique per client and call
        prefix = uuid.uuid4().hex[:12]  # once: inside the generator expression it ran for every id
        self._forward_ids = (f"{prefix}-f{i}" for i in itertools.count())
        self._loop = new_event_loop()
        self._runner = LoopRunner(self._loop)
        self.clients = ClientPool(self._loop, directory, self.picker)  # one per node, used on the loop
        self._pid, self._closed = os.getpid(), False

    def run(self, coro, timeout_s: float | None = None):
        """Run a coroutine on the dispatcher's loop from any thread; block for its result."""
        try:
            self._check_usable()
        except RuntimeError:
            coro.close()
            raise
        return self._closed_if_cancelled(self._runner.run, coro, self._bound(timeout_s))

    def _bound(self, timeout_s: float | None = None) -> float:
        return timeout_s if timeout_s is not None else self.config.timeout_s * (self.config.max_attempts + 1)

    def _check_usable(self) -> None:
        if self._closed:
            raise RuntimeError("this SwarmClient is closed; make a new one")
        if os.getpid() != self._pid:
            raise RuntimeError(  # its channels and the DHT peer stayed in the parent: it would hang
                "this SwarmClient was made before this process forked; make one in each process (after the fork)"
            )

    def _closed_if_cancelled(self, run, *args):
        try:
            return run(*args)
        except (asyncio.CancelledError, concurrent.futures.CancelledError):
            if self._closed:
                raise RuntimeError("the SwarmClient was closed during this call") from None
            raise

    async def forward(
        self, uids: list[str], x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, *, keep_activations: bool = False
    ) -> DispatchResult:
        """keep_activations: a training forward; nodes keep what backward() then reuses."""
        rows = group_rows(topk_ids_TK, uids)
        inputs = gather_rows(x_TD, rows)
        forward_ids: dict[str, str] = {}
        outputs, endpoints, attempts = await self._run_experts(_Job("forward", inputs, keep=keep_activations), {}, forward_ids)
        y_TKD, served_TK = scatter_outputs(topk_ids_TK, x_TD.shape[-1], rows, outputs)
        return DispatchResult(y_TKD, served_TK, rows, endpoints, attempts, forward_ids)

    def forward_blocking(self, uids: list[str], x_TD: torch.Tensor, topk_ids_TK: torch.Tensor) -> DispatchResult:
        """run(forward(...)) of an inference forward (nothing kept for a backward), its first round sent
        and answered by the calling thread itself where it can: decoding's path. The loop then does
        not run around the call: its tasks, futures and selector cost a decoding layer call ~0.15 ms of
        Python with the caches cold after the dense compute (bench/generate.py, full runs, per MoE
        layer over the local step: batch 1 0.67-0.69 -> 0.52-0.53 ms, batch 8 0.71-0.76 -> 0.39-0.42 ms). It can when no
        other thread runs the loop, every node of the call has a client already (made on the loop, at
        an earlier call) whose data port answers, and the call carries at most BLOCKING_MAX_BYTES.
        What that round leaves (a failed node, an answer past its hedge delay) goes on through the
        loop, with forward()'s retries, hedges and bans."""
        if not self._runner.hold():
            return self.run(self.forward(uids, x_TD, topk_ids_TK))
        held = True
        try:
            self._check_usable()
            rows = group_rows(topk_ids_TK, uids)
            inputs = gather_rows(x_TD, rows)
            job, done, late = _Job("forward", inputs), None, []
            sent = self._send_blocking(job, attempts := {uid: [] for uid in inputs})
            if sent is not None:
                done = ({}, {}, attempts)
                late = self._receive_blocking(job, sent, *done)
            if done is None or late or len(done[0]) < len(inputs):  # the rest through the loop
                held = False
                work = self._run_experts(job, {}, {}, done=done, sent=late)
                done = self._closed_if_cancelled(self._runner.run_held, work, self._bound())
            outputs, served_by, attempts = done
            y_TKD, served_TK = scatter_outputs(topk_ids_TK, x_TD.shape[-1], rows, outputs)
            return DispatchResult(y_TKD, served_TK, rows, served_by, attempts, {})
        finally:
            if held:
                self._runner.release()

    def _send_blocking(self, job: _Job, attempts: Attempts) -> list[_Sent] | None:
        """forward_blocking's first round, sent from the calling thread; None (nothing sent) where it
        cannot go so."""
        if wire.payload_bytes(job.inputs.values(), self._wire_dtype) > BLOCKING_MAX_BYTES:
            return None
        plan = self._assign(set(job.inputs), attempts, {}, {uid: x.shape[0] for uid, x in job.inputs.items()}, False)
        clients = [self.clients.existing(endpoint) for endpoint in plan]
        if not all(client is not None and client.can_call_blocking() for client in clients):
            return None
        sent = []
        for (endpoint, uids), client in zip(plan.items(), clients):
            started = time.monotonic()
            try:
                client.forward_send(self.model, {uid: job.inputs[uid] for uid in uids}, timeout_s=self.config.timeout_s, wire_dtype=self._wire_dtype)
            except MoeSwarmError as e:
                self._failed(job, endpoint, uids, attempts, e)
                continue
            sent.append(_Sent(endpoint, uids, client, started))
        return sent

    def _receive_blocking(self, job: _Job, sent: list[_Sent], outputs: dict, served_by: dict, attempts: Attempts) -> list[_Sent]:
        """The answers to _send_blocking's requests, read on the calling thread, each until its deadline
        or (experts with another replica) its hedge delay; returns those still unanswered then.
        One after the other, the node expected fastest first: a call's latency as the picker records
        it is then at most that of the calls read before it, which were expected faster. (Waiting on
        all of them at once and reading each answer as it comes woke this thread once per node, and
        on the 2-core VM made batch-8 decoding slower: 0.53-0.64 against 0.38-0.51 ms per MoE layer
        over the local step, 3 alternating --quick pairs.)"""
        late, unread = [], sorted(sent, key=lambda call: self.picker.latency_s(call.endpoint))
        try:
            while unread:
                call = unread[0]
                hedges = any(len(self.directory.replicas(uid)) >= 2 for uid in call.uids)
                limit_s = min(self.picker.hedge_after_s(call.endpoint, self.config.hedge_floor_s) if hedges else math.inf, self.config.timeout_s)
                try:
                    out = call.client.forward_receive({uid: job.inputs[uid] for uid in call.uids}, call.started + limit_s - time.monotonic())
                    if out is None and limit_s >= self.config.timeout_s:
                        call.client.forward_abandon()
                        raise NodeUnavailable(f"{call.endpoint}: DEADLINE_EXCEEDED: no answer within {self.config.timeout_s:.3g} s")
                except BadRequest:
                    raise  # our request was malformed: a bug, not a replica fault
                except MoeSwarmError as e:
                    if self._closed:  # close() from another thread cut the connection
                        raise RuntimeError("the SwarmClient was closed during this call") from None
                    self._failed(job, call.endpoint, call.uids, attempts, e)
                    out = {}
                unread.pop(0)
                if out is None:
                    late.append(call)
                elif out:
                    for uid, (tensor, endpoint, _) in self._succeeded(call.endpoint, call.started, out, "").items():
                        outputs[uid], served_by[uid] = tensor, endpoint
        except BaseException:  # their answers would pair with the next requests on these connections
            for call in unread:
                call.client.forward_abandon()
            raise
        return late

    async def backward(
        self, result: DispatchResult, x_TD: torch.Tensor, grad_y_TKD: torch.Tensor, *, apply: bool = True
    ) -> torch.Tensor:
        """Send output grads of every served expert (to the replica that served the forward first).
        apply=False: input grads alone; the nodes change nothing."""
        served = {uid: result.rows[uid] for uid in result.endpoints}
        inputs = gather_rows(x_TD, served)
        grads = gather_at(grad_y_TKD.reshape(-1, grad_y_TKD.shape[-1]), served, "flat_idx")
        kept_on = {uid: (result.endpoints[uid], fid) for uid, fid in result.forward_ids.items() if uid in result.endpoints}
        job = _Job("backward", inputs, grads, kept_on=kept_on, maybe_applied=set() if apply else set(inputs))
        grad_x, _, attempts = await self._run_experts(job, result.endpoints, {})
        missing = set(inputs) - set(grad_x)
        if missing:  # a lost gradient would silently bias training: fail loudly instead
            uid = sorted(missing)[0]
            raise AllReplicasFailed(uid, attempts.get(uid, []))
        grad_x_TD = torch.zeros(x_TD.shape, dtype=torch.float32)
        order = [uid for uid in served if uid in grad_x]  # expert order: the same sums as one add per expert
        if order:  # none when no slot was sent (a capacity limit dropped them all)
            token_idx = torch.cat([served[uid].token_idx for uid in order])
            grad_x_TD.index_add_(0, token_idx, torch.cat([grad_x[uid] for uid in order]).float())
        return grad_x_TD

    async def _run_experts(
        self, job: _Job, preferred: dict[str, str], forward_ids: dict[str, str], *,
        done: tuple[dict, dict, Attempts] | None = None, sent: list[_Sent] = (),
    ):
        """Up to max_attempts rounds: each round groups the pending experts by chosen replica.
        forward_ids is filled with the id each served expert's node kept its activations under.
        done: (outputs, served_by, attempts) of a first round forward_blocking ran; sent: its requests
        still unanswered, whose answers (and hedges) join the next round."""
        outputs, served_by, attempts = done if done is not None else ({}, {}, {uid: [] for uid in job.inputs})
        pending = set(job.inputs) - set(outputs)
        rounds = self.config.max_attempts - (done is not None)
        for round_ in range(max(rounds, 1 if sent else 0)):
            flying = {uid for call in sent for uid in call.uids}
            plan = {}
            if round_ < rounds:
                rows = {uid: job.inputs[uid].shape[0] for uid in pending - flying}
                plan = self._assign(pending - flying, attempts, preferred, rows, job.trains)
            calls = [self._call_hedged(job, call.endpoint, call.uids, attempts, call) for call in sent]
            calls += [self._call_hedged(job, endpoint, uids, attempts) for endpoint, uids in plan.items()]
            sent = ()
            if not calls:
                break
            for answered in (await asyncio.gather(*calls)) if len(calls) > 1 else [await calls[0]]:
                for uid, (tensor, endpoint, forward_id) in answered.items():
                    outputs[uid], served_by[uid] = tensor, endpoint
                    if forward_id:
                        forward_ids[uid] = forward_id
            pending -= set(outputs)
        return outputs, served_by, attempts

    def _assign(
        self, pending: set[str], attempts: Attempts, preferred: dict[str, str], rows: dict[str, int], training: bool,
    ) -> dict[str, list[str]]:
        plan: dict[str, list[str]] = {}
        for uid in sorted(pending):
            tried = {e for e, _ in attempts[uid]}
            ranked = self.picker.rank(candidates(self.directory.replicas(uid), training), tried)
            first_choice = preferred.get(uid) if preferred.get(uid) not in tried else None
            endpoint = pick_endpoint(
                [r.endpoint for r in ranked], self.picker.is_banned, first_choice,
                planned=plan if rows[uid] <= AFFINITY_MAX_ROWS else None, latency_s=self.picker.latency_s,
            )
            if endpoint is not None:
                plan.setdefault(endpoint, []).append(uid)
        return plan

    def _choose(self, uid: str, exclude: set[str], preferred: str | None, training: bool) -> str | None:
        ranked = self.picker.rank(candidates(self.directory.replicas(uid), training), exclude)
        return pick_endpoint([r.endpoint for r in ranked], self.picker.is_banned, preferred if preferred not in exclude else None)

    async def _call_hedged(self, job: _Job, endpoint, uids, attempts: Attempts, sent: _Sent | None = None) -> dict:
        """Call one node; if a forward runs past its hedge delay, send the same experts to other replicas
        too and take whichever answers first. A backward is never hedged: both replicas would apply its
        gradients (it waits for its node, or its deadline and then another replica).
        sent: the call was sent already (forward_blocking); wait for its answer here.
        Returns {uid: (tensor, endpoint, forward id)} for what succeeded."""
        op = job.op
        call = self._call(job, endpoint, uids, attempts) if sent is None else self._receive(job, sent, attempts)
        if op == "backward" or all(len(self.directory.replicas(uid)) < 2 for uid in uids):  # no hedge: skip the timer task
            return await call
        primary = asyncio.ensure_future(call)
        delay_s = self.picker.hedge_after_s(endpoint, self.config.hedge_floor_s) - (time.monotonic() - sent.started if sent else 0.0)
        done, _ = await asyncio.wait({primary}, timeout=max(delay_s, 0.0))
        if done:
            return primary.result()
        exclude = {uid: {endpoint} | {e for e, _ in attempts[uid]} for uid in uids}
        alternatives = {uid: self._choose(uid, exclude[uid], None, job.trains) for uid in uids}
        if any(alt is None for alt in alternatives.values()):
            return await primary
        logger.info("hedging %s call to %s after %.0f ms", op, endpoint, self.picker.hedge_after_s(endpoint, 0) * 1e3)
        hedge = asyncio.ensure_future(self._call_group(job, alternatives, attempts))
        done, pending = await asyncio.wait({primary, hedge}, return_when=asyncio.FIRST_COMPLETED)
        answered = {uid: value for task in done for uid, value in task.result().items()}
        if len(answered) < len(uids) and pending:  # the first one failed (partly): the other decides
            for result in await asyncio.gather(*pending):
                answered = {**result, **answered}
            return answered
        for task in pending:
            task.cancel()
        if primary in pending:
            self._ban(endpoint)  # slower than its replicas: avoid it for a while
        return answered

    async def _call_group(self, job: _Job, assignment: dict[str, str], attempts: Attempts) -> dict:
        by_endpoint: dict[str, list[str]] = {}
        for uid, endpoint in assignment.items():
            by_endpoint.setdefault(endpoint, []).append(uid)
        results = await asyncio.gather(*(self._call(job, e, u, attempts) for e, u in by_endpoint.items()))
        return {uid: value for result in results for uid, value in result.items()}

    async def _call(self, job: _Job, endpoint: str, uids: list[str], attempts: Attempts) -> dict:
        """One RPC. Failures are recorded (and the replica banned), not raised, except caller bugs."""
        client = self.clients.get(endpoint)
        started = time.monotonic()
        op, keep_as = job.op, (next(self._forward_ids) if job.keep else "")
        try:
            batch = {uid: job.inputs[uid] for uid in uids}
            if op == "forward":
                out = await client.forward(
                    self.model, batch, timeout_s=self.config.timeout_s, wire_dtype=self._wire_dtype, keep_as=keep_as
                )
            else:
                grad_batch = {uid: job.grads[uid] for uid in uids}
                # the node that kept a forward's activations is the one that can reuse them
                forward_ids = {uid: job.kept_on[uid][1] for uid in uids if job.kept_on.get(uid, ("",))[0] == endpoint}
                out = await client.backward(
                    self.model, batch, grad_batch, timeout_s=self.config.timeout_s, wire_dtype=self._wire_dtype,
                    forward_ids=forward_ids, input_grads_only=job.maybe_applied.intersection(uids),
                )
        except BadRequest:
            raise  # our request was malformed: a bug, not a replica fault; never retried
        except MoeSwarmError as e:
            self._failed(job, endpoint, uids, attempts, e)
            return {}
        return self._succeeded(endpoint, started, out, keep_as)

    async def _receive(self, job: _Job, sent: _Sent, attempts: Attempts) -> dict:
        """The answer to a forward the calling thread sent (forward_blocking), read on the loop."""
        try:
            out = await sent.client.forward_receive_async(
                {uid: job.inputs[uid] for uid in sent.uids}, sent.started + self.config.timeout_s - time.monotonic()
            )
        except BadRequest:
            raise
        except MoeSwarmError as e:
            self._failed(job, sent.endpoint, sent.uids, attempts, e)
            return {}
        return self._succeeded(sent.endpoint, sent.started, out, "")

    def _succeeded(self, endpoint: str, started: float, out: dict[str, torch.Tensor], keep_as: str) -> dict:
        self.picker.on_success(endpoint, time.monotonic() - started)
        return {uid: (tensor, endpoint, keep_as) for uid, tensor in out.items()}

    def _failed(self, job: _Job, endpoint: str, uids: list[str], attempts: Attempts, error: MoeSwarmError) -> None:
        """Record a failed call (and ban its replica, unless the node is fine)."""
        reason = str(error).split(": ", 1)[-1][:200]
        for uid in uids:
            attempts[uid].append((endpoint, reason))
        if isinstance(error, (ExpertNotFound, NotTrainable)):  # the node no longer hosts it, or serves inference only
            return
        if job.op == "backward":
            job.maybe_applied.update(uids)
        ban_s = self._ban(endpoint)
        # once per outage, not a line per call: with no replica left, every call tries the banned ones
        failures = self.picker.failures(endpoint)
        (logger.warning if failures == 1 else logger.debug)(
            "%s to %s failed (%s); banned for %.0f s%s", job.op, endpoint, reason, ban_s,
            "" if failures > 1 else " (further failures in a row are logged at debug level)",
        )

    def _ban(self, endpoint: str) -> float:
        """Ban a failing replica (returns the ban, s) and drop its client, so that the call after the
        ban opens a new connection. An unplugged peer's TCP connection sends no FIN or RST: what was
        written to it is retransmitted with a backoff that reaches minutes, and calls on it would
        find no answer long after the peer is back. Calls still in flight on the dropped client
        finish (each has its deadline) before its channel closes."""
        self.clients.drop(endpoint, grace_s=self.config.timeout_s)
        return self.picker.on_failure(endpoint)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True  # before the channels close: calls they cancel say why
        self.clients.interrupt_blocking()  # a thread blocked in forward_blocking returns, and releases the loop
        try:
            self._runner.run(self.clients.close(), 5.0)
        except Exception as e:  # closing must not fail: what is left is cancelled below
            logger.debug("closing the dispatcher's channels: %r", e)
        finally:
            self._runner.close()
