"""`moeswarm swarm up`: a bootstrap DHT peer plus N node processes on 127.0.0.1, stopped together."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable

import yaml

from moeswarm.deploy.carry_checkpoints import carry_checkpoints
from moeswarm.deploy.swarm_plan import SwarmPlan, describe_pinning, node_configs, plan_from_args
from moeswarm.deploy.stop_signals import StopFlag, exit_code_when_stopped
from moeswarm.node.checkpoint import hold_lock
from moeswarm.node.model_source import is_hf_checkpoint
from moeswarm.protocol.errors import ConfigError, StartupError
from moeswarm.protocol.spec import uid_sort_key

logger = logging.getLogger(__name__)
RUN_DIR_LOCK = "swarm.lock"  # in --run-dir: held by the swarm up using it
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 8.0
SIGNAL_GRACE_S = 1.0  # a child killed by SIGINT while starting: how long the launcher's own Ctrl-C may take to show
RESTART_LIMIT = 3  # restarts of one node within RESTART_WINDOW_S before swarm up leaves it down
RESTART_WINDOW_S = 600.0


class StartInterrupted(Exception):
    """The stop event was set while LocalSwarm was starting (the message: what was starting)."""


class LocalSwarm:
    """Owns the bootstrap DHT peer and the node processes, each in its own session (so a terminal's
    Ctrl-C reaches only the launcher). Use as a context manager; stop() leaves no process behind.
    Setting `stop` while it starts stops what it started and raises StartInterrupted."""

    def __init__(self, plan: SwarmPlan, *, stop: threading.Event | StopFlag | None = None):
        self.plan = plan
        self.procs: list[subprocess.Popen] = []  # [dht, node0, node1, ...]
        self.ready: list[dict] = []  # what each node reported: endpoint, maddrs, peer_id, uids
        self.initial_peers: list[str] = []
        self._stop = stop or threading.Event()
        self._tmp_dir = None if plan.run_dir else pathlib.Path(tempfile.mkdtemp(prefix="moeswarm-swarm-"))  # removed by stop()
        self.run_dir = pathlib.Path(plan.run_dir or self._tmp_dir)

    def __enter__(self) -> "LocalSwarm":
        try:
            self.start()
        except StartupError:
            self.stop(keep_run_dir=True)  # the error points at a log in it
            raise
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def nodes(self) -> list[subprocess.Popen]:
        return self.procs[1:]

    def start(self) -> None:
        self._spawn(self.dht_dir, self._dht_args())
        self.initial_peers = self._wait_ready(self.dht_dir, self.procs[0])["maddrs"]
        configs = node_configs(self.plan, self.initial_peers, self.run_dir)
        if self.plan.run_dir:  # a run dir used before may hold checkpoints in other nodes' folders
            carry_checkpoints(self.run_dir, [config["experts"] for config in configs])
        for i, config in enumerate(configs):
            node_dir = self.node_dir(i)
            node_dir.mkdir(parents=True, exist_ok=True)
            (node_dir / "node.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
            self._spawn(node_dir, _node_args(node_dir))
        self.ready = [self._wait_ready(self.node_dir(i), proc) for i, proc in enumerate(self.nodes)]

    def node_dir(self, i: int) -> pathlib.Path:
        return self.run_dir / f"node{i}"

    @property
    def dht_dir(self) -> pathlib.Path:
        return self.run_dir / "dht"

    def _dht_args(self, port: int = 0) -> list[str]:
        # its own key file: restarted on the same port, it keeps the multiaddr printed for clients
        args = ["dht", "--ready-file", str(self.dht_dir / "ready.json"), "--identity", str(self.dht_dir / "identity.key")]
        return args + ["--port", str(port)] if port else args

    def restart_dht(self) -> None:
        """Start the bootstrap DHT peer again at the address it had (same port and peer id)."""
        port = int(self.initial_peers[0].split("/tcp/")[1].split("/")[0])
        _kill_group(self.procs[0])
        self.procs[0] = self._popen(self.dht_dir, self._dht_args(port))

    def dht_ready(self) -> dict | None:
        return _read_ready(self.dht_dir)

    def restart_node(self, i: int) -> None:
        """Start node i again from its directory: the same config, checkpoint and DHT identity (so
        its new records replace the old ones). Does not wait for it: see node_ready()."""
        _kill_group(self.procs[1 + i])  # whatever is left of the old one
        self.procs[1 + i] = self._popen(self.node_dir(i), _node_args(self.node_dir(i)))

    def node_ready(self, i: int) -> dict | None:
        """What node i reported when it (last) became ready; None while it is starting."""
        ready = _read_ready(self.node_dir(i))
        if ready is not None:
            self.ready[i] = ready
        return ready

    def _spawn(self, work_dir: pathlib.Path, args: list[str]) -> None:
        self.procs.append(self._popen(work_dir, args))

    def _popen(self, work_dir: pathlib.Path, args: list[str]) -> subprocess.Popen:
        work_dir.mkdir(parents=True, exist_ok=True)
        (work_dir / "ready.json").unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "moeswarm.deploy.cli", *args, "--exit-with-parent"]
        with open(work_dir / "log.txt", "ab") as log:
            return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def _wait_ready(self, work_dir: pathlib.Path, proc: subprocess.Popen) -> dict:
        ready_file = work_dir / "ready.json"
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if ready_file.exists():
                return json.loads(ready_file.read_text())
            if proc.poll() is not None:
                # A Ctrl-C that lands while a child is spawned reaches it too (it joins a session of its
                # own between fork and exec, and dies of the SIGINT it got before): a stop, not a failure.
                if self._stop.is_set() or (proc.returncode == -signal.SIGINT and self._stop.wait(SIGNAL_GRACE_S)):
                    raise StartInterrupted(work_dir.name)
                raise StartupError(f"{work_dir.name} exited with code {proc.returncode}{self._why(work_dir)}")
            if self._stop.wait(0.05):
                raise StartInterrupted(work_dir.name)
        raise StartupError(f"{work_dir.name} not ready after {START_TIMEOUT_S:.0f} s{self._why(work_dir)}")

    def _why(self, work_dir: pathlib.Path) -> str:
        """': <the log's last error line> (log: PATH)' for a start that failed: the launcher's
        error alone says what went wrong. A temp run dir is kept for that log."""
        log = work_dir / "log.txt"
        reason = last_error_line(log)
        kept = ", kept" if self._tmp_dir is not None else ""
        return f": {reason} (log: {log}{kept})" if reason else f" (log: {log}{kept})"

    def stop(self, *, keep_run_dir: bool = False) -> None:
        """SIGTERM the nodes, then the bootstrap DHT peer (the nodes withdraw their records through
        it, for peers that joined from elsewhere); SIGKILL what is left after the grace period; then
        remove the temp run dir unless keep_run_dir."""
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for group in (self.procs[1:], self.procs[:1]):
            for proc in group:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in group:
                try:
                    proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    logger.warning("pid %d did not stop in %.0f s; killing it", proc.pid, STOP_TIMEOUT_S)
                _kill_group(proc)
        if self._tmp_dir is not None and not keep_run_dir:
            shutil.rmtree(self._tmp_dir, ignore_errors=True)
        self._tmp_dir = None


def _read_ready(work_dir: pathlib.Path) -> dict | None:
    try:
        return json.loads((work_dir / "ready.json").read_text())
    except (OSError, ValueError):  # not written yet (it is written atomically: never half)
        return None


# A line that says why a child stopped: our CLI's one-line error, an exception (a traceback's last
# line), or a logged error; hivemind's own log lines look like "Nov 23 20:25:28.986 [ERROR] ...".
_ERROR_LINE = re.compile(r"^moeswarm\b.*|^[\w.]+(Error|Exception|Interrupt)\b.*|.*(\bERROR\b|\bCRITICAL\b|\[ERROR\]).*")
LOG_TAIL_BYTES = 16384


def last_error_line(log: pathlib.Path) -> str | None:
    """The last line of the log's tail that says why its process stopped (else its last line),
    without our CLI's "moeswarm: " prefix; None for a missing or empty log."""
    try:
        with open(log, "rb") as file:
            file.seek(max(0, file.seek(0, os.SEEK_END) - LOG_TAIL_BYTES))
            lines = [line.strip() for line in file.read().decode(errors="replace").splitlines() if line.strip()]
    except OSError:
        return None
    line = next((line for line in reversed(lines) if _ERROR_LINE.match(line)), lines[-1] if lines else None)
    return line.removeprefix("moeswarm: ") if line else None


