"""swarm up's restart policy for nodes that exit: back-off, the limit, --no-restart (no processes)."""

from __future__ import annotations

import logging
import pathlib
import types

from moeswarm.deploy.swarm import RESTART_LIMIT, RESTART_WINDOW_S, _NodeWatch, _watch_node


class FakeProc:
    def __init__(self, returncode=None):
        self.returncode = returncode

    def poll(self):
        return self.returncode


class FakeSwarm:
    """The part of LocalSwarm that _watch_node uses; restart_node starts a live FakeProc."""

    def __init__(self, restart_nodes: bool = True):
        self.plan = types.SimpleNamespace(restart_nodes=restart_nodes)
        self.procs = [FakeProc(), FakeProc()]  # [dht, node0]
        self.restarted_at: list[float] = []
        self.ready: dict | None = None
        self.now = 0.0

    def node_dir(self, i):
        return pathlib.Path(f"/run/node{i}")

    def node_ready(self, i):
        return self.ready

    def restart_node(self, i):
        self.restarted_at.append(self.now)
        self.procs[1 + i] = FakeProc()
        self.ready = None


def tick(swarm: FakeSwarm, watch: _NodeWatch, now: float) -> None:
    swarm.now = now
    _watch_node(swarm, 0, swarm.procs[1], watch, now)


def test_a_dead_node_is_started_again_after_1_2_4_s_then_left_down(caplog):
    swarm, watch = FakeSwarm(), _NodeWatch()
    caplog.set_level(logging.WARNING)
    now = 100.0
    for attempt in range(RESTART_LIMIT):
        swarm.procs[1].returncode = 1  # it dies
        tick(swarm, watch, now)
        assert f"starting it again in {2 ** attempt} s" in caplog.text
        tick(swarm, watch, now + 2**attempt - 0.1)
        assert len(swarm.restarted_at) == attempt  # not before its delay
        tick(swarm, watch, now + 2**attempt)
        assert len(swarm.restarted_at) == attempt + 1
        swarm.ready = {"endpoint": f"127.0.0.1:{5000 + attempt}"}
        tick(swarm, watch, now + 2**attempt + 0.5)
        assert f"node 0 is back: 127.0.0.1:{5000 + attempt}" in caplog.text
        now += 10
    swarm.procs[1].returncode = 1
    tick(swarm, watch, now)
    assert "leaving it down (restarted 3 times in 10 min)" in caplog.text
    tick(swarm, watch, now + 3600)
    assert len(swarm.restarted_at) == RESTART_LIMIT


def test_restarts_older_than_the_window_do_not_count():
    swarm, watch = FakeSwarm(), _NodeWatch(restarts=[0.0] * RESTART_LIMIT)
    swarm.procs[1].returncode = -9
    tick(swarm, watch, RESTART_WINDOW_S + 1)
    tick(swarm, watch, RESTART_WINDOW_S + 2)
    assert swarm.restarted_at == [RESTART_WINDOW_S + 2]


def test_no_restart_leaves_a_dead_node_down(caplog):
    swarm, watch = FakeSwarm(restart_nodes=False), _NodeWatch()
    swarm.procs[1].returncode = 1
    caplog.set_level(logging.WARNING)
    for now in (1.0, 5.0, 60.0):
        tick(swarm, watch, now)
    assert swarm.restarted_at == [] and "leaving it down (--no-restart)" in caplog.text
    assert caplog.text.count("leaving it down") == 1  # reported once
