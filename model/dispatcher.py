"""Sends a layer's routed rows to expert replicas: one RPC per node, all nodes at once, each with a
deadline; falls back to other replicas, bans failing ones and hedges slow forwards (never a backward:
both replicas would apply its gradients).

Owns the client's single event loop, run by the threads that call it (`run`, model/loop_runner.py).
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
from typing import Callable, Collection, Mapping

import torch

from moeswarm.model.client_pool import ClientPool
from moeswarm.model.directory import ExpertDirectory
from moeswarm.model.loop_runner import LoopRunner
from moeswarm.model.replicas import ReplicaPicker
from moeswarm.protocol.codec import WIRE_DTYPES
from moeswarm.protocol.errors import AllReplicasFailed, BadRequest, ConfigError, ExpertNotFound, MoeSwarmError, NotTrainable
from moeswarm.protocol.records import ExpertRecord

logger = logging.getLogger(__name__)
Attempts = dict[str, list[tuple[str, str]]]  # uid -> [(endpoint, reason)]


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


@dataclasses.dataclass(frozen=True)
class ExpertRows:
    """Read-only: the tensors of a one-token call's rows are shared by every call (_ONE_TOKEN_ROWS)."""

    token_idx: torch.Tensor  # [N] long: which tokens were routed to this expert
    slot_idx: torch.Tensor  # [N] long: in which of their k slots
    flat_idx: torch.Tensor  # [N] long: token_idx * k + slot_idx, the row in a [T * k, ...] view
    one_slot: int = -1  # the slot, as an int, when the call has one token (else -1)


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


def group_rows(topk_ids_TK: torch.Tensor, uids: list[str]) -> dict[str, ExpertRows]:
    """Which (token, slot) pairs each expert of the layer gets; ids < 0 mark slots not to send. Pure.
    Experts in increasing id order, rows in token order."""
    if topk_ids_TK.numel() <= SMALL_ROUTING_SLOTS:
        return _group_rows_small(topk_ids_TK, uids)
    # One stable sort of the flattened (token, slot) ids by expert, cut into one run per expert:
    # a fixed handful of torch ops, however many experts the layer has.
    K = topk_ids_TK.shape[1]
    flat_ids = topk_ids_TK.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    experts, counts = torch.unique_consecutive(flat_ids[order], return_counts=True)
    token_idx, slot_idx = order // K, order % K
    rows, start = {}, 0
    for expert, count in zip(experts.tolist(), counts.tolist()):
        if expert >= 0:
            run = slice(start, start + count)
            rows[uids[expert]] = ExpertRows(token_idx[run], slot_idx[run], order[run])
        start += count
    return rows


def gather_rows(x_TD: torch.Tensor, rows: dict[str, ExpertRows]) -> dict[str, torch.Tensor]:
    """Each expert's input rows {uid: x_ND}: one gather for the whole layer, then views of it."""
    if x_TD.shape[0] == 1 and all(r.token_idx.numel() == 1 for r in rows.values()):
        return dict.fromkeys(rows, x_TD)  # decoding one sequence: every expert gets the one token, no copy
    return _gather(x_TD, rows, "token_idx")


def _gather(x: torch.Tensor, rows: dict[str, ExpertRows], index: str) -> dict[str, torch.Tensor]:
    """{uid: x[rows[uid].<index>]}: per expert when there are few, else one gather split into views."""
    if len(rows) <= 2:
        return {uid: x[getattr(r, index)] for uid, r in rows.items()}
    gathered = x[torch.cat([getattr(r, index) for r in rows.values()])]
    return dict(zip(rows, gathered.split([r.token_idx.numel() for r in rows.values()])))


SMALL_ROUTING_SLOTS = 64  # up to this many (token, slot) pairs, plain Python beats a dozen tiny torch ops
_SLOTS = torch.arange(SMALL_ROUTING_SLOTS)
# Decoding one sequence: the rows of the expert in each slot, made once (token 0; its flat index is the slot).
_ONE_TOKEN_ROWS = tuple(ExpertRows(_SLOTS[:1], _SLOTS[s : s + 1], _SLOTS[s : s + 1], s) for s in range(SMALL_ROUTING_SLOTS))


