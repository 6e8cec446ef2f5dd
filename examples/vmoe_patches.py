"""V-MoE style: image patches, not text tokens, routed through RemoteMoE (Riquelme et al. 2021).

A tiny vision model (patch embedding -> RemoteMoE block -> mean pool -> linear classifier) learns to
tell horizontal from vertical stripes. The MoE layer only sees [N, D] patch embeddings; its 8 experts
run on swarm nodes and learn there from the gradients this script sends back.

    python examples/vmoe_patches.py                          # starts its own local swarm
    python examples/vmoe_patches.py --initial-peers MADDR    # a swarm started with
        moeswarm swarm up --layers 1 --experts 8 --d-model 64 --d-ff 128 --model-name vmoe
"""

from __future__ import annotations

import argparse
import contextlib

import torch
from torch import nn
from torch.nn import functional as F

from moeswarm.model.remote_moe import RemoteMoE
from moeswarm.protocol.spec import ModelSpec

IMAGE, PATCH, D, EXPERTS = 16, 4, 64, 8
SPEC = ModelSpec(name="vmoe", d_model=D, d_ff=128, n_layers=1, n_experts=EXPERTS)


def stripes(batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, 1, 16, 16] noisy images of horizontal (label 0) or vertical (label 1) stripes."""
    labels = torch.randint(0, 2, (batch,), generator=generator)
    phase = torch.randint(0, 2, (batch, 1, 1), generator=generator)
    line = ((torch.arange(IMAGE)[None, :, None] + phase) % 2).float().expand(batch, IMAGE, IMAGE)
    images = torch.where(labels[:, None, None] == 0, line, line.transpose(1, 2))
    return (images + 0.3 * torch.randn(images.shape, generator=generator))[:, None], labels


class PatchMoEClassifier(nn.Module):
    def __init__(self, moe: nn.Module):
        super().__init__()
        self.embed = nn.Conv2d(1, D, kernel_size=PATCH, stride=PATCH)  # 16 patches of 4x4 per image
        self.position = nn.Parameter(torch.zeros(1, (IMAGE // PATCH) ** 2, D))
        self.norm = nn.LayerNorm(D)
        self.moe = moe
        self.head = nn.Linear(D, 2)

    def forward(self, images_B1HW: torch.Tensor) -> torch.Tensor:
        x_BPD = self.embed(images_B1HW).flatten(2).transpose(1, 2) + self.position
        x_BPD = x_BPD + self.moe(self.norm(x_BPD))  # every patch is routed to its top-2 experts
        return self.head(x_BPD.mean(dim=1))


def train(initial_peers: list[str], steps: int, batch: int, swarm: str = "default") -> list[float]:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    with RemoteMoE(model=SPEC.name, layer=0, d_model=D, n_experts=EXPERTS, k=2, initial_peers=initial_peers, swarm=swarm) as moe:
        model = PatchMoEClassifier(moe)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)  # the experts' optimizers run on the nodes
        losses = []
        for step in range(steps):
            images, labels = stripes(batch, generator)
            loss = F.cross_entropy(model(images), labels) + 0.01 * moe.last_routing.load_balancing_loss()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if step % 10 == 0 or step == steps - 1:
                print(f"step {step:3d}  loss {loss.item():.3f}", flush=True)
        images, labels = stripes(256, generator)
        with torch.no_grad():
            accuracy = (model(images).argmax(-1) == labels).float().mean().item()
        print(f"accuracy on 256 new images: {accuracy:.0%}", flush=True)
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--initial-peers", nargs="+", help="join this swarm instead of starting one")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    if args.steps < 1 or args.batch < 1:
        parser.error(f"--steps and --batch must be at least 1, got {args.steps} and {args.batch}")
    try:
        with contextlib.ExitStack() as stack:
            peers = args.initial_peers
            if not peers:
                from moeswarm.deploy.swarm import LocalSwarm, SwarmPlan

                print("starting a local swarm: 2 nodes hosting 8 experts of 'vmoe' ...", flush=True)
                peers = stack.enter_context(LocalSwarm(SwarmPlan(model=SPEC, nodes=2, replicas=1))).initial_peers
            train(peers, args.steps, args.batch)
    except KeyboardInterrupt:  # Ctrl-C: the swarm this script started is stopped by now
        parser.exit(130, "interrupted\n")


if __name__ == "__main__":
    main()
