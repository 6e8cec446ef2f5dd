"""Benchmark of decoding: tokens/s of a small MoE language model run locally and over a local swarm.

Model: 4 blocks, each with an MoE FFN (8 SwiGLU experts of hidden 512, top-2), d_model 256, 4 heads, byte
vocabulary, fp32, random weights (seed 0), written as a model directory (model/lm.py save_model). Swarm:
deploy/swarm.py LocalSwarm (nodes as `swarm up` starts them: each pinned to a core, sched_batch), a
bootstrap DHT and 2 node processes hosting the 32 experts once (1 replica;
--replicas 2: both host all of them, and the dispatcher picks a replica per expert), all on 127.0.0.1; the
bench process, the nodes and the echo servers run torch with 1 thread.
Greedy decoding (model/generation.py generate, KV cache) of prompts of BOS + 16 bytes of stdlib source, N new
tokens (128; 48 with --quick), at batch 1 and 8 (8 different prompts): the same model directory opened
locally (every expert in this process) and on the swarm (dense part here, experts on the nodes), one
generation of each in turn, several rounds after a warm-up, so both see the same machine noise; the remote
tokens must equal the local ones. Each decoding step (a model call after the prompt) is timed between
generate's on_tokens callbacks; hooks on each MoE module time its forward and read SwarmClient.expert_wait_s
(time blocked in Dispatcher.run) around it. Per step, medians over every step of every round:
  step = dense (embedding, attention, norms, dense head, sampling) + MoE modules;
  remote MoE modules = client side (router, combine, bookkeeping) + expert wait (round trips, node compute).
Floor, in the same run (a block after each round), each timed from the main thread through an event loop of
the dispatcher's kind, run by the calling thread as the dispatcher's is (model/loop_runner.py): a raw grpc.aio unary echo of 1 KiB (one batch-1 row of
d_model fp32) to separate echo server processes (generic handler, no serialisation), also timed inside the
loop; 2 such echoes at once to 2 servers; one ExpertClient.forward of 1 row straight to a node over its data
port, as the dispatcher calls it (codec, node handler, expert compute; no dispatcher); 2 of those at once to the 2 nodes (a token whose 2 experts sit on
different nodes: the layer call's floor, weighted by how often that happens, is printed per batch).
Figures: ms/step and tokens/s (batch / median step) local and remote; remote expert wait and local compute
(step - wait) per step; overhead per MoE layer = (remote step - local step) / MoE layers; remote / local.
Targets, at each batch: overhead per MoE layer <= 0.6 ms (one loopback round trip); remote greedy tokens
== local greedy tokens (0 differing).
Run, with moeswarm importable (installed, or on PYTHONPATH):
    python bench/generate.py [--quick] [--json out.json] [--placement spread|by-layer] [--replicas 1|2]
--quick (48 new tokens, 3 rounds) takes under a minute on a 2-core machine; the full run (128, 6) about two.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib
import inspect
import os
import pathlib
import signal
import sys
import tempfile
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from echo_server import ECHO_METHOD, GRPC_OPTIONS, spawn_echo  # noqa: E402
from common import (  # noqa: E402  (bench/ is a folder of scripts, not a package)
    Progress,
    print_greedy_check,
    print_load,
    Children,
    Figure,
    figure,
    finish,
    kill_descendants,
    machine_info,
    median,
    stats_ms,
    time_call,
    wait_ready,
)

SIZES = dict(name="bench-lm", d_model=256, n_layers=4, n_heads=4, d_ff=512, d_ff_dense=1024, max_seq_len=256, seed=0)
N_EXPERTS, K = 8, 2
# 16 bytes of each function's source; batch B uses the first B (different prompts: different experts)
PROMPT_SOURCES = ("textwrap.dedent", "textwrap.indent", "textwrap.shorten", "json.dumps", "json.loads",
                  "shlex.quote", "shlex.split", "fnmatch.fnmatch")
PROMPT_BYTES = 16
BATCHES = (1, 8)
NODES, TORCH_THREADS = 2, 1
TARGET_OVERHEAD_MS = 0.6  # per MoE layer: one loopback round trip
ECHO_SERVERS = 2
ECHO_BYTES = 1024  # one batch-1 row: 256 fp32
CALL_TIMEOUT_S = 30.0
WARMUP_TOKENS = 8  # one untimed generation of each side per batch
# (full, --quick)
NEW_TOKENS = (128, 48)
ROUNDS = (6, 3)  # one local and one remote generation per round, per batch
FLOOR_BLOCK = (20, 10)  # calls per floor side after each round
FLOOR_SIDES = {  # side -> table label
    "raw": "floor: gRPC echo 1 KiB, in its loop",
    "bridged": "floor: echo 1 KiB from a sync caller",
    "bridged_x2": "floor: 2 echoes at once, sync caller",
    "expert": "floor: ExpertClient.forward, 1 row, data port",
    "expert_x2": "floor: 2 of them at once, 2 nodes",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer tokens and rounds (under a minute)")
    parser.add_argument("--json", metavar="PATH", help="also write every figure, sizes and the machine info here")
    parser.add_argument("--placement", default="spread", choices=["spread", "by-layer"],
                        help="how the swarm places experts (coordinator/placement.py); by-layer: ~1 RPC per layer")
    parser.add_argument("--replicas", type=int, default=1, choices=range(1, NODES + 1),
                        help="nodes hosting each expert (default 1); 2: both nodes host every expert, the dispatcher chooses")
    parser.add_argument("--node-set", action="append", default=[], metavar="KEY=VALUE",
                        help="a node config key for every node, as `swarm up --node-set` (e.g. busy_poll_us=2000)")
    args = parser.parse_args()
    torch.set_num_threads(TORCH_THREADS)
    pick = 1 if args.quick else 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the `finally` blocks that reap children
    started, load_before = time.monotonic(), os.getloadavg()
    try:
        with tempfile.TemporaryDirectory(prefix="moeswarm-bench-") as tmp:
            runs, floor, details = run_all(pathlib.Path(tmp), pick, args.placement, args.replicas, tuple(args.node_set))
    finally:
        kill_descendants()  # what libraries started here: the client's DHT child, torch_shm_manager
    floor_figures = floor_figures_of(floor, details)  # first: the decode details compare against the floor
    figures = [fig for batch in BATCHES for fig in decode_figures(runs, batch, details)] + floor_figures
    finish(figures, details, load_before, started, args.quick, args.json, report, print_context)
    return 0


def report(figures: list[Figure], details: dict, quick: bool) -> dict:
    pick = 1 if quick else 0
    sizes = {
        "model": {**SIZES, "n_experts": N_EXPERTS, "k": K, "moe_layers": details["n_moe_layers"], "vocab": "bytes"},
        "dtype": "float32", "batches": BATCHES, "prompt_tokens": 1 + PROMPT_BYTES, "prompt_sources": PROMPT_SOURCES,
        "new_tokens": NEW_TOKENS[pick], "decoding_steps_per_generation": NEW_TOKENS[pick] - 1,
        "rounds": ROUNDS[pick], "warmup_tokens": WARMUP_TOKENS, "nodes": NODES, "replicas": details["replicas"],
        "placement": details["placement"], "node_set": details["node_set"],
        "torch_threads_bench": TORCH_THREADS, "torch_threads_nodes": TORCH_THREADS,
        "echo_servers": ECHO_SERVERS, "echo_bytes": ECHO_BYTES, "expert_floor_rows": 1,
        "floor_calls_per_side": FLOOR_BLOCK[pick] * ROUNDS[pick] * len(BATCHES),
    }
    return {
        "benchmark": "generate", "quick": quick, "machine": machine_info(), "sizes": sizes,
        "figures": {f.key: {"value": f.value, "unit": f.unit, "target": f.target or None, "passed": f.passed} for f in figures},
        "details": details,
    }


def print_context(details: dict) -> None:
    n_moe = details["n_moe_layers"]
    print(f"\nwhere a decoding step goes, ms per step (MoE = inside the {n_moe} MoE modules; medians of each "
          "column, so they need not add up):")
    print(f"  {'batch':<6}{'side':<8}{'step':>8}{'dense':>8}{'MoE':>8}{'expert wait':>13}{'MoE - wait':>12}")
    for batch in BATCHES:
        for side in ("local", "remote"):
            split = details[f"b{batch}_{side}_split_ms"]
            wait = f"{split['wait']:.2f}" if side == "remote" else "-"
            rest = f"{split['moe_minus_wait']:.2f}" if side == "remote" else "-"
            print(f"  {batch:<6}{side:<8}{split['step']:>8.2f}{split['dense']:>8.2f}{split['moe']:>8.2f}{wait:>13}{rest:>12}")
    floor = {side: details["floor_ms"][side]["median"] for side in FLOOR_SIDES}
    for batch in BATCHES:
        call = details[f"b{batch}_layer_call"]
        print(f"  b{batch} per MoE layer call, median: local module {call['local_module_ms']:.3f} ms; remote module "
              f"{call['remote_module_ms']:.3f} ms, of which expert wait {call['remote_wait_ms']:.3f} ms\n"
              f"     nodes called per layer call {call['nodes_mean']:.2f} (mean); 1-row ExpertClient floor for "
              f"that mix {call['expert_floor_ms']:.3f} ms")
    print(f"  floor: raw echo {floor['raw']:.3f} ms in its loop, {floor['bridged']:.3f} ms from a sync caller, "
          f"{floor['bridged_x2']:.3f} ms for 2 at once;\n"
          f"     ExpertClient.forward of 1 row {floor['expert']:.3f} ms, {floor['expert_x2']:.3f} ms for 2 nodes at once")
    for batch in BATCHES:
        over = details[f"b{batch}_overhead_per_moe_layer"]
        print(f"  b{batch} overhead per MoE layer {over['ms']:.3f} ms = {over['x_raw']:.1f}x the raw echo, "
              f"{over['x_bridged_x2']:.1f}x 2 echoes at once, {over['x_expert_x2']:.1f}x 2 expert calls at once")
    for batch in BATCHES:
        acct = details[f"b{batch}_expert_wait_accounting"]
        print(f"  b{batch} GenerationResult.expert_wait_s includes the prompt: {acct['total_ms']:.1f} ms per "
              f"generation, {acct['prefill_ms']:.1f} of it prefill (excluded above); prefill local "
              f"{acct['local_prefill_ms']:.1f} ms, remote {acct['remote_prefill_ms']:.1f} ms")
    print(f"  placement {details['placement']}, {details['replicas']} replica(s) of each expert; nodes set: {', '.join(details['node_set']) or 'nothing (defaults)'}")
    print_greedy_check(details, BATCHES, "remote greedy tokens differ from local")
    print(f"  prompt b1: {details['prompts'][0]!r}; first new tokens (random weights): {details['b1_first_tokens']}")
    print_load(details)


progress = Progress()


# ---- figures -----------------------------------------------------------------------------------


def decode_figures(runs: dict, batch: int, details: dict) -> list[Figure]:
    """runs: (side, batch) -> [Generation]. Figures of one batch; fills details."""
    n_moe = details["n_moe_layers"]
    local, remote = (pooled(runs[side, batch]) for side in ("local", "remote"))
    local_ms, remote_ms = median(local["step"]) * 1e3, median(remote["step"]) * 1e3
    wait_ms = median(remote["wait"]) * 1e3
    compute_ms = median([s - w for s, w in zip(remote["step"], remote["wait"])]) * 1e3
    overhead_ms = (remote_ms - local_ms) / n_moe
    differing, first = greedy_check(runs, batch)
    record_details(details, runs, batch, local, remote)
    details[f"b{batch}_greedy_check"] = {"differing_tokens": differing, "first_difference": first}
    floor_ms = {side: details["floor_ms"][side]["median"] for side in FLOOR_SIDES}
    times_floor = {f"x_{side}": overhead_ms / floor_ms[side] for side in floor_ms}
    details[f"b{batch}_overhead_per_moe_layer"] = {"ms": overhead_ms, **times_floor}
    b = f"b{batch}"
    return [
        figure(f"{b}_local_step_ms", f"{b} local: ms per decoding step", local_ms, "ms"),
        figure(f"{b}_local_tokens_per_s", f"{b} local: decoding tokens/s", batch * 1e3 / local_ms, "tok/s"),
        figure(f"{b}_remote_step_ms", f"{b} remote: ms per decoding step", remote_ms, "ms"),
        figure(f"{b}_remote_tokens_per_s", f"{b} remote: decoding tokens/s", batch * 1e3 / remote_ms, "tok/s"),
        figure(f"{b}_remote_expert_wait_ms", f"{b} remote: expert wait per step", wait_ms, "ms"),
        figure(f"{b}_remote_compute_ms", f"{b} remote: local compute (step - wait)", compute_ms, "ms"),
        figure(f"{b}_overhead_per_moe_layer_ms", f"{b} remote - local, per MoE layer", overhead_ms, "ms",
               at_most=TARGET_OVERHEAD_MS),
        figure(f"{b}_tokens_per_s_ratio", f"{b} tokens/s remote / local", local_ms / remote_ms, "x"),
        figure(f"{b}_greedy_tokens_differing", f"{b} remote greedy tokens != local", differing, "tokens", at_most=0),
    ]


def floor_figures_of(floor: dict[str, list[float]], details: dict) -> list[Figure]:
    details["floor_ms"] = {side: stats_ms(s) for side, s in floor.items()}
    return [figure(f"floor_{side}_ms", f"{label}, median", median(floor[side]) * 1e3, "ms")
            for side, label in FLOOR_SIDES.items()]


def pooled(generations: list["Generation"]) -> dict[str, list[float]]:
    """Per-step and per-call samples of several generations, concatenated."""
    fields = ("step", "moe", "wait", "call", "call_wait", "call_nodes")
    return {field: [v for g in generations for v in getattr(g, field)] for field in fields}


def split_ms(samples: dict[str, list[float]]) -> dict[str, float]:
    steps = list(zip(samples["step"], samples["moe"], samples["wait"]))
    return {"step": median([s for s, _, _ in steps]) * 1e3, "dense": median([s - m for s, m, _ in steps]) * 1e3,
            "moe": median([m for _, m, _ in steps]) * 1e3, "wait": median([w for _, _, w in steps]) * 1e3,
            "moe_minus_wait": median([m - w for _, m, w in steps]) * 1e3}


def record_details(details: dict, runs: dict, batch: int, local: dict, remote: dict) -> None:
    b = f"b{batch}"
    for side, samples in (("local", local), ("remote", remote)):
        details[f"{b}_{side}_split_ms"] = split_ms(samples)
        details[f"{b}_{side}_step_ms"] = stats_ms(samples["step"])
        details[f"{b}_{side}_mean_tokens_per_s"] = [g.result.decode_tokens_per_s for g in runs[side, batch]]
    details[f"{b}_remote_wait_ms"] = stats_ms(remote["wait"])
    details[f"{b}_layer_call"] = {
        "local_module_ms": median(local["call"]) * 1e3, "remote_module_ms": median(remote["call"]) * 1e3,
        "remote_wait_ms": median(remote["call_wait"]) * 1e3,
        "nodes_mean": sum(remote["call_nodes"]) / len(remote["call_nodes"]),
    }
    two_nodes = sum(n == 2 for n in remote["call_nodes"]) / len(remote["call_nodes"])  # 1 or 2 nodes with NODES = 2
    floor = details["floor_ms"]
    expert_floor_ms = (1 - two_nodes) * floor["expert"]["median"] + two_nodes * floor["expert_x2"]["median"]
    details[f"{b}_layer_call"]["expert_floor_ms"] = expert_floor_ms
    generations = runs["remote", batch]
    details[f"{b}_expert_wait_accounting"] = {
        "total_ms": median([g.result.expert_wait_s for g in generations]) * 1e3,
        "prefill_ms": median([g.prefill_wait_s for g in generations]) * 1e3,
        "decode_ms": median([g.result.expert_wait_s - g.prefill_wait_s for g in generations]) * 1e3,
        "sum_of_step_waits_ms": median([sum(g.wait) for g in generations]) * 1e3,
        "local_prefill_ms": median([g.result.prefill_s for g in runs["local", batch]]) * 1e3,
        "remote_prefill_ms": median([g.result.prefill_s for g in generations]) * 1e3,
    }


def greedy_check(runs: dict, batch: int) -> tuple[int, str | None]:
    """Tokens of every generation (local and remote) that differ from the first local one, and where the first is."""
    reference = runs["local", batch][0].result.tokens
    differing, first = 0, None
    for (side, b), generations in runs.items():
        for round_, g in enumerate(generations if b == batch else []):
            for seq, (want, got) in enumerate(zip(reference, g.result.tokens)):
                wrong = [i for i, (x, y) in enumerate(zip(want, got)) if x != y]
                wrong += list(range(min(len(want), len(got)), max(len(want), len(got))))
                differing += len(wrong)
                if wrong and first is None:
                    first = f"{side} round {round_}, sequence {seq}, token {wrong[0]}"
    return differing, first


# ---- decoding ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Generation:
    result: object  # GenerationResult
    prefill_wait_s: float  # expert wait during the prompt (included in result.expert_wait_s)
    step: list[float]  # per decoding step: wall time,
    moe: list[float]  # time inside the MoE modules,
    wait: list[float]  # and expert wait inside them
    call: list[float]  # per MoE layer call while decoding: wall time,
    call_wait: list[float]  # expert wait,
    call_nodes: list[int]  # and nodes it called (remote only)


class StepProbe:
    """Times the decoding steps of one model: generate's on_tokens callback marks each step's end; hooks
    around each MoE module time its forward and read the client's expert_wait_s (None: a local model)."""

    def __init__(self, model, client):
        self.model, self.client = model, client
        self._calls: list[tuple[float, float, int]] = []  # (wall, wait, nodes called) of each MoE call this step
        self._entered = (0.0, 0.0)
        self._endpoints: dict[str, str] = {}  # of the last dispatch: uid -> node that served it (remote only)
        for moe in model.moe_layers():
            moe.register_forward_pre_hook(self._enter)
            moe.register_forward_hook(self._exit)
        if client is not None:  # the nodes each layer call reached (whichever replicas the dispatcher chose)
            dispatch = client.dispatch

            def counting_dispatch(*args, **kwargs):
                result = dispatch(*args, **kwargs)
                self._endpoints = result.endpoints
                return result

            client.dispatch = counting_dispatch

    def _wait_s(self) -> float:
        return self.client.expert_wait_s if self.client is not None else 0.0

    def _enter(self, module, args) -> None:
        wait = self._wait_s()
        self._entered = (wait, time.perf_counter())

    def _exit(self, module, args, output) -> None:
        now = time.perf_counter()
        wait, started = self._entered
        self._calls.append((now - started, self._wait_s() - wait, len(set(self._endpoints.values()))))

    def generate(self, prompt_BT: torch.Tensor, new_tokens: int) -> Generation:
        from moeswarm.model.generation import SamplingConfig, generate

        gen = Generation(None, 0.0, [], [], [], [], [], [])
        last: list[float] = []  # perf_counter of the previous step's end

        def on_tokens(_tokens) -> None:
            now = time.perf_counter()
            if not last:  # the prompt's model call ends here
                gen.prefill_wait_s = sum(wait for _, wait, _ in self._calls)
            else:
                gen.step.append(now - last[0])
                gen.moe.append(sum(wall for wall, _, _ in self._calls))
                gen.wait.append(sum(wait for _, wait, _ in self._calls))
                gen.call += [wall for wall, _, _ in self._calls]
                gen.call_wait += [wait for _, wait, _ in self._calls]
                gen.call_nodes += [nodes for _, _, nodes in self._calls]
            self._calls = []
            last[:] = [time.perf_counter()]  # the callback's own bookkeeping is not the next step's

        self._calls = []
        gen.result = generate(self.model, prompt_BT, SamplingConfig(max_new_tokens=new_tokens), on_tokens=on_tokens)
        return gen


