"""The `moeswarm` command: node, dht, swarm up, model init, generate, status."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from moeswarm.deploy.model_cli import SIZE_PRESETS
from moeswarm.deploy.stop_signals import exit_at_once_on_stop_signals
from moeswarm.protocol.errors import ConfigError, MoeSwarmError, StartupError
from moeswarm.protocol.quick_import import import_with_gc_paused



def main(argv: list[str] | None = None) -> int:
    previous = exit_at_once_on_stop_signals()  # first: the commands that serve install their own handlers later
    args = _parser().parse_args(argv)
    interrupted = None
    if args.func is _cmd_generate:
        _start_generate_dht(args)
    # Still under exit-at-once: a KeyboardInterrupt inside torch's import (about 1 s, numpy's within
    # it) was swallowed there in 3 of 14 Ctrl-Cs (generate then ran to its end) and once aborted the process.
    import_with_gc_paused("torch")  # every command imports it (hivemind's DHT does too)
    try:  # from here a Ctrl-C may raise KeyboardInterrupt: all of it inside the try (one at ~1 s, in
        # import_dht_only, escaped it: exit by SIGINT with a traceback instead of 130)
        if args.func not in (_cmd_node, _cmd_dht, _cmd_swarm_up):  # the others stop on KeyboardInterrupt
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if previous[signal.SIGINT] is signal.default_int_handler:  # not where SIGINT was ignored (nohup, &)
                interrupted = _note_interrupts()
        from moeswarm.protocol.dht import import_dht_only

        import_dht_only()  # before anything imports hivemind: our processes need only its DHT
        configure_logging(args.log_level)
        return args.func(args)
    except SystemExit:
        raise
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt) or interrupted:
            # Ctrl-C, or what a library made of it: an import it cut short (numpy's, inside transformers)
            # raised RecursionError, then ModuleNotFoundError, with a traceback and exit code 1.
            return 130
        if isinstance(e, ConfigError):
            print(f"moeswarm: config error: {e}", file=sys.stderr)
            return 2
        if isinstance(e, (StartupError, MoeSwarmError)):
            print(f"moeswarm: {e}", file=sys.stderr)
            return 1
        raise
    finally:
        if argv is not None:  # main([...]) from Python: the caller's handlers come back, whatever the command set
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        elif interrupted is not None:  # the caller's Ctrl-C is Python's again
            signal.signal(signal.SIGINT, previous[signal.SIGINT])


def _start_generate_dht(args) -> None:
    """generate: start its client DHT peer's process before torch loads here, so that it imports and
    joins the swarm meanwhile (a 62-token generate against a local swarm: 3.3 s without, 2.75 s with).
    Flags it finds wrong start nothing; run_generate checks them again and reports them."""
    from moeswarm.deploy.model_cli import start_client_dht

    try:
        args.client_dht = start_client_dht(args)
    except ConfigError:
        pass


def _note_interrupts() -> list[int]:
    """SIGINT raises KeyboardInterrupt as Python's own handler does, and is also recorded in the
    returned list (non-empty once one came)."""
    seen: list[int] = []

    def on_sigint(signum, frame):
        seen.append(signum)  # a list append: no lock taken inside a signal handler (see stop_signals.StopFlag)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)
    return seen


def configure_logging(level_name: str) -> None:
    """Our loggers at `level_name`; other libraries' only from WARNING on (torch logs INFO at exit,
    e.g. its FakeTensor cache stats after a Ctrl-C, which users need not see)."""
    level = getattr(logging, level_name.upper())
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(max(level, logging.WARNING))
    logging.getLogger("moeswarm").setLevel(level)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moeswarm", description="Mixture-of-Experts on volunteer machines")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    node = commands.add_parser("node", help="host experts: serve them over gRPC and announce them in the DHT")
    node.add_argument("--config", help="node YAML (see deploy/node.example.yaml); optional with --model")
    node.add_argument("--model", metavar="DIR", help="serve experts of this model directory or Hugging Face checkpoint")
    node.add_argument("--experts", metavar="SPEC", help='with --model: e.g. "layers 0-3, experts 0-7" or "all" (default)')
    node.add_argument("--name", help="with a Hugging Face --model: the model name in the swarm (default: the folder name)")
    node.add_argument("--initial-peers", nargs="+", default=None, metavar="MADDR", help="DHT peers to join")
    node.add_argument("--port", type=int, default=None, help="gRPC port (overrides the config)")
    node.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    node.add_argument("--ready-file", help="write endpoint and multiaddrs as JSON here when serving")
    node.add_argument("--exit-with-parent", action="store_true", help=argparse.SUPPRESS)
    node.set_defaults(func=_cmd_node)

    dht = commands.add_parser("dht", help="run a bare DHT peer for others to join (a bootstrap peer)")
    dht.add_argument("--host", default="127.0.0.1", help="IP to listen on; 0.0.0.0: every interface (default: %(default)s)")
    dht.add_argument("--port", type=int, default=0, help="TCP port to listen on; 0: any free port (default: 0)")
    dht.add_argument("--announce-host", metavar="IP", help="the IP others reach this peer at, if not --host (NAT, cloud VM); needs --port")
    dht.add_argument("--identity", metavar="FILE",
                     help="its libp2p key (made if missing): with a fixed --port, a restart keeps the multiaddr others were given")
    dht.add_argument("--initial-peers", nargs="+", default=[], metavar="MADDR",
                     help="multiaddrs of DHT peers to join (default: none, start a new swarm)")
    dht.add_argument("--ready-file", help="write the multiaddrs as JSON here when ready")
    dht.add_argument("--exit-with-parent", action="store_true", help=argparse.SUPPRESS)
    dht.set_defaults(func=_cmd_dht)

    swarm = commands.add_parser("swarm", help="a local swarm on 127.0.0.1")
    swarm_commands = swarm.add_subparsers(required=True, metavar="ACTION")
    up = swarm_commands.add_parser("up", help="start a DHT peer and N nodes hosting a small model; Ctrl-C stops all")
    up.add_argument("--nodes", type=int, default=4, help="node processes to start (default: %(default)s)")
    up.add_argument("--replicas", type=int, default=2, help="nodes hosting each expert (default: %(default)s)")
    up.add_argument("--placement", default="spread", choices=["spread", "by-layer"],
                    help="spread: a layer's experts over every node (big batches); by-layer: on as few nodes as "
                         "possible (decoding: about one RPC per layer) (default: %(default)s)")
    bare = up.add_argument_group("experts only (no language model): give any of these instead of --model")
    bare.add_argument("--layers", type=int, help="MoE layers (default 2)")
    bare.add_argument("--experts", type=int, help="experts per layer (default 8)")
    bare.add_argument("--d-model", type=int, help="default 256")
    bare.add_argument("--d-ff", type=int, help="default 1024")
    up.add_argument("--model-name", help="model name in the swarm (default: tiny-moe, or a checkpoint's folder name)")
    up.add_argument("--model", metavar="DIR", help="serve the experts of this model directory (`moeswarm model init`) or Hugging Face checkpoint; default: a fresh small model")
    up.add_argument("--swarm", default="default",
                    help="swarm name, part of every DHT key: differently named swarms can share DHT peers (default: %(default)s)")
    up.add_argument("--node-set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a key of every node's config, e.g. device=cuda or optimizer.lr=1e-4")
    up.add_argument("--no-pin-cpus", action="store_true",
                    help="leave node threads to the OS scheduler (default: each node gets its own CPUs when there are enough)")
    up.add_argument("--no-restart", action="store_true",
                    help="leave a node or the bootstrap DHT peer that exits down (default: start it again, at most 3 times in 10 min)")
    up.add_argument("--run-dir", help="keep node checkpoints and logs here (default: a temp dir, removed at exit unless the start failed; locked while in use)")
    up.set_defaults(func=_cmd_swarm_up)

    model = commands.add_parser("model", help="model directories: create one")
    model_commands = model.add_subparsers(required=True, metavar="ACTION")
    init = model_commands.add_parser("init", help="write a freshly initialised MoE language model directory")
    init.add_argument("dir", help="folder to write (made if missing; must be empty or hold a model, see --force)")
    init.add_argument("--name", default="tiny-moe", help="model name, part of every expert UID (default: %(default)s)")
    init.add_argument("--size", default="tiny", choices=list(SIZE_PRESETS), help=f"{_sizes()} (default: %(default)s)")
    init.add_argument("--routing", default="topk", choices=["topk", "switch", "shared", "fine-grained", "soft", "hierarchical"],
                      help="topk: 8 experts, top-2 (Mixtral); switch: top-1 with a capacity; shared: topk plus one "
                           "always-on expert; fine-grained: 32 quarter-width experts, top-6, 2 shared; soft: 4 experts, "
                           "dense gating; hierarchical: 16 experts in 4 groups (default: %(default)s)")
    init.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. routing.k=1")
    init.add_argument("--force", action="store_true",
                      help="write even into a folder that holds a model (overwritten) or other files")
    init.set_defaults(func=_cmd_model_init)

    gen = commands.add_parser("generate", help="generate text with a model whose experts run on the swarm")
    gen.add_argument("--initial-peers", nargs="+", metavar="MADDR",
                     help="multiaddrs of swarm DHT peers, as `swarm up` prints them (required unless --local)")
    gen.add_argument("--model", required=True, metavar="DIR", help="moeswarm model directory (`moeswarm model init`) or Hugging Face MoE checkpoint folder "
                          "(needs `pip install 'moeswarm[hf]'`); the client reads its dense part")
    gen.add_argument("--prompt", required=True,
                     help="text to continue (moeswarm models: one token per UTF-8 byte; a checkpoint: its tokenizer)")
    gen.add_argument("--max-new-tokens", type=int, default=64,
                     help="tokens to generate at most; prompt and new tokens must fit the model's max_seq_len "
                          "(default: %(default)s)")
    gen.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0: greedy (default: %(default)s)")
    gen.add_argument("--top-p", type=float, default=1.0,
                     help="nucleus sampling: sample from the most likely tokens holding this much probability, "
                          "in (0, 1] (default: %(default)s)")
    gen.add_argument("--seed", type=int, default=None, help="sampling seed (default: a different sample each run)")
    gen.add_argument("--swarm", default="default", help="swarm name, as given to `swarm up` (default: %(default)s)")
    gen.add_argument("--model-name", help="a Hugging Face checkpoint's name in the swarm, where its nodes were given "
                                          "one (default: the folder's name lowercased, as nodes use)")
    gen.add_argument("--timeout", type=float, default=5.0, help="deadline of one expert call, seconds (default: %(default)s)")
    gen.add_argument("--wire-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                     help="dtype of activations sent to experts; 16-bit halves the bytes (default: float32; "
                          "a Hugging Face checkpoint: its own dtype)")
    gen.add_argument("--threads", type=int, default=1, help="torch threads for the dense part (default: %(default)s)")
    gen.add_argument("--local", action="store_true", help="run every expert in this process (no swarm)")
    gen.set_defaults(func=_cmd_generate)

    status = commands.add_parser("status", help="experts, replicas, endpoints and load, read from the DHT")
    status.add_argument("--initial-peers", nargs="+", required=True, metavar="MADDR",
                        help="multiaddrs of swarm DHT peers, as `swarm up` prints them")
    status.add_argument("--swarm", default="default", help="swarm name, as given to `swarm up` (default: %(default)s)")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.set_defaults(func=_cmd_status)
    return parser


def _sizes() -> str:
    """--size help: what each preset is."""
    return "; ".join(
        f"{name}: {p['n_layers']} layers, d_model {p['d_model']}, expert d_ff {p['d_ff']}, max_seq_len {p['max_seq_len']}"
        for name, p in SIZE_PRESETS.items()
    )


def _cmd_node(args) -> int:
    from moeswarm.deploy.configfile import apply_overrides, build, load_yaml
    from moeswarm.deploy.run_node import run_node
    from moeswarm.node.config import NodeConfig

    overrides = list(args.set)
    if args.port is not None:
        overrides.append(f"port={args.port}")
    if args.config is None and args.model is None:
        raise ConfigError("give --config FILE.yaml, or --model DIR (optionally with a --config for the other keys)")
    data = load_yaml(args.config) if args.config else {}
    if args.model is not None:
        flags = model_flags(args.model, args.experts, args.name, data.get("model"))
        if args.experts is None and "experts" in data:
            del flags["experts"]  # the config file's list stands
        data.update(flags)
    elif args.experts is not None or args.name is not None:
        raise ConfigError("--experts and --name go with --model")
    data = apply_overrides(data, overrides)
    if args.initial_peers is not None:
        data["initial_peers"] = args.initial_peers
    config = build(NodeConfig, data)
    return run_node(config, ready_file=args.ready_file, exit_with_parent=args.exit_with_parent)


def model_flags(model_dir: str, experts: str | None, name: str | None, configured: dict | None) -> dict:
    """Config keys set by `node --model DIR [--experts SPEC] [--name NAME]`: the spec comes from the
    checkpoint; a `model:` section in the config file must then agree with it (the node checks)."""
    from moeswarm.node.model_source import spec_of, uids_from_text

    spec = spec_of(model_dir, name)
    model = configured if configured is not None else spec.to_config()
    # Only a missing --experts means every expert: an empty one (an unset shell variable) is an error,
    # not a node that loads the whole checkpoint.
    return {"model": model, "model_dir": model_dir, "experts": uids_from_text("all" if experts is None else experts, spec)}


def _cmd_dht(args) -> int:
    from moeswarm.deploy.run_dht import run_dht

    return run_dht(
        host=args.host, port=args.port, initial_peers=args.initial_peers, ready_file=args.ready_file,
        exit_with_parent=args.exit_with_parent, announce_host=args.announce_host, identity_path=args.identity,
    )


def _cmd_swarm_up(args) -> int:
    from moeswarm.deploy.swarm import swarm_up

    return swarm_up(args)


def _cmd_model_init(args) -> int:
    from moeswarm.deploy.model_cli import model_init

    return model_init(args)


def _cmd_generate(args) -> int:
    from moeswarm.deploy.model_cli import run_generate

    return run_generate(args)


def _cmd_status(args) -> int:
    from moeswarm.deploy.status import print_status

    return print_status(args.initial_peers, args.swarm, as_json=args.json)


if __name__ == "__main__":
    sys.exit(main())