def _group_rows_small(topk_ids_TK: torch.Tensor, uids: list[str]) -> dict[str, ExpertRows]:
    """group_rows for decoding-sized batches (a few tokens): same result, ~10x fewer microseconds.
    One tensor holds every expert's (token, slot, flat) indices; each ExpertRows views its columns."""
    K = topk_ids_TK.shape[1]
    ids = topk_ids_TK.tolist()
    if len(ids) == 1:  # one token, each expert in one slot (top-k picks distinct ones): no torch op at all
        slot_of = {expert: slot for slot, expert in enumerate(ids[0]) if expert >= 0}
        if len(slot_of) == sum(expert >= 0 for expert in ids[0]):
            return {uids[expert]: _ONE_TOKEN_ROWS[slot_of[expert]] for expert in sorted(slot_of)}
    buckets: dict[int, list[tuple[int, int]]] = {}
    for token, row in enumerate(ids):
        for slot, expert in enumerate(row):
            if expert >= 0:
                buckets.setdefault(expert, []).append((token, slot))
    if not buckets:
        return {}
    experts = sorted(buckets)
    pairs = [pair for e in experts for pair in buckets[e]]
    index_3N = torch.tensor([[t for t, _ in pairs], [s for _, s in pairs], [t * K + s for t, s in pairs]])
    parts = index_3N.split([len(buckets[e]) for e in experts], dim=1)
    return {uids[e]: ExpertRows(*part.unbind(0)) for e, part in zip(experts, parts)}


