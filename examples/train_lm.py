"""Train a model directory's MoE language model on Python's standard-library sources and save it
back, so `moeswarm generate` shows Python-like text instead of noise. Every expert in this process:

    moeswarm model init /tmp/tiny
    python examples/train_lm.py /tmp/tiny --steps 300      # a few minutes on 2 CPU cores
    moeswarm swarm up --model /tmp/tiny
    moeswarm generate --initial-peers MADDR --model /tmp/tiny --prompt "def " --max-new-tokens 80

Or on the swarm: the dense part (embeddings, attention, gates) trains here, each expert on the nodes
that host it (from the gradients sent back), replicas averaging now and then; at the end the dense
weights are saved from here and every expert pulled from its most trained replica:

    moeswarm swarm up --model /tmp/tiny                    # in another terminal; prints MADDR
    python examples/train_lm.py /tmp/tiny --steps 300 --initial-peers MADDR

Objective: next-byte cross-entropy + 0.01 x load-balancing loss + 0.001 x router z-loss (the model's
aux_losses(), so every routing mode trains its gates toward balance).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch.nn import functional as F

from moeswarm.model.corpus import random_windows, stdlib_sources
from moeswarm.model.lm import open_model, save_model
from moeswarm.protocol.errors import ConfigError, MoeSwarmError


def train(
    model_dir: str, steps: int, batch: int = 16, length: int = 128, lr: float = 3e-3, seed: int = 0,
    initial_peers: list[str] | None = None,
) -> list[float]:
    with open_model(model_dir, initial_peers=initial_peers) as lm:
        return _train(lm, model_dir, steps, batch, length, lr, seed)


def _train(lm, model_dir: str, steps: int, batch: int, length: int, lr: float, seed: int) -> list[float]:
    model, tokenizer = lm.model.train(), lm.tokenizer
    if length > model.config.max_seq_len:
        raise ConfigError(f"windows of {length} bytes are longer than the model's max_seq_len ({model.config.max_seq_len})")
    data_N = torch.tensor(list(stdlib_sources()), dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
    losses, started = [], time.monotonic()
    try:
        for step in range(steps):
            window_BT = random_windows(data_N, batch, length, generator)
            logits_BTV = model(window_BT[:, :-1])
            loss = F.cross_entropy(logits_BTV.reshape(-1, logits_BTV.shape[-1]), window_BT[:, 1:].reshape(-1))
            aux = model.aux_losses()
            optimizer.zero_grad()
            (loss + 0.01 * aux["load_balancing"] + 1e-3 * aux["z_loss"]).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            if step % 25 == 0 or step == steps - 1:
                print(f"step {step:4d}  loss {loss.item():.3f} nats/byte  balance {aux['load_balancing'].item():.3f}  "
                      f"{time.monotonic() - started:.0f} s", flush=True)
    except KeyboardInterrupt:  # Ctrl-C: keep what was learned (on the swarm, the nodes' experts learned it too)
        print(f"interrupted after {len(losses)} of {steps} steps: saving them", flush=True)
    save_model(model.eval(), model_dir, tokenizer, client=lm.client, progress=_progress)
    return losses


def _progress(done: int, total: int, uid: str, version: int) -> None:
    if done == total or done % 8 == 0:
        print(f"pulled {done}/{total} experts from the swarm (last: {uid}, {version} optimizer steps)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", help="a model directory (moeswarm model init)")
    parser.add_argument("--steps", type=_positive(int), default=300)
    parser.add_argument("--batch", type=_positive(int), default=16)
    parser.add_argument("--length", type=_positive(int), default=128, help="bytes per training window")
    parser.add_argument("--lr", type=_positive(float), default=3e-3)
    parser.add_argument("--initial-peers", nargs="+", metavar="MADDR", help="train on this swarm (experts on its nodes)")
    args = parser.parse_args()
    torch.set_num_threads(min(torch.get_num_threads(), 4))
    try:
        losses = train(args.dir, args.steps, args.batch, args.length, args.lr, initial_peers=args.initial_peers)
    except MoeSwarmError as e:  # no model folder, --length too long, a swarm not reached: the message says which
        parser.exit(2 if isinstance(e, ConfigError) else 1, f"{parser.prog}: {e}\n")
    print(f"saved {args.dir}" + (f": loss {losses[0]:.3f} -> {losses[-1]:.3f} nats/byte" if losses else ""))
    if len(losses) < args.steps:
        sys.exit(130)  # interrupted, as a shell reports Ctrl-C


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if not 0 < value < float("inf"):  # also refuses nan
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in "invalid int value" messages
    return parse


if __name__ == "__main__":
    main()
