"""`moeswarm status`: what the DHT says about a swarm's nodes and experts, as a table or JSON."""

from __future__ import annotations

import json

from moeswarm.model.directory import MAX_VIEW_EXPERTS, SwarmView, models_in_view, read_swarm
from moeswarm.protocol.dht import start_dht, stop_dht
from moeswarm.protocol.spec import uid_sort_key


def missing_experts(view: SwarmView) -> dict[str, list[str]]:
    """model name -> experts of that model (per the spec most of its nodes announce) that no node
    announces. Lists at most MAX_VIEW_EXPERTS in all (models_in_view picks the models). Pure."""
    read, _ = models_in_view(view.nodes)
    missing = {
        model.name: [uid for uid in model.spec.all_uids() if not view.experts.get(uid)] for model in read if model.spec is not None
    }
    return {name: uids for name, uids in missing.items() if uids}


def format_expert_table(view: SwarmView) -> str:
    lines = [f"{len(view.nodes)} nodes, {len(view.experts)} experts"]
    for name, uids in sorted(missing_experts(view).items()):
        shown = ", ".join(sorted(uids, key=uid_sort_key)[:6]) + (", ..." if len(uids) > 6 else "")
        lines.append(f"model {name}: {len(uids)} experts have no replica: {shown}")
    for name, size in sorted(view.skipped.items()):
        lines.append(f"model {name}: not read ({size} experts; status reads at most {MAX_VIEW_EXPERTS}, models with more nodes first)")
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
        "skipped": view.skipped,  # model -> experts not read (over MAX_VIEW_EXPERTS)
    }


def print_status(initial_peers: list[str], swarm: str, *, as_json: bool) -> int:
    dht = start_dht(initial_peers=initial_peers, client_mode=True)
    try:
        view = read_swarm(dht, swarm)
    finally:
        stop_dht(dht)
    print(json.dumps(view_as_json(view), indent=1) if as_json else format_expert_table(view))
    return 0 if view.nodes else 1
