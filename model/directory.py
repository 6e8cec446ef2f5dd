"""Reads the swarm's expert and node records from the DHT (validated; invalid entries dropped)."""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import threading
import time

from moeswarm.protocol.dht import DHT_TIMEOUT_S, get_records
from moeswarm.protocol.errors import MoeSwarmError
from moeswarm.protocol.records import ExpertRecord, NodeRecord, expert_key, nodes_key, parse_entries, same_origin
from moeswarm.protocol.spec import MAX_EXPERTS_PER_MODEL, ModelSpec


logger = logging.getLogger(__name__)
FAILURE_LOG_S = 60.0  # a failing refresh is logged at most this often
# Experts a swarm view reads (and `moeswarm status` lists) at most: two models of the largest size a
# spec allows. Any peer can announce a model, so a view of everything announced has no bound; about
# 1,000 lookups take 1 s on loopback.
MAX_VIEW_EXPERTS = 2 * MAX_EXPERTS_PER_MODEL


@dataclasses.dataclass(frozen=True)
class ModelInView:
    """One model name as the swarm's node records announce it."""

    name: str
    spec: ModelSpec | None  # the spec most of its nodes announce; None where none parses (newer peers)
    uids: frozenset[str]  # the experts its nodes announce
    nodes: int  # how many node records announce it

    @property
    def size(self) -> int:
        """Experts a view of this model looks up or lists."""
        return max(len(self.uids), self.spec.expert_count() if self.spec is not None else 0)


@dataclasses.dataclass(frozen=True)
class SwarmView:
    nodes: dict[str, NodeRecord]  # peer_id -> record
    experts: dict[str, list[ExpertRecord]]  # uid -> one record per hosting node
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)  # model -> its experts, not read (over MAX_VIEW_EXPERTS)


def models_in_view(nodes: dict[str, NodeRecord], max_experts: int = MAX_VIEW_EXPERTS) -> tuple[list[ModelInView], list[ModelInView]]:
    """(models to read, models left out) so that those read hold at most max_experts experts in all.
    Models that more nodes announce come first (a forged record is one node), then smaller ones. Pure."""
    specs: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    uids: dict[str, set[str]] = collections.defaultdict(set)
    for record in nodes.values():
        name = str(record.model.get("name"))
        specs[name][ModelSpec.from_record(record.model)] += 1
        uids[name].update(record.uids)
    models = []
    for name, counts in specs.items():
        parsed = [(count, spec) for spec, count in counts.items() if spec is not None]
        spec = max(parsed, key=lambda pair: pair[0])[1] if parsed else None  # ties: the first seen
        models.append(ModelInView(name, spec, frozenset(uids[name]), sum(counts.values())))
    read, skipped, total = [], [], 0
    for model in sorted(models, key=lambda model: (-model.nodes, model.size, model.name)):
        fits = total + model.size <= max_experts
        (read if fits else skipped).append(model)
        total += model.size if fits else 0
    return read, skipped


def find_experts(dht, swarm: str, uids: list[str]) -> dict[str, list[ExpertRecord]]:
    """uid -> announced replicas (possibly empty). Blocking; one DHT traversal for all keys."""
    found = get_records(dht, [expert_key(swarm, uid) for uid in uids])
    return {uid: list(parse_entries(found.get(expert_key(swarm, uid)), ExpertRecord).values()) for uid in uids}


def nodes_with_other_shapes(dht, swarm: str, spec: ModelSpec, own_peer_id: str = "") -> list[tuple[NodeRecord, ModelSpec]]:
    """(record, its spec) of the nodes announcing model `spec.name` with other expert shapes than
    `spec` (a spec this version cannot parse is not ours to judge). Blocking; one DHT read. Any
    peer can sign such a record: callers warn, or check it with the node (node/model_source.py)."""
    found = get_records(dht, [nodes_key(swarm)]).get(nodes_key(swarm))
    other = []
    for record in parse_entries(found, NodeRecord).values():
        if record.peer_id == own_peer_id or record.model.get("name") != spec.name:
            continue
        theirs = ModelSpec.from_record(record.model)
        if theirs is not None and theirs != spec:
            other.append((record, theirs))
    return other


def warn_if_served_with_other_shapes(dht, swarm: str, spec: ModelSpec) -> list[str]:
    """Log (once) where nodes announce model `spec.name` with other expert shapes than `spec` (a
    model directory of another size under the same name): every call to them fails, naming only a
    shape. Returns those nodes' peer ids. A warning, not an error: any peer can sign such a record."""
    others = nodes_with_other_shapes(dht, swarm, spec)
    if others:
        record, theirs = others[0]
        logger.warning(
            "%d node(s) of swarm %r serve model %r with other expert shapes (e.g. %s at %s: %s) than this one (%s): "
            "calls to them fail; load the model directory the swarm was started from, or start nodes from this one",
            len(others), swarm, spec.name, record.peer_id, record.endpoint, _shapes(theirs), _shapes(spec),
        )
    return [record.peer_id for record, _ in others]


def _shapes(spec: ModelSpec) -> str:
    return f"d_model {spec.d_model}, d_ff {spec.d_ff}, {spec.n_layers} layers, {spec.n_experts} experts"


