"""`swarm up --run-dir` again with fewer nodes: the experts keep the training of the last run."""

from __future__ import annotations

import torch
from procs import probe, run, train_step
from moeswarm.deploy.swarm import LocalSwarm
from moeswarm.deploy.swarm_plan import SwarmPlan
from moeswarm.protocol.spec import ModelSpec

SPEC = ModelSpec(name="carry", d_model=16, d_ff=16, n_layers=1, n_experts=2)


def test_a_run_with_fewer_nodes_serves_the_experts_trained_in_the_last_run(tmp_path):
    plan = dict(model=SPEC, replicas=1, swarm="carry", run_dir=tmp_path, pin_cpus=False, node_overrides=("optimizer.name=sgd",))
    x, grad_y = torch.randn(3, SPEC.d_model), torch.randn(3, SPEC.d_model)
    with LocalSwarm(SwarmPlan(nodes=2, **plan)) as swarm:
        uid = swarm.ready[1]["uids"][0]  # an expert of the node the next run does without
        trained, versions = run(train_step(swarm.ready[1]["endpoint"], SPEC.name, uid, x, grad_y))
        assert versions[uid] == 1
    with LocalSwarm(SwarmPlan(nodes=1, **plan)) as swarm:
        served, versions = run(probe(swarm.ready[0]["endpoint"], SPEC.name, uid, x))
    assert versions[uid] == 1 and torch.equal(served, trained)
