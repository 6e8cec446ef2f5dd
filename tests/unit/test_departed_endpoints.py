"""A long-running client forgets the endpoints that left the swarm: their gRPC channels are closed and
their replica health dropped, so churn (nodes restarting on new ports) does not grow the client.
No sockets: channels connect only when called, and the DHT is a stand-in answering from a dict."""

from __future__ import annotations

import asyncio
import logging
import socket
import types

import grpc
import torch
from hivemind.utils.crypto import RSAPrivateKey

from moeswarm.model.directory import ExpertDirectory
from moeswarm.model.dispatcher import DispatchConfig, Dispatcher
from moeswarm.model.replicas import ReplicaPicker
from moeswarm.protocol.client_dht import IsolatedDHT
from moeswarm.protocol.records import ExpertRecord, dht_subkey, expert_key

UID = "m.L0.E0"


class StandInDHT(IsolatedDHT):
    """Answers lookups from a dict (no child process)."""

    def __init__(self):
        self.records = {}

    def get_records(self, keys, timeout_s=0.0):
        return {key: self.records.get(key) for key in keys}

    def close(self):
        pass


def announce(dht: StandInDHT, endpoints: dict[bytes, str]) -> None:
    """Set the expert's replicas: subkey (a node's key) -> endpoint, as hivemind returns them."""
    entries = {}
    for subkey, endpoint in endpoints.items():
        record = ExpertRecord(peer_id="p", endpoint=endpoint, queue_depth=0, rows_per_s=0.0, version=0, wire_dtypes=("float32",))
        entries[subkey] = types.SimpleNamespace(value=record.model_dump())
    dht.records = {expert_key("default", UID): entries}


def open_client(dispatcher: Dispatcher, endpoint: str):
    async def make():
        return dispatcher.clients.get(endpoint)

    return dispatcher.run(make(), timeout_s=5)


def settle(dispatcher: Dispatcher) -> None:
    async def closes():
        await asyncio.gather(*list(dispatcher.clients.dropping))

    dispatcher.run(closes(), timeout_s=5)


def test_channels_and_health_of_endpoints_that_left_are_dropped_as_nodes_restart_on_new_ports():
    stays, restarts = dht_subkey(RSAPrivateKey()), dht_subkey(RSAPrivateKey())
    dht = StandInDHT()
    announce(dht, {stays: "127.0.0.1:1000", restarts: "127.0.0.1:2000"})
    directory = ExpertDirectory(dht, "default", refresh_s=3600)  # refreshed by the test only
    dispatcher = Dispatcher(directory, "m", DispatchConfig(), ReplicaPicker())
    try:
        directory.track([UID])
        open_client(dispatcher, "127.0.0.1:1000")
        first = open_client(dispatcher, "127.0.0.1:2000")
        for port in range(2001, 2051):  # the node restarts 50 times, each time on another port
            dispatcher.picker.on_failure(f"127.0.0.1:{port - 1}")  # its calls failed as it went down
            announce(dht, {stays: "127.0.0.1:1000", restarts: f"127.0.0.1:{port}"})
            directory.refresh()
            open_client(dispatcher, f"127.0.0.1:{port}")
        settle(dispatcher)
        assert set(dispatcher.clients.clients) == {"127.0.0.1:1000", "127.0.0.1:2050"}
        assert set(dispatcher.picker._health) <= {"127.0.0.1:1000", "127.0.0.1:2050"}
        assert first._channel.get_state() == grpc.ChannelConnectivity.SHUTDOWN
    finally:
        dispatcher.close()
        directory.close()


def test_a_channel_mid_call_is_kept_until_a_later_new_endpoint():
    node = dht_subkey(RSAPrivateKey())
    dht = StandInDHT()
    announce(dht, {node: "127.0.0.1:3000"})
    directory = ExpertDirectory(dht, "default", refresh_s=3600)
    dispatcher = Dispatcher(directory, "m", DispatchConfig(), ReplicaPicker())
    try:
        directory.track([UID])
        busy = open_client(dispatcher, "127.0.0.1:3000")
        busy.in_flight = 1  # a call to it is still running (a backward to the node that served the forward)
        announce(dht, {node: "127.0.0.1:3001"})
        directory.refresh()
        open_client(dispatcher, "127.0.0.1:3001")
        assert set(dispatcher.clients.clients) == {"127.0.0.1:3000", "127.0.0.1:3001"}
        busy.in_flight = 0
        announce(dht, {node: "127.0.0.1:3002"})
        directory.refresh()
        open_client(dispatcher, "127.0.0.1:3002")
        settle(dispatcher)
        assert set(dispatcher.clients.clients) == {"127.0.0.1:3002"}
    finally:
        dispatcher.close()
        directory.close()


def test_a_replica_that_stays_down_is_logged_once_not_at_every_call(caplog):
    # With no replica left, every call tries the banned ones again: before, a WARNING line each time
    # (about 10 lines a second from a client calling through a swarm restart).
    node = dht_subkey(RSAPrivateKey())
    dht = StandInDHT()
    with socket.socket() as closed:  # a port nobody listens on: connections are refused at once
        closed.bind(("127.0.0.1", 0))
        endpoint = f"127.0.0.1:{closed.getsockname()[1]}"
    announce(dht, {node: endpoint})
    directory = ExpertDirectory(dht, "default", refresh_s=3600)
    dispatcher = Dispatcher(directory, "m", DispatchConfig(timeout_s=2.0), ReplicaPicker())
    try:
        directory.track([UID])
        caplog.set_level(logging.DEBUG, logger="moeswarm.model.dispatcher")
        for _ in range(5):
            result = dispatcher.run(dispatcher.forward([UID], torch.zeros(1, 4), torch.zeros(1, 1, dtype=torch.long)))
            assert not result.served_TK.any() and result.attempts[UID]  # tried, and failed
        lines = [r for r in caplog.records if r.name == "moeswarm.model.dispatcher" and "failed" in r.getMessage()]
        assert [r.levelno for r in lines] == [logging.WARNING] + [logging.DEBUG] * (len(lines) - 1) and len(lines) >= 5
    finally:
        dispatcher.close()
        directory.close()
