"""`moeswarm swarm up` + `moeswarm status` as a user runs them; a killed node comes back; Ctrl-C leaves no process behind."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
from procs import alive, process_tree, processes_mentioning, read_until, wait_for

READY_LINE = "Ctrl-C stops the swarm"
TINY = ("--layers", "1", "--experts", "2", "--d-model", "16", "--d-ff", "32")


@contextlib.contextmanager
def swarm_up(tmp_path, *args: str):
    """`moeswarm swarm up ARGS --run-dir tmp_path/run` in its own session; (process, its output file).
    Whatever is left of its process tree is killed at the end."""
    cmd = [sys.executable, "-m", "moeswarm.deploy.cli", "swarm", "up", *args, "--run-dir", str(tmp_path / "run")]
    output = tmp_path / "swarm.out"
    with open(output, "wb") as out:
        swarm = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield swarm, output
    finally:
        for pid in alive(process_tree(swarm.pid)) | {swarm.pid}:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def ctrl_c_leaves_nothing_behind(swarm: subprocess.Popen) -> None:
    tree = process_tree(swarm.pid)
    os.killpg(swarm.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    assert swarm.wait(30) == 0
    deadline = time.monotonic() + 10
    while alive(tree) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(tree), f"left behind: {alive(tree)}"


def status_json(peer: str, *, check: bool = True) -> dict:
    """`moeswarm status --json`; check=False: {} where it finds no node (exit code 1)."""
    status = subprocess.run(
        [sys.executable, "-m", "moeswarm.deploy.cli", "status", "--initial-peers", peer, "--json"],
        capture_output=True, text=True, timeout=60,
    )
    if not check and status.returncode == 1:
        return {}
    assert status.returncode == 0, status.stderr
    return json.loads(status.stdout)


def initial_peer(text: str) -> str:
    return next(line.split()[-1] for line in text.splitlines() if line.startswith("initial peers:"))


def test_swarm_up_status_and_ctrl_c(tmp_path, cli_here):
    with swarm_up(tmp_path, "--nodes", "3", "--replicas", "2", "--layers", "2", "--experts", "3", "--d-model", "32", "--d-ff", "64") as (swarm, output):
        text = read_until(swarm, output, READY_LINE, timeout_s=90)
        peer = initial_peer(text)
        assert len(process_tree(swarm.pid)) >= 1 + 4 * 3  # launcher + (dht + 3 nodes), each with a DHT child and p2pd

        view = status_json(peer)
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
        a_second_swarm_up_on_its_run_dir_is_refused(cli_here, tmp_path / "run", swarm.pid)
        ctrl_c_leaves_nothing_behind(swarm)


def a_second_swarm_up_on_its_run_dir_is_refused(cli_here, run_dir: pathlib.Path, holder_pid: int) -> None:
    """...before it touches anything there: the first swarm's ready files and logs stay as they were."""
    before = {path: path.read_bytes() for path in run_dir.rglob("*") if path.name in ("ready.json", "log.txt")}
    second = cli_here("swarm", "up", *TINY, "--nodes", "1", "--replicas", "1", "--run-dir", str(run_dir))
    assert second.returncode == 2, second.stderr
    assert f"--run-dir {run_dir} is in use by another swarm up (pid {holder_pid})" in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1, second.stderr
    assert {path: path.read_bytes() for path in before} == before


