"""Keeps the replicas of an expert together: a new replica starts from a peer's weights, trainable
replicas average with each other now and then, and inference-only replicas follow the trained ones.

At start, each hosted expert that no checkpoint restored looks up its replicas in the DHT; if one
has applied optimizer steps (version > 0), the node takes the weights of the most trained one that
answers (ExportState) before it announces anything, so it never serves weights the swarm has
trained past. A fresh swarm (every version 0) keeps the weights each node made from the shared seed
or model directory.

While serving, every `average_every_s` (jittered by +-20%):
- a trainable node pulls the weights of one trainable replica of each hosted expert, chosen at
  random, and sets its own to the mean of the two (ExpertRegistry.average_with). A round is skipped
  when neither side has stepped since the last round with that peer (or ever), so an idle swarm
  sends nothing. Its weights never move toward a "replica" whose weights differ from its own by
  more than MAX_RELATIVE_DISTANCE (a different seed or model directory, or a broken peer): that is
  refused and logged.
- an inference-only node (it never steps) takes, as at start, the weights of the most trained
  replica of each expert that has stepped past the version it holds, so it serves what the swarm
  has learned rather than what it started with. Nothing moves while no replica is ahead of it.
Once training stops (no trainable replica of an expert stepped since the last round), pairwise
means leave the replicas close, not equal; they settle on the weights of the trainable replica with
the lowest peer id (the leader). In quiet rounds the leader averages with every replica that stepped
since its last round with it; after SETTLE_AFTER_ROUNDS quiet rounds every other replica takes the
leader's weights, once, so any replica a client picks answers alike, bit for bit. A record's `state`
names the weights it holds, so a settled swarm sends nothing more.
Pulling, never pushing: a node's weights change only by its own choice.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Callable

import torch

from moeswarm.model.directory import find_experts
from moeswarm.node.batcher import Batcher
from moeswarm.node.registry import ExpertRegistry
from moeswarm.protocol.errors import AllReplicasFailed, MoeSwarmError, NodeUnavailable
from moeswarm.protocol.records import ExpertRecord, same_origin
from moeswarm.protocol.state_transfer import fetch_newest, fetch_state

logger = logging.getLogger(__name__)
MAX_RELATIVE_DISTANCE = 0.5  # |peer - own| / |own| above this is not the same expert: not averaged
# Quiet rounds before a replica takes the leader's weights. The leader takes in a replica's last
# step at its first quiet round, at most 2 of its rounds (2.4 average_every_s: rounds are jittered by
# +-20%) plus one announce refresh after that step; this replica's 4th quiet round comes at least
# 3.2 average_every_s after it. So settling loses no replica's training while a refresh
# (announce_ttl_s / 3) is shorter than 0.8 average_every_s, as with the defaults (10 s and 60 s).
SETTLE_AFTER_ROUNDS = 4
FAILURE_LOG_S = 300.0  # the same failure is logged at most this often
PROGRESS_S = 5.0  # a start that takes weights from replicas logs its progress this often


def _leader(peers: list[ExpertRecord]) -> ExpertRecord:
    """The trainable replica every other settles on: the one with the lowest peer id (this node's own
    id compared by the caller). Peer ids are the records' signers' (protocol/records.py parse_entries):
    a peer cannot claim another's, nor pick one such as "!"; it can only try keys until one derives a
    low id, and as leader it still hands out weights that _apply checks like any replica's."""
    return min(peers, key=lambda record: record.peer_id)


def relative_distance(own: dict[str, torch.Tensor], peer: dict[str, torch.Tensor]) -> float:
    """|peer - own| / |own| over all parameters (0 for identical weights)."""
    own = {name: param.detach() for name, param in own.items()}
    diff = sum(float((peer[name].to(param.device, torch.float32) - param.float()).square().sum()) for name, param in own.items())
    norm = sum(float(param.float().square().sum()) for param in own.values())
    return (diff / norm) ** 0.5 if norm > 0 else (0.0 if diff == 0 else float("inf"))


