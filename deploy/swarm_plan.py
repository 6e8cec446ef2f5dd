"""What `moeswarm swarm up` will start, decided before any process starts: the SwarmPlan built from
the command line, each node's config, CPU pinning; bad flags are ConfigErrors here."""

from __future__ import annotations

import dataclasses
import os
import pathlib

from moeswarm.coordinator.placement import place_experts
from moeswarm.deploy.configfile import apply_overrides, build
from moeswarm.node.affinity import available_cpus, format_cpus
from moeswarm.node.config import NodeConfig
from moeswarm.node.model_source import is_hf_checkpoint, spec_of
from moeswarm.protocol.errors import ConfigError
from moeswarm.protocol.spec import ModelSpec


@dataclasses.dataclass(frozen=True, kw_only=True)
class SwarmPlan:
    model: ModelSpec
    nodes: int = 4
    replicas: int = 2
    swarm: str = "default"
    run_dir: pathlib.Path | None = None  # node state (checkpoints); a temp dir when None
    seed: int = 0
    torch_threads: int = 1
    model_dir: str | None = None  # serve this model directory's experts (None: the seed's init)
    uids: tuple[str, ...] | None = None  # the experts to place (None: every expert of the model)
    placement: str = "spread"  # coordinator/placement.py: "spread" (throughput) or "by-layer" (decoding latency)
    node_overrides: tuple[str, ...] = ()  # "key=value" applied to every node's config (--node-set)
    pin_cpus: bool = True  # give each node its own CPUs when there are enough (node_cpus)
    restart_nodes: bool = True  # start a node again when it exits (watch_until_signal)


# Keys swarm up sets per node from its plan; --node-set may change any other key of a node config.
PLANNED_NODE_KEYS = frozenset({"model", "experts", "seed", "model_dir", "swarm", "initial_peers", "state_dir", "host", "port", "dht_port"})


def node_cpus(nodes: int, threads: int, available: list[int] | None) -> list[tuple[int, ...]] | None:
    """The CPUs each node is pinned to: `threads` of the available ones each, none shared. None (leave
    them to the scheduler) when there are too few CPUs for that or the OS cannot pin. Pure."""
    if available is None or nodes * threads > len(available):
        return None
    return [tuple(available[i * threads : (i + 1) * threads]) for i in range(nodes)]


def planned_cpus(plan: SwarmPlan) -> list[tuple[int, ...]] | None:
    return node_cpus(plan.nodes, plan.torch_threads, available_cpus()) if plan.pin_cpus else None


def node_configs(plan: SwarmPlan, initial_peers: list[str], run_dir: pathlib.Path) -> list[dict]:
    """One node YAML mapping per node, from the placement plan, with plan.node_overrides applied."""
    placement = place_experts(list(plan.uids or plan.model.all_uids()), plan.nodes, plan.replicas, layout=plan.placement)
    cpus = planned_cpus(plan)
    planned = [
        {
            "model": plan.model.to_config(),
            "experts": uids,
            "seed": plan.seed,
            **({"model_dir": str(pathlib.Path(plan.model_dir).resolve())} if plan.model_dir else {}),
            "swarm": plan.swarm,
            "initial_peers": initial_peers,
            "state_dir": str(run_dir / f"node{i}"),
            "torch_threads": plan.torch_threads,
            **({"cpus": list(cpus[i])} if cpus else {}),
            # the nodes share this machine with a client, often: they must not preempt it (node/affinity.py)
            **({"sched_batch": True} if hasattr(os, "SCHED_BATCH") else {}),
        }
        for i, uids in enumerate(placement)
    ]
    return [apply_overrides(config, list(plan.node_overrides), flag="--node-set") for config in planned]


def check_node_overrides(plan: SwarmPlan) -> None:
    """ConfigError, before any process starts, for a --node-set of a planned key or a bad value."""
    for item in plan.node_overrides:
        top = item.partition("=")[0].split(".")[0]
        if top in PLANNED_NODE_KEYS:
            raise ConfigError(f"--node-set {item!r}: swarm up sets {top!r} for each node itself")
    build(NodeConfig, node_configs(plan, [], pathlib.Path("unused"))[0])