def _node_args(node_dir: pathlib.Path) -> list[str]:
    return ["node", "--config", str(node_dir / "node.yaml"), "--ready-file", str(node_dir / "ready.json")]


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill the node's process group, even if the node died first. Its DHT child and p2pd, in a group of
    their own (protocol/dht.py), stop by themselves within about 1 s of the node's end."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def format_placement(ready: list[dict]) -> str:
    """Expert -> endpoints table from what the nodes reported when they became ready."""
    endpoints: dict[str, list[str]] = {}
    for node in ready:
        for uid in node["uids"]:
            endpoints.setdefault(uid, []).append(node["endpoint"])
    lines = [f"{'expert':<24} endpoints"]
    lines += [f"{uid:<24} {', '.join(endpoints[uid])}" for uid in sorted(endpoints, key=uid_sort_key)]
    return "\n".join(lines)


@dataclasses.dataclass
class _Watch:
    restarts: list[float] = dataclasses.field(default_factory=list)  # monotonic times of its restarts
    restart_at: float | None = None  # when to start it again
    starting: bool = False  # restarted, not ready yet
    left_down: bool = False


@dataclasses.dataclass(frozen=True)
class _Child:
    """A process swarm up keeps running: how to see it is back, and how to start it again."""

    name: str  # "node 0", "the bootstrap DHT peer"
    proc: subprocess.Popen
    log: pathlib.Path
    ready: Callable[[], dict | None]
    where: Callable[[dict], str]  # its address, from what ready() returned
    restart: Callable[[], None]


