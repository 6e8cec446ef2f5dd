"""deploy/status.py: the operator's table names the experts of a model that no node announces."""

from moeswarm.deploy.status import format_expert_table, missing_experts, view_as_json
from moeswarm.model.directory import SwarmView
from moeswarm.protocol.records import ExpertRecord, NodeRecord

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
