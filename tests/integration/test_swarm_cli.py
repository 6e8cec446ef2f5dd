"""`moeswarm swarm up` + `moeswarm status` as a user runs them; Ctrl-C leaves no process behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from procs import alive, process_tree, read_until

READY_LINE = "Ctrl-C stops the swarm"


def test_swarm_up_status_and_ctrl_c(tmp_path):
    cmd = [sys.executable, "-m", "moeswarm.deploy.cli", "swarm", "up", "--nodes", "3", "--replicas", "2"]
    cmd += ["--layers", "2", "--experts", "3", "--d-model", "32", "--d-ff", "64", "--run-dir", str(tmp_path / "run")]
    output = tmp_path / "swarm.out"
    with open(output, "wb") as out:
        swarm = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        text = read_until(swarm, output, READY_LINE, timeout_s=90)
        peer = next(line.split()[-1] for line in text.splitlines() if line.startswith("initial peers:"))
        tree = process_tree(swarm.pid)
        assert len(tree) >= 1 + 4 * 3  # launcher + (dht + 3 nodes), each with a DHT child and p2pd

        status = subprocess.run(
            [sys.executable, "-m", "moeswarm.deploy.cli", "status", "--initial-peers", peer, "--json"],
            capture_output=True, text=True, timeout=60,
        )
        assert status.returncode == 0, status.stderr
        view = json.loads(status.stdout)
        assert len(view["nodes"]) == 3
        uids = {f"tiny-moe.L{layer}.E{expert}" for layer in range(2) for expert in range(3)}
        assert set(view["experts"]) == uids
        for uid, replicas in view["experts"].items():
            endpoints = {replica["endpoint"] for replica in replicas}
            assert len(endpoints) == 2, f"{uid}: {endpoints}"

        table = subprocess.run(
            [sys.executable, "-m", "moeswarm.deploy.cli", "status", "--initial-peers", peer],
            capture_output=True, text=True, timeout=60,
        )
        assert table.returncode == 0, table.stderr
        rows = [line.split() for line in table.stdout.splitlines() if line.startswith("tiny-moe.")]
        assert sorted(row[0] for row in rows) == sorted(uids) and all(row[1] == "2" for row in rows), table.stdout

        os.killpg(swarm.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        assert swarm.wait(30) == 0
        deadline = time.monotonic() + 10
        while alive(tree) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive(tree), f"left behind: {alive(tree)}"
    finally:
        for pid in alive(process_tree(swarm.pid)) | {swarm.pid}:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_swarm_up_rejects_more_replicas_than_nodes():
    cmd = [sys.executable, "-m", "moeswarm.deploy.cli", "swarm", "up", "--nodes", "2", "--replicas", "3"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "replicas=3" in result.stderr