def _children(swarm: LocalSwarm) -> list[_Child]:
    children = [_Child("the bootstrap DHT peer", swarm.procs[0], swarm.dht_dir / "log.txt", swarm.dht_ready,
                       lambda ready: ready["maddrs"][0], swarm.restart_dht)]
    for i, proc in enumerate(swarm.nodes):
        children.append(_Child(f"node {i}", proc, swarm.node_dir(i) / "log.txt", functools.partial(swarm.node_ready, i),
                               lambda ready: ready["endpoint"], functools.partial(swarm.restart_node, i)))
    return children


def watch_until_signal(swarm: LocalSwarm, stop: threading.Event | StopFlag) -> None:
    """Block until `stop` is set. A node or the bootstrap DHT peer that exits is started again
    (a node from its checkpoint, the DHT peer at its old address) after 1, 2, 4 s, at most
    RESTART_LIMIT times in RESTART_WINDOW_S; past that, or with restarts off (--no-restart), it is
    reported and left down."""
    watches: dict[str, _Watch] = {}
    while not stop.wait(0.5):
        for child in _children(swarm):
            _watch_child(child, watches.setdefault(child.name, _Watch()), time.monotonic(), swarm.plan.restart_nodes)


def _watch_child(child: _Child, watch: _Watch, now: float, restart: bool) -> None:
    if watch.starting and child.proc.poll() is None and (ready := child.ready()) is not None:
        watch.starting = False
        logger.warning("%s is back: %s", child.name, child.where(ready))
    if child.proc.poll() is None or watch.left_down:
        return
    if watch.restart_at is None:
        watch.starting = False
        watch.restarts = [t for t in watch.restarts if now - t < RESTART_WINDOW_S]
        if not restart or len(watch.restarts) >= RESTART_LIMIT:
            why = "--no-restart" if not restart else f"restarted {RESTART_LIMIT} times in {RESTART_WINDOW_S / 60:.0f} min"
            logger.warning("%s exited with code %s; leaving it down (%s); see %s", child.name, child.proc.returncode, why, child.log)
            watch.left_down = True
            return
        delay = 2 ** len(watch.restarts)
        logger.warning("%s exited with code %s; starting it again in %d s; see %s", child.name, child.proc.returncode, delay, child.log)
        watch.restart_at = now + delay
    elif now >= watch.restart_at:
        child.restart()
        watch.restarts.append(now)
        watch.restart_at, watch.starting = None, True


