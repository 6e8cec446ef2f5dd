"""Benchmark of a Hugging Face Mixtral checkpoint on the swarm: decoding tokens/s, node start-up and memory.

Greedy decoding, plain transformers vs moeswarm in the same run; node start-up time and memory as a function
of the hosted expert bytes. Checkpoints: random-initialised Mixtral models (seed 0, fp32, initializer_range
0.08) written here with transformers' save_pretrained in its default one-tensor-per-expert layout, sharded
at 64 MB (the start-up checkpoints are several files: nodes find tensors through the index file).
  (a) decoding: 4 layers, 8 experts of hidden 512, top-2, d_model 256, 4 heads (2 KV), vocab 1024. The same
      checkpoint opened with AutoModelForCausalLM.from_pretrained (every expert in this process) and with
      moeswarm.model.from_pretrained against deploy/swarm.py LocalSwarm (a bootstrap DHT and 2 node processes
      hosting the 32 experts once, 1 replica), all on 127.0.0.1, every process with 1 torch thread. Greedy
      generate(ids, max_new_tokens=N, do_sample=False), N = 96 (24 with --quick), of random prompts of 16
      tokens at batch 1 and 8, one generation of each side in turn, several rounds after a warm-up, so both
      see the same machine noise. tokens/s = batch x N / wall time of generate (the 16-token prefill
      included); median over rounds. The moeswarm tokens must equal the transformers tokens.
  (b) node start-up: d_model 512, 8 experts of hidden 1408 per layer (8.25 MiB each in fp32), 4 layers (2
      with --quick), and a 1-layer twin of the same shapes. One `moeswarm node --model DIR --experts SPEC`
      process at a time joins a bootstrap DHT, hosting growing expert sets: 1 expert, 1 layer x 8, 2 layers
      x 8, all (--quick: 1 expert and all), twice each (once with --quick). For each: hosted expert bytes
      (safetensors headers of the experts the node reports), launch-to-ready wall time (interpreter start,
      imports and DHT join included; the node's logged "loaded N experts in X s" too), and SETTLE_S after
      ready: RSS of the node main process (anon/file split, peak VmHWM) and RSS/PSS summed over its process
      tree (node, its DHT child, p2pd); then its group is killed. The checkpoint is in the page cache (just
      written), except for cold starts, after posix_fadvise(DONTNEED) of its files: the twin's 1-expert
      node (first, so it also takes the first-start penalty) and, in the full run, the largest set again;
      for those, the checkpoint bytes in the page cache afterwards (mincore) over the hosted bytes.
Targets: moeswarm greedy tokens == transformers greedy tokens (0 differing); for each expert set above the
smallest, (node RSS - RSS of the 1-expert node) / (hosted bytes - 1 expert's bytes) <= 1.3 (the 1-expert node
is the runtime baseline: "memory within 1.3x the hosted experts' bytes plus the runtime"); a node hosting 1
expert of the L-layer checkpoint has at most 0.1 x the checkpoint size difference more RSS than one hosting
the same expert of the 1-layer twin (it reads only that expert's tensors). Reported without a target:
tokens/s and their ratio, start-up times, the peak (VmHWM) ratio, page-cache bytes per hosted byte (the
kernel's readahead window, printed, decides most of it for small experts).
Run, with moeswarm and transformers importable (installed, or on PYTHONPATH):
    python bench/hf_generate.py [--quick] [--json out.json]
--quick (24 tokens, 2 rounds, a 2-layer checkpoint, 3 node starts) takes under a minute on a 2-core machine;
the full run (96 tokens, 5 rounds, 10 node starts) about two.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import pathlib
import re
import signal
import struct
import sys
import tempfile
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from common import (  # noqa: E402  (bench/ is a folder of scripts, not a package)
    Progress,
    print_greedy_check,
    print_load,
    Children,
    Figure,
    package_version,
    figure,
    finish,
    kill_descendants,
    machine_info,
    median,
    memory_of,
    process_tree,
    stats_ms,
    time_call,
    wait_ready,
)

COMMON = dict(vocab_size=1024, num_experts_per_tok=2, num_local_experts=8, num_key_value_heads=2,
              max_position_embeddings=512, initializer_range=0.08, tie_word_embeddings=False,
              bos_token_id=1, eos_token_id=None, pad_token_id=None)  # no EOS: every generation runs N tokens
DECODE_SIZES = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4)
NODE_SIZES = dict(hidden_size=512, intermediate_size=1408, num_attention_heads=8)
SHARD_SIZE = "64MB"
SEED, PROMPT_TOKENS, BATCHES = 0, 16, (1, 8)
NODES, REPLICAS, TORCH_THREADS = 2, 1, 1
WARMUP_TOKENS = 8  # one untimed generation of each side per batch
SETTLE_S = 0.5  # after ready, before reading memory: let late frees and the first announce happen
RATIO_TARGET = 1.3
SELECTIVE_TARGET = 0.1  # of the checkpoint size difference
EXPERT_TENSOR = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.")
LOADED = re.compile(r"loaded (\d+)/\d+ experts \([\d.]+ GB\) in ([\d.]+) s from ")  # node/model_source.py _Progress.done
MIB = 1 << 20
# (full, --quick)
NEW_TOKENS = (96, 24)
ROUNDS = (5, 2)
NODE_LAYERS = (4, 2)
STARTS = (2, 1)  # starts per expert set (medians reported)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer tokens, rounds and expert sets (under a minute)")
    parser.add_argument("--json", metavar="PATH", help="also write every figure, sizes and the machine info here")
    args = parser.parse_args()
    torch.set_num_threads(TORCH_THREADS)
    pick = 1 if args.quick else 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the `finally` blocks that reap children
    started, load_before = time.monotonic(), os.getloadavg()
    try:
        with tempfile.TemporaryDirectory(prefix="moeswarm-bench-") as tmp, Children(pathlib.Path(tmp)) as children:
            details = run_all(children, pathlib.Path(tmp), pick)
    finally:
        kill_descendants()  # what libraries started here: the client's DHT child, torch_shm_manager
    figures = decode_figures(details) + node_figures(details)
    finish(figures, details, load_before, started, args.quick, args.json, report, print_context)
    return 0


def report(figures: list[Figure], details: dict, quick: bool) -> dict:
    pick = 1 if quick else 0
    sizes = {
        "decode_model": {"model_type": "mixtral", **COMMON, **DECODE_SIZES}, "dtype": "float32", "seed": SEED,
        "batches": BATCHES, "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS[pick], "rounds": ROUNDS[pick],
        "warmup_tokens": WARMUP_TOKENS, "nodes": NODES, "replicas": REPLICAS, "torch_threads_bench": TORCH_THREADS,
        "torch_threads_nodes": TORCH_THREADS, "node_model": {"model_type": "mixtral", **COMMON, **NODE_SIZES,
        "num_hidden_layers": NODE_LAYERS[pick]}, "shard_size": SHARD_SIZE, "starts_per_set": STARTS[pick],
        "settle_s": SETTLE_S, "checkpoint_bytes": details["checkpoint_bytes"],
    }
    machine = machine_info()
    machine["versions"].update({dist: package_version(dist) for dist in ("transformers", "safetensors")})
    return {
        "benchmark": "hf_generate", "quick": quick, "machine": machine, "sizes": sizes,
        "figures": {f.key: {"value": f.value, "unit": f.unit, "target": f.target or None, "passed": f.passed} for f in figures},
        "details": details,
    }


def print_context(details: dict) -> None:
    print("\nnode start-up, per expert set (medians over starts; MiB):")
    print(f"  {'set':<28}{'experts':>8}{'hosted':>8}{'ready s':>8}{'load s':>7}{'RSS':>7}{'anon':>7}{'file':>7}"
          f"{'peak':>7}{'tree RSS':>9}{'tree PSS':>9}")
    for case in details["nodes"]:
        print(f"  {case['label']:<28}{case['experts']:>8}{case['hosted_bytes'] / MIB:>8.1f}{case['ready_s']:>8.2f}"
              f"{case['load_s']:>7.2f}{case['rss_kib'] / 1024:>7.0f}{case['anon_kib'] / 1024:>7.0f}"
              f"{case['file_kib'] / 1024:>7.0f}{case['hwm_kib'] / 1024:>7.0f}{case['tree_rss_kib'] / 1024:>9.0f}"
              f"{case['tree_pss_kib'] / 1024:>9.0f}")
    for case in (case for case in details["nodes"] if case["cold"]):
        files = case["checkpoint_file_bytes"]
        print(f"  {case['label']}: {case['read_bytes'] / MIB:.1f} MiB of the checkpoint's {files / MIB:.1f} MiB entered "
              f"the page cache (evicted before; device readahead {details['read_ahead_kib']} KiB)")
    print(f"  runtime: 1-expert node RSS - that expert's bytes = {details['runtime_rss_mib']:.0f} MiB; "
          f"peak (VmHWM) over the 1-expert node's, per extra hosted byte, {details['peak']['label']}: "
          f"{details['peak']['ratio']:.2f}")
    print_greedy_check(details, BATCHES, "moeswarm greedy tokens differ from transformers'")
    for batch in BATCHES:
        print(f"  b{batch}: moeswarm expert wait {details[f'b{batch}_expert_wait_ms_per_token']:.2f} ms per generated "
              f"token (all rows of the batch together)")
    print(f"  first new tokens b1 (random weights): {details['b1_first_tokens']}")
    print_load(details)


progress = Progress()


# ---- figures -----------------------------------------------------------------------------------


def decode_figures(details: dict) -> list[Figure]:
    figures = []
    for batch in BATCHES:
        rate = details[f"b{batch}_tokens_per_s"]
        figures += [
            figure(f"b{batch}_transformers_tokens_per_s", f"b{batch} transformers greedy tokens/s",
                   rate["transformers"], "tok/s"),
            figure(f"b{batch}_moeswarm_tokens_per_s", f"b{batch} moeswarm greedy tokens/s", rate["moeswarm"], "tok/s"),
            figure(f"b{batch}_tokens_per_s_ratio", f"b{batch} tokens/s moeswarm / transformers",
                   rate["moeswarm"] / rate["transformers"], "x"),
            figure(f"b{batch}_differing_tokens", f"b{batch} greedy tokens differing",
                   details[f"b{batch}_greedy_check"]["differing_tokens"], "tok", at_most=0),
        ]
    return figures


def node_figures(details: dict) -> list[Figure]:
    base = next(case for case in details["nodes"] if case["key"] == "1e")
    figures = []
    for case in details["nodes"]:
        name = f"node {case['label']}"
        figures.append(figure(f"node_{case['key']}_ready_s", f"{name}: launch to ready", case["ready_s"], "s"))
        if case["cold"]:
            figures.append(figure(f"node_{case['key']}_read_per_byte", f"{name}: page cache / hosted",
                                  case["read_bytes"] / case["hosted_bytes"], "x"))
            continue
        figures.append(figure(f"node_{case['key']}_rss_mib", f"{name}: RSS", case["rss_kib"] / 1024, "MiB"))
        figures.append(figure(f"node_{case['key']}_tree_pss_mib", f"{name}: tree PSS", case["tree_pss_kib"] / 1024, "MiB"))
        if case is not base and case["ratio"] is not None:
            figures.append(figure(f"node_{case['key']}_rss_per_byte", f"{name}: (RSS - base) / bytes", case["ratio"],
                                  "x", at_most=RATIO_TARGET))
    peak = details["peak"]
    figures.append(figure("node_peak_rss_per_byte", f"node {peak['label']}: (peak - base) / bytes",
                          peak["ratio"], "x", at_most=RATIO_TARGET))  # loading must fit the same bound
    selective = details["selective"]
    figures.append(figure("node_1_expert_rss_growth_mib", f"1 expert: RSS {selective['layers']}-layer - 1-layer ckpt",
                          selective["rss_growth_mib"], "MiB", at_most=round(selective["limit_mib"], 1)))
    return figures


# ---- checkpoints -------------------------------------------------------------------------------


def save_mixtral(directory: pathlib.Path, **sizes) -> int:
    """Write a random Mixtral checkpoint (seed SEED, fp32) to `directory`; returns its tensor bytes."""
    from transformers import AutoModelForCausalLM, MixtralConfig

    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(MixtralConfig(**COMMON, **sizes))
    model.save_pretrained(directory, max_shard_size=SHARD_SIZE)
    return sum(tensor_bytes(directory).values())


def tensor_bytes(model_dir: pathlib.Path) -> dict[str, int]:
    """Tensor name -> bytes, from the safetensors headers (no tensor data read)."""
    sizes = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with open(path, "rb") as file:
            header = json.loads(file.read(struct.unpack("<Q", file.read(8))[0]))
        for name, meta in header.items():
            if name != "__metadata__":
                start, end = meta["data_offsets"]
                sizes[name] = end - start
    return sizes


def hosted_bytes(model_dir: pathlib.Path, uids: list[str]) -> int:
    """Bytes of the routed-expert tensors of the experts `uids` (as a node reports them) in the checkpoint."""
    from moeswarm.protocol.spec import parse_uid

    pairs = {(parse_uid(uid).layer, parse_uid(uid).expert) for uid in uids}
    total = 0
    for name, size in tensor_bytes(model_dir).items():
        match = EXPERT_TENSOR.match(name)
        if match and (int(match[1]), int(match[2])) in pairs:
            total += size
    return total


def evict_page_cache(model_dir: pathlib.Path) -> None:
    """Drop this checkpoint's pages from the page cache (only its files; flushed first)."""
    for path in model_dir.glob("*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_ahead_kib(path: pathlib.Path) -> int | None:
    """The kernel's readahead window for the device holding `path` (None where sysfs does not say)."""
    device = os.stat(path).st_dev
    number = f"{os.major(device)}:{os.minor(device)}"
    for candidate in (f"/sys/class/bdi/{number}/read_ahead_kb", f"/sys/dev/block/{number}/queue/read_ahead_kb",
                      f"/sys/dev/block/{number}/../queue/read_ahead_kb"):
        try:
            return int(pathlib.Path(candidate).read_text())
        except (OSError, ValueError):
            continue
    return None


def cached_bytes(model_dir: pathlib.Path) -> int:
    """Bytes of the checkpoint's safetensors files now in the page cache (mincore on a private map)."""
    libc, page, total = ctypes.CDLL(None, use_errno=True), os.sysconf("SC_PAGE_SIZE"), 0
    for path in model_dir.glob("*.safetensors"):
        size = path.stat().st_size
        with open(path, "rb") as file, mmap.mmap(file.fileno(), size, access=mmap.ACCESS_COPY) as mapped:
            resident = (ctypes.c_ubyte * ((size + page - 1) // page))()
            anchor = ctypes.c_char.from_buffer(mapped)  # its address; released before the map closes
            failed = libc.mincore(ctypes.c_void_p(ctypes.addressof(anchor)), ctypes.c_size_t(size), resident)
            del anchor
            if failed:
                raise OSError(ctypes.get_errno(), f"mincore on {path}")
            total += sum(flag & 1 for flag in resident) * page
    return total


# ---- run ---------------------------------------------------------------------------------------


def run_all(children: Children, work_dir: pathlib.Path, pick: int) -> dict:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    dht_ready = work_dir / "dht.json"  # the start-up nodes' bootstrap peer, booting meanwhile
    dht = children.spawn([sys.executable, "-m", "moeswarm.deploy.cli", "dht", "--ready-file", str(dht_ready),
                          "--exit-with-parent"], "dht")
    layers = NODE_LAYERS[pick]
    dirs = {"decode": work_dir / "hf-decode", "node": work_dir / f"hf-node-{layers}l", "twin": work_dir / "hf-node-1l"}
    details = {"checkpoint_bytes": {
        "decode": save_mixtral(dirs["decode"], **DECODE_SIZES),
        "node": save_mixtral(dirs["node"], **NODE_SIZES, num_hidden_layers=layers),
        "twin": save_mixtral(dirs["twin"], **NODE_SIZES, num_hidden_layers=1),
    }}
    progress(f"checkpoints written: {', '.join(f'{k} {v / MIB:.0f} MiB' for k, v in details['checkpoint_bytes'].items())}")
    details.update(run_decode(dirs["decode"], pick))
    peers = wait_ready(dht_ready, dht, "bootstrap DHT")["maddrs"]
    details.update(run_node_starts(children, work_dir, peers, dirs, pick))
    details["read_ahead_kib"] = read_ahead_kib(dirs["node"])
    return details


# ---- (a) decoding ------------------------------------------------------------------------------


def run_decode(model_dir: pathlib.Path, pick: int) -> dict:
    import moeswarm.model
    from moeswarm.deploy.swarm import LocalSwarm, SwarmPlan
    from moeswarm.node.model_source import spec_of
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    plan = SwarmPlan(model=spec_of(model_dir), model_dir=str(model_dir), nodes=NODES, replicas=REPLICAS,
                     torch_threads=TORCH_THREADS)
    with LocalSwarm(plan) as swarm:
        progress(f"swarm ready: {NODES} nodes, {sum(len(node['uids']) for node in swarm.ready)} experts")
        model = moeswarm.model.from_pretrained(model_dir, initial_peers=swarm.initial_peers)
        try:
            return decode_rounds({"transformers": reference, "moeswarm": model}, pick)
        finally:
            model.moeswarm_client.close()


def generate(model, ids_BT: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """The new tokens [B, new_tokens] of a greedy generation."""
    with torch.no_grad():
        out_BT = model.generate(ids_BT, attention_mask=torch.ones_like(ids_BT), max_new_tokens=new_tokens,
                                do_sample=False)
    return out_BT[:, ids_BT.shape[1]:]


def decode_rounds(models: dict, pick: int) -> dict:
    """Warm-up, then ROUNDS alternating timed generations of each side, per batch."""
    client, new_tokens, details = models["moeswarm"].moeswarm_client, NEW_TOKENS[pick], {}
    vocab = COMMON["vocab_size"]
    for batch in BATCHES:
        ids_BT = torch.randint(3, vocab, (batch, PROMPT_TOKENS), generator=torch.Generator().manual_seed(batch))
        for model in models.values():
            generate(model, ids_BT, WARMUP_TOKENS)
        seconds = {name: [] for name in models}
        tokens, waits = {name: [] for name in models}, []
        for _ in range(ROUNDS[pick]):
            for name, model in models.items():
                wait_before = client.expert_wait_s
                seconds[name].append(time_call(lambda: tokens[name].append(generate(model, ids_BT, new_tokens))))
                if name == "moeswarm":
                    waits.append(client.expert_wait_s - wait_before)
        details[f"b{batch}_tokens_per_s"] = {name: batch * new_tokens / median(s) for name, s in seconds.items()}
        details[f"b{batch}_generate_ms"] = {name: stats_ms(s) for name, s in seconds.items()}
        details[f"b{batch}_expert_wait_ms_per_token"] = median(waits) * 1e3 / new_tokens
        details[f"b{batch}_greedy_check"] = greedy_check(tokens["transformers"], tokens["moeswarm"])
        details[f"b{batch}_first_tokens"] = tokens["transformers"][0][0, :12].tolist()
        progress(f"b{batch}: {ROUNDS[pick]} rounds of {new_tokens} tokens done")
    return details


def greedy_check(expected: list[torch.Tensor], got: list[torch.Tensor]) -> dict:
    """Differing tokens over every round; where the first difference is (round, row, position)."""
    differing, first = 0, None
    for round_, (want_BN, have_BN) in enumerate(zip(expected, got)):
        mask_BN = want_BN != have_BN
        differing += int(mask_BN.sum())
        if first is None and mask_BN.any():
            row, pos = (int(i) for i in mask_BN.nonzero()[0])
            first = f"round {round_}, row {row}, new token {pos}"
    return {"differing_tokens": differing, "first_difference": first, "rounds": len(expected)}


# ---- (b) node start-up -------------------------------------------------------------------------


def expert_sets(layers: int, pick: int) -> list[tuple[str, str, str]]:
    """(key, label, expert spec) from 1 expert to all of them."""
    sets = [("1e", "1 expert", "layers 0, experts 0")]
    if not pick:
        sets += [("8e", "1 layer x 8", "layers 0, experts all"), ("2l", "2 layers x 8", "layers 0-1, experts all")]
    return sets + [("all", f"{layers} layers x 8", "all")]


def run_node_starts(children: Children, work_dir: pathlib.Path, peers: list[str], dirs: dict, pick: int) -> dict:
    layers, cases = NODE_LAYERS[pick], []
    # The twin first: the first node start after the decoding swarm is the slowest (it also warms up).
    # Cold: what the node reads of the checkpoint is then what enters the page cache.
    twin = start_case(children, work_dir, peers, dirs["twin"], "twin_1e", "twin 1 expert", "layers 0, experts 0",
                      1, cold=True)
    for key, label, spec in expert_sets(layers, pick):
        cases.append(start_case(children, work_dir, peers, dirs["node"], key, label, spec, STARTS[pick]))
    if not pick:
        key, label, spec = expert_sets(layers, pick)[-1]
        cases.append(start_case(children, work_dir, peers, dirs["node"], f"{key}_cold", f"{label}, cold", spec,
                                1, cold=True))
    base = cases[0]
    for case in cases[1:]:
        extra = case["hosted_bytes"] - base["hosted_bytes"]
        case["ratio"] = (case["rss_kib"] - base["rss_kib"]) * 1024 / extra if extra > 0 else None
    largest = max((case for case in cases if not case["cold"]), key=lambda case: case["hosted_bytes"])
    size_diff = sum(tensor_bytes(dirs["node"]).values()) - sum(tensor_bytes(dirs["twin"]).values())
    extra = largest["hosted_bytes"] - base["hosted_bytes"]
    return {
        "nodes": [twin] + cases,
        "runtime_rss_mib": (base["rss_kib"] * 1024 - base["hosted_bytes"]) / MIB,
        "peak": {"label": largest["label"], "ratio": (largest["hwm_kib"] - base["hwm_kib"]) * 1024 / extra},
        "selective": {"layers": layers, "rss_growth_mib": (base["rss_kib"] - twin["rss_kib"]) / 1024,
                      "hwm_growth_mib": (base["hwm_kib"] - twin["hwm_kib"]) / 1024,
                      "checkpoint_diff_mib": size_diff / MIB, "limit_mib": SELECTIVE_TARGET * size_diff / MIB},
    }


def start_case(children, work_dir, peers, model_dir, key, label, spec, starts, cold=False) -> dict:
    """Start a node `starts` times on `spec`; the medians of what measure_node reports."""
    runs = []
    for i in range(starts):
        if cold:
            evict_page_cache(model_dir)
            cached_before = cached_bytes(model_dir)
        runs.append(measure_node(children, work_dir, f"node-{key}-{i}", model_dir, spec, peers))
        if cold:  # what the node read: pages of the checkpoint's files now in the page cache
            runs[-1].update(cached_before_bytes=cached_before, read_bytes=cached_bytes(model_dir) - cached_before)
    progress(f"node {label}: {len(runs[0]['uids'])} experts, ready in {median([r['ready_s'] for r in runs]):.2f} s")
    numbers = [k for k, v in runs[0].items() if isinstance(v, (int, float))]
    case = {k: median([r[k] for r in runs]) for k in numbers}
    case.update(key=key, label=label, spec=spec, cold=cold, experts=len(runs[0]["uids"]), ratio=None,
                hosted_bytes=hosted_bytes(model_dir, runs[0]["uids"]),
                checkpoint_file_bytes=sum(path.stat().st_size for path in model_dir.glob("*.safetensors")),
                runs=[{k: r[k] for k in numbers} for r in runs])
    return case


def measure_node(children: Children, work_dir: pathlib.Path, name: str, model_dir: pathlib.Path, spec: str,
                 peers: list[str]) -> dict:
    """Launch one node, wait for its ready file, let it settle, read its memory, stop it."""
    ready = work_dir / f"{name}.json"
    cmd = [sys.executable, "-m", "moeswarm.deploy.cli", "node", "--model", str(model_dir), "--experts", spec,
           "--initial-peers", *peers, "--ready-file", str(ready), "--exit-with-parent"]
    started = time.perf_counter()
    proc = children.spawn(cmd, name)
    try:
        uids = wait_ready(ready, proc, name)["uids"]
        ready_s = time.perf_counter() - started
        time.sleep(SETTLE_S)
        main_memory, tree = status_memory(proc.pid), tree_memory(proc.pid)
    finally:  # killed at once: a graceful stop (~2 s) is not what this measures
        children.stop(proc, grace_s=0)
    loaded = LOADED.search((work_dir / f"{name}.log").read_text(errors="replace"))
    return {"uids": uids, "ready_s": ready_s, "load_s": float(loaded[2]) if loaded else float("nan"),
            **main_memory, **tree}


def status_memory(pid: int) -> dict:
    """RSS (anon and file parts) and peak RSS of one process, KiB, from /proc/PID/status."""
    fields = {"VmRSS": "rss_kib", "RssAnon": "anon_kib", "RssFile": "file_kib", "VmHWM": "hwm_kib"}
    usage = {}
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in fields:
            usage[fields[key]] = int(rest.split()[0])
    return usage


def tree_memory(pid: int) -> dict:
    """RSS and PSS (KiB) summed over the process and its descendants."""
    usages = []
    for member in process_tree(pid):
        try:
            usages.append(memory_of(member))
        except OSError:  # exited while we walked
            continue
    return {"tree_rss_kib": sum(u["rss_kib"] for u in usages), "tree_pss_kib": sum(u["pss_kib"] for u in usages),
            "tree_processes": len(usages)}


if __name__ == "__main__":
    sys.exit(main())
