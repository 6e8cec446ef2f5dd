"""Replicas of one expert on real node processes: a new replica starts from the trained one's weights,
an inference-only one follows it, trainable replicas average and then settle, a stranger's weights are refused,
ExportState checks its input, and callers that stop reading or cancel cost it neither its slots nor its log."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import AsyncIterator

import grpc
import pytest
import torch
from conftest import MODEL
from procs import probe, run, train_step, wait_for
from moeswarm.model.directory import find_experts
from moeswarm.model.experts import init_expert
from moeswarm.protocol.errors import NodeUnavailable, Overloaded
from moeswarm.protocol.state_transfer import MIN_CHUNK_BYTES, fetch_state
from moeswarm.protocol import expert_pb2

D, F = MODEL["d_model"], MODEL["d_ff"]
UID = "itest.L1.E2"
SEED = 7  # conftest.node_config's
# Fast DHT refresh (announce_ttl_s / 3) so a new version is visible within a second; Adam with a large
# rate so one step moves the weights far from the seed's.
TRAINED = dict(experts=[UID], announce_ttl_s=3, optimizer=dict(name="adam", lr=0.05, update_every=1))


def _published_version(client_dht, swarm: str, endpoint: str) -> int:
    records = find_experts(client_dht, swarm, [UID])[UID]
    return next((r.version for r in records if r.endpoint == endpoint), -1)


def _trained_node(node_factory, client_dht, swarm: str, x, **config):
    """A node hosting UID that took one optimizer step, and the DHT shows it; returns (node, its output on x)."""
    node = node_factory("trained", swarm=swarm, **TRAINED, **config)
    out, versions = run(train_step(node.ready["endpoint"], MODEL["name"], UID, x, torch.randn(len(x), D)))
    assert versions[UID] == 1
    wait_for(lambda: _published_version(client_dht, swarm, node.ready["endpoint"]) == 1, what="version 1 in the DHT")
    return node, out


def test_a_new_replica_starts_from_the_trained_replica_not_from_the_seed(node_factory, client_dht):
    x = torch.randn(3, D)
    trained, trained_out = _trained_node(node_factory, client_dht, "adopt", x, average_every_s=0)
    seed_out = init_expert(D, F, seed=SEED, uid=UID)(x).detach()
    assert not torch.allclose(trained_out, seed_out, atol=1e-3)

    joined = node_factory("joined", swarm="adopt", experts=[UID], average_every_s=0)
    out, versions = run(probe(joined.ready["endpoint"], MODEL["name"], UID, x))
    assert torch.equal(out, trained_out) and versions[UID] == 1
    assert f"1 of 1 experts start from the weights of their most trained replica (first: {UID}; " in joined.log

    alone = node_factory("alone", swarm="adopt", experts=[UID], average_every_s=0, sync_from_replicas=False)
    out, versions = run(probe(alone.ready["endpoint"], MODEL["name"], UID, x))
    assert torch.allclose(out, seed_out, atol=1e-6) and versions[UID] == 0


def test_an_inference_only_replica_follows_the_replica_that_trains(node_factory, client_dht):
    x = torch.randn(3, D)
    trained, out_v1 = _trained_node(node_factory, client_dht, "follow", x, average_every_s=0)
    follower = node_factory("follower", swarm="follow", experts=[UID], trainable=False, average_every_s=1)
    out, versions = run(probe(follower.ready["endpoint"], MODEL["name"], UID, x))
    assert torch.equal(out, out_v1) and versions[UID] == 1  # taken at start

    out_v2, versions = run(train_step(trained.ready["endpoint"], MODEL["name"], UID, x, torch.randn(len(x), D)))
    assert versions[UID] == 2 and not torch.equal(out_v2, out_v1)

    def followed():
        out, versions = run(probe(follower.ready["endpoint"], MODEL["name"], UID, x))
        return (out, versions) if versions[UID] == 2 else None

    out, _ = wait_for(followed, timeout_s=20, what="the follower at version 2")
    assert torch.equal(out, out_v2)  # the trained replica's weights, bit for bit
    assert f"took the weights of 1 of 1 experts from replicas trained further (first: {UID}, now version 2;" in follower.log


def test_trainable_replicas_average_then_settle_on_the_same_weights(node_factory, client_dht):
    x = torch.randn(3, D)
    other = node_factory("other", swarm="average", **TRAINED, average_every_s=1, sync_from_replicas=False)
    before, _ = run(probe(other.ready["endpoint"], MODEL["name"], UID, x))
    trained, trained_out = _trained_node(node_factory, client_dht, "average", x, average_every_s=1, sync_from_replicas=False)
    gap = (trained_out - before).abs().max()

    def both_moved():
        a, _ = run(probe(trained.ready["endpoint"], MODEL["name"], UID, x))
        b, _ = run(probe(other.ready["endpoint"], MODEL["name"], UID, x))
        return (a, b) if not torch.equal(a, trained_out) and not torch.equal(b, before) else None

    a, b = wait_for(both_moved, timeout_s=30, what="both replicas averaged")
    # Each pulled the other once: the weights are now at most a quarter as far apart (exactly equal if
    # both pulled before either applied); the outputs follow closely at this size.
    assert (a - b).abs().max() <= 0.5 * gap

    # Neither steps any more: they settle on one replica's weights, bit for bit ...
    def settled():
        a, _ = run(probe(trained.ready["endpoint"], MODEL["name"], UID, x))
        b, _ = run(probe(other.ready["endpoint"], MODEL["name"], UID, x))
        return (a,) if torch.equal(a, b) else None

    (same,) = wait_for(settled, timeout_s=30, what="the replicas settled")
    assert "averaging pulls and 1 settled of 1 experts" in trained.log + other.log
    # ... and later rounds change nothing.
    run(asyncio.sleep(2.5))
    assert torch.equal(run(probe(trained.ready["endpoint"], MODEL["name"], UID, x))[0], same)
    assert torch.equal(run(probe(other.ready["endpoint"], MODEL["name"], UID, x))[0], same)


def test_a_replica_with_unrelated_weights_is_not_averaged_with(node_factory, client_dht):
    # Another seed: another origin in its record, so its weights are not even fetched. (Replicas whose
    # origin is unknown are fetched, and refused by their distance: test_state_transfer.py.)
    x = torch.randn(3, D)
    stranger = node_factory("stranger", swarm="stranger", **TRAINED, seed=SEED + 1, average_every_s=0)
    trained, trained_out = _trained_node(node_factory, client_dht, "stranger", x, average_every_s=1, sync_from_replicas=False)
    refusal = f"the node at {stranger.ready['endpoint']} (peer {stranger.ready['peer_id']}) serves {UID} from other weights than this node"
    wait_for(lambda: refusal in trained.log, timeout_s=20, what="the refusal")
    assert f"average {UID} with {stranger.ready['endpoint']}" not in trained.log  # neither "did not" nor "could not"
    assert torch.equal(run(probe(trained.ready["endpoint"], MODEL["name"], UID, x))[0], trained_out)


async def _export(endpoint: str, request: bytes) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(endpoint) as channel:
        call = channel.unary_stream("/moeswarm.ExpertService/ExportState")(request, timeout=10)
        try:
            async for _ in call:
                pass
        except grpc.aio.AioRpcError as e:
            return e.code(), e.details()
        return grpc.StatusCode.OK, ""


BAD_REQUESTS = [
    (b"\xff\xff\xff", grpc.StatusCode.INVALID_ARGUMENT, "not a valid StateRequest"),
    (expert_pb2.StateRequest(uid="itest.L0.E3").SerializeToString(), grpc.StatusCode.NOT_FOUND, "not hosted"),
    (expert_pb2.StateRequest(uid="../etc").SerializeToString(), grpc.StatusCode.INVALID_ARGUMENT, "uid"),
]


def test_export_state_checks_its_request_and_fits_the_callers_message_limit(node_factory):
    node = node_factory("exporter", swarm="export", experts=[UID])
    for request, code, message in BAD_REQUESTS:
        got, details = run(_export(node.ready["endpoint"], request))
        assert got == code and message in details, (request, got, details)
    expert = init_expert(D, F, seed=SEED, uid=UID)
    expected = {name: (tuple(p.shape), p.dtype) for name, p in expert.named_parameters()}
    # A 4 KiB message limit: fetch_state still takes the chunks of at least 64 KiB nodes send
    version, tensors = run(fetch_state(node.ready["endpoint"], UID, expected, max_message_bytes=4096))
    assert version == 0 and all(torch.equal(tensors[name], p) for name, p in expert.named_parameters())
    out, _ = run(probe(node.ready["endpoint"], MODEL["name"], UID, torch.ones(1, D)))  # and it still serves
    assert out.shape == (1, D)


# A 3 MiB expert, and callers without BDP probing: their window stays at 64 KiB, so a node's sends to
# one that does not read block after a few chunks (with it, grpc takes in ~20 MiB unread first).
BIG_MODEL = dict(name="big", d_model=256, d_ff=1024, n_layers=1, n_experts=1)
BIG_UID = "big.L0.E0"


@contextlib.asynccontextmanager
async def _not_reading_channels(endpoint: str) -> AsyncIterator[list[grpc.aio.Channel]]:
    """Two channels, as two callers that stop reading would have."""
    channels = [grpc.aio.insecure_channel(endpoint, options=[("grpc.http2.bdp_probe", 0)]) for _ in range(2)]
    try:
        yield channels
    finally:
        for channel in channels:
            await channel.close()


def _export_call(channel: grpc.aio.Channel, max_chunk_bytes: int) -> grpc.aio.UnaryStreamCall:
    request = expert_pb2.StateRequest(uid=BIG_UID, max_chunk_bytes=max_chunk_bytes)
    return channel.unary_stream("/moeswarm.ExpertService/ExportState")(request.SerializeToString(), timeout=60)


async def _read_rest(call: grpc.aio.UnaryStreamCall, pause_s: float = 0.0) -> tuple[int, grpc.StatusCode, str]:
    """(data bytes of the chunks still to come, the call's status code, its details); pause_s before each read."""
    received = 0
    try:
        while await asyncio.sleep(pause_s) or (raw := await call.read()) is not grpc.aio.EOF:
            received += len(expert_pb2.StateChunk.FromString(raw).data)
    except grpc.aio.AioRpcError as e:
        return received, e.code(), e.details()
    return received, grpc.StatusCode.OK, ""


async def _fetch_once_free(endpoint: str, expected: dict) -> dict[str, torch.Tensor]:
    """fetch_state, asked again while both of the node's export slots are taken (bounded by run())."""
    while True:
        try:
            return (await fetch_state(endpoint, BIG_UID, expected, max_message_bytes=64 << 20))[1]
        except Overloaded:
            await asyncio.sleep(0.1)


async def _take_both_slots(channels: list[grpc.aio.Channel]) -> list[tuple[grpc.aio.UnaryStreamCall, int]]:
    """Two exports open at once, each past its first chunk (call, its bytes): no earlier call holds a slot."""
    while True:
        calls = [_export_call(channel, 0) for channel in channels]
        try:
            return [(call, len(expert_pb2.StateChunk.FromString(await call.read()).data)) for call in calls]
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
            for call in calls:
                call.cancel()
            await asyncio.sleep(0.1)


def _big_expert() -> tuple[torch.nn.Module, dict, int]:
    """(BIG_UID's seed weights, its parameter specs, its bytes)."""
    expert = init_expert(BIG_MODEL["d_model"], BIG_MODEL["d_ff"], seed=SEED, uid=BIG_UID)
    expected = {name: (tuple(p.shape), p.dtype) for name, p in expert.named_parameters()}
    return expert, expected, sum(p.numel() * p.element_size() for p in expert.parameters())


def test_callers_that_stop_reading_lose_their_export_slots_to_one_that_reads(node_factory):
    node = node_factory("exporter", swarm="stall", model=BIG_MODEL, experts=[BIG_UID], export_chunk_timeout_s=1)
    endpoint = node.ready["endpoint"]
    expert, expected, total_bytes = _big_expert()

    async def scenario():
        async with _not_reading_channels(endpoint) as channels:
            stalled = [_export_call(channel, max_chunk_bytes=1) for channel in channels]  # both slots
            firsts = [expert_pb2.StateChunk.FromString(await call.read()) for call in stalled]
            # Both stop reading but keep their calls open (deadline 60 s): the node ends their exports.
            tensors = await _fetch_once_free(endpoint, expected)
            return firsts, tensors, [await _read_rest(call) for call in stalled]

    firsts, tensors, rests = run(scenario())
    assert [len(chunk.data) for chunk in firsts] == [MIN_CHUNK_BYTES] * 2  # they asked for 1-byte chunks
    assert all(torch.equal(tensors[name], p) for name, p in expert.named_parameters())
    for received, code, details in rests:
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "took no chunk for 1 s" in details, (code, details)
        assert MIN_CHUNK_BYTES + received < total_bytes
    assert "Traceback" not in node.log


def test_a_reader_slower_than_the_nodes_time_limit_loses_its_export(node_factory):
    # A 3 MiB expert may take 2 s + 3 s (1 MiB/s) here; this reader takes a 64 KiB chunk every 0.5 s.
    node = node_factory("exporter", swarm="slow", model=BIG_MODEL, experts=[BIG_UID], export_chunk_timeout_s=2)
    _, _, total_bytes = _big_expert()

    async def slow_read():
        async with _not_reading_channels(node.ready["endpoint"]) as channels:
            return await _read_rest(_export_call(channels[0], max_chunk_bytes=1), pause_s=0.5)

    received, code, details = run(slow_read())
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "bytes taken in 5 s" in details, (code, details)
    assert received < total_bytes


def test_a_caller_that_cancels_an_export_puts_no_traceback_in_the_node_log(node_factory):
    node = node_factory("exporter", swarm="cancel", model=BIG_MODEL, experts=[BIG_UID])
    _, _, total_bytes = _big_expert()

    async def scenario():
        async with _not_reading_channels(node.ready["endpoint"]) as channels:
            calls = [_export_call(channel, MIN_CHUNK_BYTES) for channel in channels]
            for call in calls:
                await call.read()
            await asyncio.sleep(0.5)  # meanwhile the node's sends stop: no one reads
            for call in calls:
                call.cancel()  # mid-send, well within export_chunk_timeout_s (30 s)
            # Both calls ended on the node, and logged what they log, once both slots are free again.
            return [(first, *await _read_rest(call)) for call, first in await _take_both_slots(channels)]

    for first, received, code, _ in run(scenario()):
        assert code == grpc.StatusCode.OK and first + received == total_bytes
    assert "ExecuteBatchError" not in node.log and "Traceback" not in node.log


def test_a_replica_whose_node_is_gone_is_given_up_at_its_refused_connect():
    """Records outlive a killed node by up to a TTL, so a starting node often tries a dead replica:
    a refused connection ends the try at once. (Waiting for the connection to be ready retried it
    for the whole connect timeout, 10 s per start.)"""
    with socket.socket() as probe_socket:  # a port nothing listens on
        probe_socket.bind(("127.0.0.1", 0))
        endpoint = f"127.0.0.1:{probe_socket.getsockname()[1]}"
    expected = {"w1.weight": ((4, 4), torch.float32)}
    with pytest.raises(NodeUnavailable, match="connection failed"):
        run(fetch_state(endpoint, "itest.L0.E0", expected, max_message_bytes=1 << 20))