def read_swarm(dht, swarm: str) -> SwarmView:
    """Every node in the swarm and the experts they announce, up to MAX_VIEW_EXPERTS (see models_in_view)."""
    found = get_records(dht, [nodes_key(swarm)])
    nodes = {record.peer_id: record for record in parse_entries(found.get(nodes_key(swarm)), NodeRecord).values()}
    read, skipped = models_in_view(nodes)
    if skipped:
        logger.warning(
            "reading %d models of swarm %r, not %d more (over %d experts in all): %s",
            len(read), swarm, len(skipped), MAX_VIEW_EXPERTS, ", ".join(model.name for model in skipped[:5]),
        )
    uids = sorted(uid for model in read for uid in model.uids)
    return SwarmView(
        nodes=nodes, experts=find_experts(dht, swarm, uids) if uids else {}, skipped={model.name: model.size for model in skipped}
    )


class ExpertDirectory:
    """In-memory view of who hosts which expert, refreshed from the DHT by a background thread.

    Routing reads this view and never waits for the DHT; a new node shows up within one refresh.
    """

    def __init__(self, dht, swarm: str, *, refresh_s: float = 2.0):
        self._dht, self.swarm, self.refresh_s = dht, swarm, refresh_s
        self._uids: set[str] = set()
        self._view: dict[str, list[ExpertRecord]] = {}
        self._origins: dict[str, str] = {}  # expect_origins
        self._warned_peers: set[str] = set()  # peers already logged as serving other weights
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

    def expect_origins(self, origins: dict[str, str]) -> None:
        """Prefer for each UID the replicas whose weights started from `origins[uid]` (a model
        directory's: Manifest.expert_origins). A replica announcing another origin serves other
        weights under the same UID (another model directory, another seed): it is used only while no
        replica of this origin (or of an unknown one) is up, and its node is logged once. Call before
        track(); refreshes apply it."""
        self._origins = {uid: origin for uid, origin in origins.items() if origin}

    def prefer_origin(self, uid: str, records: list[ExpertRecord]) -> list[ExpertRecord]:
        """The replicas of `uid` to use among `records`, as expect_origins says."""
        expected = self._origins.get(uid)
        if not expected:
            return records
        kept = [record for record in records if same_origin(record.origin, expected)]
        for record in records:
            if record.peer_id not in self._warned_peers and not same_origin(record.origin, expected):
                self._warned_peers.add(record.peer_id)
                logger.warning(
                    "the node at %s (peer %s) serves %s from other weights than this model directory (origin %s, here %s; "
                    "another model directory or seed under the same model name): %s",
                    record.endpoint, record.peer_id, uid, record.origin, expected,
                    "used only while no replica of this directory's weights is up" if kept
                    else "no node serves this directory's weights for it, so its outputs are not this model's",
                )
        return kept or records

    def replicas(self, uid: str) -> list[ExpertRecord]:
        return self._view.get(uid, [])

    def endpoints(self) -> set[str]:
        """The endpoints of every replica in the current view (records that expired are gone)."""
        return {record.endpoint for records in self._view.values() for record in records}

    def data_endpoint(self, endpoint: str) -> str | None:
        """The data port (host:port) the node at `endpoint` announces, or None (none, or not in view)."""
        for records in self._view.values():
            for record in records:
                if record.endpoint == endpoint:
                    return record.data_endpoint
        return None

    def warn_if_missing(self, uids: list[str]) -> list[str]:
        """Log (once per call) the experts no node announces; returns them. Routing to them fails with
        AllReplicasFailed until a node hosting them shows up (picked up within one refresh)."""
        missing = [uid for uid in uids if not self.replicas(uid)]
        if missing:
            logger.warning(
                "%d of %d experts have no node in swarm %r yet (e.g. %s); tokens routed to them fail until one appears",
                len(missing), len(uids), self.swarm, ", ".join(missing[:3]),
            )
        return missing

    def refresh(self, uids: list[str] | None = None) -> None:
        uids = sorted(self._uids) if uids is None else uids
        if uids:
            found = find_experts(self._dht, self.swarm, uids)
            found = {uid: self.prefer_origin(uid, records) for uid, records in found.items()}
            with self._lock:
                self._view = {**self._view, **found}  # replace, never mutate: readers hold no lock

    def _refresh_loop(self) -> None:
        """Refresh every refresh_s. Failures keep the last view; they are logged at most once a
        FAILURE_LOG_S (the DHT may be gone for good: a warning every 2 s would bury everything else)."""
        failures, logged_at = 0, -math.inf
        while not self._stop.wait(self.refresh_s):
            try:
                self.refresh()
            except Exception as e:  # thread boundary: keep the last view, try again next period
                failures += 1
                if time.monotonic() - logged_at >= FAILURE_LOG_S:
                    logged_at = time.monotonic()
                    logger.warning(
                        "expert directory refresh failed (%d in a row); routing on the last view: %s", failures, e,
                        exc_info=not isinstance(e, MoeSwarmError),  # ours say what is wrong; anything else is a bug
                    )
                continue
            if failures:
                logger.warning("expert directory refresh works again after %d failures", failures)
                failures, logged_at = 0, -math.inf

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=DHT_TIMEOUT_S + 1)
