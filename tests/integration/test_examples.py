"""The examples in examples/ run against a real local swarm and do what they say."""

from __future__ import annotations

import importlib.util
import pathlib

from moeswarm.deploy.swarm import LocalSwarm, SwarmPlan

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_vmoe_patches_learn_through_remote_experts(tmp_path):
    vmoe = load_example("vmoe_patches")
    with LocalSwarm(SwarmPlan(model=vmoe.SPEC, nodes=2, replicas=1, swarm="vmoe", run_dir=tmp_path)) as swarm:
        losses = vmoe.train(swarm.initial_peers, steps=12, batch=16, swarm="vmoe")
    assert len(losses) == 12 and losses[-1] < losses[0] / 3, losses
