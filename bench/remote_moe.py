"""Benchmark of one MoE layer: moeswarm RemoteMoE vs the same layer local vs hivemind.moe; a node kill.

Layer: 8 experts, top-2, d_model 256, expert hidden 1024, fp32, batches of 16, 64 and 256 tokens, all
on 127.0.0.1, the bench process with torch.set_num_threads(1) (nodes and servers run 1 thread too).
  (a) moeswarm RemoteMoE: a bootstrap DHT process and 2 node processes hosting 4 experts each
      (1 replica), SwiGLU experts (moeswarm.model.experts), each pinned to its own CPU as `swarm up`
      pins nodes when there are enough CPUs (deploy/swarm.py node_cpus; not on a 1-CPU machine);
  (b) LocalMoE: the same router and the same expert weights (same seed), in this process;
  (c) hivemind.moe RemoteMixtureOfExperts (k_best=2, grid of 8) against 2 hivemind Server processes,
      4 experts each. hivemind has no SwiGLU expert: its 'ffn' block (hidden_dim=256: Linear 256->1024,
      GELU, Linear 1024->256, biases, residual, LayerNorm) is the closest; it does 2/3 of SwiGLU's
      matmul FLOPs, so this comparison favours hivemind.
Each figure is tokens/s = batch / median step time: "forward" is a torch.no_grad() call; "forward+
backward" is zero_grad, forward, backward of a random output gradient (input grads too, as inside a
model) and an Adam step on the client-side parameters (LocalMoE: router and experts; remote: the router,
the nodes/servers step their experts with Adam themselves). (a) and (b) run in alternating blocks so
both see the same machine noise; (c), far slower, is bounded by a time budget per figure.
Fault run: 2 more nodes each hosting all 8 experts (replication 2, their own swarm name); forward calls
at batch 64 in a loop for W s, a timer kills (SIGKILL, possibly mid-call) the process group of the node
that served the most rows so far, calls go on for W s more (W = 5 s, 3 s with --quick). Calls that end before the kill are "before", the
others "after"; reported: p50/p99 latency of each, failed calls (exceptions) and outputs with NaN/inf.
Targets at batch 256: forward >= 0.67x local and >= 100x hivemind; forward+backward >= 0.5x local and
>= 50x hivemind; after the kill: p99 <= 2 x p99 before + the RemoteMoE call deadline, 0 errors.
Run, with moeswarm importable (installed, or on PYTHONPATH):
    python bench/remote_moe.py [--quick] [--json out.json]
--quick (fewer steps, shorter windows) takes under a minute on a 2-core machine; the full run a few.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import pathlib
import signal
import sys
import tempfile
import threading
import time

import torch
import yaml

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from common import (  # noqa: E402  (bench/ is a folder of scripts, not a package)
    finish,
    POLL_S,
    Children,
    Figure,
    LogCapture,
    figure,
    kill_descendants,
    machine_info,
    median,
    quantile,
    stats_ms,
    time_call,
    time_within,
    wait_ready,
    write_ready,
)

D_MODEL, D_FF, N_EXPERTS, K, SEED, LR = 256, 1024, 8, 2, 0, 1e-3
MODEL = dict(name="bench", d_model=D_MODEL, d_ff=D_FF, n_layers=1, n_experts=N_EXPERTS)
UIDS = [f"bench.L0.E{e}" for e in range(N_EXPERTS)]
BATCHES = (16, 64, 256)
TORCH_THREADS = 1
FAULT_BATCH = 64
FAULT_SWARM = "fault"
DEFAULT_DEADLINE_S = 5.0  # used when RemoteMoE has no config.timeout_s
HM_PREFIX = "expert."
HM_UIDS = [f"{HM_PREFIX}{e}" for e in range(N_EXPERTS)]
HM_HANDLERS = 4  # connection-handler processes per hivemind server (its default, 8 per expert, is 32)
HM_TIMEOUT_S = 60.0
VISIBLE_TIMEOUT_S = 60.0
SERVER_MAX_LIFETIME_S = 1800.0
# (full, --quick)
ROUNDS = (10, 3)  # alternating local / moeswarm blocks per (batch, mode)
BLOCK = (5, 3)  # steps per block
WARMUP = (5, 2)
HM_BUDGET_S = (15.0, 1.0)  # per hivemind figure: stop after this long (b256 forward: ~10 steps) ...
HM_MAX_STEPS = (10, 2)  # ... or this many steps, whichever first (at least one)
FAULT_WINDOW_S = (5.0, 3.0)
FAULT_MAX_CALLS = 100_000
MODES = {"fwd": "forward", "fwdbwd": "forward+backward"}
STARTED = time.monotonic()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps, shorter fault windows (under a minute)")
    parser.add_argument("--json", metavar="PATH", help="also write every figure, sizes and the machine info here")
    parser.add_argument("--serve-hivemind", nargs=3, metavar=("READY", "UIDS", "PEER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(TORCH_THREADS)
    if args.serve_hivemind:
        return serve_hivemind(*args.serve_hivemind)
    pick = 1 if args.quick else 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the `finally` blocks that reap children
    started, load_before = time.monotonic(), os.getloadavg()
    try:
        with tempfile.TemporaryDirectory(prefix="moeswarm-bench-") as tmp, Children(pathlib.Path(tmp)) as children:
            peers, nodes, node_cpus = start_moeswarm(children, pathlib.Path(tmp))  # they start while hivemind runs
            seconds, details = run_hivemind(children, pathlib.Path(tmp), pick)
            more_seconds, more_details = run_moeswarm(peers, nodes, pick)
            details["node_cpus"] = node_cpus
    finally:
        kill_descendants()  # what libraries started here: DHT children, p2pd, torch_shm_manager
    seconds.update(more_seconds)
    details.update(more_details)
    figures = throughput_figures(seconds, details) + fault_figures(details["fault"])
    finish(figures, details, load_before, started, args.quick, args.json, report, print_context)
    return 0


def report(figures: list[Figure], details: dict, quick: bool) -> dict:
    pick = 1 if quick else 0
    sizes = {
        "model": MODEL, "k": K, "dtype": "float32", "batches": BATCHES, "seed": SEED, "lr": LR,
        "torch_threads_bench": TORCH_THREADS, "torch_threads_nodes": 1, "node_optimizer": "adam, update_every 1",
        "throughput_nodes": 2, "throughput_replicas": 1, "fault_nodes": 2, "fault_replicas": 2,
        "fault_batch": FAULT_BATCH, "fault_window_s": FAULT_WINDOW_S[pick],
        "steps_per_figure_moeswarm_and_local": ROUNDS[pick] * BLOCK[pick], "warmup_steps": WARMUP[pick],
        "hivemind": {"servers": 2, "experts_per_server": 4, "expert_cls": "ffn", "hidden_dim": D_MODEL,
                     "num_handlers": HM_HANDLERS, "k_best": K, "grid_size": [N_EXPERTS],
                     "budget_s": HM_BUDGET_S[pick], "max_steps": HM_MAX_STEPS[pick]},
    }
    return {
        "benchmark": "remote_moe", "quick": quick, "machine": machine_info(), "sizes": sizes,
        "figures": {f.key: {"value": f.value, "unit": f.unit, "target": f.target or None, "passed": f.passed} for f in figures},
        "details": details,
    }


def print_context(details: dict) -> None:
    check = details["check"]
    print(f"\nmoeswarm vs local output, batch {FAULT_BATCH}: max |diff| {check['max_abs_diff']:.2e}")
    fault = details["fault"]
    print(f"fault run: {fault['calls_before']} calls before, {fault['calls_after']} after the kill; deadline "
          f"{fault['deadline_s']:.1f} s ({fault['deadline_source']}); slowest call after {fault['max_after_ms']:.1f} ms")
    for error in fault["error_samples"]:
        print(f"  error: {error}")
    print(f"  killed {fault['killed_endpoint']} (the busier replica); {len(fault['failed_rpcs_retried'])} failed RPCs "
          "retried on the other replica (dispatcher warnings)")
    pinned = details["node_cpus"]
    print("moeswarm nodes pinned to CPUs " + ", ".join(map(str, pinned)) if pinned[0] else "moeswarm nodes not pinned (1 CPU)")
    load = details["loadavg_1_5_15"]
    print(f"load average before {load['before'][0]:.2f}, after {load['after'][0]:.2f} on {os.cpu_count()} CPUs")


# ---- figures -----------------------------------------------------------------------------------


def throughput_figures(seconds: dict, details: dict) -> list[Figure]:
    """seconds: (impl, mode, batch) -> step times."""
    rate = {key: key[2] / median(s) for key, s in seconds.items()}
    details["tokens_per_s"] = {f"{i}_{m}_b{b}": r for (i, m, b), r in rate.items()}
    details["step_ms"] = {f"{i}_{m}_b{b}": stats_ms(s) for (i, m, b), s in seconds.items()}
    names = {"moeswarm": "moeswarm RemoteMoE", "local": "LocalMoE (1 process)", "hivemind": "hivemind.moe"}
    figures = [
        figure(f"{impl}_{mode}_b{batch}_tokens_per_s", f"{names[impl]} {MODES[mode]}, b{batch}", rate[impl, mode, batch], "tok/s")
        for impl in names for mode in MODES for batch in BATCHES if (impl, mode, batch) in rate
    ]
    targets = {("fwd", "local"): 0.67, ("fwd", "hivemind"): 100, ("fwdbwd", "local"): 0.5, ("fwdbwd", "hivemind"): 50}
    for batch in BATCHES:
        for (mode, other), target in targets.items():
            ratio = rate["moeswarm", mode, batch] / rate[other, mode, batch]
            details[f"ratio_{mode}_vs_{other}_b{batch}"] = ratio
            if batch == BATCHES[-1]:
                label = f"{MODES[mode]} b{batch} moeswarm / {other}"
                figures.append(figure(f"ratio_{mode}_vs_{other}_b{batch}", label, ratio, "x", at_least=target))
    return figures


def fault_figures(fault: dict) -> list[Figure]:
    bound = 2 * fault["p99_before_ms"] + fault["deadline_s"] * 1e3
    return [
        figure("fault_p50_before_ms", f"fault run b{FAULT_BATCH}: p50 before kill", fault["p50_before_ms"], "ms"),
        figure("fault_p99_before_ms", f"fault run b{FAULT_BATCH}: p99 before kill", fault["p99_before_ms"], "ms"),
        figure("fault_p50_after_ms", f"fault run b{FAULT_BATCH}: p50 after kill", fault["p50_after_ms"], "ms"),
        figure("fault_p99_after_ms", f"fault run b{FAULT_BATCH}: p99 after kill", fault["p99_after_ms"], "ms", at_most=round(bound, 1)),
        figure("fault_errors", "fault run: failed calls", fault["errors"], "calls", at_most=0),
        figure("fault_nan_outputs", "fault run: outputs with NaN/inf", fault["nan_outputs"], "calls", at_most=0),
    ]


def progress(message: str) -> None:
    print(f"[{time.monotonic() - STARTED:5.1f} s] {message}", flush=True)


# ---- steps -------------------------------------------------------------------------------------


def make_step(moe: torch.nn.Module, mode: str, x_ND: torch.Tensor, grad_ND: torch.Tensor, optimizer):
    """A callable running one forward (no_grad) or forward+backward+Adam step of `moe`."""
    if mode == "fwd":
        def step():
            with torch.no_grad():
                return moe(x_ND)
    else:
        def step():
            optimizer.zero_grad(set_to_none=True)
            y_ND = moe(x_ND.detach().requires_grad_(True))
            y_ND.backward(grad_ND)
            optimizer.step()
    return step


def alternate(steps: dict, rounds: int, block: int, warmup: int) -> dict[str, list[float]]:
    """Warm each step up, then time `block` steps of each in turn, `rounds` times."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    seconds = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            seconds[name] += [time_call(step) for _ in range(block)]
    return seconds


