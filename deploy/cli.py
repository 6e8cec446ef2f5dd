"""The `moeswarm` command: node, swarm up, status."""

from __future__ import annotations

import argparse
import logging
import sys

from moeswarm.protocol.errors import ConfigError, StartupError

DEFAULT_MODEL = dict(name="tiny-moe", d_model=256, d_ff=1024, n_layers=2, n_experts=8)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"moeswarm: config error: {e}", file=sys.stderr)
        return 2
    except StartupError as e:
        print(f"moeswarm: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moeswarm", description="Mixture-of-Experts on volunteer machines")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    node = commands.add_parser("node", help="host experts: serve them over gRPC and announce them in the DHT")
    node.add_argument("--config", required=True, help="node YAML (see deploy/node.example.yaml)")
    node.add_argument("--initial-peers", nargs="+", default=None, metavar="MADDR", help="DHT peers to join")
    node.add_argument("--port", type=int, default=None, help="gRPC port (overrides the config)")
    node.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    node.add_argument("--ready-file", help="write endpoint and multiaddrs as JSON here when serving")
    node.add_argument("--exit-with-parent", action="store_true", help=argparse.SUPPRESS)
    node.set_defaults(func=_cmd_node)

    dht = commands.add_parser("dht", help="run a bare DHT peer for others to join (a bootstrap peer)")
    dht.add_argument("--host", default="127.0.0.1")
    dht.add_argument("--port", type=int, default=0)
    dht.add_argument("--initial-peers", nargs="+", default=[], metavar="MADDR")
    dht.add_argument("--ready-file", help="write the multiaddrs as JSON here when ready")
    dht.add_argument("--exit-with-parent", action="store_true", help=argparse.SUPPRESS)
    dht.set_defaults(func=_cmd_dht)

    swarm = commands.add_parser("swarm", help="a local swarm on 127.0.0.1")
    swarm_commands = swarm.add_subparsers(required=True, metavar="ACTION")
    up = swarm_commands.add_parser("up", help="start a DHT peer and N nodes hosting a small model; Ctrl-C stops all")
    up.add_argument("--nodes", type=int, default=4)
    up.add_argument("--replicas", type=int, default=2, help="nodes hosting each expert")
    up.add_argument("--layers", type=int, default=DEFAULT_MODEL["n_layers"])
    up.add_argument("--experts", type=int, default=DEFAULT_MODEL["n_experts"], help="experts per layer")
    up.add_argument("--d-model", type=int, default=DEFAULT_MODEL["d_model"])
    up.add_argument("--d-ff", type=int, default=DEFAULT_MODEL["d_ff"])
    up.add_argument("--model-name", default=DEFAULT_MODEL["name"])
    up.add_argument("--swarm", default="default")
    up.add_argument("--run-dir", help="keep node checkpoints and logs here (default: a temp dir removed at exit)")
    up.set_defaults(func=_cmd_swarm_up)

    status = commands.add_parser("status", help="experts, replicas, endpoints and load, read from the DHT")
    status.add_argument("--initial-peers", nargs="+", required=True, metavar="MADDR")
    status.add_argument("--swarm", default="default")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.set_defaults(func=_cmd_status)
    return parser


def _cmd_node(args) -> int:
    from moeswarm.deploy.configfile import apply_overrides, build, load_yaml
    from moeswarm.deploy.run_node import run_node
    from moeswarm.node.config import NodeConfig

    overrides = list(args.set)
    if args.port is not None:
        overrides.append(f"port={args.port}")
    data = apply_overrides(load_yaml(args.config), overrides)
    if args.initial_peers is not None:
        data["initial_peers"] = args.initial_peers
    config = build(NodeConfig, data)
    return run_node(config, ready_file=args.ready_file, exit_with_parent=args.exit_with_parent)


def _cmd_dht(args) -> int:
    from moeswarm.deploy.run_dht import run_dht

    return run_dht(
        host=args.host, port=args.port, initial_peers=args.initial_peers, ready_file=args.ready_file,
        exit_with_parent=args.exit_with_parent,
    )


def _cmd_swarm_up(args) -> int:
    from moeswarm.deploy.swarm import swarm_up

    return swarm_up(args)


def _cmd_status(args) -> int:
    from moeswarm.deploy.status import print_status

    return print_status(args.initial_peers, args.swarm, as_json=args.json)


if __name__ == "__main__":
    sys.exit(main())