def _scatter_outputs(
    topk_ids_TK: torch.Tensor, d_model: int, rows: dict[str, ExpertRows], outputs: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y_TKD, served_TK): each answered expert's rows in its (token, slot) places, in fp32; zeros
    and False where an expert was not answered or a slot was not sent. One copy for all experts."""
    T, K = topk_ids_TK.shape
    answered = [uid for uid in rows if uid in outputs]
    if len(answered) == K and all(rows[uid].one_slot >= 0 for uid in answered):  # one token, every slot answered
        by_slot = sorted(answered, key=lambda uid: rows[uid].one_slot)
        return torch.cat([outputs[uid] for uid in by_slot]).float().view(1, K, d_model), torch.ones(1, K, dtype=torch.bool)
    y_TKD = torch.zeros(T, K, d_model, dtype=torch.float32)
    if not answered:
        return y_TKD, torch.zeros(T, K, dtype=torch.bool)
    flat_idx = torch.cat([rows[uid].flat_idx for uid in answered])
    y_TKD.view(T * K, d_model).index_copy_(0, flat_idx, torch.cat([outputs[uid] for uid in answered]).float())
    if len(answered) == len(rows):
        return y_TKD, topk_ids_TK >= 0
    served_TK = torch.zeros(T, K, dtype=torch.bool)
    served_TK.view(-1)[flat_idx] = True
    return y_TKD, served_TK


def candidates(replicas: list[ExpertRecord], training: bool) -> list[ExpertRecord]:
    """The replicas to choose from. Pure. Training work goes to replicas that accept gradients while
    there are any (then a step's backward finds its forward's node); otherwise to all of them, so an
    expert served only by inference-only nodes fails with their answers, not an empty list."""
    if not training:
        return replicas
    return [record for record in replicas if record.trainable] or replicas


AFFINITY_MAX_ROWS = 32  # an expert with this few rows joins a node already called rather than adding an RPC,
AFFINITY_MAX_EXPERTS = 2  # while that node has fewer experts than this in the call; then a replica not yet
SPREAD_MAX_LATENCY_RATIO = 2.0  # called, if about as fast, gets its own RPC, so that the nodes compute in parallel.
# Measured (bench/generate.py with 2 nodes each hosting every expert: 8 per layer of 256x512, top-2),
# decoding 8 sequences: all joined onto one node cost 1.26 ms per MoE layer over local, split 0.84 ms
# (544 vs 491 tokens/s); decoding one, a token's 2 experts still share one RPC (0.78 ms either way).


def pick_endpoint(
    ranked: list[str], is_banned: Callable[[str], bool], preferred: str | None = None,
    planned: Mapping[str, Collection[str]] | None = None, latency_s: Callable[[str], float] | None = None,
) -> str | None:
    """The replica to call for one expert. Pure. `ranked`: candidates best first (ReplicaPicker.rank,
    excluded ones already dropped). preferred (the replica that served the forward) wins unless banned.
    planned: the experts this layer call already sends to each node, given for an expert with few rows:
    it joins one of those RPCs (one RPC more costs more than a slightly slower replica for a few rows)
    while that node has room (AFFINITY_MAX_EXPERTS); when all it could join are full, it goes to its
    best replica not called yet if that one's latency_s is within SPREAD_MAX_LATENCY_RATIO of theirs
    (the nodes then compute in parallel), else to the one with the fewest experts planned. Without
    `planned`: the best usable replica."""
    if preferred is not None and not is_banned(preferred):
        return preferred
    usable = [endpoint for endpoint in ranked if not is_banned(endpoint)]
    if not usable:
        return ranked[0] if ranked else None
    if not planned:
        return usable[0]
    joinable = [endpoint for endpoint in usable if endpoint in planned]
    for endpoint in joinable:
        if len(planned[endpoint]) < AFFINITY_MAX_EXPERTS:
            return endpoint
    fresh = [endpoint for endpoint in usable if endpoint not in planned]
    if not joinable:
        return fresh[0]
    if fresh and (latency_s is None or latency_s(fresh[0]) <= SPREAD_MAX_LATENCY_RATIO * min(map(latency_s, joinable))):
        return fresh[0]
    return min(joinable, key=lambda endpoint: len(planned[endpoint]))  # stable: the best ranked among the least loaded


class Dispatcher:
    def __init__(self, directory: ExpertDirectory, model: str, config: DispatchConfig, picker: ReplicaPicker | None = None):
        self.directory, self.model, self.config = directory, model, config
        self.picker = picker or ReplicaPicker()
        self._wire_dtype = WIRE_DTYPES[config.wire_dtype]
        # ids under which nodes keep a training forward's activations: unique per client and call
        prefix = uuid.uuid4().hex[:12]  # once: inside the generator expression it ran for every id
        self._forward_ids = (f"{prefix}-f{i}" for i in itertools.count())
        self._loop = _new_event_loop()
        self._runner = LoopRunner(self._loop)
        self.clients = ClientPool(self._loop, directory, self.picker)  # one per node, used on the loop
        self._pid, self._closed = os.getpid(), False

    def run(self, coro, timeout_s: float | None = None):
        """Run a coroutine on the dispatcher's loop from any thread; block for its result."""
        if self._closed or os.getpid() != self._pid:
            coro.close()
            if self._closed:
                raise RuntimeError("this SwarmClient is closed; make a new one")
            raise RuntimeError(  # its channels and the DHT peer stayed in the parent: it would hang
                "this SwarmClient was made before this process forked; make one in each process (after the fork)"
            )
        bound = timeout_s if timeout_s is not None else self.config.timeout_s * (self.config.max_attempts + 1)
        try:
            return self._runner.run(coro, bound)
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
        y_TKD, served_TK = _scatter_outputs(topk_ids_TK, x_TD.shape[-1], rows, outputs)
        return DispatchResult(y_TKD, served_TK, rows, endpoints, attempts, forward_ids)

    async def backward(
        self, result: DispatchResult, x_TD: torch.Tensor, grad_y_TKD: torch.Tensor, *, apply: bool = True
    ) -> torch.Tensor:
        """Send output grads of every served expert (to the replica that served the forward first).
        apply=False: input grads alone; the nodes change nothing."""
        served = {uid: result.rows[uid] for uid in result.endpoints}
        inputs = gather_rows(x_TD, served)
        grads = _gather(grad_y_TKD.reshape(-1, grad_y_TKD.shape[-1]), served, "flat_idx")
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

    async def _run_experts(self, job: _Job, preferred: dict[str, str], forward_ids: dict[str, str]):
        """Up to max_attempts rounds: each round groups the pending experts by chosen replica.
        forward_ids is filled with the id each served expert's node kept its activations under."""
        outputs, served_by, attempts = {}, {}, {uid: [] for uid in job.inputs}
        pending = set(job.inputs)
        for _ in range(self.config.max_attempts):
            plan = self._assign(pending, attempts, preferred, {uid: job.inputs[uid].shape[0] for uid in pending}, job.trains)
            if not plan:
                break
            calls = [self._call_hedged(job, endpoint, uids, attempts) for endpoint, uids in plan.items()]
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

    async def _call_hedged(self, job: _Job, endpoint, uids, attempts: Attempts) -> dict:
        """Call one node; if a forward runs past its hedge delay, send the same experts to other replicas
        too and take whichever answers first. A backward is never hedged: both replicas would apply its
        gradients (it waits for its node, or its deadline and then another replica).
        Returns {uid: (tensor, endpoint, forward id)} for what succeeded."""
        op = job.op
        if op == "backward" or all(len(self.directory.replicas(uid)) < 2 for uid in uids):  # no hedge: skip the timer task
            return await self._call(job, endpoint, uids, attempts)
        primary = asyncio.ensure_future(self._call(job, endpoint, uids, attempts))
        done, _ = await asyncio.wait({primary}, timeout=self.picker.hedge_after_s(endpoint, self.config.hedge_floor_s))
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
            reason = str(e).split(": ", 1)[-1][:200]
            for uid in uids:
                attempts[uid].append((endpoint, reason))
            if not isinstance(e, (ExpertNotFound, NotTrainable)):  # else the node is fine: it no longer hosts it, or serves inference only
                if op == "backward":
                    job.maybe_applied.update(uids)
                ban_s = self._ban(endpoint)
                # once per outage, not a line per call: with no replica left, every call tries the banned ones
                failures = self.picker.failures(endpoint)
                (logger.warning if failures == 1 else logger.debug)(
                    "%s to %s failed (%s); banned for %.0f s%s", op, endpoint, reason, ban_s,
                    "" if failures > 1 else " (further failures in a row are logged at debug level)",
                )
            return {}
        self.picker.on_success(endpoint, time.monotonic() - started)
        return {uid: (tensor, endpoint, keep_as) for uid, tensor in out.items()}

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
        try:
            self._runner.run(self.clients.close(), 5.0)
        except Exception as e:  # closing must not fail: what is left is cancelled below
            logger.debug("closing the dispatcher's channels: %r", e)
        finally:
            self._runner.close()


