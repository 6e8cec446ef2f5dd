"""Entry point of `moeswarm node`: start an ExpertNode, report readiness, stop cleanly on signals."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pathlib
import signal

from moeswarm.node.affinity import pin_process
from moeswarm.node.config import NodeConfig
from moeswarm.protocol.malloc import keep_freed_memory

logger = logging.getLogger(__name__)
DHT_WATCH_S = 1.0  # how often a serving node checks that its DHT process is still there
EXIT_DHT_LOST = 1


def run_node(config: NodeConfig, *, ready_file: str | None = None, exit_with_parent: bool = False) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit code."""
    if config.cpus:  # first: threads and processes started from here on inherit it
        pin_process(config.cpus)
        if len(config.cpus) < config.torch_threads:
            logger.warning("torch_threads=%d on %d pinned CPUs: the threads will take turns", config.torch_threads, len(config.cpus))
    keep_freed_memory()
    try:
        import uvloop
    except ImportError:  # uvloop is optional on platforms without it
        return asyncio.run(_serve(config, ready_file, exit_with_parent))
    return uvloop.run(_serve(config, ready_file, exit_with_parent))


async def _serve(config: NodeConfig, ready_file: str | None, exit_with_parent: bool) -> int:
    from moeswarm.node.checkpoint import write_atomic
    from moeswarm.node.node import ExpertNode

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if exit_with_parent:
        watchdog = asyncio.create_task(_stop_when_orphaned(os.getppid(), stop))
    node = ExpertNode(config)
    dht_watch = None
    try:
        await node.start()
        dht_watch = asyncio.create_task(_stop_when_dht_dies(node, stop))
        maddrs = node.dht_maddrs()
        print(f"moeswarm node ready: {len(node.uids)} experts of {config.model.name}", flush=True)
        print(f"  grpc endpoint : {node.endpoint}", flush=True)
        print(f"  dht multiaddr : {maddrs[0] if maddrs else '(none)'}", flush=True)
        if ready_file:
            ready = {"endpoint": node.endpoint, "maddrs": maddrs, "peer_id": node.peer_id, "uids": list(node.uids)}
            write_atomic(pathlib.Path(ready_file), lambda file: file.write(json.dumps(ready).encode()))
        await stop.wait()
        logger.info("stopping: finishing in-flight requests and writing a last checkpoint")
    finally:
        await node.stop()
    return dht_watch.result() if dht_watch is not None and dht_watch.done() else 0


async def _stop_when_dht_dies(node, stop: asyncio.Event) -> int:
    """The DHT process cannot be started again from here (it forks, and forking after gRPC has
    started is unsafe), so a node that lost it stops cleanly (last checkpoint included) with a
    non-zero exit code: a supervisor (systemd's Restart=on-failure) then starts it afresh."""
    while not stop.is_set():
        failure = node.dht_failure()
        if failure is not None:
            logger.error("%s: this node can no longer announce its experts; stopping (exit code %d) so that a supervisor restarts it", failure, EXIT_DHT_LOST)
            stop.set()
            return EXIT_DHT_LOST
        await asyncio.sleep(DHT_WATCH_S)
    return 0


async def _stop_when_orphaned(parent_pid: int, stop: asyncio.Event) -> None:
    """A launcher killed with SIGKILL cannot stop its nodes; they notice and stop themselves."""
    while os.getppid() == parent_pid:
        await asyncio.sleep(0.5)
    logger.warning("launcher (pid %d) is gone: stopping", parent_pid)
    stop.set()