class ReplicaSync:
    def __init__(
        self, *, dht, swarm: str, peer_id: str, registry: ExpertRegistry, batcher: Batcher, max_message_bytes: int,
        rng: random.Random | None = None, clock: Callable[[], float] = time.monotonic,
    ):
        self._dht, self._swarm, self._peer_id = dht, swarm, peer_id
        self._registry, self._batcher, self._max_message_bytes = registry, batcher, max_message_bytes
        self._rng, self._clock = rng or random.Random(), clock
        self._last_round: dict[tuple[str, str], tuple[int, int]] = {}  # (uid, peer) -> (own, peer's) version then
        self._versions_seen: dict[str, tuple] = {}  # uid -> (versions of its trainable replicas, rounds they held)
        self._settled: dict[str, tuple[str, int]] = {}  # uid -> (leader's state, own revision) once it took them
        self._logged: dict[tuple, float] = {}  # what failed -> when it was last logged
        # endpoints that did not answer in this pass (adopt_newest or one round): not tried again in
        # it, so a replica gone off the network costs one connect timeout per pass, not one per expert
        self._unreachable: set[str] = set()
        self._other_origins: set[str] = set()  # peers found serving other weights under our UIDs (warned once)

    async def replicas(self, uids: list[str]) -> dict[str, list[ExpertRecord]]:
        """uid -> the other nodes' announced replicas of it whose weights may share this one's origin
        (a replica of other weights under the same UID is not one to average with or start from). A
        record's peer id is its signer's, so no peer's record passes for this node's own and is
        skipped, nor this node's for another's."""
        found = await asyncio.to_thread(find_experts, self._dht, self._swarm, uids)
        replicas = {}
        for uid, records in found.items():
            own = self._registry.experts[uid].origin
            replicas[uid] = [r for r in records if r.peer_id != self._peer_id and same_origin(r.origin, own)]
            for other in (r for r in records if not same_origin(r.origin, own) and r.peer_id not in self._other_origins):
                self._other_origins.add(other.peer_id)
                logger.warning(
                    "the node at %s (peer %s) serves %s from other weights than this node (origin %s, here %s): "
                    "never averaged with or started from; check the model both were started from",
                    other.endpoint, other.peer_id, uid, other.origin, own,
                )
        return replicas

    async def _fetch(self, record: ExpertRecord, uid: str) -> tuple[int, dict[str, torch.Tensor]]:
        if record.endpoint in self._unreachable:
            raise NodeUnavailable(f"{record.endpoint}: did not answer for another expert in this round; skipped")
        expected = self._registry.parameter_specs(uid)
        try:
            return await fetch_state(record.endpoint, uid, expected, max_message_bytes=self._max_message_bytes)
        except NodeUnavailable:
            self._unreachable.add(record.endpoint)
            raise

    async def adopt_newest(self, uids: list[str]) -> list[str]:
        """Start each expert in `uids` from its most trained replica (version > 0) that answers; returns
        the UIDs that took a peer's weights. An expert no such replica gave keeps its own (logged)."""
        if not uids:
            return []
        started, self._unreachable = time.monotonic(), set()
        adopted = await self._take_newest(uids, lambda uid: 0, await self.replicas(uids))
        if adopted:
            logger.info(
                "%d of %d experts start from the weights of their most trained replica (first: %s; %.1f s)",
                len(adopted), len(uids), adopted[0], time.monotonic() - started,
            )
        return adopted

    async def follow_round(self) -> int:
        """An inference-only node's round: each hosted expert takes the weights of its most trained
        replica if that one stepped past the version held here; returns how many did."""
        started, self._unreachable = time.monotonic(), set()
        uids = list(self._registry.experts)
        found = await self.replicas(uids)
        self._forget_departed(found)
        taken = await self._take_newest(uids, lambda uid: self._registry.experts[uid].visible_version, found)
        if taken:
            logger.info(
                "took the weights of %d of %d experts from replicas trained further (first: %s, now version %d; %.2f s)",
                len(taken), len(uids), taken[0], self._registry.experts[taken[0]].version, time.monotonic() - started,
            )
        settled = 0
        for uid in uids:  # training stopped: hold what the trainable replicas settle on
            peers = [record for record in found[uid] if record.trainable]
            if uid not in taken and peers and self._quiet_rounds(uid, peers) >= SETTLE_AFTER_ROUNDS:
                settled += await self._settle(uid, _leader(peers))  # this node, inference only, never leads
        return len(taken) + settled

    async def _take_newest(self, uids: list[str], held: Callable[[str], int], found: dict[str, list[ExpertRecord]]) -> list[str]:
        """For each expert, the weights and version of its most trained replica that answers, among
        those with a version above held(uid) (found: replicas() of uids); returns the UIDs that took them."""
        taken, started, shown = [], time.monotonic(), time.monotonic()
        for i, uid in enumerate(uids):
            if time.monotonic() - shown >= PROGRESS_S:  # large experts over a slow link take a while: say so
                shown = time.monotonic()
                logger.info("taking weights from replicas: %d of %d experts checked, %d taken, %.0f s", i, len(uids), len(taken), shown - started)
            ahead = [r for r in found[uid] if r.version > held(uid)]
            if not ahead:
                continue
            try:
                record, version, tensors = await fetch_newest(
                    uid, ahead, self._registry.parameter_specs(uid), max_message_bytes=self._max_message_bytes,
                    unreachable=self._unreachable,
                )
            except AllReplicasFailed as e:
                self._log((uid, "take"), f"{uid} keeps the weights it has (version {held(uid)}): {e}")
                continue
            await self._batcher.run_on_compute_thread(self._registry.adopt_state, uid, version, tensors)
            self._last_round[(uid, record.peer_id)] = (version, version)  # the same weights: nothing to average yet
            self._settled[uid] = (record.state, self._registry.experts[uid].revision)
            logger.debug("%s took the weights of its replica at %s (version %d)", uid, record.endpoint, version)
            taken.append(uid)
        return taken

    async def run(self, every_s: float, *, follow: bool = False) -> None:
        """Every `every_s` seconds (jittered) until cancelled, an averaging round, or with follow=True
        (an inference-only node) a follow_round; a failed round is logged."""
        while True:
            await asyncio.sleep(every_s * self._rng.uniform(0.8, 1.2))
            try:
                await (self.follow_round() if follow else self.average_round())
            except MoeSwarmError as e:
                self._log(("round",), f"replica sync skipped a round: {e}")
            except Exception:  # task boundary: keep serving, try again next round
                logger.error("replica sync failed; will retry", exc_info=True)

    async def average_round(self) -> int:
        """For each hosted expert: while replicas train, average with one trainable replica that has
        stepped since the last round with it; once none steps, the leader catches up with all of them
        and the others settle (see the module docstring). Returns how many pulls changed weights."""
        started, self._unreachable = time.monotonic(), set()
        uids = list(self._registry.experts)
        found = await self.replicas(uids)
        self._forget_departed(found)
        averaged = settled = 0
        for uid in uids:
            peers = [record for record in found[uid] if record.trainable]
            if not peers:
                continue
            quiet, leader = self._quiet_rounds(uid, peers), _leader(peers)
            if quiet and self._peer_id < leader.peer_id:
                # the leader catches up with every replica's last steps before the others take its weights
                for peer in peers:
                    averaged += await self._average_with(uid, peer)
            elif quiet >= SETTLE_AFTER_ROUNDS:
                settled += await self._settle(uid, leader)
            else:
                averaged += await self._average_with(uid, self._rng.choice(peers))
        if averaged or settled:
            logger.info(
                "%d averaging pulls and %d settled of %d experts in %.2f s", averaged, settled, len(uids), time.monotonic() - started
            )
        return averaged + settled

    def _forget_departed(self, found: dict[str, list[ExpertRecord]]) -> None:
        """Drop the last rounds with peers no longer announced: volunteers come and go (a node without
        a state_dir has a new peer id at each start), and a node runs for days. A peer that returns
        costs one pull more."""
        announced = {(uid, record.peer_id) for uid, records in found.items() for record in records}
        self._last_round = {key: versions for key, versions in self._last_round.items() if key in announced}

    def _quiet_rounds(self, uid: str, peers: list[ExpertRecord]) -> int:
        """How many rounds in a row this expert's trainable replicas, this one included, held the
        versions they hold now (0: one stepped since this node's last round, or none ever stepped: a
        swarm that never trained holds its seed's or model directory's weights everywhere)."""
        versions = (self._registry.experts[uid].visible_version, frozenset((r.peer_id, r.version) for r in peers))
        seen, count = self._versions_seen.get(uid, (None, 0))
        trained = versions[0] > 0 or any(r.version > 0 for r in peers)
        count = count + 1 if seen == versions and trained else 0
        self._versions_seen[uid] = (versions, count)
        return count

    async def _settle(self, uid: str, leader: ExpertRecord) -> bool:
        """Training stopped: pairwise averaging leaves replicas close, not equal. Every replica but the
        leader (_leader) takes the leader's weights, so all answer alike, bit for bit; nothing is sent
        again while neither side's weights change (the leader's ExpertRecord.state names them)."""
        if not leader.state:  # a peer from before ExpertRecord.state: nothing to tell its weights by
            return False
        if self._settled.get(uid) == (leader.state, self._registry.experts[uid].revision):
            return False
        if await self._pull(uid, leader, take=True) is None:
            return False
        self._settled[uid] = (leader.state, self._registry.experts[uid].revision)
        logger.debug("%s took the weights of %s (settled)", uid, leader.endpoint)
        return True

    async def _average_with(self, uid: str, peer: ExpertRecord) -> bool:
        own_version = self._registry.experts[uid].visible_version
        # (0, 0): two replicas neither of which ever stepped hold the same weights (seed or model directory)
        if self._last_round.get((uid, peer.peer_id), (0, 0)) == (own_version, peer.version):
            return False  # neither side stepped since the last round with this peer
        version = await self._pull(uid, peer, take=False)
        if version is None:
            return False
        self._last_round[(uid, peer.peer_id)] = (self._registry.experts[uid].visible_version, version)
        logger.debug("averaged %s with %s (its version %d)", uid, peer.endpoint, version)
        return True

    async def _pull(self, uid: str, peer: ExpertRecord, *, take: bool) -> int | None:
        """Fetch the peer's weights of uid and average with them (take: replace ours by them); returns
        the peer's version, or None (logged) if it did not answer or its weights were refused."""
        try:
            version, tensors = await self._fetch(peer, uid)
        except MoeSwarmError as e:
            self._log((uid, peer.endpoint, "fetch"), f"could not average {uid} with {peer.endpoint}: {e}")
            return None
        refused = await self._batcher.run_on_compute_thread(self._apply, uid, tensors, take)
        if refused is not None:
            self._log((uid, peer.endpoint, "refused"), f"did not average {uid} with {peer.endpoint}: {refused}")
            return None
        return version

    def _apply(self, uid: str, tensors: dict[str, torch.Tensor], take: bool) -> str | None:
        """On the compute thread: average (or take), or say why not."""
        own = dict(self._registry.experts[uid].module.named_parameters())
        distance = relative_distance(own, tensors)
        if distance > MAX_RELATIVE_DISTANCE:
            return (
                f"its weights differ from this node's by {distance:.2f} of their norm (over {MAX_RELATIVE_DISTANCE}): "
                "not the same expert (different seed or model_dir?)"
            )
        self._registry.average_with(uid, tensors, take=take)
        return None

    def _log(self, key: tuple, message: str) -> None:
        now = self._clock()
        if now - self._logged.get(key, -FAILURE_LOG_S) >= FAILURE_LOG_S:
            # Keys name endpoints, and every restart of a peer is a new one: drop the entries that no
            # longer hold anything back, so this holds what failed in the last FAILURE_LOG_S only.
            self._logged = {old: at for old, at in self._logged.items() if now - at < FAILURE_LOG_S}
            self._logged[key] = now
            logger.warning("%s", message)