def inputs(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(batch)
    return torch.randn(batch, D_MODEL, generator=generator), torch.randn(batch, D_MODEL, generator=generator)


# ---- (c) hivemind.moe --------------------------------------------------------------------------


def run_hivemind(children: Children, work_dir: pathlib.Path, pick: int) -> tuple[dict, dict]:
    import hivemind
    from hivemind.moe.client.moe import RemoteMixtureOfExperts
    from hivemind.moe.server.dht_handler import get_experts

    dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])  # the servers' bootstrap peer
    servers = []
    try:
        peer = str(dht.get_visible_maddrs()[0])
        for i in range(2):
            ready = work_dir / f"hivemind{i}.json"
            uids = ",".join(HM_UIDS[i * N_EXPERTS // 2:(i + 1) * N_EXPERTS // 2])
            proc = children.spawn([sys.executable, __file__, "--serve-hivemind", str(ready), uids, peer], f"hivemind{i}")
            servers.append((proc, ready))
        for i, (proc, ready) in enumerate(servers):
            wait_ready(ready, proc, f"hivemind server {i}")
        progress("hivemind servers ready")
        deadline = time.monotonic() + VISIBLE_TIMEOUT_S
        while None in get_experts(dht, HM_UIDS):
            if time.monotonic() > deadline:
                raise RuntimeError(f"hivemind experts not all visible after {VISIBLE_TIMEOUT_S:.0f} s")
            time.sleep(POLL_S)
        torch.manual_seed(SEED)
        moe = RemoteMixtureOfExperts(in_features=D_MODEL, grid_size=(N_EXPERTS,), dht=dht, uid_prefix=HM_PREFIX,
                                     k_best=K, forward_timeout=HM_TIMEOUT_S, backward_timeout=HM_TIMEOUT_S)
        optimizer = torch.optim.Adam(moe.parameters(), lr=LR)
        seconds = {}
        for mode in MODES:
            for batch in BATCHES:
                step = make_step(moe, mode, *inputs(batch), optimizer)
                if batch == BATCHES[0]:  # warm-up (connections, expert info, backward pools) and check
                    y_ND = step()
                    if mode == "fwd" and (y_ND.shape != (batch, D_MODEL) or not torch.isfinite(y_ND).all()):
                        raise RuntimeError(f"hivemind.moe returned shape {list(y_ND.shape)} or non-finite values")
                seconds["hivemind", mode, batch] = time_within(step, HM_BUDGET_S[pick], HM_MAX_STEPS[pick])
                progress(f"hivemind.moe {MODES[mode]} b{batch}: {len(seconds['hivemind', mode, batch])} steps")
        return seconds, {}
    finally:
        close_p2p_replica(dht)
        for proc, _ in servers:
            children.stop(proc)
        dht.shutdown()


def close_p2p_replica(dht) -> None:
    """Close the P2P replica hivemind's client opened here, on its own loop; otherwise its __del__
    runs at interpreter exit without a loop and prints tracebacks."""
    import asyncio

    from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker

    replica = getattr(dht, "_p2p_replica", None)  # private: hivemind 1.1.x
    if replica is not None:
        async def shutdown():
            await replica.shutdown()
            await asyncio.sleep(0.05)  # let the cancelled reader/writer tasks finish

        RemoteExpertWorker.run_coroutine(shutdown())


def serve_hivemind(ready_file: str, uids: str, peer: str) -> int:
    """Child process: a hivemind Server hosting `uids` ('ffn' experts); stops when its parent goes."""
    from hivemind.moe.server import Server

    server = Server.create(expert_uids=uids.split(","), expert_cls="ffn", hidden_dim=D_MODEL, num_handlers=HM_HANDLERS,
                           optim_cls=functools.partial(torch.optim.Adam, lr=LR), device="cpu", initial_peers=[peer],
                           host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    write_ready(ready_file, {"uids": uids})
    parent = os.getppid()
    for _ in range(int(SERVER_MAX_LIFETIME_S / 0.5)):
        if os.getppid() != parent:
            break
        time.sleep(0.5)
    server.shutdown()
    return 0


# ---- (a) moeswarm and (b) local ----------------------------------------------------------------


def spawn_node(children: Children, work_dir: pathlib.Path, name: str, uids, swarm: str, peers: list[str], cpus=None):
    config = {"model": MODEL, "experts": uids, "seed": SEED, "swarm": swarm, "initial_peers": peers, "state_dir": None,
              "torch_threads": 1, "optimizer": {"name": "adam", "lr": LR, "update_every": 1}, "cpus": list(cpus or ())}
    (work_dir / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    ready = work_dir / f"{name}.json"
    cmd = [sys.executable, "-m", "moeswarm.deploy.cli", "node", "--config", str(work_dir / f"{name}.yaml"),
           "--ready-file", str(ready), "--exit-with-parent"]
    return children.spawn(cmd, name), ready


def start_moeswarm(children: Children, work_dir: pathlib.Path) -> tuple[list[str], list, list]:
    """Bootstrap DHT (waited for), then 2 throughput nodes and 2 fault-run nodes (not waited for);
    returns the CPUs each node of a pair is pinned to ([None, None]: not pinned)."""
    from moeswarm.deploy.swarm_plan import node_cpus
    from moeswarm.node.affinity import available_cpus

    dht_ready = work_dir / "dht.json"
    cmd = [sys.executable, "-m", "moeswarm.deploy.cli", "dht", "--ready-file", str(dht_ready), "--exit-with-parent"]
    peers = wait_ready(dht_ready, children.spawn(cmd, "dht"), "bootstrap DHT")["maddrs"]
    half = N_EXPERTS // 2
    cpus = node_cpus(2, 1, available_cpus()) or [None, None]  # each pair as `swarm up` would pin it
    nodes = [spawn_node(children, work_dir, "node0", UIDS[:half], "default", peers, cpus[0]),
             spawn_node(children, work_dir, "node1", UIDS[half:], "default", peers, cpus[1]),
             spawn_node(children, work_dir, "fault0", "all", FAULT_SWARM, peers, cpus[0]),
             spawn_node(children, work_dir, "fault1", "all", FAULT_SWARM, peers, cpus[1])]
    return peers, nodes, cpus


def run_moeswarm(peers: list[str], nodes: list, pick: int) -> tuple[dict, dict]:
    from moeswarm.model.local_moe import LocalMoE
    from moeswarm.model.remote_moe import RemoteMoE

    for i, (proc, ready) in enumerate(nodes):
        wait_ready(ready, proc, f"node {i}")
    progress("moeswarm nodes ready")
    torch.manual_seed(SEED)
    local = LocalMoE(model=MODEL["name"], layer=0, d_model=D_MODEL, d_ff=D_FF, n_experts=N_EXPERTS, k=K, seed=SEED)
    # Both clients (each may fork a DHT child) before this process makes any gRPC call.
    remotes = [RemoteMoE(model=MODEL["name"], layer=0, d_model=D_MODEL, n_experts=N_EXPERTS, k=K, initial_peers=peers,
                         swarm=swarm) for swarm in ("default", FAULT_SWARM)]
    try:
        for remote in remotes:
            remote.router.load_state_dict(local.router.state_dict())
        x_ND, _ = inputs(FAULT_BATCH)
        with torch.no_grad():
            diff = (remotes[0](x_ND) - local(x_ND)).abs().max().item()
        details = {"check": {"batch": FAULT_BATCH, "max_abs_diff": diff}}
        optimizers = {"local": torch.optim.Adam(local.parameters(), lr=LR),
                      "moeswarm": torch.optim.Adam(remotes[0].parameters(), lr=LR)}
        seconds = {}
        for mode in MODES:
            for batch in BATCHES:
                x_ND, grad_ND = inputs(batch)
                steps = {name: make_step(moe, mode, x_ND, grad_ND, optimizers[name])
                         for name, moe in (("local", local), ("moeswarm", remotes[0]))}
                for name, s in alternate(steps, ROUNDS[pick], BLOCK[pick], WARMUP[pick]).items():
                    seconds[name, mode, batch] = s
                progress(f"moeswarm and local {MODES[mode]} b{batch}: done")
        fault_nodes = [(proc, read_endpoint(ready)) for proc, ready in nodes[2:]]
        details["fault"] = fault_run(remotes[1], fault_nodes, FAULT_WINDOW_S[pick])
        progress("fault run: done")
        return seconds, details
    finally:
        for remote in remotes:
            remote.close()


def read_endpoint(ready: pathlib.Path) -> str:
    import json

    return json.loads(ready.read_text())["endpoint"]


def busiest(fault_nodes: list) -> tuple:
    """The (process, endpoint) that has served the most rows so far (Info over a plain gRPC call):
    killing the replica the client is using is the case worth measuring."""
    import grpc

    from moeswarm.protocol import expert_pb2, expert_pb2_grpc

    served = []
    for proc, endpoint in fault_nodes:
        with grpc.insecure_channel(endpoint) as channel:
            info = expert_pb2_grpc.ExpertServiceStub(channel).Info(expert_pb2.InfoRequest(), timeout=5)
        served.append((sum(state.rows_served for state in info.experts), proc.pid, proc, endpoint))
    return max(served)[2:]


def fault_run(remote, fault_nodes: list, window_s: float) -> dict:
    """Forward calls for window_s, SIGKILL (by a timer) of the process group of the replica that
    served the most rows until then, window_s more."""
    config = getattr(remote, "config", None)
    deadline_s = getattr(config, "timeout_s", None)
    source = "remote.config.timeout_s" if deadline_s is not None else "default: RemoteMoE has no config.timeout_s"
    deadline_s = float(deadline_s if deadline_s is not None else DEFAULT_DEADLINE_S)
    x_ND, _ = inputs(FAULT_BATCH)
    with torch.no_grad():
        for _ in range(WARMUP[0]):
            remote(x_ND)
    killed, failed_rpcs = {}, LogCapture()
    logging.getLogger("moeswarm.model.dispatcher").addHandler(failed_rpcs)  # its warnings: failed RPCs, retried

    def kill() -> None:
        victim, killed["endpoint"] = busiest(fault_nodes)
        killed["at"] = time.perf_counter()
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait()

    timer = threading.Timer(window_s, kill)
    calls = []  # (end time, latency, error or None, non-finite output)
    start = time.perf_counter()
    timer.start()
    try:
        while len(calls) < FAULT_MAX_CALLS and time.perf_counter() - start < 2 * window_s:
            begin = time.perf_counter()
            error, bad = None, False
            try:
                with torch.no_grad():
                    bad = not bool(torch.isfinite(remote(x_ND)).all())
            except Exception as e:  # counted: the target is 0
                error = f"{type(e).__name__}: {e}"
            end = time.perf_counter()
            calls.append((end, end - begin, error, bad))
    finally:
        timer.cancel()
        timer.join()
        logging.getLogger("moeswarm.model.dispatcher").removeHandler(failed_rpcs)
    if "at" not in killed:
        raise RuntimeError("the fault run ended before the node was killed")
    before = [c for c in calls if c[0] < killed["at"]]
    after = [c for c in calls if c[0] >= killed["at"]]
    errors = [c[2] for c in calls if c[2] is not None]
    ms = lambda group, q: quantile([c[1] for c in group] or [float("nan")], q) * 1e3  # noqa: E731
    return {
        "deadline_s": deadline_s, "deadline_source": source, "window_s": window_s,
        "calls_before": len(before), "calls_after": len(after),
        "p50_before_ms": ms(before, 0.5), "p99_before_ms": ms(before, 0.99),
        "p50_after_ms": ms(after, 0.5), "p99_after_ms": ms(after, 0.99),
        "max_after_ms": max(c[1] for c in after) * 1e3,
        "errors": len(errors), "errors_after": sum(c[2] is not None for c in after),
        "nan_outputs": sum(c[3] for c in calls), "error_samples": sorted(set(errors))[:5],
        "latency_after_ms": [round(c[1] * 1e3, 3) for c in after[:50]],  # the first 50 calls after the kill
        "failed_rpcs_retried": [f"{t - killed['at']:+.3f} s after the kill: {m}" for t, m in failed_rpcs.messages],
        "killed_endpoint": killed["endpoint"],
    }


if __name__ == "__main__":
    sys.exit(main())
