"""Benchmark of one expert node: call latency, payload bandwidth, launch-to-visible, processes, memory.

Measured, all on 127.0.0.1 with a bootstrap DHT process and node processes started here:
  * latency of one ExpertClient.forward (grpc.aio, uvloop when installed) to a node hosting one
    expert (h=256, F=1024, fp32), at batch 1, 64 and 256 rows: median, p90, p99; at batch 1 also
    against its floors (raw echoes, a d_ff=1 expert) and to a second node serving the same expert
    with busy_poll_us=2000 (node/busy_poll.py; off by default, so the target figure is the first node's);
  * payload bandwidth: round trips carrying a 1 MiB fp32 tensor [1024, 256] each way to a node whose
    expert has d_ff=1 (compute negligible: transport + codec + validation; ExpertClient sends it on
    its open Stream call), against a raw grpc.aio unary echo of 1 MiB of bytes served by a separate
    process (generic handler, no serialisation), and for context the same echo on an open stream;
    calls alternate in blocks so all see the same machine noise; MB/s counts both directions;
  * launch-to-visible: from Popen of a fresh node until find_experts() on a client DHT in this
    process returns its expert (polled every 50 ms, at most 60 s);
  * processes and memory of a node's tree (node, its DHT child, p2pd): count, RSS, PSS;
  * for context, in a fresh interpreter (timed inside it): `import torch`, `import hivemind`,
    `import moeswarm.node.node`, and the first step of torch.optim.Adam (it imports torch._dynamo) and
    of NodeAdam, the nodes' own (it does not).

Targets: batch-1 median <= 0.6 ms, bandwidth ratio moeswarm/raw >= 0.70, launch-to-visible median <= 2.0 s, <= 3 processes.
Run, with moeswarm importable (installed, or on PYTHONPATH):
    python bench/node_call.py [--quick] [--json out.json]
--quick takes under a minute on a 2-core machine; the full run about a minute or two.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import pathlib
import re
import signal
import subprocess
import sys
import tempfile
import time

import yaml

from moeswarm.protocol.malloc import keep_freed_memory

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from echo_server import ECHO_METHOD, GRPC_OPTIONS, STREAM_ECHO_METHOD, run_event_loop, spawn_echo  # noqa: E402
from common import (  # noqa: E402  (bench/ is a folder of scripts, not a package)
    finish,
    POLL_S,
    Children,
    Figure,
    figure,
    kill_descendants,
    machine_info,
    median,
    memory_of,
    process_tree,
    quantile,
    wait_ready,
)

MODEL = dict(name="bench", d_model=256, d_ff=1024, n_layers=1, n_experts=8)
BW_MODEL = dict(name="bench-bw", d_model=256, d_ff=1, n_layers=1, n_experts=1)
LATENCY_UID = "bench.L0.E0"  # launches host E1, E2, ... so each one is a key nobody announced yet
BW_UID = "bench-bw.L0.E0"
PAYLOAD_ROWS = 1024  # [1024, 256] fp32 = 1 MiB
BUSY_POLL_US = 2000  # a second node serving the latency expert polls this long after each answer (config busy_poll_us)
CALL_TIMEOUT_S = 30.0
VISIBLE_TIMEOUT_S = 60.0
# (full, --quick)
LATENCY_CALLS = {1: (500, 100), 64: (300, 60), 256: (200, 40)}
WARMUP_CALLS = (20, 10)
BANDWIDTH_CALLS = (200, 50)  # per side; run in alternating blocks of BANDWIDTH_BLOCK
BANDWIDTH_BLOCK = 10
LAUNCHES = (3, 2)
IMPORT_REPEATS = (3, 1)
# name -> (untimed setup, timed statement, table label), each in a fresh interpreter
IMPORTS = {
    "import_torch": ("", "import torch", "import torch"),
    "import_hivemind": ("", "import hivemind", "import hivemind (includes torch)"),
    "import_moeswarm_node": (
        "", "from moeswarm.protocol.dht import import_dht_only; import_dht_only(); import moeswarm.node.node",
        "import moeswarm.node.node (as a node)",
    ),
    "first_adam": (
        "import torch; p = [torch.nn.Parameter(torch.zeros(1))]; p[0].grad = torch.ones(1)",
        "torch.optim.Adam(p, fused=True).step()", "first torch.optim.Adam step (after torch)",
    ),
    "first_node_adam": (
        "import torch; from moeswarm.node.optimizers import NodeAdam; p = [torch.nn.Parameter(torch.zeros(1))]; p[0].grad = torch.ones(1)",
        "NodeAdam(p, lr=1e-3).step()", "first NodeAdam step, a node's (after torch)",
    ),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls and launches (under a minute)")
    parser.add_argument("--json", metavar="PATH", help="also write every figure and the machine info here")
    args = parser.parse_args()
    # Same allocator settings as a node (protocol/malloc.py) for this client and the echo server,
    # so the comparison is transport against transport.
    keep_freed_memory()
    pick = 1 if args.quick else 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the `finally` blocks that reap children
    started = time.monotonic()
    load_before = os.getloadavg()
    figures, details = measure_imports(IMPORT_REPEATS[pick])
    try:
        with tempfile.TemporaryDirectory(prefix="moeswarm-bench-") as tmp:
            swarm_figures, swarm_details = run_swarm(pathlib.Path(tmp), pick)
    finally:
        kill_descendants()  # what libraries started here: torch_shm_manager (hivemind's MPFuture)
    figures += swarm_figures
    details.update(swarm_details)
    finish(figures, details, load_before, started, args.quick, args.json, report, print_context)
    return 0


def print_context(details: dict) -> None:
    tree = ", ".join(f"{p['name']} ({p['rss_kib'] // 1024} MiB RSS)" for p in details["node_processes"])
    print(f"\nnode process tree: {tree}")
    visible = ", ".join(f"{sample['visible_s']:.2f}" for sample in details["launches"])
    print(f"launch to visible, each run: {visible} s")
    load = details["loadavg_1_5_15"]
    print(f"load average before {load['before'][0]:.2f}, after {load['after'][0]:.2f} on {os.cpu_count()} CPUs")


def report(figures: list[Figure], details: dict, quick: bool) -> dict:
    sizes = {
        "model": MODEL, "bandwidth_model": BW_MODEL, "dtype": "float32",
        "payload_bytes": PAYLOAD_ROWS * BW_MODEL["d_model"] * 4,
        "latency_calls": {b: n[1 if quick else 0] for b, n in LATENCY_CALLS.items()},
        "bandwidth_calls_per_side": BANDWIDTH_CALLS[1 if quick else 0], "launches": LAUNCHES[1 if quick else 0],
    }
    return {
        "benchmark": "node_call", "quick": quick, "machine": machine_info(), "sizes": sizes,
        "figures": {f.key: {"value": f.value, "unit": f.unit, "target": f.target or None, "passed": f.passed} for f in figures},
        "details": details,
    }


# ---- imports ---------------------------------------------------------------------------------


def measure_imports(repeats: int) -> tuple[list[Figure], dict]:
    seconds = {key: [time_fresh(setup, stmt) for _ in range(repeats)] for key, (setup, stmt, _) in IMPORTS.items()}
    figures = [figure(f"{key}_s", IMPORTS[key][2], median(s), "s") for key, s in seconds.items()]
    return figures, {"fresh_interpreter_s": seconds}


def time_fresh(setup: str, statement: str) -> float:
    """Seconds `statement` takes in a fresh interpreter, after `setup` (timed inside it)."""
    code = f"import time\n{setup}\nt = time.perf_counter()\n{statement}\nprint(time.perf_counter() - t)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return float(done.stdout.strip().splitlines()[-1])


# ---- processes ---------------------------------------------------------------------------------


def spawn_node(children: Children, work_dir: pathlib.Path, name: str, model: dict, uids, peers: list[str], **extra):
    config = {"model": model, "experts": uids, "initial_peers": peers, "state_dir": None, "torch_threads": 1, **extra}
    (work_dir / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    ready = work_dir / f"{name}.json"
    cmd = [sys.executable, "-m", "moeswarm.deploy.cli", "node", "--config", str(work_dir / f"{name}.yaml"),
           "--ready-file", str(ready), "--exit-with-parent"]
    return children.spawn(cmd, name), ready


def run_swarm(work_dir: pathlib.Path, pick: int) -> tuple[list[Figure], dict]:
    """Start DHT, nodes and echo server; measure; stop them all (also on error)."""
    from moeswarm.protocol.dht import start_dht, stop_dht

    with Children(work_dir) as children:
        dht_ready = work_dir / "dht.json"
        cmd = [sys.executable, "-m", "moeswarm.deploy.cli", "dht", "--ready-file", str(dht_ready), "--exit-with-parent"]
        peers = wait_ready(dht_ready, children.spawn(cmd, "dht"), "bootstrap DHT")["maddrs"]
        dht = start_dht(initial_peers=peers, client_mode=True)  # before any gRPC object: hivemind forks
        try:
            node, node_ready = spawn_node(children, work_dir, "node", MODEL, [LATENCY_UID], peers)
            bw, bw_ready = spawn_node(children, work_dir, "bw", BW_MODEL, "all", peers)
            poll, poll_ready = spawn_node(children, work_dir, "poll", MODEL, [LATENCY_UID], peers, busy_poll_us=BUSY_POLL_US)
            echo, echo_ready = spawn_echo(children, work_dir)
            started = {"node": (node_ready, node, "latency node"), "bw": (bw_ready, bw, "bandwidth node"),
                       "poll": (poll_ready, poll, "busy-polling node"), "echo": (echo_ready, echo, "echo server")}
            ready = {name: wait_ready(*args) for name, args in started.items()}
            endpoints = {name: (r["endpoint"], r.get("data_endpoint")) for name, r in ready.items()}  # (gRPC, data port)
            launch = functools.partial(launch_node, children, work_dir, peers=peers, dht=dht)
            figures, details = run_event_loop(measure_async(endpoints, launch, pick))
            tree_figures, details["node_processes"] = measure_tree(node.pid)
            return figures + tree_figures, details
        finally:
            stop_dht(dht)


def measure_tree(pid: int) -> tuple[list[Figure], list[dict]]:
    usage = [memory_of(p) for p in process_tree(pid)]
    figures = [
        figure("node_processes", "node process tree (node, DHT, p2pd)", len(usage), "procs", at_most=3),
        figure("node_rss_mib", "node tree RSS", sum(u["rss_kib"] for u in usage) / 1024, "MiB"),
        figure("node_pss_mib", "node tree PSS", sum(u["pss_kib"] for u in usage) / 1024, "MiB"),
    ]
    return figures, usage


# ---- async measurements ------------------------------------------------------------------------


async def measure_async(endpoints: dict, launch, pick: int) -> tuple[list[Figure], dict]:
    from moeswarm.model.expert_client import ExpertClient

    # As a dispatcher makes them: over each node's data port; and gRPC-only ones for comparison.
    node, bw, poll = (ExpertClient(endpoint, data_endpoint=data) for endpoint, data in map(endpoints.get, ("node", "bw", "poll")))
    node_grpc, bw_grpc = ExpertClient(endpoints["node"][0]), ExpertClient(endpoints["bw"][0])
    echo = endpoints["echo"][0]
    try:
        figures, details = await measure_latency(node, pick)
        small_figures, details["batch1_breakdown"] = await measure_batch1_breakdown(node, node_grpc, bw, poll, echo, pick)
        bw_figures, details["bandwidth"] = await measure_bandwidth(bw, bw_grpc, echo, pick)
        samples = [await launch(i + 1) for i in range(LAUNCHES[pick])]
    finally:
        for client in (node, bw, poll, node_grpc, bw_grpc):
            await client.close()
    details["launches"] = samples
    visible = [s["visible_s"] for s in samples]
    figures += small_figures + bw_figures + [
        figure("launch_to_visible_median_s", "launch to visible in DHT, median", median(visible), "s", at_most=2.0),
        figure("launch_to_ready_median_s", "launch to ready file, median", median([s["ready_s"] for s in samples]), "s"),
    ]
    return figures, details


async def measure_latency(client, pick: int) -> tuple[list[Figure], dict]:
    import torch

    figures, details = [], {}
    for rows, counts in LATENCY_CALLS.items():
        x_ND = torch.randn(rows, MODEL["d_model"])
        y_ND = (await client.forward(MODEL["name"], {LATENCY_UID: x_ND}, timeout_s=CALL_TIMEOUT_S))[LATENCY_UID]
        if y_ND.shape != x_ND.shape:
            raise RuntimeError(f"node answered shape {list(y_ND.shape)} for input {list(x_ND.shape)}")
        call = functools.partial(client.forward, MODEL["name"], {LATENCY_UID: x_ND}, timeout_s=CALL_TIMEOUT_S)
        await time_calls(call, WARMUP_CALLS[pick])
        seconds = await time_calls(call, counts[pick])
        details[f"latency_b{rows}_ms"] = stats_ms(seconds)
        for name, q in (("median", 0.5), ("p90", 0.9), ("p99", 0.99)):
            value = quantile(seconds, q) * 1e3
            target = 0.6 if (rows, name) == (1, "median") else None  # the batch-1 target
            label = f"forward latency, batch {rows}, {name}"
            figures.append(figure(f"latency_b{rows}_{name}_ms", label, value, "ms", at_most=target))
    return figures, details


def stats_ms(seconds: list[float]) -> dict:
    return {"n": len(seconds), "min": min(seconds) * 1e3, "median": median(seconds) * 1e3,
            "p90": quantile(seconds, 0.9) * 1e3, "p99": quantile(seconds, 0.99) * 1e3, "max": max(seconds) * 1e3}


async def time_calls(call, n: int) -> list[float]:
    seconds = []
    for _ in range(n):
        start = time.perf_counter()
        await call()
        seconds.append(time.perf_counter() - start)
    return seconds


async def measure_batch1_breakdown(node, node_grpc, bw, poll, echo_endpoint: str, pick: int) -> tuple[list[Figure], dict]:
    """Batch-1 call against its floors, in alternating blocks: raw gRPC echo of the same 1 KiB, unary
    and on an open stream, the same Forward on an expert with d_ff=1 (our path without compute), the
    real expert (over the node's data port, as clients call it, and over gRPC's Stream, as clients
    do where a node has no data port), and the real expert on a node that busy-polls after each
    answer (config busy_poll_us)."""
    import grpc
    import torch

    x_1D = torch.randn(1, MODEL["d_model"])
    payload = x_1D.numpy().tobytes()
    channel = grpc.aio.insecure_channel(echo_endpoint, options=GRPC_OPTIONS)
    stream, stream_echo = open_stream_echo(channel, payload)
    try:
        calls = {
            "raw echo": functools.partial(channel.unary_unary(ECHO_METHOD), payload, timeout=CALL_TIMEOUT_S),
            "raw stream echo": stream_echo,
            "d_ff=1 expert": functools.partial(bw.forward, BW_MODEL["name"], {BW_UID: x_1D}, timeout_s=CALL_TIMEOUT_S),
            "real expert": functools.partial(node.forward, MODEL["name"], {LATENCY_UID: x_1D}, timeout_s=CALL_TIMEOUT_S),
            "real expert, gRPC only": functools.partial(node_grpc.forward, MODEL["name"], {LATENCY_UID: x_1D}, timeout_s=CALL_TIMEOUT_S),
            f"real expert, node busy_poll_us={BUSY_POLL_US}": functools.partial(
                poll.forward, MODEL["name"], {LATENCY_UID: x_1D}, timeout_s=CALL_TIMEOUT_S
            ),
        }
        seconds = await alternate(calls, BANDWIDTH_CALLS[pick] * 4, WARMUP_CALLS[pick])
    finally:
        stream.cancel()
        await channel.close()
    figures = [
        figure(f"batch1_{re.sub(r'[^a-z0-9]+', '_', side)}_ms", f"batch 1 (1 KiB), {side}, median", median(s) * 1e3, "ms")
        for side, s in seconds.items()
    ]
    return figures, {side: stats_ms(s) for side, s in seconds.items()}


async def measure_bandwidth(client, client_grpc, echo_endpoint: str, pick: int) -> tuple[list[Figure], dict]:
    import grpc
    import torch

    x_ND = torch.randn(PAYLOAD_ROWS, BW_MODEL["d_model"])
    payload = x_ND.numpy().tobytes()
    channel = grpc.aio.insecure_channel(echo_endpoint, options=GRPC_OPTIONS)
    stream, stream_echo = open_stream_echo(channel, payload)
    try:
        echo = channel.unary_unary(ECHO_METHOD)  # no serializers: bytes in, bytes out
        calls = {
            "raw": functools.partial(echo, payload, timeout=CALL_TIMEOUT_S),
            "raw stream": stream_echo,
            "moeswarm": functools.partial(client.forward, BW_MODEL["name"], {BW_UID: x_ND}, timeout_s=CALL_TIMEOUT_S),
            "moeswarm gRPC only": functools.partial(client_grpc.forward, BW_MODEL["name"], {BW_UID: x_ND}, timeout_s=CALL_TIMEOUT_S),
        }
        for side, call in calls.items():
            answer = await call()
            if (answer[BW_UID].shape != x_ND.shape) if side.startswith("moeswarm") else len(answer) != len(payload):
                raise RuntimeError(f"{side}: an answer came back with a different size than sent")
        seconds = await alternate(calls, BANDWIDTH_CALLS[pick], WARMUP_CALLS[pick])
    finally:
        stream.cancel()
        await channel.close()
    moved_mb = 2 * len(payload) / 1e6  # request and response
    rate = {side: moved_mb / median(s) for side, s in seconds.items()}
    figures = [
        figure("raw_1mib_roundtrip_ms", "raw gRPC echo 1 MiB round trip, median", median(seconds["raw"]) * 1e3, "ms"),
        figure("raw_stream_1mib_roundtrip_ms", "raw gRPC echo on an open stream, 1 MiB, median", median(seconds["raw stream"]) * 1e3, "ms"),
        figure("moeswarm_1mib_roundtrip_ms", "moeswarm Forward 1 MiB round trip, median", median(seconds["moeswarm"]) * 1e3, "ms"),
        figure("moeswarm_grpc_1mib_roundtrip_ms", "moeswarm Forward 1 MiB over gRPC only, median",
               median(seconds["moeswarm gRPC only"]) * 1e3, "ms"),
        figure("raw_mb_per_s", "raw gRPC echo, both ways", rate["raw"], "MB/s"),
        figure("moeswarm_mb_per_s", "moeswarm Forward (d_ff=1), both ways", rate["moeswarm"], "MB/s"),
        figure("bandwidth_ratio", "bandwidth moeswarm / raw", rate["moeswarm"] / rate["raw"], "x", at_least=0.70),
        figure("bandwidth_ratio_stream", "bandwidth moeswarm / raw on an open stream", rate["moeswarm"] / rate["raw stream"], "x"),
        figure("bandwidth_ratio_grpc", "bandwidth moeswarm over gRPC only / raw", rate["moeswarm gRPC only"] / rate["raw"], "x"),
    ]
    return figures, {side: stats_ms(s) for side, s in seconds.items()}


def open_stream_echo(channel, payload: bytes):
    """(the open StreamEcho call, a coroutine function sending payload on it and reading its echo)."""
    stream = channel.stream_stream(STREAM_ECHO_METHOD)()

    async def stream_echo():
        await stream.write(payload)
        return await stream.read()

    return stream, stream_echo


async def alternate(calls: dict, n: int, warmup: int) -> dict[str, list[float]]:
    """n timed calls per side, in alternating blocks, so both sides share the machine's noise."""
    for call in calls.values():
        await time_calls(call, warmup)
    seconds = {side: [] for side in calls}
    for _ in range(max(1, n // BANDWIDTH_BLOCK)):
        for side, call in calls.items():
            seconds[side] += await time_calls(call, BANDWIDTH_BLOCK)
    return seconds


async def launch_node(children: Children, work_dir: pathlib.Path, index: int, peers: list[str], dht) -> dict:
    """Start a fresh node hosting bench.L0.E{index}; time until the client DHT finds it. Stops it after."""
    from moeswarm.model.directory import find_experts

    uid = f"{MODEL['name']}.L0.E{index}"
    name = f"launch{index}"
    start = time.perf_counter()
    proc, ready = spawn_node(children, work_dir, name, MODEL, [uid], peers)
    try:
        sample = {"uid": uid, "ready_s": None, "visible_s": None, "polls": 0}
        while time.perf_counter() - start < VISIBLE_TIMEOUT_S:
            if sample["ready_s"] is None and ready.exists():
                sample["ready_s"] = time.perf_counter() - start
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with code {proc.returncode}; see {work_dir / name}.log")
            if sample["visible_s"] is None:
                found = await asyncio.to_thread(find_experts, dht, "default", [uid])
                sample["polls"] += 1
                if found[uid]:
                    sample["visible_s"] = time.perf_counter() - start
            if None not in (sample["ready_s"], sample["visible_s"]):
                return sample
            await asyncio.sleep(POLL_S)
        raise RuntimeError(f"{uid} not visible in the DHT after {VISIBLE_TIMEOUT_S:.0f} s; see {work_dir / name}.log")
    finally:
        await asyncio.to_thread(children.stop, proc)


# ---- raw echo server (child process) -----------------------------------------------------------


if __name__ == "__main__":
    sys.exit(main())
