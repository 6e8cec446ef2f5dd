"""What one expert costs a node, per device: forward, backward (with and without the forward's kept
activations) and the optimizer step, through ExpertRegistry, the code a node runs per batch.

    python bench/expert_compute.py [--quick] [--json PATH]

SwiGLU experts (d_model x d_ff) of the remote_moe benchmark (256 x 1024) and of a Mixtral-like
width (1024 x 4096), fp32, Adam (fused where torch has it). Rows arrive and leave on the CPU, as they
do from the wire, so a GPU's figures include the copies and the synchronisation. Devices: the CPU
with 1 thread (what `swarm up` gives each node), the CPU with every core, the CPU with 1 thread and
prepacked weights (node config `prepack_weights`), and `cuda` when torch sees one. No network: the RPC path is node_call's. Ratios are against the 1-thread CPU in the same run.
"""

from __future__ import annotations

import argparse
import itertools
import os
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from common import Figure, figure, finish, machine_info, median  # noqa: E402  (bench/ is a folder of scripts)

from moeswarm.node.config import OptimizerConfig  # noqa: E402
from moeswarm.node.registry import ExpertRegistry, make_optimizer  # noqa: E402
from moeswarm.protocol.spec import ModelSpec  # noqa: E402

SIZES = ((256, 1024), (1024, 4096))  # (d_model, d_ff)
ROWS = (1, 64, 512)
REPEATS = (20, 5)  # timed calls per figure: (full, --quick)
UID = "bench.L0.E0"
STARTED = time.monotonic()


def devices() -> list[tuple[str, str, int, bool]]:
    """(label, torch device, CPU threads, prepacked weights: node config prepack_weights)."""
    found = [("cpu1", "cpu", 1, False), (f"cpu{os.cpu_count()}", "cpu", os.cpu_count() or 1, False)]
    if torch.backends.mkldnn.is_available():
        found.append(("cpu1-prepacked", "cpu", 1, True))
    if torch.cuda.is_available():
        found.append(("cuda", "cuda", 1, False))
    return found


def timed(call, repeats: int, device: str) -> float:
    """Median seconds of call() after two warm-up calls (a GPU is synchronised by the .cpu() copies)."""
    call(), call()
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    return median(seconds)


def measure(d_model: int, d_ff: int, device: str, threads: int, prepack: bool, repeats: int) -> dict[str, float]:
    torch.set_num_threads(threads)
    spec = ModelSpec(name="bench", d_model=d_model, d_ff=d_ff, n_layers=1, n_experts=1)
    registry = ExpertRegistry(spec, (UID,), seed=0, optimizer=OptimizerConfig(name="adam", lr=1e-4, update_every=1 << 30),
                              device=device, activation_cache_bytes=1 << 30, prepack_weights=prepack)
    out, ids = {}, itertools.count()
    for rows in ROWS:
        x_ND, g_ND = torch.randn(rows, d_model), torch.randn(rows, d_model)
        out[f"fwd_r{rows}"] = timed(lambda: registry.forward(UID, x_ND), repeats, device)
        out[f"bwd_r{rows}"] = timed(lambda: registry.backward(UID, x_ND, g_ND), repeats, device)

        def kept_backward():  # the training pair: a forward that keeps activations, its backward
            tag = f"f{next(ids)}"
            registry.forward(UID, x_ND, [(tag, rows)])
            registry.backward(UID, x_ND, g_ND, [(tag, rows)])

        out[f"fwdbwd_kept_r{rows}"] = timed(kept_backward, repeats, device)
    # the step a node runs every update_every rows (the expert holds the grads accumulated above)
    optimizer = make_optimizer(registry.experts[UID].module.parameters(), registry.optimizer_config)
    out["adam_step"] = timed(optimizer.step, repeats, device)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (under a minute)")
    parser.add_argument("--json", metavar="PATH", help="also write every figure and the machine info here")
    args = parser.parse_args()
    load_before = os.getloadavg()
    results: dict[str, dict[str, float]] = {}
    for d_model, d_ff in SIZES:
        for label, device, threads, prepack in devices():
            key = f"{d_model}x{d_ff}_{label}"
            results[key] = measure(d_model, d_ff, device, threads, prepack, REPEATS[args.quick])
            print(f"[{time.monotonic() - STARTED:5.1f} s] {key}: done", flush=True)
    figures: list[Figure] = []
    for key, values in results.items():
        size, label = key.rsplit("_", 1)
        baseline = results[f"{size}_cpu1"]
        for name, seconds in values.items():
            figures.append(figure(f"{key}_{name}_ms", f"{size} {label} {name}", seconds * 1e3, "ms"))
            if label != "cpu1":
                figures.append(figure(f"{key}_{name}_speedup", f"{size} {label} {name} vs cpu1", baseline[name] / seconds, "x"))
    details = {"sizes": SIZES, "rows": ROWS, "devices": [d[0] for d in devices()], "repeats": REPEATS[args.quick]}

    def report(figures, details, quick):
        return {"benchmark": "expert_compute", "quick": quick, "machine": machine_info(), "details": details,
                "figures": {f.key: {"value": f.value, "unit": f.unit} for f in figures}}

    def print_context(details):
        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
        print(f"devices: {', '.join(details['devices'])}; GPU: {gpu}; torch {torch.__version__}")

    finish(figures, details, load_before, STARTED, args.quick, args.json, report, print_context)
    return 0


if __name__ == "__main__":
    sys.exit(main())
