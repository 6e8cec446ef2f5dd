"""Chunked expert state (ExportState) and its checked reassembly; a registry's replica operations."""

from __future__ import annotations

import asyncio

import pytest
import torch

from moeswarm.model.experts import init_expert
from moeswarm.node.config import OptimizerConfig
from moeswarm.node.registry import ExpertRegistry
from moeswarm.node.replica_sync import FAILURE_LOG_S, SETTLE_AFTER_ROUNDS, ReplicaSync, relative_distance
from moeswarm.protocol.records import ExpertRecord
from moeswarm.protocol import expert_pb2
from moeswarm.protocol.errors import BadRequest
from moeswarm.protocol.spec import ModelSpec
from moeswarm.protocol.state_transfer import (
    CHUNK_BYTES, MIN_CHUNK_BYTES, StateAssembler, chunk_bytes_for, export_time_limit_s, state_chunks,
)

UID = "m.L0.E1"


def _tensors() -> dict[str, torch.Tensor]:
    return {"a": torch.randn(7, 5), "b": torch.randn(3).to(torch.bfloat16), "empty": torch.zeros(0, 4)}


def _expected(tensors) -> dict:
    return {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}


def _chunks(tensors, chunk_bytes=16, version=3) -> list[expert_pb2.StateChunk]:
    return list(state_chunks(UID, version, tensors, chunk_bytes))


def test_chunks_reassemble_to_the_same_tensors_and_version():
    tensors = _tensors()
    chunks = _chunks(tensors)
    assert len(chunks) == 9 + 1 + 1  # 140 bytes of "a" in 16-byte chunks, 6 of "b", one empty chunk for "empty"
    assembler = StateAssembler(UID, _expected(tensors))
    for chunk in chunks:
        assembler.add(chunk)
    version, out = assembler.result()
    assert version == 3 and list(out) == list(tensors)
    for name, tensor in tensors.items():
        assert out[name].dtype == tensor.dtype and torch.equal(out[name], tensor)


def _tamper(**changes):
    """(chunks with the first chunk of "a" changed, expected) for one kind of bad stream."""
    tensors = _tensors()
    chunks = _chunks(tensors)
    for field, value in changes.items():
        if field == "shape":
            chunks[0].shape[:] = value
        else:
            setattr(chunks[0], field, value)
    return chunks, _expected(tensors)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(uid="m.L0.E2"), "asked for m.L0.E1"),
        (dict(name="c"), "unknown parameter 'c'"),
        (dict(shape=[5, 7]), r"sent float32 \[5, 7\], this node has float32 \[7, 5\]"),
        (dict(dtype="float16"), "sent float16"),
        (dict(offset=16), "chunk at byte 16, expected byte 0"),
        (dict(version=-1), "chunk version -1"),
    ],
)
def test_a_bad_first_chunk_is_refused_with_what_is_wrong(changes, message):
    chunks, expected = _tamper(**changes)
    with pytest.raises(BadRequest, match=message):
        StateAssembler(UID, expected).add(chunks[0])


def test_a_stream_that_changes_version_overflows_repeats_or_ends_early_is_refused():
    tensors = _tensors()
    expected = _expected(tensors)
    cases = {
        "version 4 after version 3": lambda c: c[1].__setattr__("version", 4) or c,
        "146 bytes, the parameter has 140": lambda c: c[8].__setattr__("data", c[8].data + b"123456") or c,
        "chunk at byte 0, expected byte 140": lambda c: c + [c[0]],
        "before all of \\['b'\\] arrived": lambda c: [chunk for chunk in c if chunk.name != "b"],
        "empty chunk at byte 16 of 140": lambda c: c[:1] + [expert_pb2.StateChunk(**{**_fields(c[1]), "data": b""})] + c[1:],
    }
    for message, bad in cases.items():
        assembler = StateAssembler(UID, expected)
        with pytest.raises(BadRequest, match=message):
            for chunk in bad(_chunks(tensors)):
                assembler.add(chunk)
            assembler.result()


def _fields(chunk: expert_pb2.StateChunk) -> dict:
    return {field.name: value for field, value in chunk.ListFields()}


