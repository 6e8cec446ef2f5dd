"""Benchmark of a node's checkpoints: what clients and memory see while a node with big experts saves,
and what a restart from its state_dir costs.

A node (real process, with a DHT) hosts 8 SwiGLU experts (1024x4096 fp32, Adam; --quick: 512x2048)
and a state_dir. A client trains each expert once (a backward: gradients and an Adam step), then calls
one of them at batch 1 in a loop until the node's next checkpoint has been written, and 1 s more.
Calls that started before the checkpoint are the baseline; calls that overlapped it (its window comes
from the node's log) are compared with it. Figures:
  * batch-1 latency, median and max, before and during the checkpoint; max during / median before;
  * the checkpoint's duration and how many experts it wrote;
  * the node's peak RSS rise while checkpointing, against the state it holds (weights + Adam moments);
  * after SIGTERM, a fresh node on the same state_dir: seconds to ready, and its RSS against the
    first node's RSS before its checkpoint.
No target: the issues set none. Run, with moeswarm importable (installed, or on PYTHONPATH):
    python bench/checkpoint.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import re
import signal
import sys
import tempfile
import time

import yaml

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from common import Children, figure, finish, machine_info, median, print_load, wait_ready  # noqa: E402
from echo_server import run_event_loop  # noqa: E402

SIZES = ({"d_model": 1024, "d_ff": 4096}, {"d_model": 512, "d_ff": 2048})  # full, quick
N_EXPERTS = 8
CHECKPOINT_INTERVAL_S = (10.0, 6.0)  # the first checkpoint comes this long after the node starts
CALL_TIMEOUT_S = 60.0
AFTER_S = 1.0  # calls kept after the checkpoint was written
WARMUP_CALLS = 20  # the first calls after training (the expert's first forward, its due step) are not timed
WRITTEN = re.compile(r"^(\S+ \S+) INFO moeswarm\.node\.node: checkpoint written: (\d+) of \d+ experts .* in ([\d.]+) s$", re.M)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller experts, a shorter wait (under a minute)")
    parser.add_argument("--json", metavar="PATH", help="also write every figure and the machine info here")
    args = parser.parse_args()
    pick = 1 if args.quick else 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the `finally` blocks that reap children
    started, load_before = time.monotonic(), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="moeswarm-bench-") as tmp, Children(pathlib.Path(tmp)) as children:
        figures, details = measure(children, pathlib.Path(tmp), pick)
    finish(figures, details, load_before, started, args.quick, args.json, report, print_load)
    return 0


def report(figures, details: dict, quick: bool) -> dict:
    sizes = {"expert": SIZES[1 if quick else 0], "experts": N_EXPERTS, "dtype": "float32", "optimizer": "adam"}
    return {
        "benchmark": "checkpoint", "quick": quick, "machine": machine_info(), "sizes": sizes,
        "figures": {f.key: {"value": f.value, "unit": f.unit} for f in figures}, "details": details,
    }


def measure(children: Children, work: pathlib.Path, pick: int):
    model = dict(name="ckpt", n_layers=1, n_experts=N_EXPERTS, **SIZES[pick])
    ready = work / "dht.json"
    cmd = [sys.executable, "-m", "moeswarm.deploy.cli", "dht", "--ready-file", str(ready), "--exit-with-parent"]
    peers = wait_ready(ready, children.spawn(cmd, "dht"), "bootstrap DHT")["maddrs"]
    config = dict(
        model=model, experts="all", initial_peers=peers, state_dir=str(work / "state"), torch_threads=1,
        checkpoint_interval_s=CHECKPOINT_INTERVAL_S[pick], optimizer=dict(name="adam", lr=1e-4, update_every=1),
    )
    (work / "node.yaml").write_text(yaml.safe_dump(config))
    node, endpoint = start_node(children, work, "node1")
    calls, rss_before = run_event_loop(train_then_call(node, work / "node1.log", endpoint, model))
    rss_peak = status_mib(node.pid, "VmHWM")
    log = (work / "node1.log").read_text()
    stamp, count, duration = next(WRITTEN.finditer(log)).groups()
    end = datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
    window = (end - float(duration), end)
    before = [s for t, s in calls if t + s < window[0]]
    during = [s for t, s in calls if t < window[1] and t + s > window[0]]
    state_mib = N_EXPERTS * 3 * 3 * model["d_model"] * model["d_ff"] * 4 / 2**20  # 3 matrices x (weight, 2 Adam moments)
    children.stop(node)

    restart_started = time.perf_counter()
    restarted, _ = start_node(children, work, "node2")
    restart_s = time.perf_counter() - restart_started
    rss_restarted = status_mib(restarted.pid, "VmRSS")
    resumed = "resumed 8 of 8 experts" in (work / "node2.log").read_text()
    children.stop(restarted)
    if not resumed:
        raise RuntimeError(f"the restarted node did not resume its experts; see {work / 'node2.log'}")
    figures = [
        figure("b1_median_before_ms", "batch-1 forward before the checkpoint, median", median(before) * 1e3, "ms"),
        figure("b1_max_before_ms", "batch-1 forward before the checkpoint, max", max(before) * 1e3, "ms"),
        figure("b1_median_during_ms", "batch-1 forward during the checkpoint, median", median(during) * 1e3, "ms"),
        figure("b1_max_during_ms", "batch-1 forward during the checkpoint, max", max(during) * 1e3, "ms"),
        figure("b1_max_during_ratio", "max during / median before", max(during) / median(before), "x"),
        figure("checkpoint_s", f"checkpoint of {count} experts, duration", float(duration), "s"),
        figure("state_mib", "expert state held (weights + Adam moments)", state_mib, "MiB"),
        figure("rss_rise_mib", "peak RSS rise while checkpointing", rss_peak - rss_before, "MiB"),
        figure("rss_rise_ratio", "peak RSS rise / state held", (rss_peak - rss_before) / state_mib, "x"),
        figure("restart_ready_s", "restart on the state_dir: launch to ready", restart_s, "s"),
        figure("restart_rss_ratio", "RSS after the restart / before the checkpoint", rss_restarted / rss_before, "x"),
    ]
    details = {"calls_before": len(before), "calls_during": len(during), "rss_mib": {
        "before_checkpoint": rss_before, "peak": rss_peak, "after_restart": rss_restarted}}
    return figures, details


def start_node(children: Children, work: pathlib.Path, name: str):
    ready = work / f"{name}.json"
    cmd = [sys.executable, "-m", "moeswarm.deploy.cli", "node", "--config", str(work / "node.yaml"),
           "--ready-file", str(ready), "--exit-with-parent"]
    proc = children.spawn(cmd, name)
    return proc, wait_ready(ready, proc, name)["endpoint"]


async def train_then_call(node, log: pathlib.Path, endpoint: str, model: dict):
    """Train every expert once, then batch-1 forwards until the checkpoint is written (and AFTER_S
    more): [(wall start time, seconds)], and the node's peak RSS before the checkpoint."""
    import torch

    from moeswarm.model.expert_client import ExpertClient

    client = ExpertClient(endpoint)
    try:
        for i in range(N_EXPERTS):
            uid = f"ckpt.L0.E{i}"
            x = torch.randn(4, model["d_model"])
            await client.backward("ckpt", {uid: x}, {uid: torch.randn_like(x)}, timeout_s=CALL_TIMEOUT_S)
        if "checkpoint written" in log.read_text():
            raise RuntimeError("the checkpoint came before training finished: raise CHECKPOINT_INTERVAL_S")
        rss_before = status_mib(node.pid, "VmHWM")
        x, calls, written_at = torch.randn(1, model["d_model"]), [], None
        while written_at is None or time.monotonic() - written_at < AFTER_S:
            started, clock = time.time(), time.perf_counter()
            await client.forward("ckpt", {"ckpt.L0.E0": x}, timeout_s=CALL_TIMEOUT_S)
            calls.append((started, time.perf_counter() - clock))
            if written_at is None and len(calls) % 20 == 0 and "checkpoint written" in log.read_text():
                written_at = time.monotonic()
        return calls[WARMUP_CALLS:], rss_before
    finally:
        await client.close()


def status_mib(pid: int, field: str) -> float:
    """A /proc/PID/status memory field (VmRSS, VmHWM) in MiB."""
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for pid {pid}")


if __name__ == "__main__":
    sys.exit(main())
