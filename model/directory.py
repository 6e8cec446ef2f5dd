"""Reads the swarm's expert and node records from the DHT (validated; invalid entries dropped)."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import threading

import hivemind

from moeswarm.protocol.errors import NodeUnavailable
from moeswarm.protocol.records import ExpertRecord, NodeRecord, expert_key, nodes_key, parse_entries


logger = logging.getLogger(__name__)


async def _get_many(dht: hivemind.DHT, node, keys: list[str]) -> dict:
    # Runs inside the DHT process. latest=True: a cached get can miss subkeys other peers added later.
    found = await node.get_many(keys, sufficient_expiration_time=float("inf"))
    return {key: (value.value if value is not None else None) for key, value in found.items()}


@dataclasses.dataclass(frozen=True)
class SwarmView:
    nodes: dict[str, NodeRecord]  # peer_id -> record
    experts: dict[str, list[ExpertRecord]]  # uid -> one record per hosting node


DHT_TIMEOUT_S = 10.0


def get_records(dht: hivemind.DHT, keys: list[str], timeout_s: float = DHT_TIMEOUT_S) -> dict:
    """Latest values of `keys` (None where absent). Raises NodeUnavailable if the DHT does not answer."""
    future = dht.run_coroutine(functools.partial(_get_many, keys=keys), return_future=True)
    try:
        return future.result(timeout=timeout_s)
    except concurrent.futures.TimeoutError as e:
        future.cancel()
        raise NodeUnavailable(f"the DHT did not answer within {timeout_s:.0f} s; check --initial-peers") from e


def find_experts(dht: hivemind.DHT, swarm: str, uids: list[str]) -> dict[str, list[ExpertRecord]]:
    """uid -> announced replicas (possibly empty). Blocking; one DHT traversal for all keys."""
    found = get_records(dht, [expert_key(swarm, uid) for uid in uids])
    return {uid: list(parse_entries(found.get(expert_key(swarm, uid)), ExpertRecord).values()) for uid in uids}


def read_swarm(dht: hivemind.DHT, swarm: str) -> SwarmView:
    """Every node in the swarm and every expert they announce."""
    found = get_records(dht, [nodes_key(swarm)])
    nodes = {record.peer_id: record for record in parse_entries(found.get(nodes_key(swarm)), NodeRecord).values()}
    uids = sorted({uid for record in nodes.values() for uid in record.uids})
    return SwarmView(nodes=nodes, experts=find_experts(dht, swarm, uids) if uids else {})


class ExpertDirectory:
    """In-memory view of who hosts which expert, refreshed from the DHT by a background thread.

    Routing reads this view and never waits for the DHT; a new node shows up within one refresh.
    """

    def __init__(self, dht: hivemind.DHT, swarm: str, *, refresh_s: float = 2.0):
        self._dht, self.swarm, self.refresh_s = dht, swarm, refresh_s
        self._uids: set[str] = set()
        self._view: dict[str, list[ExpertRecord]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._refresh_loop, name="moeswarm-directory", daemon=True)
        self._thread.start()

    def track(self, uids: list[str]) -> None:
        """Start following these UIDs; looks them up now (blocking) so the first call can route."""
        with self._lock:
            new = set(uids) - self._uids
            self._uids |= new
        if new:
            self.refresh(sorted(new))

    def replicas(self, uid: str) -> list[ExpertRecord]:
        return self._view.get(uid, [])

    def refresh(self, uids: list[str] | None = None) -> None:
        uids = sorted(self._uids) if uids is None else uids
        if uids:
            found = find_experts(self._dht, self.swarm, uids)
            with self._lock:
                self._view = {**self._view, **found}  # replace, never mutate: readers hold no lock

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.refresh_s):
            try:
                self.refresh()
            except Exception:  # thread boundary: keep the last view, try again next period
                logger.warning("expert directory refresh failed; keeping the last view", exc_info=True)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=DHT_TIMEOUT_S + 1)
