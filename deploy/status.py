"""`moeswarm status`: what the DHT says about a swarm's nodes and experts, as a table or JSON."""

from __future__ import annotations

import json

from moeswarm.model.directory import MAX_VIEW_EXPERTS, SwarmView, models_in_view, read_swarm
from moeswarm.protocol.dht import start_dht, stop_dht
from moeswarm.protocol.spec import parse_uid, uid_sort_key


def missing_experts(view: SwarmView) -> dict[str, list[str]]:
    """model name -> experts of that model (per the spec most of its nodes announce) that no node
    announces, except those of unserved_indices. Lists at most MAX_VIEW_EXPERTS in all
    (models_in_view picks the models). Pure."""
    unserved = unserved_indices(view)
    missing = {
        model.name: [uid for uid in model.spec.all_uids() if not view.experts.get(uid) and parse_uid(uid).expert not in unserved.get(model.name, ())]
        for model in models_in_view(view.nodes)[0] if model.spec is not None
    }
    return {name: uids for name, uids in missing.items() if uids}


def unserved_indices(view: SwarmView) -> dict[str, list[int]]:
    """model name -> expert indices that no node serves in any of its (two or more) MoE layers, while
    others are served. A
    model's shared experts count in its spec, and its clients may compute them (model directories
    do by default): such an index is not a gap, so it is named apart from missing_experts. Pure."""
    unserved = {}
    for model in models_in_view(view.nodes)[0]:
        layers = model.spec.layers_with_experts() if model.spec is not None else []
        if len(layers) < 2:
            continue
        indices = [e for e in range(model.spec.n_experts) if not any(view.experts.get(model.spec.uid(layer, e)) for layer in layers)]
        if indices and len(indices) < model.spec.n_experts:  # a model no node serves at all is just missing
            unserved[model.name] = indices
    return unserved


def mixed_origins(view: SwarmView) -> dict[str, dict[str, list[str]]]:
    """uid -> {origin: endpoints} for the experts whose replicas announce different weights under
    the same UID (ExpertRecord.origin: nodes started from other model directories or seeds). Pure."""
    mixed = {}
    for uid, records in view.experts.items():
        origins: dict[str, list[str]] = {}
        for record in records:
            if record.origin:
                origins.setdefault(record.origin, []).append(record.endpoint)
        if len(origins) > 1:
            mixed[uid] = {origin: sorted(endpoints) for origin, endpoints in sorted(origins.items())}
    return mixed


def format_expert_table(view: SwarmView) -> str:
    lines = [f"{len(view.nodes)} nodes, {len(view.experts)} experts"]
    grpc_only = sorted(record.endpoint for record in view.nodes.values() if not record.data_port)
    if grpc_only:
        shown = ", ".join(grpc_only[:4]) + (", ..." if len(grpc_only) > 4 else "")
        lines.append(f"nodes without a data port (data_port: null, or an older version; clients reach them over gRPC, "
                     f"~0.2-0.3 ms slower per call): {len(grpc_only)}: {shown}")
    if mixed := mixed_origins(view):
        uid = min(mixed, key=uid_sort_key)
        example = "; ".join(f"origin {origin} at {', '.join(endpoints)}" for origin, endpoints in mixed[uid].items())
        lines.append(
            f"{len(mixed)} experts are served from different weights by their replicas (e.g. {uid}: {example}): "
            "nodes started from other model directories or seeds; a client of a model directory uses the replicas of its own"
        )
    for name, uids in sorted(missing_experts(view).items()):
        shown = ", ".join(sorted(uids, key=uid_sort_key)[:6]) + (", ..." if len(uids) > 6 else "")
        lines.append(f"model {name}: {len(uids)} experts have no replica: {shown}")
    for name, indices in sorted(unserved_indices(view).items()):
        lines.append(
            f"model {name}: experts {', '.join(f'E{e}' for e in indices)} are on no node in any layer "
            "(as expected for shared experts that clients compute)"
        )
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
        "unserved_in_every_layer": unserved_indices(view),  # model -> expert indices (shared experts clients compute)
        "skipped": view.skipped,  # model -> experts not read (over MAX_VIEW_EXPERTS)
        "mixed_origins": mixed_origins(view),  # uid -> {origin: endpoints}, where replicas serve different weights
    }


def print_status(initial_peers: list[str], swarm: str, *, as_json: bool) -> int:
    dht = start_dht(initial_peers=initial_peers, client_mode=True)
    try:
        view = read_swarm(dht, swarm)
    finally:
        stop_dht(dht)
    print(json.dumps(view_as_json(view), indent=1) if as_json else format_expert_table(view))
    return 0 if view.nodes else 1
