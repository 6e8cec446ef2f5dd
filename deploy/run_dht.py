"""Entry point of `moeswarm dht`: a bare DHT peer that others bootstrap from (no experts)."""

from __future__ import annotations

import ipaddress
import json
import os
import pathlib

from moeswarm.deploy.stop_signals import StopFlag
from moeswarm.protocol.dht import describe_dht_exit, start_dht, stop_dht
from moeswarm.protocol.errors import ConfigError


def run_dht(
    *, host: str, port: int, initial_peers: list[str], ready_file: str | None, exit_with_parent: bool = False,
    announce_host: str | None = None, identity_path: str | None = None,
) -> int:
    check_addresses(host, port, announce_host)
    from moeswarm.node.checkpoint import load_or_create_key_file, write_atomic  # after the checks: it imports torch (about 1 s)

    stop = StopFlag().install()
    parent_pid = os.getppid()
    lock = private_key = None  # two peers under one key would fight over one peer id: hold its lock while running
    if identity_path is not None:
        lock = _lock_identity(identity_path)
        private_key = load_or_create_key_file(pathlib.Path(identity_path))  # its DHT node id derives from it
    dht = start_dht(
        initial_peers=initial_peers, host=host, port=port, announce_host=announce_host, identity_path=identity_path,
        private_key=private_key,
    )
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
        if lock is not None:
            lock.close()
    return 0


def _lock_identity(identity_path: str):
    """Hold `FILE.lock` beside the key file while running; ConfigError where it cannot be made."""
    from moeswarm.node.checkpoint import hold_lock

    try:
        return hold_lock(
            pathlib.Path(f"{identity_path}.lock"),
            lambda pid: f"--identity {identity_path} is in use by another DHT peer (pid {pid}); give each peer its own key file",
        )
    except OSError as e:
        raise ConfigError(
            f"--identity {identity_path}: cannot create {identity_path}.lock beside it ({e.strerror}); "
            "give a key file path in a folder that exists and that you may write to"
        ) from e


def check_addresses(host: str, port: int, announce_host: str | None) -> None:
    """ConfigError for flags the DHT peer could not start with, or would announce wrongly with."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port}: must be in [0, 65535] (0: any free port)")
    try:
        bind = ipaddress.ip_address(host)
        public = ipaddress.ip_address(announce_host) if announce_host is not None else None
    except ValueError as e:
        raise ConfigError(f"--host / --announce-host: {e}") from e
    if public is None and bind.is_unspecified:
        raise ConfigError(f"--host {host} listens on every interface: give --announce-host, the IP others reach this peer at")
    if public is not None and (public.is_unspecified or port == 0):
        raise ConfigError("--announce-host needs a specific IP and a fixed --port (the DHT announces its port before it listens)")
