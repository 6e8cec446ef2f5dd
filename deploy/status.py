"""`moeswarm status`: what the DHT says about a swarm's nodes and experts, as a table or JSON."""

from __future__ import annotations

import json

from moeswarm.model.directory import SwarmView, read_swarm
from moeswarm.protocol.dht import start_dht, stop_dht
from moeswarm.protocol.spec import ModelSpec, uid_sort_key


def missing_experts(view: SwarmView) -> dict[str, list[str]]:
    """model name -> experts of that model (per the nodes' announced specs) that no node announces. Pure."""
    missing: dict[str, list[str]] = {}
    for record in view.nodes.values():
        spec = ModelSpec.from_record(record.model)
        if spec is not None and spec.name not in missing:
            missing[spec.name] = [uid for uid in spec.all_uids() if not view.experts.get(uid)]
    return {name: uids for name, uids in missing.items() if uids}


def format_expert_table(view: SwarmView) -> str:
    lines = [f"{len(view.nodes)} nodes, {len(view.experts)} experts"]
    for name, uids in sorted(missing_experts(view).items()):
        shown = ", ".join(sorted(uids, key=uid_sort_key)[:6]) + (", ..." if len(uids) > 6 else "")
        lines.append(f"model {name}: {len(uids)} experts have no replica: {shown}")
    lines.append(f"{'expert':<24} {'replicas':>8}  endpoints (queue rows, rows/s, version[, inference only: refuses gradients])")
    for uid in sorted(view.experts, key=uid_sort_key):
        replicas = sorted(view.experts[uid], key=lambda record: record.endpoint)
        where = ", ".join(
            f"{r.endpoint} ({r.queue_depth}, {r.rows_per_s:.0f}, v{r.version}{'' if r.trainable else ', inference only'})" for r in replicas
        )
        lines.append(f"{uid:<24} {len(replicas):>8}  {where or '-- none --'}")
    return "\n".join(lines)


def view_as_json(view: SwarmView) -> dict:
    return {
        "nodes": {peer: record.model_dump() for peer, record in view.nodes.items()},
        "experts": {uid: [r.model_dump() for r in records] for uid, records in view.experts.items()},
        "missing": missing_experts(view),
    }


def print_status(initial_peers: list[str], swarm: str, *, as_json: bool) -> int:
    dht = start_dht(initial_peers=initial_peers, client_mode=True)
    try:
        view = read_swarm(dht, swarm)
    finally:
        stop_dht(dht)
    print(json.dumps(view_as_json(view), indent=1) if as_json else format_expert_table(view))
    return 0 if view.nodes else 1