def _new_event_loop() -> asyncio.AbstractEventLoop:
    """The client's loop: asyncio's own, not uvloop (nodes use uvloop). The calling thread runs it for
    each call (model/loop_runner.py), and uvloop, run from the main thread, makes and closes a
    socket pair and sets Python's signal wakeup fd at every run: a run of an empty coroutine took
    70 us against 43-46 us for asyncio's loop, with the caches cold as between two decoding layers.
    bench/generate.py --quick, 2 alternating pairs: batch 1, 0.638 / 0.654 against 0.719 / 0.723 ms
    per MoE layer over the local step; batch 8 and bench/remote_moe.py within their noise."""
    loop = asyncio.new_event_loop()
    loop.set_exception_handler(_skip_expected_loop_errors)
    return loop


def _skip_expected_loop_errors(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """grpc.aio's poller queues every completion event of the process, and whichever bound loop reads
    the queue hands each event to the loop its call was made on. An event that comes after that loop
    was closed (another client of this process, closed a moment before) raises "Event loop is closed"
    in the loop that read it, a traceback in the user's output. Its call was over: nothing waits for
    the event, and the other events stay queued for the next read. Skip those; report the rest.
    Also skipped: a Ctrl-C's KeyboardInterrupt left in a task it ended (the caller's thread runs the loop,
    so Python's SIGINT handler may run inside a task); the same exception ended the caller's call."""
    error, handle = context.get("exception"), context.get("handle")
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed" and "PollerCompletionQueue" in repr(handle):
        logger.debug("skipped a gRPC completion event of a closed event loop")
        return
    if isinstance(error, (KeyboardInterrupt, SystemExit)) and "never retrieved" in context.get("message", ""):
        return
    loop.default_exception_handler(context)
