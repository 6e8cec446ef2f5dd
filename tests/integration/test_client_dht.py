"""The client's DHT peer (IsolatedDHT): started without waiting, it answers later; closed while
still starting, it leaves no process behind."""

from __future__ import annotations

import pathlib
import time

from procs import alive, process_tree
from moeswarm.protocol.dht import IsolatedDHT
from moeswarm.protocol.records import nodes_key


def test_started_without_waiting_it_answers_lookups(dht_peer):
    dht = IsolatedDHT(dht_peer.ready["maddrs"], wait=False)
    try:
        assert dht.get_records([nodes_key("nobody")]) == {nodes_key("nobody"): None}
    finally:
        dht.close()
    assert dht._proc.poll() is not None


def _p2pd_pids() -> set[int]:
    pids = set()
    for entry in pathlib.Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"p2pd" in (entry / "cmdline").read_bytes().split(b"\0")[0]:
                pids.add(int(entry.name))
        except OSError:
            continue
    return alive(pids)


def test_closed_while_starting_leaves_no_process(dht_peer):
    before = _p2pd_pids()
    dht = IsolatedDHT(dht_peer.ready["maddrs"], wait=False)
    time.sleep(0.2)  # the child is importing hivemind: not ready yet
    tree = process_tree(dht._proc.pid)
    dht.close()  # waits for the child to come up, then stops it (and its p2pd) through its socket
    deadline = time.monotonic() + 10
    while (alive(tree) or _p2pd_pids() - before) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(tree) and not _p2pd_pids() - before, f"left behind: {alive(tree) | (_p2pd_pids() - before)}"
