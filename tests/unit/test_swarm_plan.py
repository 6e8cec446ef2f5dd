"""deploy/swarm.py: the node configs `moeswarm swarm up` writes, with --node-set overrides and CPU pinning."""

import dataclasses
import os
import pathlib
import subprocess
import sys

import pytest

from moeswarm.deploy import swarm_plan as plan_module
from moeswarm.deploy.cli import _parser
from moeswarm.deploy.configfile import build, load_yaml
from moeswarm.deploy.model_cli import config_from_args
from moeswarm.deploy.swarm import last_error_line
from moeswarm.deploy.swarm_plan import SwarmPlan, check_node_overrides, describe_pinning, node_configs, node_cpus, plan_from_args
from moeswarm.node.affinity import available_cpus, format_cpus, pin_process
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
        ("optimizer.lr=[1", "--node-set .*not valid YAML"),  # the message names the flag it came from
    ],
)
def test_bad_node_set_is_refused_before_anything_starts(override, message):
    with pytest.raises(ConfigError, match=message):
        check_node_overrides(_plan(override))


@pytest.mark.parametrize(
    "nodes,threads,available,expected",
    [
        (2, 1, [0, 1], [(0,), (1,)]),
        (2, 2, [0, 1, 2, 3, 4], [(0, 1), (2, 3)]),
        (2, 1, [3, 7, 9], [(3,), (7,)]),  # the launcher's own affinity (taskset) is respected
        (3, 1, [0, 1], None),  # too few CPUs: sharing pinned cores would be worse than the scheduler
        (2, 2, [0, 1, 2], None),
        (2, 1, None, None),  # the OS cannot pin
    ],
)
def test_node_cpus_gives_each_node_its_own_cpus_or_none(nodes, threads, available, expected):
    assert node_cpus(nodes, threads, available) == expected


def test_nodes_are_pinned_apart_when_there_are_enough_cpus(monkeypatch):
    monkeypatch.setattr(plan_module, "available_cpus", lambda: [0, 1, 2])
    configs = [build(NodeConfig, data) for data in node_configs(_plan(), [], pathlib.Path("run"))]
    assert [c.cpus for c in configs] == [(0,), (1,)]
    unpinned = dataclasses.replace(_plan(), pin_cpus=False)
    assert [build(NodeConfig, data).cpus for data in node_configs(unpinned, [], pathlib.Path("run"))] == [(), ()]
    assert describe_pinning(_plan()).endswith("node0 0, node1 1")
    monkeypatch.setattr(plan_module, "available_cpus", lambda: [0])
    assert [build(NodeConfig, data).cpus for data in node_configs(_plan(), [], pathlib.Path("run"))] == [(), ()]
    assert "not pinned (2 nodes x 1 threads > 1 CPUs)" in describe_pinning(_plan())


