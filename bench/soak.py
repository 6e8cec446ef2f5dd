"""Soak test: a real local swarm under long, mixed use; reports per-process growth and flags leaks.

Starts a swarm as `moeswarm swarm up` does (deploy/swarm.py LocalSwarm: a bootstrap DHT peer and
NODES node processes hosting a tiny MoE language model's experts, REPLICAS replicas each), opens the
model on the swarm in this process (RemoteMoE layers sharing one SwarmClient), then loops until the
time is up:
  - inference forwards of the LM at batch sizes cycling through BATCHES (torch.no_grad());
  - training steps: forward + backward (nodes keep activations, accumulate grads, step optimizers);
  - a short `generate` (KV cache, one RPC per node per layer and token) every few rounds;
  - churn every --churn-s: a node other than node 0 is killed (SIGKILL, as a crash; every other time
    SIGTERM, as a volunteer leaving), then started again from its directory (a new gRPC port: to the
    client a new endpoint joins, the old one is dead for good). Node 0 and the bootstrap peer live
    throughout, so their series cover the whole run.
Every --sample-s it records, for each process (node i, its DHT child and its p2pd; the bootstrap
peer; this client, its DHT child and p2pd): RSS, PSS, open FDs and threads; for this client also
its in-process state (gRPC channels held, replica-health entries, banned replicas, directory
entries, asyncio tasks on the dispatcher loop, live Python objects), and the run dir's file count
and bytes. Reported per series: first value after warm-up, last value, least-squares slope per hour
after warm-up (each series from its own first sample); a series whose growth after warm-up exceeds its
tolerance is flagged MISS.
A killed node's leftover DHT child or p2pd (orphans) are counted before it is started again.
Run, with moeswarm importable:  python bench/soak.py [--quick | --minutes N] [--json out.json]
--quick takes under a minute (warm-up 15 s); the default run 15 minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import signal
import sys
import tempfile
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from common import Progress, finish, kill_descendants, machine_info, print_load, process_tree  # noqa: E402
from soak_probe import ProcessProbe, Series, client_state, dir_usage, growth_figures  # noqa: E402

NODES, REPLICAS, TORCH_THREADS = 3, 2, 1
SIZES = dict(name="soak-moe", vocab_size=258, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=128)
N_EXPERTS, K = 4, 2
BATCHES = (1, 4, 16, 64)  # sequences of SEQ tokens per inference call
SEQ = 16
GENERATE_EVERY = 5  # rounds
progress = Progress()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 45 s run (churn every 15 s), to check the harness")
    parser.add_argument("--minutes", type=float, default=15.0, help="how long to run (default 15)")
    parser.add_argument("--churn-s", type=float, default=60.0, help="kill and restart a node this often (0: never)")
    parser.add_argument("--sample-s", type=float, default=5.0, help="sample every process this often")
    parser.add_argument("--warmup-s", type=float, default=60.0, help="samples before this are left out of the slopes")
    parser.add_argument("--run-dir", help="where the swarm keeps its state and logs (default: a temp dir, removed)")
    parser.add_argument("--json", metavar="PATH", help="also write every series, figure and the machine info here")
    args = parser.parse_args()
    if args.quick:
        args.minutes, args.churn_s, args.sample_s, args.warmup_s = 0.75, 15.0, 3.0, 15.0
    started, load_before = time.monotonic(), os.getloadavg()
    torch.set_num_threads(TORCH_THREADS)
    try:
        with tempfile.TemporaryDirectory(prefix="moeswarm-soak-") if args.run_dir is None else contextlib.nullcontext(args.run_dir) as path:
            work_dir = pathlib.Path(path)
            work_dir.mkdir(parents=True, exist_ok=True)
            series, details = run(work_dir, args)
    finally:
        kill_descendants()
    figures = growth_figures(series, args.warmup_s)
    details.update(duration_s=time.monotonic() - started, warmup_s=args.warmup_s, machine=machine_info())
    details["series"] = {name: s.points for name, s in series.items()}
    finish(figures, details, load_before, started, args.quick, args.json, report, print_context)
    return 1 if any(f.passed is False for f in figures) else 0


def report(figures, details: dict, quick: bool) -> dict:
    return {"benchmark": "soak", "quick": quick, "figures": [f.__dict__ for f in figures], "details": details}


def print_context(details: dict) -> None:
    work = details["work"]
    print(f"work: {work['infer_calls']} inference calls, {work['train_steps']} training steps, "
          f"{work['generate_calls']} generate calls, {work['errors']} failed calls; "
          f"churn: {details['churn']['kills']} SIGKILL + {details['churn']['leaves']} SIGTERM, "
          f"{details['churn']['orphans']} orphaned processes left by killed nodes")
    print_load(details)


def run(work_dir: pathlib.Path, args) -> tuple[dict[str, Series], dict]:
    from moeswarm.deploy.swarm import LocalSwarm, SwarmPlan
    from moeswarm.model.lm import build_local_model, open_model, save_model
    from moeswarm.model.lm_config import MoELMConfig
    from moeswarm.model.routing import RoutingConfig

    config = MoELMConfig(**SIZES, routing=RoutingConfig(n_experts=N_EXPERTS, k=K))
    model_dir = save_model(build_local_model(config), work_dir / "model")
    plan = SwarmPlan(model=config.spec(), nodes=NODES, replicas=REPLICAS, model_dir=str(model_dir), seed=config.seed,
                     uids=tuple(config.remote_uids()), torch_threads=TORCH_THREADS, run_dir=work_dir / "swarm",
                     node_overrides=("checkpoint_interval_s=10", "average_every_s=30"))
    with LocalSwarm(plan) as swarm:
        progress(f"swarm up: {NODES} nodes, {len(plan.uids)} experts x {REPLICAS}; run dir {work_dir}")
        with open_model(model_dir, initial_peers=swarm.initial_peers) as lm:
            return Soak(swarm, lm, args).loop()


class Soak:
    def __init__(self, swarm, lm, args):
        self.swarm, self.lm, self.args = swarm, lm, args
        self.series: dict[str, Series] = {}
        self.work = dict(infer_calls=0, train_steps=0, generate_calls=0, errors=0)
        self.churn = dict(kills=0, leaves=0, orphans=0, restart_s=[])
        self.optimizer = torch.optim.AdamW([p for p in lm.model.parameters() if p.requires_grad], lr=1e-4)
        self.probe = ProcessProbe()
        self.incarnation = [0] * NODES  # a restarted node's processes are new series: node1#2, ...

    def loop(self) -> tuple[dict[str, Series], dict]:
        end = time.monotonic() + self.args.minutes * 60
        next_sample = next_churn = time.monotonic()
        next_churn += self.args.churn_s or float("inf")
        victim, rounds = 0, 0
        while time.monotonic() < end:
            if time.monotonic() >= next_sample:
                self.sample()
                next_sample += self.args.sample_s
            if time.monotonic() >= next_churn:
                victim = 1 + victim % (NODES - 1)
                self.restart(victim, kill=(self.churn["kills"] + self.churn["leaves"]) % 2 == 0)
                next_churn = time.monotonic() + self.args.churn_s
            self.step(rounds)
            rounds += 1
        self.sample()
        return self.series, {"work": self.work, "churn": {**self.churn, "restart_s": self.churn["restart_s"]}}

    def step(self, i: int) -> None:
        from moeswarm.model.generation import SamplingConfig, generate

        batch = BATCHES[i % len(BATCHES)]
        tokens_BT = torch.randint(0, SIZES["vocab_size"], (batch, SEQ), generator=torch.Generator().manual_seed(i))
        model = self.lm.model
        try:
            model.eval()
            with torch.no_grad():
                model(tokens_BT)
            self.work["infer_calls"] += 1
            model.train()
            logits = model(tokens_BT[: max(1, batch // 4)])
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens_BT[: max(1, batch // 4), 1:].reshape(-1))
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            self.work["train_steps"] += 1
            model.eval()
            if i % GENERATE_EVERY == 0:
                generate(model, tokens_BT[:1, :4], SamplingConfig(max_new_tokens=8, temperature=0.8, seed=i))
                self.work["generate_calls"] += 1
        except Exception as e:  # a call that failed during churn: counted, the soak goes on
            self.work["errors"] += 1
            if self.work["errors"] <= 5:
                progress(f"call failed: {type(e).__name__}: {str(e)[:160]}")

    def restart(self, i: int, *, kill: bool) -> None:
        """Kill (SIGKILL, the node process alone, as a crash) or stop (SIGTERM) node i, count what it
        leaves behind, then start it again from its directory and wait (bounded) for it to be ready."""
        proc = self.swarm.nodes[i]
        tree = process_tree(proc.pid)
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(10)
        except Exception:
            proc.kill()
            proc.wait()
        time.sleep(3.0)  # a DHT child watching its parent has this long to notice
        orphans = [pid for pid in tree[1:] if _alive(pid)]
        self.churn["orphans"] += len(orphans)
        self.churn["kills" if kill else "leaves"] += 1
        self.incarnation[i] += 1
        ready_file = self.swarm.node_dir(i) / "ready.json"
        ready_file.unlink(missing_ok=True)
        started = time.monotonic()
        self.swarm.restart_node(i)  # kills whatever is left of the old process group first
        while self.swarm.node_ready(i) is None and time.monotonic() - started < 60:
            time.sleep(0.2)
        self.churn["restart_s"].append(round(time.monotonic() - started, 2))
        progress(f"node {i} {'killed' if kill else 'stopped'}: {len(orphans)} orphans; back on "
                 f"{self.swarm.ready[i]['endpoint']} in {time.monotonic() - started:.1f} s")

    def sample(self) -> None:
        now = time.monotonic()
        roots = {"dht-bootstrap": self.swarm.procs[0].pid}
        roots.update({f"node{i}" + (f"#{n}" if n else ""): proc.pid for i, (proc, n) in enumerate(zip(self.swarm.nodes, self.incarnation))})
        swarm_pids = frozenset(pid for root in roots.values() for pid in process_tree(root))
        roots["client"] = os.getpid()  # its own DHT child and p2pd, not the swarm it started
        for root, pid in roots.items():
            for name, values in self.probe.tree(root, pid, swarm_pids if root == "client" else frozenset()).items():
                for key, value in values.items():
                    self._add(f"{name}.{key}", now, value)
        for key, value in client_state(self.lm.client).items():
            self._add(f"client.state.{key}", now, value)
        for key, value in dir_usage(self.swarm.run_dir).items():
            self._add(f"run_dir.{key}", now, value)

    def _add(self, name: str, now: float, value: float) -> None:
        self.series.setdefault(name, Series(name)).points.append((round(now, 2), value))


def _alive(pid: int) -> bool:
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


if __name__ == "__main__":
    sys.exit(main())
