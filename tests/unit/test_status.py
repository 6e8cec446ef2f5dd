"""deploy/status.py: the operator's table names the experts of a model that no node announces, and
lists a bounded number of experts whatever peers announce."""

import dataclasses

from moeswarm.deploy.status import format_expert_table, missing_experts, view_as_json
from moeswarm.model.directory import MAX_VIEW_EXPERTS, SwarmView, models_in_view
from moeswarm.protocol.records import ExpertRecord, NodeRecord
from moeswarm.protocol.spec import MAX_EXPERTS_PER_MODEL

SPEC = dict(name="m", d_model=8, d_ff=16, n_layers=2, n_experts=2, moe_layers=[1])


def _view(hosted: list[str]) -> SwarmView:
    load = dict(peer_id="p1", endpoint="127.0.0.1:5000", queue_depth=0, rows_per_s=0.0)
    node = NodeRecord(**load, model=SPEC, uids=hosted)
    return SwarmView(nodes={"p1": node}, experts={uid: [ExpertRecord(**load, version=0)] for uid in hosted})


def test_missing_experts_follow_the_announced_spec():
    assert missing_experts(_view(["m.L1.E0"])) == {"m": ["m.L1.E1"]}  # layer 0 has no experts (moe_layers)
    assert missing_experts(_view(["m.L1.E0", "m.L1.E1"])) == {}


def test_table_and_json_report_them():
    view = _view(["m.L1.E0"])
    assert "model m: 1 experts have no replica: m.L1.E1" in format_expert_table(view)
    assert view_as_json(view)["missing"] == {"m": ["m.L1.E1"]}
    assert "no replica" not in format_expert_table(_view(["m.L1.E0", "m.L1.E1"]))


def test_table_marks_inference_only_replicas():
    load = dict(peer_id="p1", endpoint="127.0.0.1:5000", queue_depth=0, rows_per_s=0.0)
    view = SwarmView(nodes={}, experts={"m.L1.E0": [ExpertRecord(**load, version=3, trainable=False)]})
    assert "127.0.0.1:5000 (0, 0, v3, inference only)" in format_expert_table(view)
    assert view_as_json(view)["experts"]["m.L1.E0"][0]["trainable"] is False


def test_experts_whose_replicas_serve_different_weights_are_named():
    def replica(port: int, origin: str) -> ExpertRecord:
        return ExpertRecord(peer_id=f"p{port}", endpoint=f"127.0.0.1:{port}", queue_depth=0, rows_per_s=0.0, version=0, origin=origin)

    a, b = "0123456789abcdef", "fedcba9876543210"
    view = SwarmView(nodes={}, experts={
        "m.L1.E0": [replica(1, a), replica(2, b), replica(3, "")],  # unknown origins are no evidence either way
        "m.L1.E1": [replica(1, a), replica(3, "")],
    })
    assert view_as_json(view)["mixed_origins"] == {"m.L1.E0": {a: ["127.0.0.1:1"], b: ["127.0.0.1:2"]}}
    assert f"1 experts are served from different weights by their replicas (e.g. m.L1.E0: origin {a} at 127.0.0.1:1; origin {b} at 127.0.0.1:2)" in format_expert_table(view)
    assert "different weights" not in format_expert_table(_view(["m.L1.E0"]))


def _node(peer: str, model: dict, uids: list[str]) -> NodeRecord:
    return NodeRecord(peer_id=peer, endpoint="127.0.0.1:5000", queue_depth=0, rows_per_s=0.0, model=model, uids=uids)


def test_a_forged_spec_over_the_bounds_is_not_listed():
    # a spec the old bounds let through: status listed its 1,048,576 experts as missing
    forged = _node("evil", dict(name="huge", d_model=1, d_ff=1, n_layers=1024, n_experts=1024), [])
    view = _view(["m.L1.E0"])
    view = SwarmView(nodes={**view.nodes, "evil": forged}, experts=view.experts)
    assert missing_experts(view) == {"m": ["m.L1.E1"]}


def test_status_lists_a_bounded_number_of_experts_and_names_the_models_it_left_out():
    big = dict(d_model=1, d_ff=1, n_layers=256, n_experts=256)  # MAX_EXPERTS_PER_MODEL experts each
    nodes = {f"evil{i}": _node(f"evil{i}", dict(big, name=f"big{i}"), []) for i in range(4)}
    honest = _view(["m.L1.E0"]).nodes["p1"]
    nodes.update({"p1": honest, "p2": dataclasses.replace(honest, peer_id="p2")})  # announced by two nodes: read first
    read, skipped = models_in_view(nodes)
    assert [model.name for model in read] == ["m", "big0"] and [model.name for model in skipped] == ["big1", "big2", "big3"]
    assert sum(model.size for model in read) <= MAX_VIEW_EXPERTS
    view = SwarmView(nodes=nodes, experts={}, skipped={model.name: model.size for model in skipped})
    missing = missing_experts(view)
    assert sorted(missing) == ["big0", "m"] and sum(map(len, missing.values())) <= MAX_VIEW_EXPERTS
    assert f"model big1: not read ({MAX_EXPERTS_PER_MODEL} experts; status reads at most {MAX_VIEW_EXPERTS}" in format_expert_table(view)
    assert view_as_json(view)["skipped"] == {"big1": MAX_EXPERTS_PER_MODEL, "big2": MAX_EXPERTS_PER_MODEL, "big3": MAX_EXPERTS_PER_MODEL}


def test_an_expert_index_on_no_node_in_any_layer_is_named_apart_as_shared_experts_clients_compute():
    # a model directory with 2 shared experts computed on clients: its spec counts them (E2, E3)
    spec = dict(name="s", d_model=8, d_ff=16, n_layers=2, n_experts=4)
    hosted = ["s.L0.E0", "s.L0.E1", "s.L1.E0"]
    load = dict(peer_id="p1", endpoint="127.0.0.1:5000", queue_depth=0, rows_per_s=0.0)
    view = SwarmView(nodes={"p1": NodeRecord(**load, model=spec, uids=hosted)}, experts={uid: [ExpertRecord(**load, version=0)] for uid in hosted})
    assert missing_experts(view) == {"s": ["s.L1.E1"]}  # a real gap
    assert view_as_json(view)["unserved_in_every_layer"] == {"s": [2, 3]}
    table = format_expert_table(view)
    assert "model s: 1 experts have no replica: s.L1.E1" in table and "model s: experts E2, E3 are on no node in any layer" in table


def test_table_names_the_nodes_that_announce_no_data_port():
    load = dict(queue_depth=0, rows_per_s=0.0)
    nodes = {
        "p1": NodeRecord(peer_id="p1", endpoint="127.0.0.1:5000", data_port=5001, **load, model=SPEC, uids=["m.L1.E0"]),
        "p2": NodeRecord(peer_id="p2", endpoint="127.0.0.1:6000", **load, model=SPEC, uids=["m.L1.E1"]),
    }
    table = format_expert_table(SwarmView(nodes=nodes, experts={}))
    assert "nodes without a data port" in table and "127.0.0.1:6000" in table and "127.0.0.1:5000" not in table
    assert "data port" not in format_expert_table(SwarmView(nodes={"p1": nodes["p1"]}, experts={}))
