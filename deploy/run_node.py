"""Entry point of `moeswarm node`: start an ExpertNode, report readiness, stop cleanly on signals."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pathlib
import signal
import sys

from moeswarm.deploy.stop_signals import exit_code_when_stopped
from moeswarm.node.affinity import batch_scheduling, pin_process
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
    if config.sched_batch:  # likewise inherited
        batch_scheduling()
    keep_freed_memory()
    try:
        import uvloop
    except ImportError:  # uvloop is optional on platforms without it
        return asyncio.run(_serve(config, ready_file, exit_with_parent))
    return uvloop.run(_serve(config, ready_file, exit_with_parent))


async def _serve(config: NodeConfig, ready_file: str | None, exit_with_parent: bool) -> int:
    stop = asyncio.Event()
    with _StopSignals(asyncio.get_running_loop(), stop) as signals:
        from moeswarm.node.checkpoint import write_atomic  # after the handlers: torch takes a while to import
        from moeswarm.node.node import ExpertNode

        if exit_with_parent:
            watchdog = asyncio.create_task(_stop_when_orphaned(os.getppid(), stop))
        node = ExpertNode(config)
        dht_watch = None
        try:
            if not await _start_unless_stopped(node, stop, signals):
                logger.info("stopped while starting")
                return exit_code_when_stopped(signals.received)
            dht_watch = asyncio.create_task(_stop_when_dht_dies(node, stop))
            maddrs = node.dht_maddrs()
            print(f"moeswarm node ready: {len(node.uids)} experts of {config.model.name}", flush=True)
            print(f"  grpc endpoint : {node.endpoint}", flush=True)
            print(f"  data port     : {node.data_endpoint or 'off (data_port: null)'}", flush=True)
            print(f"  dht multiaddr : {maddrs[0] if maddrs else '(none)'}", flush=True)
            if ready_file:
                ready = {"endpoint": node.endpoint, "data_endpoint": node.data_endpoint, "maddrs": maddrs, "peer_id": node.peer_id, "uids": list(node.uids)}
                write_atomic(pathlib.Path(ready_file), lambda file: file.write(json.dumps(ready).encode()))
            await stop.wait()
            logger.info("stopping: finishing in-flight requests and writing a last checkpoint")
        finally:
            await node.stop()
        return dht_watch.result() if dht_watch is not None and dht_watch.done() else 0


class _StopSignals:
    """While entered, SIGTERM and SIGINT set `stop`; the start in progress (`starting`) is then cut
    short at its next await. A signal that lands in one of its synchronous stretches (loading a big
    checkpoint's experts takes minutes, and no event-loop handler runs before it awaits) ends the
    process at once: an exception raised in the middle of that code is unsafe (one raised inside
    grpc's server setup crashed the process), and a node that has not served has nothing to save.
    Its DHT process and p2pd stop by themselves within about 2 s once it is gone."""

    def __init__(self, loop: asyncio.AbstractEventLoop, stop: asyncio.Event):
        self.loop, self.stop = loop, stop
        self.received: list[int] = []
        self.starting: asyncio.Task | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "_StopSignals":
        # Python-level handlers, not loop.add_signal_handler: they run in the middle of synchronous code
        self._previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum: int, _frame) -> None:
        self.received.append(signum)
        if self.starting is not None and asyncio.current_task(self.loop) is self.starting:
            logger.info("stopped while starting (%s)", signal.Signals(signum).name)
            sys.stdout.flush()
            os._exit(exit_code_when_stopped(self.received))
        self.loop.call_soon_threadsafe(self.stop.set)


async def _start_unless_stopped(node, stop: asyncio.Event, signals: _StopSignals) -> bool:
    """Start the node unless a stop comes first: True once it is serving; False when a stop signal
    (or the launcher's end) came before that, after cancelling the start (node.stop() then undoes
    what it did). A start failure that no stop caused is raised."""
    if signals.received or stop.is_set():
        return False
    start = signals.starting = asyncio.create_task(node.start())
    stopped = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({start, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        signals.starting = None
        stopped.cancel()
    if start.done() and not signals.received and not stop.is_set():
        start.result()  # its error, if it failed
        return True
    start.cancel()
    try:
        await start
    except asyncio.CancelledError:
        pass
    except Exception:  # a start cut short may fail in any way; the stop is what was asked for
        logger.debug("start cut short", exc_info=True)
    return False


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
