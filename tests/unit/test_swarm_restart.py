"""swarm up's restart policy for a node or the bootstrap DHT peer that exits: back-off, the limit,
--no-restart (no processes: stand-ins)."""

from __future__ import annotations

import logging
import pathlib

from moeswarm.deploy.swarm import RESTART_LIMIT, RESTART_WINDOW_S, _Child, _Watch, _watch_child


class FakeProc:
    def __init__(self, returncode=None):
        self.returncode = returncode

    def poll(self):
        return self.returncode


class Supervised:
    """One child process: restart() starts a live FakeProc; ready() says what it reported."""

    def __init__(self):
        self.proc, self.report, self.restarted_at, self.now = FakeProc(), None, [], 0.0

    def restart(self):
        self.restarted_at.append(self.now)
        self.proc, self.report = FakeProc(), None

    def child(self) -> _Child:
        return _Child("node 0", self.proc, pathlib.Path("/run/node0/log.txt"), lambda: self.report,
                      lambda ready: ready["endpoint"], self.restart)


def tick(supervised: Supervised, watch: _Watch, now: float, restart: bool = True) -> None:
    supervised.now = now
    _watch_child(supervised.child(), watch, now, restart)


def test_a_dead_child_is_started_again_after_1_2_4_s_then_left_down(caplog):
    supervised, watch = Supervised(), _Watch()
    caplog.set_level(logging.WARNING)
    now = 100.0
    for attempt in range(RESTART_LIMIT):
        supervised.proc.returncode = 1  # it dies
        tick(supervised, watch, now)
        assert f"node 0 exited with code 1; starting it again in {2 ** attempt} s" in caplog.text
        tick(supervised, watch, now + 2**attempt - 0.1)
        assert len(supervised.restarted_at) == attempt  # not before its delay
        tick(supervised, watch, now + 2**attempt)
        assert len(supervised.restarted_at) == attempt + 1
        supervised.report = {"endpoint": f"127.0.0.1:{5000 + attempt}"}
        tick(supervised, watch, now + 2**attempt + 0.5)
        assert f"node 0 is back: 127.0.0.1:{5000 + attempt}" in caplog.text
        now += 10
    supervised.proc.returncode = 1
    tick(supervised, watch, now)
    assert "leaving it down (restarted 3 times in 10 min)" in caplog.text
    tick(supervised, watch, now + 3600)
    assert len(supervised.restarted_at) == RESTART_LIMIT


def test_restarts_older_than_the_window_do_not_count():
    supervised, watch = Supervised(), _Watch(restarts=[0.0] * RESTART_LIMIT)
    supervised.proc.returncode = -9
    tick(supervised, watch, RESTART_WINDOW_S + 1)
    tick(supervised, watch, RESTART_WINDOW_S + 2)
    assert supervised.restarted_at == [RESTART_WINDOW_S + 2]


def test_no_restart_leaves_a_dead_child_down(caplog):
    supervised, watch = Supervised(), _Watch()
    supervised.proc.returncode = 1
    caplog.set_level(logging.WARNING)
    for now in (1.0, 5.0, 60.0):
        tick(supervised, watch, now, restart=False)
    assert supervised.restarted_at == [] and "leaving it down (--no-restart)" in caplog.text
    assert caplog.text.count("leaving it down") == 1  # reported once