def _child_pid(launcher_pid: int, argument: str) -> int:
    """The pid of the launcher's direct child whose command line has `argument`."""
    for pid in process_tree(launcher_pid):
        try:
            cmdline = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            parent = int(pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if argument.encode() in cmdline and parent == launcher_pid:
            return pid
    raise LookupError(f"no child process with {argument}")


def test_swarm_up_starts_a_node_that_died_again_under_its_identity(tmp_path):
    run_dir = tmp_path / "run"
    with swarm_up(tmp_path, "--nodes", "2", "--replicas", "1", "--layers", "1", "--experts", "2", "--d-model", "32", "--d-ff", "64") as (swarm, output):
        read_until(swarm, output, READY_LINE, timeout_s=90)
        before = json.loads((run_dir / "node0" / "ready.json").read_text())
        os.kill(_child_pid(swarm.pid, str(run_dir / "node0" / "node.yaml")), signal.SIGKILL)
        text = read_until(swarm, output, "node 0 is back", timeout_s=60)
        assert "node 0 exited with code -9; starting it again in 1 s" in text
        after = json.loads((run_dir / "node0" / "ready.json").read_text())
        assert after["uids"] == before["uids"] and f"node 0 is back: {after['endpoint']}" in output.read_text()
        experts = status_json(initial_peer(text))["experts"]
        for uid in after["uids"]:  # its records were replaced (same signing identity), not joined by new ones
            assert [replica["endpoint"] for replica in experts[uid]] == [after["endpoint"]], experts[uid]
        ctrl_c_leaves_nothing_behind(swarm)


def test_swarm_up_starts_its_bootstrap_dht_peer_again_at_the_printed_address(tmp_path):
    run_dir = tmp_path / "run"
    # announce_ttl_s=3: the node refreshes every second, so some refreshes fall while the bootstrap is
    # down; before, the first unanswered one dropped it from the node's routing table for good, and
    # the restarted bootstrap never saw the node's records again (protocol/dht.py rejoin_initial_peers)
    args = ("--nodes", "1", "--replicas", "1", "--layers", "1", "--experts", "2", "--d-model", "32", "--d-ff", "64")
    with swarm_up(tmp_path, *args, "--node-set", "announce_ttl_s=3") as (swarm, output):
        peer = initial_peer(read_until(swarm, output, READY_LINE, timeout_s=90))
        os.kill(_child_pid(swarm.pid, str(run_dir / "dht" / "ready.json")), signal.SIGKILL)
        text = read_until(swarm, output, "the bootstrap DHT peer is back", timeout_s=60)
        assert f"the bootstrap DHT peer is back: {peer}" in text  # same port, same peer id
        deadline = time.monotonic() + 40  # the node re-announces to it within a third of its TTL (and status takes ~2 s)
        while not status_json(peer, check=False).get("experts") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert set(status_json(peer)["experts"]) == {"tiny-moe.L0.E0", "tiny-moe.L0.E1"}
        ctrl_c_leaves_nothing_behind(swarm)


def test_ctrl_c_while_the_swarm_starts_stops_what_it_started(tmp_path):
    run_dir = tmp_path / "run"
    with swarm_up(tmp_path, "--nodes", "2", "--replicas", "1", *TINY) as (swarm, output):
        wait_for(lambda: (run_dir / "node0" / "log.txt").exists() or swarm.poll() is not None, timeout_s=60, what="node0's spawn")
        os.killpg(swarm.pid, signal.SIGINT)  # the DHT peer is up, the nodes were just spawned: they take seconds to be ready
        assert swarm.wait(30) == 130, output.read_text()
        text = output.read_text()
        assert "stopped while node0 was starting" in text and "swarm up in" not in text, text
        assert "Traceback" not in text, text
        wait_for(lambda: not processes_mentioning(str(run_dir)), timeout_s=10, what="every process of the swarm exiting")


def test_a_node_that_fails_to_start_is_explained_and_its_log_kept(tmp_path):
    # Without --run-dir the nodes run in a temp dir; the one whose node failed is kept for its log.
    missing_cpu = max(os.sched_getaffinity(0)) + 1
    cmd = [sys.executable, "-m", "moeswarm.deploy.cli", "swarm", "up", "--nodes", "1", "--replicas", "1", *TINY,
           "--node-set", f"cpus=[{missing_cpu}]"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "TMPDIR": str(tmp_path)})
    assert result.returncode == 1
    error = result.stderr.strip()
    assert error.startswith("moeswarm: node0 exited with code 2: config error: ") and f"CPU [{missing_cpu}] is not available" in error, error
    log = pathlib.Path(error.split("(log: ")[1].split(",")[0])
    assert log.is_relative_to(tmp_path) and "is not available" in log.read_text(), error
    assert len(error.splitlines()) == 1 and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (("--nodes", "3", "--replicas", "1", *TINY), "--nodes 3 > 2 experts x --replicas 1: 1 node(s) would host no expert"),
        (("--nodes", "1", "--replicas", "1", *TINY, "--run-dir", "{file}"), "--run-dir {file} is a file, not a folder"),
    ],
)
def test_swarm_up_refuses_a_bad_plan_in_one_line(tmp_path, cli_here, args, message):
    file = tmp_path / "a-file"
    file.write_text("")
    result = cli_here("swarm", "up", *(arg.format(file=file) for arg in args))
    assert result.returncode == 2, result.stderr
    assert message.format(file=file) in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_swarm_up_rejects_more_replicas_than_nodes(cli_here):
    result = cli_here("swarm", "up", "--nodes", "2", "--replicas", "3")
    assert result.returncode != 0
    assert "replicas=3" in result.stderr


def test_status_with_a_malformed_peer_address_says_so_in_one_line():
    cmd = [sys.executable, "-m", "moeswarm.deploy.cli", "status", "--initial-peers", "ip4/127.0.0.1/tcp/1"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert 'failed to parse multiaddr "ip4/127.0.0.1/tcp/1"' in result.stderr
    assert "Traceback" not in result.stderr, result.stderr


def _maps_torch(pid: int) -> bool:
    try:
        return "libtorch_cpu" in pathlib.Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.parametrize("command", ["swarm up", "node", "dht"])
def test_ctrl_c_while_a_command_imports_exits_130_quietly(tmp_path, command):
    """A Ctrl-C that lands while torch is being imported (the first second or so of every command that
    serves; deploy/stop_signals.py): exit 130, no traceback, no process left."""
    args = {
        "swarm up": ["swarm", "up", *TINY, "--nodes", "1", "--replicas", "1", "--run-dir", str(tmp_path / "run")],
        "node": ["node", "--config", str(pathlib.Path(__file__).parents[2] / "deploy" / "node.example.yaml"),
                 "--set", f"state_dir={tmp_path / 'state'}"],
        "dht": ["dht"],
    }[command]
    output = tmp_path / "out.txt"
    with open(output, "wb") as out:
        popen = subprocess.Popen([sys.executable, "-m", "moeswarm.deploy.cli", *args], stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    try:
        wait_for(lambda: _maps_torch(popen.pid) or popen.poll() is not None, timeout_s=30, what="the torch import")
        os.killpg(popen.pid, signal.SIGINT)
        assert popen.wait(30) == 130, output.read_text()
        assert "Traceback" not in output.read_text(), output.read_text()
        wait_for(lambda: not processes_mentioning(str(tmp_path)), timeout_s=10, what="every process of it exiting")
    finally:
        for pid in alive(process_tree(popen.pid)) | {popen.pid}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
