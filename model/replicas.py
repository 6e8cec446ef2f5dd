"""Replica choice: prefer fast, lightly loaded replicas; ban failing ones with exponential backoff.

Pure bookkeeping (no I/O); the dispatcher reports each call's outcome here.
"""

from __future__ import annotations

import dataclasses
import random
import time
from typing import Callable, Collection, Mapping

from moeswarm.protocol.records import ExpertRecord

UNKNOWN_LATENCY_S = 0.002  # prior for a replica never measured, capped by the best measured one


@dataclasses.dataclass
class _Health:
    latency_s: float = UNKNOWN_LATENCY_S  # EWMA of successful call latency (the first one sets it)
    deviation_s: float = UNKNOWN_LATENCY_S  # EWMA of |latency - mean|
    measured: bool = False  # a call to it has succeeded
    failures: int = 0  # consecutive failures
    banned_until: float = 0.0


class ReplicaPicker:
    def __init__(
        self,
        *,
        ban_base_s: float = 1.0,
        ban_max_s: float = 60.0,
        alpha: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ):
        self.ban_base_s, self.ban_max_s, self.alpha, self.clock = ban_base_s, ban_max_s, alpha, clock
        self._rng = rng or random.Random()
        self._health: dict[str, _Health] = {}

    def _get(self, endpoint: str) -> _Health:
        return self._health.setdefault(endpoint, _Health())

    def rank(self, records: list[ExpertRecord], exclude: set[str] = frozenset()) -> list[ExpertRecord]:
        """Candidates best first: usable ones by score (latency x load, with jitter to spread load),
        then banned ones (tried only when nothing else is left). A replica never measured scores as
        the best measured one (at most UNKNOWN_LATENCY_S), so it is tried soon however fast the
        others are, and a slow one is measured once and then left alone."""
        now = self.clock()
        usable, banned = [], []
        for record in records:
            if record.endpoint not in exclude:
                (usable if self._get(record.endpoint).banned_until <= now else banned).append(record)
        if len(usable) > 1:
            measured = [h.latency_s for h in map(self._get, (r.endpoint for r in usable)) if h.measured]
            prior_s = min(measured, default=UNKNOWN_LATENCY_S)
            usable.sort(key=lambda record: self._score(record, prior_s))
        if len(banned) > 1:
            banned.sort(key=lambda r: self._get(r.endpoint).banned_until)
        return usable + banned

    def _score(self, record: ExpertRecord, prior_s: float) -> float:
        health = self._get(record.endpoint)
        latency_s = health.latency_s if health.measured else min(prior_s, UNKNOWN_LATENCY_S)
        return latency_s * (1.0 + record.queue_depth / 1024) * self._rng.uniform(0.8, 1.25)

    def latency_s(self, endpoint: str) -> float:
        """Mean latency of its successful calls; 0 before the first one (as rank() does, an unknown
        replica is taken to be as fast as any, so it gets tried)."""
        health = self._get(endpoint)
        return health.latency_s if health.measured else 0.0

    def failures(self, endpoint: str) -> int:
        """Consecutive failures of this endpoint (0 after any success)."""
        return self._get(endpoint).failures

    def is_banned(self, endpoint: str) -> bool:
        return self._get(endpoint).banned_until > self.clock()

    def hedge_after_s(self, endpoint: str, floor_s: float) -> float:
        """A call running past mean + 4 deviations is slow enough to send to a second replica."""
        health = self._get(endpoint)
        return max(floor_s, health.latency_s + 4 * health.deviation_s)

    def forget(self, keep: set[str]) -> None:
        """Drop what is known of every endpoint not in `keep` (the ones still announced): a client
        running for days through churn keeps one entry per live replica, not one per endpoint it met."""
        for endpoint in [e for e in self._health if e not in keep]:
            del self._health[endpoint]

    def on_success(self, endpoint: str, latency_s: float) -> None:
        health = self._get(endpoint)
        if not health.measured:  # the first call replaces the prior, as RFC 6298 starts its RTT estimate
            health.latency_s, health.deviation_s, health.measured = latency_s, latency_s / 2, True
        else:
            health.deviation_s += self.alpha * (abs(latency_s - health.latency_s) - health.deviation_s)
            health.latency_s += self.alpha * (latency_s - health.latency_s)
        health.failures, health.banned_until = 0, 0.0

    def on_failure(self, endpoint: str) -> float:
        """Ban the endpoint: 1, 2, 4, ... s (capped) after consecutive failures; returns the ban."""
        health = self._get(endpoint)
        health.failures += 1
        ban_s = min(self.ban_max_s, self.ban_base_s * 2.0 ** min(health.failures - 1, 60))  # no overflow
        health.banned_until = self.clock() + ban_s
        return ban_s


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
