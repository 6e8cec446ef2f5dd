"""swarm up --run-dir with another placement than the last run: each node folder gets the newest
checkpoint of the experts it will host (files only: stand-in checkpoints with set mtimes)."""

from __future__ import annotations

import os
import pathlib

from moeswarm.deploy.carry_checkpoints import carry_checkpoints
from moeswarm.node.checkpoint import expert_checkpoint_path


def _write(run_dir: pathlib.Path, node: int, uid: str, content: str, mtime: float) -> None:
    path = expert_checkpoint_path(run_dir / f"node{node}", uid)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    os.utime(path, (mtime, mtime))


def _read(run_dir: pathlib.Path, node: int, uid: str) -> str | None:
    path = expert_checkpoint_path(run_dir / f"node{node}", uid)
    return path.read_text() if path.exists() else None


def test_fewer_nodes_take_the_checkpoints_of_the_nodes_that_are_gone(tmp_path):
    # last run: 4 nodes, one expert each; this run: 2 nodes, two experts each
    for node, uid in enumerate(["m.L0.E0", "m.L0.E1", "m.L0.E2", "m.L0.E3"]):
        _write(tmp_path, node, uid, f"trained {uid}", 100.0)
    assert carry_checkpoints(tmp_path, [["m.L0.E0", "m.L0.E2"], ["m.L0.E1", "m.L0.E3"]]) == 2
    assert _read(tmp_path, 0, "m.L0.E2") == "trained m.L0.E2" and _read(tmp_path, 1, "m.L0.E3") == "trained m.L0.E3"
    assert _read(tmp_path, 0, "m.L0.E0") == "trained m.L0.E0"  # its own, untouched
    assert carry_checkpoints(tmp_path, [["m.L0.E0", "m.L0.E2"], ["m.L0.E1", "m.L0.E3"]]) == 0  # a rerun: nothing to do


def test_a_new_replica_starts_from_the_newest_one_and_replicas_keep_their_own(tmp_path):
    _write(tmp_path, 0, "m.L0.E0", "replica 0", 100.0)
    _write(tmp_path, 1, "m.L0.E0", "replica 1", 105.0)
    assert carry_checkpoints(tmp_path, [["m.L0.E0"], ["m.L0.E0"], ["m.L0.E0"]]) == 1
    assert [_read(tmp_path, node, "m.L0.E0") for node in range(3)] == ["replica 0", "replica 1", "replica 1"]


def test_an_expert_that_moved_away_and_back_takes_its_newer_state_back(tmp_path):
    _write(tmp_path, 0, "m.L0.E0", "run 1", 100.0)  # run 1 on node 0; run 2 moved it to node 1 and trained it
    _write(tmp_path, 1, "m.L0.E0", "run 2", 200.0)
    assert carry_checkpoints(tmp_path, [["m.L0.E0"], ["m.L0.E1"]]) == 1  # run 3: back on node 0
    assert _read(tmp_path, 0, "m.L0.E0") == "run 2"


def test_experts_nobody_checkpointed_and_other_files_are_left_alone(tmp_path):
    (tmp_path / "dht").mkdir()
    (tmp_path / "node0").mkdir()
    (tmp_path / "node0" / "node.yaml").write_text("x")
    assert carry_checkpoints(tmp_path, [["m.L0.E0"]]) == 0
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["dht", "node.yaml", "node0"]
