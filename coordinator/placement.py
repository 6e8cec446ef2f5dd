"""Initial placement of experts on nodes: every expert on `replicas` distinct nodes, load spread evenly."""

from __future__ import annotations


def place_experts(uids: list[str], n_nodes: int, replicas: int) -> list[list[str]]:
    """Return, for each node, the UIDs it hosts: every expert on `replicas` distinct nodes.

    Replica slots are dealt round-robin (slot i * replicas + r goes to node slot % n), so node loads
    differ by at most one expert and an expert's replicas sit on consecutive, distinct nodes.
    """
    if n_nodes < 1:
        raise ValueError(f"nodes={n_nodes}: need at least one node")
    if not 1 <= replicas <= n_nodes:
        raise ValueError(f"replicas={replicas}: must be between 1 and the number of nodes ({n_nodes})")
    plan: list[list[str]] = [[] for _ in range(n_nodes)]
    for i, uid in enumerate(uids):
        for r in range(replicas):
            plan[(i * replicas + r) % n_nodes].append(uid)
    return plan
