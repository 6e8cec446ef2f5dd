"""Shared benchmark helpers: child processes reaped in `finally`, /proc accounting, percentiles,
machine info, the PASS/MISS table and the JSON report."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import logging
import os
import pathlib
import platform
import signal
import subprocess
import sys
import time

START_TIMEOUT_S = 60.0  # a child that has not written its ready file by then failed to start
STOP_GRACE_S = 6.0  # SIGTERM, then SIGKILL the whole group after this
POLL_S = 0.05


@dataclasses.dataclass(frozen=True)
class Figure:
    key: str  # JSON key, e.g. "latency_b1_median_ms"
    label: str  # what the table shows
    value: float
    unit: str
    target: str = ""  # e.g. ">= 0.70"; empty: reported for context only
    passed: bool | None = None


def figure(key: str, label: str, value: float, unit: str, *, at_least: float | None = None, at_most: float | None = None) -> Figure:
    if at_least is not None:
        return Figure(key, label, value, unit, f">= {at_least:g}", value >= at_least)
    if at_most is not None:
        return Figure(key, label, value, unit, f"<= {at_most:g}", value <= at_most)
    return Figure(key, label, value, unit)


def quantile(values: list[float], q: float) -> float:
    """Linear-interpolated quantile (q in [0, 1]) of a non-empty list."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def median(values: list[float]) -> float:
    return quantile(values, 0.5)


def stats_ms(seconds: list[float]) -> dict:
    """n, min, median, p90, p99, max of a non-empty list of seconds, in milliseconds."""
    return {"n": len(seconds), "min": min(seconds) * 1e3, "median": median(seconds) * 1e3,
            "p90": quantile(seconds, 0.9) * 1e3, "p99": quantile(seconds, 0.99) * 1e3, "max": max(seconds) * 1e3}


def time_call(call) -> float:
    """Seconds one synchronous call takes."""
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def time_within(call, budget_s: float, max_calls: int) -> list[float]:
    """Time calls until budget_s has passed or max_calls were made (at least one call)."""
    seconds = []
    start = time.perf_counter()
    while len(seconds) < max_calls and (not seconds or time.perf_counter() - start < budget_s):
        seconds.append(time_call(call))
    return seconds


class LogCapture(logging.Handler):
    """Keeps (perf_counter, message) of each record at WARNING and above; attach it to a logger."""

    def __init__(self, level: int = logging.WARNING):
        super().__init__(level)
        self.messages: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append((time.perf_counter(), record.getMessage()))


def print_table(figures: list[Figure]) -> None:
    print(f"\n{'figure':<44} {'value':>12} {'unit':<6} {'target':>9}  result")
    for fig in figures:
        result = "-" if fig.passed is None else ("PASS" if fig.passed else "MISS")
        value = f"{int(fig.value)}" if float(fig.value).is_integer() else f"{fig.value:.3f}"
        print(f"{fig.label:<44} {value:>12} {fig.unit:<6} {fig.target or '-':>9}  {result}")


def package_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info() -> dict:
    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "versions": {dist: package_version(dist) for dist in ("torch", "grpcio", "hivemind", "protobuf", "uvloop", "moeswarm")},
        "moeswarm_commit": _source_commit(),
    }


def _source_commit() -> str | None:
    """Git commit of the moeswarm sources imported here (None outside a checkout)."""
    spec = importlib.util.find_spec("moeswarm.protocol")
    if spec is None or spec.origin is None:
        return None
    source = pathlib.Path(spec.origin).resolve().parent
    done = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    return done.stdout.strip() or None


def write_json(path: str, report: dict) -> None:
    target = pathlib.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(target.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, target)