def test_node_set_torch_threads_gives_each_pinned_node_that_many_cpus(monkeypatch, tmp_path):
    """Pinning counted 1 thread per node whatever --node-set torch_threads said: each node got one CPU
    for its 2 threads, also where there were not nodes x threads CPUs (then none should be pinned)."""
    tiny = ["--layers", "1", "--experts", "2", "--d-model", "16", "--d-ff", "32", "--nodes", "2", "--replicas", "1"]
    monkeypatch.setattr(plan_module, "available_cpus", lambda: [0, 1, 2, 3])
    plan = _plan_from_cli(tmp_path, *tiny, "--node-set", "torch_threads=2")
    assert [(c["torch_threads"], c["cpus"]) for c in node_configs(plan, [], tmp_path)] == [(2, [0, 1]), (2, [2, 3])]
    monkeypatch.setattr(plan_module, "available_cpus", lambda: [0, 1])
    assert ["cpus" in c for c in node_configs(plan, [], tmp_path)] == [False, False]
    assert "not pinned (2 nodes x 2 threads > 2 CPUs)" in describe_pinning(plan)


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux only")
def test_swarm_up_nodes_run_as_batch_work_unless_told_otherwise():
    """They share the machine with a client, often (node/affinity.py batch_scheduling)."""
    assert [build(NodeConfig, data).sched_batch for data in node_configs(_plan(), [], pathlib.Path("run"))] == [True, True]
    plan = dataclasses.replace(_plan(), node_overrides=("sched_batch=false",))
    assert [build(NodeConfig, data).sched_batch for data in node_configs(plan, [], pathlib.Path("run"))] == [False, False]


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux only")
def test_batch_scheduling_reaches_every_thread_and_those_started_later():
    """In a child process: the test process keeps its own policy."""
    code = """
import os, threading
from moeswarm.node.affinity import batch_scheduling
before = threading.Event(); stop = threading.Event()
early = threading.Thread(target=lambda: (before.set(), stop.wait())); early.start(); before.wait()
batch_scheduling()
late = threading.Thread(target=stop.wait); late.start()
policies = {os.sched_getscheduler(int(tid)) for tid in os.listdir("/proc/self/task")}
stop.set(); early.join(); late.join()
print(sorted(policies) == [os.SCHED_BATCH], len(os.listdir("/proc/self/task")))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout.split()
    assert out[0] == "True", out
    assert os.sched_getscheduler(0) != os.SCHED_BATCH


def test_format_cpus_joins_runs():
    assert format_cpus([6, 0, 1, 2, 3, 9, 10]) == "0-3,6,9-10"
    assert format_cpus([4]) == "4"


def test_pinning_to_a_missing_cpu_is_refused_before_changing_anything():
    before = available_cpus()
    if before is None:
        pytest.skip("this OS cannot pin")
    with pytest.raises(ConfigError, match=rf"CPU \[{max(before) + 1}\] is not available to this process \(available: "):
        pin_process([before[0], max(before) + 1])
    assert available_cpus() == before


def _plan_from_cli(scratch: pathlib.Path, *args: str) -> SwarmPlan:
    return plan_from_args(_parser().parse_args(["swarm", "up", *args]), scratch)


@pytest.mark.parametrize("placement", ["spread", "by-layer"])
def test_more_nodes_than_expert_replicas_are_refused_up_front(tmp_path, placement):
    tiny = ["--layers", "1", "--experts", "2", "--d-model", "16", "--d-ff", "32", "--placement", placement]
    with pytest.raises(ConfigError, match=r"^--nodes 3 > 2 experts x --replicas 1: 1 node\(s\) would host no expert; give at most 2 nodes"):
        _plan_from_cli(tmp_path, "--nodes", "3", "--replicas", "1", *tiny)
    assert _plan_from_cli(tmp_path, "--nodes", "3", "--replicas", "2", *tiny).nodes == 3  # 4 replica slots: each node gets one


def test_a_model_name_the_model_directory_does_not_hold_is_refused(tmp_path):
    from moeswarm.model.lm import build_local_model, save_model

    save_model(build_local_model(config_from_args("dirmodel", "tiny", "topk", ["d_model=16", "n_heads=2", "n_layers=1", "d_ff=16"])), tmp_path / "m")
    with pytest.raises(ConfigError, match="holds model 'dirmodel', not 'other'"):
        _plan_from_cli(tmp_path, "--model", str(tmp_path / "m"), "--model-name", "other", "--nodes", "1", "--replicas", "1")
    plan = _plan_from_cli(tmp_path, "--model", str(tmp_path / "m"), "--model-name", "dirmodel", "--nodes", "1", "--replicas", "1")
    assert plan.model.name == "dirmodel"


def test_a_run_dir_holding_the_default_model_of_another_name_is_refused_with_the_way_out(tmp_path, monkeypatch):
    # a tiny stand-in for the default model, so the test writes kilobytes, not the small model
    tiny = config_from_args("tiny-moe", "tiny", "topk", ["d_model=16", "n_heads=2", "n_layers=1", "d_ff=16"])
    monkeypatch.setattr("moeswarm.deploy.model_cli.config_from_args", lambda name, *args: dataclasses.replace(tiny, name=name))
    first = plan_module.default_model_dir("tiny-moe", tmp_path)
    assert plan_module.default_model_dir("tiny-moe", tmp_path) == first  # the same model again: reused
    with pytest.raises(ConfigError, match=rf"--run-dir {tmp_path} holds the model 'tiny-moe' of an earlier run .*--model-name tiny-moe"):
        plan_module.default_model_dir("other", tmp_path)


def test_the_example_node_config_serves_the_model_of_a_default_swarm_up():
    # `moeswarm node --config deploy/node.example.yaml --initial-peers <default swarm>` must be let in:
    # a node whose model differs from the swarm's in any field is refused (node/model_source.py).
    example = build(NodeConfig, load_yaml(pathlib.Path(plan_module.__file__).parent / "node.example.yaml"))
    default = config_from_args("tiny-moe", "small", "topk", [])  # what default_model_dir writes
    assert example.model == default.spec()
    assert example.seed == default.seed and example.swarm == "default"  # no model_dir: the same expert weights
    assert set(example.hosted_uids()) <= set(default.remote_uids())


def test_the_error_line_of_a_child_log_is_found(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text(
        "2026-11-23 20:25:28,900 INFO moeswarm.node.node: no checkpoint\nTraceback (most recent call last):\n"
        '  File "x.py", line 1, in <module>\n    raise ValueError\nsafetensors.SafetensorError: invalid header length\n'
        "Nov 23 20:25:29.001 [INFO] shutting down\n"
    )
    assert last_error_line(log) == "safetensors.SafetensorError: invalid header length"
    log.write_text("starting\nmoeswarm: config error: device='cuda': no CUDA device\n")
    assert last_error_line(log) == "config error: device='cuda': no CUDA device"
    log.write_text("no error said\nKilled\n")
    assert last_error_line(log) == "Killed"
    assert last_error_line(tmp_path / "missing.txt") is None