def lock_run_dir(run_dir: pathlib.Path):
    """Make --run-dir if missing and lock it while this process lives (returns the open lock file):
    a second swarm up on it would start a DHT peer on the same key and overwrite the first one's
    ready files and logs. ConfigError, before anything in it is touched, if it is taken or not a folder."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--run-dir {run_dir} is a file, not a folder")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        return hold_lock(
            run_dir / RUN_DIR_LOCK,
            lambda pid: f"--run-dir {run_dir} is in use by another swarm up (pid {pid}); stop it first, or give another --run-dir",
        )
    except OSError as e:
        raise ConfigError(f"--run-dir {run_dir}: {e.strerror or e}") from e


def swarm_up(args) -> int:
    """CLI body of `moeswarm swarm up`: start, print where to connect, wait for Ctrl-C or SIGTERM.
    Returns 0 once stopped; 130 if a Ctrl-C came before the swarm was up (0 for a SIGTERM)."""
    stop = StopFlag().install()  # first: a Ctrl-C while the plan is made stops the start before it begins
    lock = lock_run_dir(pathlib.Path(args.run_dir)) if args.run_dir else contextlib.nullcontext()
    with lock, tempfile.TemporaryDirectory(prefix="moeswarm-model-") as scratch:
        return _run_swarm(plan_from_args(args, pathlib.Path(scratch)), stop)


def _run_swarm(plan: SwarmPlan, stop: StopFlag) -> int:
    spec = plan.model
    n_uids = len(plan.uids or spec.all_uids())
    source = f"from {plan.model_dir}" if plan.model_dir else f"seed {plan.seed}"
    print(f"starting {plan.nodes} nodes: {n_uids} experts of {spec.name} ({source}), {plan.replicas} replicas each", flush=True)
    started = time.monotonic()
    try:
        with LocalSwarm(plan, stop=stop) as swarm:
            _print_started(plan, swarm, time.monotonic() - started)
            watch_until_signal(swarm, stop)
            print("stopping the swarm...", flush=True)
    except StartInterrupted as e:
        print(f"stopped while {e} was starting", flush=True)
        return exit_code_when_stopped(stop.signals)
    print("stopped", flush=True)
    return 0


def _print_started(plan: SwarmPlan, swarm: LocalSwarm, took_s: float) -> None:
    spec = plan.model
    print(f"swarm up in {took_s:.1f} s", flush=True)
    print(format_placement(swarm.ready), flush=True)
    print(describe_pinning(plan), flush=True)
    peer = swarm.initial_peers[0]
    print(f"\ninitial peers: {peer}", flush=True)
    print(f"try:  moeswarm status --initial-peers {peer}", flush=True)
    if plan.model_dir:
        from moeswarm.model.hf_spec import default_model_name

        hf = is_hf_checkpoint(plan.model_dir)
        name = f" --model-name {spec.name}" if hf and spec.name != default_model_name(plan.model_dir) else ""
        print(f'      moeswarm generate --initial-peers {peer} --model {plan.model_dir}{name} --prompt "def "', flush=True)
        if hf:
            print(f"      python: moeswarm.model.from_pretrained({plan.model_dir!r}, name={spec.name!r}, initial_peers=[{peer!r}])")
    print("Ctrl-C stops the swarm", flush=True)