def write_ready(path: str, data: dict) -> None:
    """Atomic write, so a poller never reads half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as file:
        file.write(json.dumps(data))
    os.replace(tmp, path)


def _parent_pids() -> dict[int, int]:
    """pid -> ppid for every process visible in /proc."""
    parents = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = pathlib.Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # exited while we walked
            continue
        # the command name may hold spaces and parentheses: fields resume after the last ')'
        parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    return parents


def process_tree(root_pid: int) -> list[int]:
    """root_pid and all its descendants (breadth first)."""
    children: dict[int, list[int]] = {}
    for pid, ppid in _parent_pids().items():
        children.setdefault(ppid, []).append(pid)
    tree = [root_pid]
    for pid in tree:  # grows while we iterate; bounded by the number of processes
        tree.extend(children.get(pid, []))
    return tree


def kill_descendants() -> None:
    """SIGKILL and reap whatever this process still has running below it."""
    for pid in process_tree(os.getpid())[1:]:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            continue
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:  # a grandchild: its own parent or init reaps it
            pass


def memory_of(pid: int) -> dict:
    """Name, RSS and PSS (KiB) of one process, from /proc/PID/comm and smaps_rollup."""
    usage = {"pid": pid, "name": pathlib.Path(f"/proc/{pid}/comm").read_text().strip(), "rss_kib": 0, "pss_kib": 0}
    for line in pathlib.Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("Rss", "Pss"):
            usage[f"{key.lower()}_kib"] = int(rest.split()[0])
    return usage


def wait_ready(path: pathlib.Path, proc: subprocess.Popen, what: str, timeout_s: float = START_TIMEOUT_S) -> dict:
    """Wait for a child's ready file; raise RuntimeError naming its log if it dies or times out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists():
            return json.loads(path.read_text())
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}; see {path.with_suffix('.log')}")
        time.sleep(POLL_S)
    raise RuntimeError(f"{what} not ready after {timeout_s:.0f} s; see {path.with_suffix('.log')}")


class Children:
    """Child processes, each in its own session; their descendants (a DHT child and its p2pd have a
    process group of their own) are recorded when stopping and killed too.
    Use as a context manager: on exit every child group is terminated, then killed."""

    def __init__(self, work_dir: pathlib.Path):
        self.work_dir = work_dir
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> "Children":
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()

    def spawn(self, cmd: list[str], name: str) -> subprocess.Popen:
        """Start `cmd`; its stdout and stderr go to WORK_DIR/NAME.log."""
        with open(self.work_dir / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM the process (it stops its own DHT), SIGKILL its group and leftovers after grace_s."""
        self._stop([proc], grace_s)

    def stop_all(self) -> None:
        self._stop([proc for proc in self.procs if proc.returncode is None], STOP_GRACE_S)

    def _stop(self, procs: list[subprocess.Popen], grace_s: float) -> None:
        trees = {proc.pid: [(pid, _start_time(pid)) for pid in process_tree(proc.pid)[1:]] for proc in procs}
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                if grace_s > 0:  # (0: killed at once on purpose)
                    print(f"bench: pid {proc.pid} did not stop in {grace_s:.0f} s; killing it", file=sys.stderr)
            _kill_group(proc, trees[proc.pid])
            self.procs.remove(proc)


def _start_time(pid: int) -> str | None:
    """Start time in clock ticks (field 22 of /proc/PID/stat): tells a recycled pid from ours."""
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except OSError:
        return None


def _kill_group(proc: subprocess.Popen, descendants: list[tuple[int, str | None]]) -> None:
    """SIGKILL the session's group, then any recorded descendant that left it and is still the same process."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for pid, started in descendants:
        if started is not None and _start_time(pid) == started:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    proc.wait()


def finish(figures, details: dict, load_before, started: float, quick: bool, json_path: str | None, report, print_context) -> None:
    """Print the table and context, and write the JSON report if asked."""
    details["loadavg_1_5_15"] = {"before": load_before, "after": os.getloadavg()}
    print_table(figures)
    print_context(details)
    print(f"(total {time.monotonic() - started:.1f} s; {'quick' if quick else 'full'} run)")
    if json_path:
        write_json(json_path, report(figures, details, quick))


def print_greedy_check(details: dict, batches, what: str) -> None:
    """Loud line for every batch whose greedy tokens differed from the reference's."""
    for batch in batches:
        check = details[f"b{batch}_greedy_check"]
        if check["differing_tokens"]:
            print(f"!!! FAILED b{batch}: {what}: {check['differing_tokens']} tokens; first at {check['first_difference']}")


def print_load(details: dict) -> None:
    load = details["loadavg_1_5_15"]
    print(f"load average before {load['before'][0]:.2f}, after {load['after'][0]:.2f} on {os.cpu_count()} CPUs")


class Progress:
    """print(f"[elapsed] message") from a fixed start, flushed (long benchmark phases)."""

    def __init__(self):
        self.started = time.monotonic()

    def __call__(self, message: str) -> None:
        print(f"[{time.monotonic() - self.started:5.1f} s] {message}", flush=True)
