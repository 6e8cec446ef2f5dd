"""The client's DHT peer (IsolatedDHT): started without waiting, it answers later; closed while
still starting, it leaves no process behind."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import pytest
from procs import alive, process_tree
from moeswarm.protocol.client_dht import IsolatedDHT
from moeswarm.protocol.dht import get_records
from moeswarm.protocol.errors import NodeUnavailable
from moeswarm.protocol.records import nodes_key


def test_started_without_waiting_it_answers_lookups(dht_peer):
    dht = IsolatedDHT(dht_peer.ready["maddrs"], wait=False)
    try:
        assert dht.get_records([nodes_key("nobody")]) == {nodes_key("nobody"): None}
    finally:
        dht.close()
    assert dht._proc.poll() is not None


def _watch_tree(pid: int, seen: dict[int, bytes], stop: threading.Event) -> None:
    """Record every process ever in pid's tree (p2pd among them), with its argv[0], until stop is
    set. Only this client's processes: other tests, e.g. under pytest-xdist, run p2pd daemons too.
    argv[0] is re-read while a process stays in the tree: one first seen between fork and exec
    still shows its parent's (python), and p2pd would go unrecognised."""
    while not stop.is_set():
        for child in process_tree(pid):
            seen[child] = _argv0(child) or seen.get(child, b"")
        time.sleep(0.02)