def load_prompts(tokenizer) -> tuple[list[str], torch.Tensor]:
    """BOS + the first PROMPT_BYTES bytes of each PROMPT_SOURCES function: [len(PROMPT_SOURCES), 1 + PROMPT_BYTES]."""
    texts = []
    for dotted in PROMPT_SOURCES:
        module, name = dotted.rsplit(".", 1)
        text = inspect.getsource(getattr(importlib.import_module(module), name))[:PROMPT_BYTES]
        if len(text.encode()) != PROMPT_BYTES:
            raise RuntimeError(f"the source of {dotted} does not start with {PROMPT_BYTES} ASCII characters: {text!r}")
        texts.append(text)
    return texts, torch.tensor([tokenizer.encode(text) for text in texts])


def run_all(work_dir: pathlib.Path, pick: int, placement: str, replicas: int = 1, node_set: tuple[str, ...] = ()) -> tuple[dict, dict, dict]:
    """Write the model, start echo servers and the swarm, decode in alternating rounds; stop them all."""
    from moeswarm.deploy.swarm import LocalSwarm, SwarmPlan
    from moeswarm.model.lm import build_local_model, open_model, save_model
    from moeswarm.model.lm_config import MoELMConfig
    from moeswarm.model.routing import RoutingConfig

    config = MoELMConfig(**SIZES, routing=RoutingConfig(n_experts=N_EXPERTS, k=K))
    model_dir = save_model(build_local_model(config), work_dir / "model")
    plan = SwarmPlan(model=config.spec(), nodes=NODES, replicas=replicas, model_dir=str(model_dir), seed=config.seed,
                     uids=tuple(config.remote_uids()), torch_threads=TORCH_THREADS, run_dir=work_dir / "swarm",
                     placement=placement, node_overrides=node_set)
    with Children(work_dir) as children:
        echoes = [spawn_echo(children, work_dir, f"echo{i}") for i in range(ECHO_SERVERS)]  # they start with the swarm
        with LocalSwarm(plan) as swarm:
            endpoints = [wait_ready(ready, proc, f"echo server {i}")["endpoint"] for i, (proc, ready) in enumerate(echoes)]
            progress(f"swarm up: {NODES} nodes, {len(plan.uids)} experts")
            # Both models (the remote one spawns its DHT peer) before this process makes any gRPC call.
            with open_model(model_dir) as local, open_model(model_dir, initial_peers=swarm.initial_peers) as remote:
                with FloorCalls(endpoints, node_experts(swarm.ready), config.name) as floor:
                    probes = {"local": StepProbe(local.model, None), "remote": StepProbe(remote.model, remote.client)}
                    texts, prompts_BT = load_prompts(local.tokenizer)
                    runs, floor_s = decode_rounds(probes, prompts_BT, floor, pick)
    first_tokens = runs["local", BATCHES[0]][0].result.tokens[0][:12]
    details = {"placement": placement, "replicas": replicas, "node_set": list(node_set), "n_moe_layers": len(config.moe_layers()), "prompts": texts[: max(BATCHES)], "b1_first_tokens": first_tokens}
    return runs, floor_s, details