def describe_pinning(plan: SwarmPlan) -> str:
    cpus = planned_cpus(plan)
    if cpus:
        return "node CPUs (--no-pin-cpus leaves them to the scheduler): " + ", ".join(f"node{i} {format_cpus(c)}" for i, c in enumerate(cpus))
    if not plan.pin_cpus:
        return "node CPUs: not pinned (--no-pin-cpus)"
    available = available_cpus()
    if available is None:
        return "node CPUs: not pinned (this OS cannot pin)"
    return f"node CPUs: not pinned ({plan.nodes} nodes x {plan.torch_threads} threads > {len(available)} CPUs)"


BARE_DEFAULTS = dict(layers=2, experts=8, d_model=256, d_ff=1024)  # experts-only swarm (no language model)


def default_model_dir(name: str, parent: pathlib.Path) -> pathlib.Path:
    """Write (once) the small language model `swarm up` serves when no --model is given."""
    from moeswarm.deploy.model_cli import config_from_args
    from moeswarm.model.lm import build_local_model, save_model
    from moeswarm.model.model_dir import MANIFEST, read_manifest

    path = parent / "model"
    if not (path / MANIFEST).exists():
        save_model(build_local_model(config_from_args(name, "small", "topk", [])), path)
    elif (held := read_manifest(path).config.name) != name:
        raise ConfigError(
            f"--run-dir {parent} holds the model {held!r} of an earlier run ({path}), not {name!r}: "
            f"run with --model-name {held}, or give another --run-dir for a new model"
        )
    return path


def plan_from_args(args, scratch: pathlib.Path) -> SwarmPlan:
    """The swarm to start: a model directory's experts (--model), experts only (any size flag), or
    by default a fresh small language model written under the run dir (or `scratch`)."""
    run_dir = pathlib.Path(args.run_dir) if args.run_dir else None
    common = dict(
        nodes=args.nodes, replicas=args.replicas, swarm=args.swarm, run_dir=run_dir, placement=args.placement,
        node_overrides=tuple(args.node_set), pin_cpus=not args.no_pin_cpus, restart_nodes=not args.no_restart,
        torch_threads=_node_set_threads(args.node_set),
    )
    bare = {key: getattr(args, key) for key in BARE_DEFAULTS if getattr(args, key) is not None}
    if args.model and bare:
        raise ConfigError(f"--model serves a model directory; drop --{next(iter(bare)).replace('_', '-')}")
    if bare:
        sizes = {**BARE_DEFAULTS, **bare}
        spec = ModelSpec(
            name=args.model_name or "tiny-moe", d_model=sizes["d_model"], d_ff=sizes["d_ff"], n_layers=sizes["layers"], n_experts=sizes["experts"]
        )
        plan = SwarmPlan(model=spec, **common)
    elif args.model and is_hf_checkpoint(args.model):
        spec = spec_of(args.model, args.model_name)
        plan = SwarmPlan(model=spec, model_dir=str(args.model), **common)
    else:
        from moeswarm.model.model_dir import read_manifest

        model_dir = pathlib.Path(args.model) if args.model else default_model_dir(args.model_name or "tiny-moe", run_dir or scratch)
        spec = spec_of(model_dir, args.model_name)  # a --model-name it does not hold is refused, as by `node --name`
        config = read_manifest(model_dir).config
        plan = SwarmPlan(model=spec, seed=config.seed, model_dir=str(model_dir), uids=tuple(config.remote_uids()), **common)
    check_placement(plan)
    check_node_overrides(plan)
    return plan


def _node_set_threads(node_set: list[str]) -> int:
    """The nodes' torch_threads as --node-set gives it (pinning gives each node that many CPUs), else 1;
    a bad value is left to check_node_overrides to refuse."""
    threads = apply_overrides({}, list(node_set), flag="--node-set").get("torch_threads", 1)
    return threads if type(threads) is int and threads >= 1 else 1


def check_placement(plan: SwarmPlan) -> None:
    """ConfigError, before any process starts, for nodes and replicas that cannot share out the
    experts: more replicas than nodes, or a node that would host no expert (it could not start)."""
    uids = list(plan.uids or plan.model.all_uids())
    try:
        place_experts(uids, plan.nodes, plan.replicas, layout=plan.placement)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    slots = len(uids) * plan.replicas  # every node needs one
    if plan.nodes > slots:
        raise ConfigError(
            f"--nodes {plan.nodes} > {len(uids)} experts x --replicas {plan.replicas}: {plan.nodes - slots} node(s) "
            f"would host no expert; give at most {slots} nodes, or more replicas"
        )
