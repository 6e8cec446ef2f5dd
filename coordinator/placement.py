"""Initial placement of experts on nodes: every expert on `replicas` distinct nodes, load spread evenly."""

from __future__ import annotations


def place_experts(uids: list[str], n_nodes: int, replicas: int) -> list[list[str]]:
    """Return, for each node, the UIDs it hosts. Replica r of expert i goes to node (i + r * step) % n.

    The step spreads the replicas of neighbouring experts over different node pairs, so losing one
    node moves its load onto several others rather than onto a single neighbour.
    """
    if n_nodes < 1:
        raise ValueError(f"nodes={n_nodes}: need at least one node")
    if not 1 <= replicas <= n_nodes:
        raise ValueError(f"replicas={replicas}: must be between 1 and the number of nodes ({n_nodes})")
    step = max(1, n_nodes // replicas)
    plan: list[list[str]] = [[] for _ in range(n_nodes)]
    for i, uid in enumerate(uids):
        nodes = {(i + r * step) % n_nodes for r in range(replicas)}
        r = replicas
        while len(nodes) < replicas:  # step collided: fill with the next free nodes
            nodes.add((i + r) % n_nodes)
            r += 1
        for node in sorted(nodes):
            plan[node].append(uid)
    return plan