def node_experts(ready: list[dict]) -> list[tuple[str, str | None, str]]:
    """(endpoint, data port, first uid) of the first two nodes, from what they reported when ready."""
    return [(node["endpoint"], node.get("data_endpoint"), sorted(node["uids"])[0]) for node in ready[:2]]


def decode_rounds(probes: dict[str, StepProbe], prompts_BT: torch.Tensor, floor: FloorCalls, pick: int):
    """Per batch: a warm-up generation of each side, then ROUNDS of (local, remote, floor block)."""
    runs, floor_s = {}, {side: [] for side in FLOOR_SIDES}
    floor.block(FLOOR_BLOCK[pick])  # warm-up: channels connected
    for batch in BATCHES:
        for probe in probes.values():
            probe.generate(prompts_BT[:batch], WARMUP_TOKENS)
        for _ in range(ROUNDS[pick]):
            for side, probe in probes.items():
                runs.setdefault((side, batch), []).append(probe.generate(prompts_BT[:batch], NEW_TOKENS[pick]))
            for side, seconds in floor.block(FLOOR_BLOCK[pick]).items():
                floor_s[side] += seconds
        progress(f"batch {batch}: {ROUNDS[pick]} rounds of {NEW_TOKENS[pick]} new tokens, local and remote")
    return runs, floor_s


