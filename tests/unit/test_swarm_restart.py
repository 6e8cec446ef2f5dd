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


def _wait_ready_of(proc, stop, tmp_path):
    """LocalSwarm._wait_ready on a child that is not ready (its only state: the stop flag, the logs)."""
    import types

    from moeswarm.deploy.swarm import LocalSwarm

    launcher = types.SimpleNamespace(_stop=stop, _why=lambda work_dir: "")
    return LocalSwarm._wait_ready(launcher, tmp_path, proc)


def test_a_child_the_launcher_s_ctrl_c_killed_while_starting_is_a_stop_not_a_failure(tmp_path):
    """The Ctrl-C reaches a child spawned at that moment (before it is in its own session): it dies
    of SIGINT, and the launcher's own handler may record the signal a moment later."""
    import signal
    import threading

    import pytest

    from moeswarm.deploy.swarm import StartInterrupted, StartupError

    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()  # the launcher's handler, a moment after the child died
    with pytest.raises(StartInterrupted):
        _wait_ready_of(FakeProc(-signal.SIGINT), stop, tmp_path)
    # the same death without a stop, or any other exit, is the child's failure
    with pytest.raises(StartupError, match="exited with code -2"):
        _wait_ready_of(FakeProc(-signal.SIGINT), threading.Event(), tmp_path)
    with pytest.raises(StartupError, match="exited with code 1"):
        _wait_ready_of(FakeProc(1), threading.Event(), tmp_path)