def test_non_finite_weights_are_refused():
    tensors = _tensors()
    tensors["a"][2, 3] = float("nan")
    assembler = StateAssembler(UID, _expected(tensors))
    for chunk in _chunks(tensors):
        assembler.add(chunk)
    with pytest.raises(BadRequest, match="a: contains NaN"):
        assembler.result()


def test_chunk_size_respects_both_message_limits():
    assert chunk_bytes_for(64 << 20) == CHUNK_BYTES
    assert chunk_bytes_for(64 << 20, asked=100_000) == 100_000
    assert chunk_bytes_for(8192) == 8192 - 1024
    assert chunk_bytes_for(8192, asked=1 << 30) == 8192 - 1024


def test_tiny_chunks_are_raised_to_the_minimum_within_the_senders_limit():
    # 1-byte chunks: a message's work per byte for the sender, for minutes
    assert chunk_bytes_for(64 << 20, asked=1) == chunk_bytes_for(64 << 20, asked=10_000) == MIN_CHUNK_BYTES
    assert chunk_bytes_for(8192, asked=1) == 8192 - 1024  # the sender's own limit still wins


def test_an_export_may_take_long_enough_for_a_slow_honest_peer_and_no_longer():
    chunk_timeout_s = 30.0
    mixtral_bytes = 350_000_000
    assert export_time_limit_s(mixtral_bytes, chunk_timeout_s) > mixtral_bytes / 10e6  # 10 MB/s: 35 s
    assert export_time_limit_s(3 << 20, chunk_timeout_s) == chunk_timeout_s + 3  # the default expert: 3 MiB
    assert export_time_limit_s(0, 1.0) == 1.0


def _registry(seed: int = 0) -> ExpertRegistry:
    spec = ModelSpec(name="m", d_model=8, d_ff=16, n_layers=1, n_experts=2)
    return ExpertRegistry(spec, (UID,), seed=seed, optimizer=OptimizerConfig(name="adam", lr=0.1), activation_cache_bytes=1 << 20)


def test_averaging_is_the_same_on_both_replicas_and_keeps_the_version():
    a, b = _registry(seed=0), _registry(seed=1)
    _, state_a = a.export_state(UID)
    _, state_b = b.export_state(UID)
    a.average_with(UID, state_b)
    b.average_with(UID, state_a)
    _, after_a = a.export_state(UID)
    _, after_b = b.export_state(UID)
    for name in state_a:
        assert torch.equal(after_a[name], after_b[name])
        assert torch.allclose(after_a[name], (state_a[name] + state_b[name]) / 2)
    assert a.experts[UID].version == 0 and a.experts[UID].averaged == 1
    assert relative_distance(dict(a.experts[UID].module.named_parameters()), after_b) == 0.0
    assert relative_distance(state_a, state_b) > 1.0  # two seeds: unrelated weights


def test_weights_far_from_a_replicas_own_are_refused_not_averaged():
    """The guard for peers of unknown origin (Hugging Face checkpoints, older nodes): another seed's
    weights are as far apart as unrelated weights get."""
    own, stranger = _registry(seed=0), _registry(seed=1)
    sync = ReplicaSync(dht=None, swarm="s", peer_id="p", registry=own, batcher=None, max_message_bytes=1 << 20)
    _, before = own.export_state(UID)
    refused = sync._apply(UID, stranger.export_state(UID)[1], take=False)
    assert refused is not None and "not the same expert (different seed or model_dir?)" in refused
    assert all(torch.equal(tensor, before[name]) for name, tensor in own.export_state(UID)[1].items())
    assert sync._apply(UID, before, take=False) is None  # its own weights: averaged (to themselves)


def test_registry_origins_name_the_start_of_each_experts_weights():
    """A seed's init names its weights; two seeds differ; given modules carry the origin given with them."""
    a, a_again, b = _registry(seed=0), _registry(seed=0), _registry(seed=1)
    assert len(a.experts[UID].origin) == 16 and a.experts[UID].origin == a_again.experts[UID].origin != b.experts[UID].origin
    spec = ModelSpec(name="m", d_model=8, d_ff=16, n_layers=1, n_experts=2)
    module = init_expert(8, 16, seed=5, uid=UID)
    given = ExpertRegistry(spec, (UID,), seed=0, optimizer=OptimizerConfig(), modules={UID: module}, origins={UID: "0123456789abcdef"})
    unknown = ExpertRegistry(spec, (UID,), seed=0, optimizer=OptimizerConfig(), modules={UID: module})
    assert given.experts[UID].origin == "0123456789abcdef" and unknown.experts[UID].origin == ""