# ---- floor: raw gRPC echo, direct expert calls -----------------------------------------------


class FloorCalls:
    """The floor under an MoE layer's expert wait: raw echoes of ECHO_BYTES to the echo servers and
    ExpertClient.forward calls of 1 row straight to the nodes (no dispatcher), on an event loop run by the
    calling thread, as the dispatcher calls nodes (model/loop_runner.py). Use as a context manager
    (closes channels and the loop)."""

    def __init__(self, echo_endpoints: list[str], experts: list[tuple[str, str]], model: str):
        """experts: (endpoint, data port, uid) of one expert on each of two nodes."""
        from moeswarm.model.loop_runner import new_event_loop  # the dispatcher's own kind of loop
        from moeswarm.model.loop_runner import LoopRunner

        self.runner = LoopRunner(new_event_loop(), "bench-floor")
        self.payload, self.model = os.urandom(ECHO_BYTES), model
        self.uids, self.x_1D = [uid for _, _, uid in experts], torch.randn(1, ECHO_BYTES // 4)
        self.channels, self.stubs, self.clients = self.run(self._open(echo_endpoints, [(e, d) for e, d, _ in experts]))

    def __enter__(self) -> "FloorCalls":
        return self

    def __exit__(self, *exc) -> None:
        self.run(self._close())
        self.runner.close()

    def run(self, coro):
        return self.runner.run(coro, CALL_TIMEOUT_S * 2)

    async def _open(self, echo_endpoints: list[str], node_endpoints: list[tuple[str, str | None]]):
        import grpc

        from moeswarm.model.expert_client import ExpertClient

        channels = [grpc.aio.insecure_channel(endpoint, options=GRPC_OPTIONS) for endpoint in echo_endpoints]
        stubs = [channel.unary_unary(ECHO_METHOD) for channel in channels]  # bytes in, bytes out
        return channels, stubs, [ExpertClient(endpoint, data_endpoint=data) for endpoint, data in node_endpoints]

    async def _close(self) -> None:
        await asyncio.gather(*(channel.close() for channel in self.channels), *(c.close() for c in self.clients))

    async def _echo(self, server: int = 0) -> None:
        if len(await self.stubs[server](self.payload, timeout=CALL_TIMEOUT_S)) != len(self.payload):
            raise RuntimeError("an echo came back with a different size than sent")

    async def _expert(self, node: int = 0) -> None:
        uid = self.uids[node]
        y_1D = (await self.clients[node].forward(self.model, {uid: self.x_1D}, timeout_s=CALL_TIMEOUT_S))[uid]
        if y_1D.shape != self.x_1D.shape:
            raise RuntimeError(f"{uid} answered shape {list(y_1D.shape)} for {list(self.x_1D.shape)}")

    async def _both(self, call) -> None:
        await asyncio.gather(call(0), call(1))

    async def _timed_in_loop(self, n: int) -> list[float]:
        seconds = []
        for _ in range(n):
            start = time.perf_counter()
            await self._echo()
            seconds.append(time.perf_counter() - start)
        return seconds

    def block(self, n: int) -> dict[str, list[float]]:
        """n timed calls of each FLOOR_SIDES side, one side after the other."""
        bridged = {"bridged": self._echo, "bridged_x2": lambda: self._both(self._echo),
                   "expert": self._expert, "expert_x2": lambda: self._both(self._expert)}
        seconds = {"raw": self.run(self._timed_in_loop(n))}
        for side, call in bridged.items():
            seconds[side] = [time_call(lambda: self.run(call())) for _ in range(n)]
        return seconds


if __name__ == "__main__":
    sys.exit(main())
