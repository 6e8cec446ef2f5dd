"""deploy/swarm.py: the node configs `moeswarm swarm up` writes, with --node-set overrides."""

import pathlib

import pytest

from moeswarm.deploy.configfile import build
from moeswarm.deploy.swarm import SwarmPlan, check_node_overrides, node_configs
from moeswarm.node.config import NodeConfig
from moeswarm.protocol.errors import ConfigError
from moeswarm.protocol.spec import ModelSpec

SPEC = ModelSpec(name="tiny", d_model=8, d_ff=16, n_layers=2, n_experts=4)


def _plan(*overrides: str) -> SwarmPlan:
    return SwarmPlan(model=SPEC, nodes=2, replicas=1, node_overrides=overrides)


def test_every_node_config_builds_and_the_nodes_share_out_the_experts():
    configs = [build(NodeConfig, data) for data in node_configs(_plan(), ["/ip4/127.0.0.1/tcp/1/p2p/x"], pathlib.Path("run"))]
    assert sorted(uid for c in configs for uid in c.experts) == sorted(SPEC.all_uids())
    assert [c.state_dir for c in configs] == [str(pathlib.Path("run") / "node0"), str(pathlib.Path("run") / "node1")]


def test_node_set_reaches_every_node():
    plan = _plan("optimizer.lr=0.0003", "optimizer.name=sgd", "checkpoint_interval_s=5")
    check_node_overrides(plan)
    for data in node_configs(plan, [], pathlib.Path("run")):
        config = build(NodeConfig, data)
        assert (config.optimizer.name, config.optimizer.lr, config.checkpoint_interval_s) == ("sgd", 0.0003, 5)


@pytest.mark.parametrize(
    "override,message",
    [
        ("experts=[tiny.L0.E0]", "swarm up sets 'experts'"),
        ("model.d_model=16", "swarm up sets 'model'"),
        ("state_dir=/tmp/x", "swarm up sets 'state_dir'"),
        ("device=gpu", "device='gpu'"),
        ("optimizer.lrr=1", "unknown key optimizer.lrr"),
        ("torch_threads", "expected key=value"),
    ],
)
def test_bad_node_set_is_refused_before_anything_starts(override, message):
    with pytest.raises(ConfigError, match=message):
        check_node_overrides(_plan(override))