def test_a_new_replica_adopts_a_peers_weights_and_version_with_fresh_optimizer_state():
    trained, fresh = _registry(), _registry()
    x, g = torch.randn(4, 8), torch.randn(4, 8)
    trained.backward(UID, x, g)  # one Adam step
    version, state = trained.export_state(UID)
    assert version == 1
    state["w1.weight"].zero_()  # export_state gives copies: the expert is untouched
    assert not torch.equal(trained.experts[UID].module.w1.weight, state["w1.weight"])
    version, state = trained.export_state(UID)
    fresh.backward(UID, x, g)
    fresh.adopt_state(UID, version, state)
    hosted = fresh.experts[UID]
    assert hosted.version == 1 and hosted.optimizer is None and hosted.module.w1.weight.grad is None
    assert torch.equal(fresh.forward(UID, x), trained.forward(UID, x))
    assert not torch.equal(fresh.forward(UID, x), init_expert(8, 16, seed=0, uid=UID)(x))


def test_taking_a_peers_weights_keeps_the_optimizer_state_and_version():
    a, b = _registry(seed=0), _registry(seed=1)
    a.backward(UID, torch.randn(4, 8), torch.randn(4, 8))  # update_every 1: steps
    optimizer, version = a.experts[UID].optimizer, a.experts[UID].version
    _, state_b = b.export_state(UID)
    a.average_with(UID, state_b, take=True)
    _, after_a = a.export_state(UID)
    assert all(torch.equal(after_a[name], state_b[name]) for name in state_b)
    assert a.experts[UID].optimizer is optimizer and a.experts[UID].version == version == 1


def _record(peer_id: str, version: int) -> ExpertRecord:
    return ExpertRecord(peer_id=peer_id, endpoint="127.0.0.1:9", queue_depth=0, rows_per_s=0.0, version=version)


def test_replicas_count_as_quiet_only_once_trained_and_while_no_one_steps():
    registry = _registry()
    sync = ReplicaSync(dht=None, swarm="s", peer_id="me", registry=registry, batcher=None, max_message_bytes=1 << 20)
    never_trained = [_record("peer", 0)]
    assert [sync._quiet_rounds(UID, never_trained) for _ in range(4)] == [0, 0, 0, 0]  # seed weights everywhere
    trained = [_record("peer", 5)]
    assert [sync._quiet_rounds(UID, trained) for _ in range(4)] == [0, 1, 2, 3]
    assert sync._quiet_rounds(UID, [_record("peer", 6)]) == 0  # the peer stepped
    registry.experts[UID].version = 1  # this node stepped
    assert [sync._quiet_rounds(UID, [_record("peer", 6)]) for _ in range(SETTLE_AFTER_ROUNDS + 1)] == list(range(SETTLE_AFTER_ROUNDS + 1))


def test_failures_logged_for_departed_endpoints_are_not_kept_past_their_quiet_period():
    """Each restart of a peer is a new endpoint: a node running for days must not keep one entry per
    endpoint whose failure it ever logged."""
    now = [0.0]
    sync = ReplicaSync(dht=None, swarm="s", peer_id="me", registry=_registry(), batcher=None, max_message_bytes=1 << 20,
                       clock=lambda: now[0])
    for port in range(100):  # a peer restarting on a new port, once a minute
        sync._log((UID, f"127.0.0.1:{port}", "fetch"), "could not average")
        now[0] += 60.0
    assert len(sync._logged) <= FAILURE_LOG_S / 60.0 + 1


def test_an_averaging_round_forgets_the_peers_no_longer_announced():
    sync = ReplicaSync(dht=None, swarm="s", peer_id="me", registry=_registry(), batcher=None, max_message_bytes=1 << 20)
    sync._last_round = {(UID, f"gone{i}"): (3, 4) for i in range(50)}  # volunteers that left, each with a new peer id

    async def replicas(uids):
        return {uid: [_record("live", 0)] for uid in uids}  # never trained: the round pulls nothing

    sync.replicas = replicas
    asyncio.run(sync.average_round())
    assert set(sync._last_round) <= {(UID, "live")}
