"""coordinator/placement.py: every expert on `replicas` distinct nodes, load spread evenly."""

import collections

import pytest

from moeswarm.coordinator.placement import LAYOUTS, place_experts

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


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n_nodes,replicas,n_uids", COMBOS + UNEVEN_COMBOS)
def test_every_uid_on_exactly_replicas_distinct_nodes(n_nodes, replicas, n_uids, layout):
    plan = place_experts(_uids(n_uids), n_nodes, replicas, layout=layout)
    assert len(plan) == n_nodes
    for hosted in plan:
        assert len(hosted) == len(set(hosted)), "a node hosts the same expert twice"
    counts = collections.Counter(uid for hosted in plan for uid in hosted)
    assert counts == {uid: replicas for uid in _uids(n_uids)}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n_nodes,replicas,n_uids", COMBOS + UNEVEN_COMBOS)
def test_load_is_spread_evenly(n_nodes, replicas, n_uids, layout):
    loads = [len(hosted) for hosted in place_experts(_uids(n_uids), n_nodes, replicas, layout=layout)]
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


@pytest.mark.parametrize("n_nodes,replicas", [(2, 1), (4, 1), (4, 2), (8, 2)])
def test_by_layer_keeps_each_layer_on_few_nodes(n_nodes, replicas):
    uids = [f"m.L{layer}.E{e}" for layer in range(4) for e in range(8)]  # 4 layers x 8 experts
    nodes_of_layer = {
        layout: {layer: {i for i, hosted in enumerate(place_experts(uids, n_nodes, replicas, layout=layout))
                         if any(uid.startswith(f"m.L{layer}.") for uid in hosted)} for layer in range(4)}
        for layout in LAYOUTS
    }
    # a layer's 8 experts fill 8 of the 32 x replicas slots: one node's run, or two when a run boundary cuts it
    per_replica = max(1, n_nodes // 4)
    assert all(len(nodes) <= replicas * (per_replica + 1) for nodes in nodes_of_layer["by-layer"].values())
    if n_nodes <= 4 and replicas == 1:
        assert all(len(nodes) == 1 for nodes in nodes_of_layer["by-layer"].values())
    assert all(len(nodes) == n_nodes for nodes in nodes_of_layer["spread"].values())


def test_no_experts_gives_empty_nodes():
    assert place_experts([], 3, 2) == [[], [], []]


@pytest.mark.parametrize(
    "n_nodes,replicas,message",
    [(0, 1, "nodes=0"), (-1, 1, "nodes=-1"), (2, 3, "replicas=3"), (3, 0, "replicas=0"), (3, -1, "replicas=-1")],
)
def test_bad_node_or_replica_count_raises(n_nodes, replicas, message):
    with pytest.raises(ValueError, match=message):
        place_experts(_uids(4), n_nodes, replicas)
    with pytest.raises(ValueError, match="placement='round'"):
        place_experts(_uids(4), 2, 1, layout="round")