def _argv0(pid: int) -> bytes:
    try:
        return (pathlib.Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")[0]
    except OSError:
        return b""


def _still_running(seen: dict[int, bytes]) -> set[int]:
    return {pid for pid in alive(set(seen)) if _argv0(pid) == seen[pid]}  # a reused pid is someone else's


def test_closed_while_starting_leaves_no_process(dht_peer):
    dht = IsolatedDHT(dht_peer.ready["maddrs"], wait=False)
    seen: dict[int, bytes] = {}
    stop = threading.Event()
    watcher = threading.Thread(target=_watch_tree, args=(dht._proc.pid, seen, stop))
    watcher.start()
    time.sleep(0.2)  # the child is importing hivemind: not ready yet
    try:
        dht.close()  # waits for the child to come up, then stops it (and its p2pd) through its socket
    finally:
        stop.set()
        watcher.join()
    assert any(b"p2pd" in argv0 for argv0 in seen.values()), f"the child's p2pd was never seen: {seen}"
    deadline = time.monotonic() + 10
    while _still_running(seen) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _still_running(seen), f"left behind: {_still_running(seen)}"


_OWNER = """
import sys, time
from moeswarm.protocol.client_dht import IsolatedDHT
dht = IsolatedDHT(sys.argv[1:], wait=False)  # never connects: the child waits for it in accept()
print(dht._proc.pid, flush=True)
time.sleep(120)
"""


def test_owner_killed_before_connecting_leaves_no_process(dht_peer):
    """kill -9 of the owning process (a user's crashed script) stops its DHT child and p2pd, even
    when it died before its first lookup."""
    owner = subprocess.Popen([sys.executable, "-c", _OWNER, *dht_peer.ready["maddrs"]], stdout=subprocess.PIPE, text=True)
    seen: dict[int, bytes] = {}
    stop = threading.Event()
    try:
        child = int(owner.stdout.readline())
        watcher = threading.Thread(target=_watch_tree, args=(child, seen, stop))
        watcher.start()
        deadline = time.monotonic() + 30
        while not any(b"p2pd" in argv0 for argv0 in seen.values()) and time.monotonic() < deadline:
            time.sleep(0.05)  # the child is up (p2pd running) and waits for its owner
        assert any(b"p2pd" in argv0 for argv0 in seen.values()), f"the child's p2pd never started: {seen}"
        time.sleep(0.5)
    finally:
        owner.kill()
        owner.wait()
        stop.set()
    watcher.join()
    deadline = time.monotonic() + 15
    while _still_running(seen) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _still_running(seen), f"left behind after the owner died: {_still_running(seen)}"


_OWNER_GONE_AT_ONCE = """
import os, sys
from moeswarm.protocol.client_dht import IsolatedDHT
dht = IsolatedDHT(sys.argv[1:], wait=False)
print(dht._proc.pid, flush=True)
os._exit(130)  # what a Ctrl-C does to `moeswarm generate` while it imports torch, with its DHT child starting
"""


def test_owner_gone_while_its_dht_child_starts_leaves_no_traceback_and_no_process(dht_peer):
    # The child told a dead owner it was ready: BrokenPipeError, with a traceback on the owner's terminal.
    owner = subprocess.Popen(
        [sys.executable, "-c", _OWNER_GONE_AT_ONCE, *dht_peer.ready["maddrs"]],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    child = int(owner.stdout.readline())
    _, err = owner.communicate(timeout=60)  # the child writes to the same stderr: its end closes when it exits
    assert owner.returncode == 130
    assert "Traceback" not in err and "Error" not in err, err[-3000:]
    deadline = time.monotonic() + 15
    while alive({child}) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive({child})


def test_lookups_through_a_client_dht_peer_that_died_say_so_at_once(dht_peer):
    dht = IsolatedDHT(dht_peer.ready["maddrs"])
    try:
        tree = process_tree(dht._proc.pid)
        assert get_records(dht, [nodes_key("default")], timeout_s=30)  # it works first
        dht._proc.kill()
        dht._proc.wait()
        # not "did not answer within 30 s": the cause, with what to do
        with pytest.raises(NodeUnavailable, match=r"client DHT peer \(pid \d+\) was killed by signal 9; restart this process"):
            get_records(dht, [nodes_key("default")], timeout_s=30)
        deadline = time.monotonic() + 10  # its DHT process and p2pd follow it (they watch their parent)
        while alive(tree) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(tree), f"left behind: {alive(tree)}"
    finally:
        dht.close()
    assert not pathlib.Path(dht._address).parent.exists()  # nor its socket directory


def test_waiting_for_a_dht_peer_whose_process_died_while_starting_fails_at_once():
    import os
    import signal

    from moeswarm.protocol.dht import start_dht, wait_dht_ready

    dht = start_dht(await_ready=False)
    os.kill(dht.pid, signal.SIGSTOP)  # freeze it mid-start, so no p2pd it may have started escapes the kill
    tree = process_tree(dht.pid)
    for pid in tree:
        os.kill(pid, signal.SIGKILL)
    dht.join(10)
    # hivemind's own wait_until_ready() would block forever: the process can no longer answer it
    with pytest.raises(NodeUnavailable, match="the DHT process was killed by signal 9 before it was ready"):
        wait_dht_ready(dht)
    assert not alive(tree)


def test_unreachable_initial_peers_fail_at_once_naming_why():
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    peer = f"/ip4/127.0.0.1/tcp/{port}/p2p/QmQSWMgkhr3hX3dzPgPVMjpwrfC3wMUYGjjSPxCGJJ9TRy"
    dht = IsolatedDHT([peer], wait=False)
    child = dht._proc
    with pytest.raises(NodeUnavailable, match=f"failed to connect to bootstrap peers.*initial peers: {peer}"):
        dht.wait_ready()
    assert child.wait(10) is not None


def test_a_dht_peer_that_failed_to_start_leaves_no_temporary_folder(tmp_path, monkeypatch):
    # The child says "failed", then removes its folder on the way out: it must be let exit by itself
    # (code 1), not be killed as soon as it said so, which left the folder behind in 3 tries out of 4.
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the child's tempfile folder
    dht = IsolatedDHT(["garbage"], wait=False)
    with pytest.raises(NodeUnavailable, match='failed to parse multiaddr "garbage"'):
        dht.wait_ready()
    assert dht._proc.returncode == 1
    assert not [name for name in os.listdir(tmp_path) if name.startswith("moeswarm-dht-")]


_CTRL_C_SCRIPT = """
import sys, time
from moeswarm.protocol.client_dht import IsolatedDHT
from moeswarm.protocol.dht import get_records
dht = IsolatedDHT(sys.argv[1:])
print("ready", flush=True)
try:
    time.sleep(60)
except KeyboardInterrupt:  # an interactive session goes on after Ctrl-C
    pass
time.sleep(1.0)  # what Ctrl-C stopped has stopped by now
try:
    print(repr(get_records(dht, ["moeswarm:ctrl-c:nothing"], timeout_s=5)), flush=True)
finally:
    dht.close()
"""


def test_ctrl_c_in_the_owners_terminal_leaves_its_dht_peer_working(dht_peer):
    # Ctrl-C signals the terminal's whole foreground process group: the owner, its DHT child, the
    # DHT process and p2pd. An interactive session that goes on after Ctrl-C must still reach the
    # swarm. (This passed before the DHT process left the group too: a client's p2pd, which has
    # initial peers, keeps running on SIGINT; a node's without them did not. See test_node_lifecycle.)
    proc = subprocess.Popen(
        [sys.executable, "-c", _CTRL_C_SCRIPT, *dht_peer.ready["maddrs"]],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,  # its own group, as in a terminal
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(2.0)  # a session that has run a while: its p2pd is settled
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert out.strip() == "{'moeswarm:ctrl-c:nothing': None}"


_LOOKUP_SCRIPT = """
import sys
from moeswarm.model.directory import find_experts
from moeswarm.protocol.client_dht import IsolatedDHT
dht = IsolatedDHT(sys.argv[2:])
try:
    found = find_experts(dht, sys.argv[1], ["itest.L0.E0"])
finally:
    dht.close()
print(len(found["itest.L0.E0"]), "hivemind" in sys.modules, flush=True)
"""


def test_reading_records_does_not_load_hivemind_into_the_users_process(node_factory, dht_peer):
    # The DHT peer is a child process; what it sends back must unpickle without hivemind, whose
    # package import (scipy included) cost a user's process 0.4 s and 60 MiB at its first lookup.
    node_factory("lookup", experts=["itest.L0.E0"], swarm="imports")
    proc = subprocess.run(
        [sys.executable, "-c", _LOOKUP_SCRIPT, "imports", *dht_peer.ready["maddrs"]],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["1", "False"]  # the node's record was read, and hivemind never imported
