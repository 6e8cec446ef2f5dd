"""Entry point of `moeswarm dht`: a bare DHT peer that others bootstrap from (no experts)."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import threading

from moeswarm.node.checkpoint import write_atomic
from moeswarm.protocol.dht import describe_dht_exit, start_dht, stop_dht


def run_dht(*, host: str, port: int, initial_peers: list[str], ready_file: str | None, exit_with_parent: bool = False) -> int:
    stop = threading.Event()
    parent_pid = os.getppid()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    dht = start_dht(initial_peers=initial_peers, host=host, port=port)
    try:
        maddrs = [str(maddr) for maddr in dht.get_visible_maddrs()]
        print(f"moeswarm dht ready: {maddrs[0]}", flush=True)
        if ready_file:
            write_atomic(pathlib.Path(ready_file), lambda file: file.write(json.dumps({"maddrs": maddrs}).encode()))
        while not stop.wait(0.5):
            if exit_with_parent and os.getppid() != parent_pid:
                print("moeswarm dht: launcher is gone, stopping", flush=True)
                break
            if not dht.is_alive():
                print(f"moeswarm dht: the DHT process {describe_dht_exit(dht.exitcode)}", flush=True)
                return 1
    finally:
        stop_dht(dht)
    return 0
