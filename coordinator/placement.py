"""Initial placement of experts on nodes: every expert on `replicas` distinct nodes, load spread evenly."""

from __future__ import annotations

from typing import Literal

Layout = Literal["spread", "by-layer"]
LAYOUTS: tuple[Layout, ...] = ("spread", "by-layer")


def place_experts(uids: list[str], n_nodes: int, replicas: int, *, layout: Layout = "spread") -> list[list[str]]:
    """Return, for each node, the UIDs it hosts: every expert on `replicas` distinct nodes, node loads
    within one expert of each other.

    spread: replica slots dealt round-robin (slot i * replicas + r goes to node slot % n); a layer's
      experts sit on every node, so a big batch keeps all nodes busy at once.
    by-layer: each replica of the expert list (in the given order, layer by layer) cut into n
      contiguous runs; a layer's experts sit on as few nodes as possible, so a decoding step (a few
      tokens) needs about one RPC per layer instead of one per node.
    """
    if n_nodes < 1:
        raise ValueError(f"nodes={n_nodes}: need at least one node")
    if not 1 <= replicas <= n_nodes:
        raise ValueError(f"replicas={replicas}: must be between 1 and the number of nodes ({n_nodes})")
    if layout not in LAYOUTS:
        raise ValueError(f"placement={layout!r}: one of {', '.join(LAYOUTS)}")
    plan: list[list[str]] = [[] for _ in range(n_nodes)]
    slots = len(uids) * replicas
    for i, uid in enumerate(uids):
        for r in range(replicas):
            if layout == "spread":
                node = (i * replicas + r) % n_nodes
            else:  # replica r of uid i is slot r * len + i; replicas are len slots apart: distinct nodes
                node = (r * len(uids) + i) * n_nodes // slots
            plan[node].append(uid)
    return plan
