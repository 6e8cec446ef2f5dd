"""Real moeswarm processes for integration tests: spawn, wait until ready (bounded), reap the group."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from typing import Sequence

import yaml

READY_TIMEOUT_S = 60.0


@dataclasses.dataclass
class Proc:
    popen: subprocess.Popen
    work_dir: pathlib.Path
    ready: dict

    @property
    def log(self) -> str:
        return (self.work_dir / "log.txt").read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL the process group and every descendant (a DHT child and its p2pd have a group of
        their own; they would also stop by themselves once their parent is gone, within about 1 s)."""
        for pid in process_tree(self.popen.pid) - {self.popen.pid}:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait(10)


def spawn(work_dir: pathlib.Path, *args: str, prefix: Sequence[str] = ()) -> subprocess.Popen:
    """`moeswarm ARGS` with its output in work_dir/log.txt. prefix: a command that runs it, e.g.
    netns.Host.prefix (`ip netns exec NAME`, which execs it: the pid stays the moeswarm process's)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / "ready.json").unlink(missing_ok=True)
    cmd = [*prefix, sys.executable, "-m", "moeswarm.deploy.cli", *args, "--ready-file", str(work_dir / "ready.json")]
    if args[0] in ("node", "dht"):  # a pytest killed mid-run (a CI timeout, a second Ctrl-C) leaves no node behind
        cmd.append("--exit-with-parent")
    with open(work_dir / "log.txt", "ab") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(popen: subprocess.Popen, work_dir: pathlib.Path, timeout_s: float = READY_TIMEOUT_S) -> dict:
    ready_file = work_dir / "ready.json"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready_file.exists():
            return json.loads(ready_file.read_text())
        if popen.poll() is not None:
            log = (work_dir / "log.txt").read_text(errors="replace")
            raise RuntimeError(f"process exited with {popen.returncode} before ready:\n{log[-3000:]}")
        time.sleep(0.05)
    raise TimeoutError(f"not ready after {timeout_s} s")


def start_dht_peer(work_dir: pathlib.Path, *args: str, prefix: Sequence[str] = ()) -> Proc:
    popen = spawn(work_dir, "dht", *args, prefix=prefix)
    try:
        return Proc(popen, work_dir, wait_ready(popen, work_dir))
    except BaseException:
        Proc(popen, work_dir, {}).kill()
        raise


def node_args(work_dir: pathlib.Path, config: dict) -> tuple[str, ...]:
    """`moeswarm node` arguments for `config`, written to work_dir/node.yaml."""
    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / "node.yaml").write_text(yaml.safe_dump(config))
    return "node", "--config", str(work_dir / "node.yaml")


def start_node(work_dir: pathlib.Path, config: dict, prefix: Sequence[str] = (), timeout_s: float = READY_TIMEOUT_S) -> Proc:
    popen = spawn(work_dir, *node_args(work_dir, config), prefix=prefix)
    try:
        return Proc(popen, work_dir, wait_ready(popen, work_dir, timeout_s))
    except BaseException:
        Proc(popen, work_dir, {}).kill()
        raise


def process_tree(pid: int) -> set[int]:
    """pid and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    tree, stack = set(), [pid]
    while stack:
        current = stack.pop()
        tree.add(current)
        stack.extend(children.get(current, []))
    return tree


def alive(pids: set[int]) -> set[int]:
    """Those pids that still exist and are not zombies."""
    living = set()
    for pid in pids:
        try:
            state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            living.add(pid)
    return living


def processes_mentioning(text: str) -> set[int]:
    """Live pids whose command line contains `text` (a run dir: the processes of one swarm, forked
    DHT children and p2pd daemons included, wherever they were reparented)."""
    found = set()
    for entry in pathlib.Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text.encode() in (entry / "cmdline").read_bytes():
                found.add(int(entry.name))
        except OSError:  # gone meanwhile
            continue
    return alive(found)


def run(coro, timeout_s: float = 30.0):
    """Run one client coroutine with a bound, so a hang fails the test instead of freezing it."""
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


def wait_for(predicate, timeout_s: float = 20.0, what: str = "condition"):
    """Poll predicate() every 0.1 s until it returns something true (returned); TimeoutError after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError(f"{what} not met within {timeout_s} s")


async def probe(endpoint: str, model: str, uid: str, x):
    """(Forward output of `uid` on x, {uid: version} from Info) of the node at endpoint, the output
    computed at those versions: Info is read before and after the Forward, again until both agree (a
    node taking a replica's weights between the two calls would pair old outputs with the new version)."""
    from moeswarm.model.expert_client import ExpertClient

    client = ExpertClient(endpoint)
    try:
        versions = await _versions(client)
        for _ in range(10):
            out = await client.forward(model, {uid: x}, timeout_s=10)
            versions, before = await _versions(client), versions
            if versions == before:
                return out[uid], versions
        raise AssertionError(f"{endpoint}: expert versions changed at every one of 10 probes")
    finally:
        await client.close()


async def _versions(client) -> dict[str, int]:
    info = await client.info(timeout_s=10)
    return {state.uid: state.version for state in info.experts}


async def train_step(endpoint: str, model: str, uid: str, x, grad_y):
    """One Backward (the node steps if it is due), then probe()."""
    from moeswarm.model.expert_client import ExpertClient

    client = ExpertClient(endpoint)
    try:
        await client.backward(model, {uid: x}, {uid: grad_y}, timeout_s=10)
    finally:
        await client.close()
    return await probe(endpoint, model, uid, x)


def read_until(proc: subprocess.Popen, output, marker: str, timeout_s: float) -> str:
    """Re-read the process's output file until `marker` appears; bounded by timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = output.read_text()
        if marker in text or proc.poll() is not None:
            break
        time.sleep(0.1)
    assert marker in text, f"swarm did not come up:\n{text}"
    return text


class ProcGroup:
    """Processes started in parallel (spawn all, then wait for all) and reaped together."""

    def __init__(self):
        self.procs: list[Proc] = []

    def add(self, proc: Proc) -> Proc:
        self.procs.append(proc)
        return proc

    def spawn(self, work_dir: pathlib.Path, *args: str, prefix: Sequence[str] = ()) -> Proc:
        return self.add(Proc(spawn(work_dir, *args, prefix=prefix), work_dir, {}))

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        for proc in self.procs:
            if not proc.ready:
                proc.ready = wait_ready(proc.popen, proc.work_dir, timeout_s)

    def kill(self) -> None:
        for proc in self.procs:
            proc.kill()
