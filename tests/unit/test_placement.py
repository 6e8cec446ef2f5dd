"""coordinator/placement.py: every expert on `replicas` distinct nodes, load spread evenly."""

import collections

import pytest

from moeswarm.coordinator.placement import place_experts

COMBOS = [  # (nodes, replicas, experts)
    (1, 1, 5),
    (2, 2, 3),
    (3, 1, 7),
    (3, 3, 4),
    (4, 2, 8),
    (4, 3, 5),
    (5, 2, 7),
    (6, 2, 1),
    (6, 3, 18),
    (8, 2, 13),
    (8, 3, 20),
    (10, 3, 16),
]
# Combinations where the number of experts is not a multiple of the nodes and replicas >= 3.
UNEVEN_COMBOS = [(5, 3, 8), (7, 4, 4)]


def _uids(n: int) -> list[str]:
    return [f"tiny.L{i // 4}.E{i % 4}" for i in range(n)]


@pytest.mark.parametrize("n_nodes,replicas,n_uids", COMBOS + UNEVEN_COMBOS)
def test_every_uid_on_exactly_replicas_distinct_nodes(n_nodes, replicas, n_uids):
    plan = place_experts(_uids(n_uids), n_nodes, replicas)
    assert len(plan) == n_nodes
    for hosted in plan:
        assert len(hosted) == len(set(hosted)), "a node hosts the same expert twice"
    counts = collections.Counter(uid for hosted in plan for uid in hosted)
    assert counts == {uid: replicas for uid in _uids(n_uids)}


@pytest.mark.parametrize("n_nodes,replicas,n_uids", COMBOS + UNEVEN_COMBOS)
def test_load_is_spread_evenly(n_nodes, replicas, n_uids):
    loads = [len(hosted) for hosted in place_experts(_uids(n_uids), n_nodes, replicas)]
    # n_uids * replicas slots over n_nodes nodes: an even spread differs by at most one expert.
    assert max(loads) - min(loads) <= 1, (
        f"BUG: {n_uids} experts x {replicas} replicas on {n_nodes} nodes gives loads {loads}, "
        "not spread evenly (coordinator/placement.py: when the experts are not a multiple of the "
        "nodes, the leftover experts' replica windows (i + r * step) % n pile onto the same nodes)"
    )


def test_plan_is_deterministic_and_keeps_uid_order():
    uids = _uids(8)
    plan = place_experts(uids, 3, 2)
    assert plan == place_experts(uids, 3, 2)
    for hosted in plan:
        assert hosted == [uid for uid in uids if uid in hosted]


def test_no_experts_gives_empty_nodes():
    assert place_experts([], 3, 2) == [[], [], []]


@pytest.mark.parametrize(
    "n_nodes,replicas,message",
    [(0, 1, "nodes=0"), (-1, 1, "nodes=-1"), (2, 3, "replicas=3"), (3, 0, "replicas=0"), (3, -1, "replicas=-1")],
)
def test_bad_node_or_replica_count_raises(n_nodes, replicas, message):
    with pytest.raises(ValueError, match=message):
        place_experts(_uids(4), n_nodes, replicas)
