"""node/checkpoint.py: atomic writes, checkpoint round trips, and the node's persistent RSA identity."""

import asyncio
import os
import stat
import threading

import pytest
import torch

from moeswarm.node.checkpoint import (
    CHECKPOINT_NAME,
    Checkpointer,
    P2P_IDENTITY_NAME,
    expert_checkpoint_path,
    load_checkpoint,
    iter_checkpoints,
    load_or_create_identity,
    lock_state_dir,
    remove_unfinished_writes,
    save_expert_checkpoint,
    write_atomic,
)
from moeswarm.node.config import OptimizerConfig
from moeswarm.node.registry import ExpertRegistry
from moeswarm.protocol.errors import ConfigError
from moeswarm.protocol.records import dht_subkey, signer_peer_id
from moeswarm.protocol.spec import ModelSpec


def test_write_atomic_replaces_file(tmp_path):
    path = tmp_path / "sub" / "file.bin"
    write_atomic(path, lambda file: file.write(b"first"))
    write_atomic(path, lambda file: file.write(b"second"))
    assert path.read_bytes() == b"second"
    assert os.listdir(path.parent) == ["file.bin"]


def test_failed_write_keeps_old_file_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "file.bin"
    path.write_bytes(b"old contents")

    def half_write(file):
        file.write(b"torn")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, half_write)
    assert path.read_bytes() == b"old contents"
    assert os.listdir(tmp_path) == ["file.bin"]


def test_failed_first_write_creates_nothing(tmp_path):
    path = tmp_path / "file.bin"
    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, lambda file: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert os.listdir(tmp_path) == []


def test_load_checkpoint_without_file_is_none(tmp_path):
    assert load_checkpoint(tmp_path / "experts" / "tiny.L0.E0.pt") is None
    assert list(iter_checkpoints(tmp_path, ["tiny.L0.E0"])) == []


def test_expert_checkpoint_round_trip(tmp_path):
    state = {"model": {"name": "tiny"}, "experts": {"tiny.L0.E0": {"w": torch.arange(6.0).view(2, 3), "version": 3}}}
    path = save_expert_checkpoint(tmp_path, "tiny.L0.E0", state)
    assert path == expert_checkpoint_path(tmp_path, "tiny.L0.E0") == tmp_path / "experts" / "tiny.L0.E0.pt"
    [(loaded, own, _)] = iter_checkpoints(tmp_path, ["tiny.L0.E0", "tiny.L0.E1"])
    assert own and loaded["model"] == {"name": "tiny"} and loaded["experts"]["tiny.L0.E0"]["version"] == 3
    assert torch.equal(loaded["experts"]["tiny.L0.E0"]["w"], state["experts"]["tiny.L0.E0"]["w"])


def test_the_single_file_of_older_nodes_serves_the_experts_without_their_own(tmp_path):
    def expert(version):
        return {"w": torch.full((2,), float(version)), "version": version}

    torch.save({"model": {"name": "tiny"}, "experts": {f"tiny.L0.E{i}": expert(1) for i in range(3)}}, tmp_path / CHECKPOINT_NAME)
    save_expert_checkpoint(tmp_path, "tiny.L0.E0", {"model": {"name": "tiny"}, "experts": {"tiny.L0.E0": expert(5)}})
    (own, is_own, _), (legacy, is_own_too, path) = iter_checkpoints(tmp_path, ["tiny.L0.E0", "tiny.L0.E1"])  # E2: held, not hosted
    assert is_own and own["experts"]["tiny.L0.E0"]["version"] == 5  # its own file wins
    assert not is_own_too and path == tmp_path / CHECKPOINT_NAME and legacy["model"] == {"name": "tiny"} and list(legacy["experts"]) == ["tiny.L0.E1"]
    save_expert_checkpoint(tmp_path, "tiny.L0.E1", {"model": {"name": "tiny"}, "experts": {"tiny.L0.E1": expert(2)}})
    assert [own for _, own, _ in iter_checkpoints(tmp_path, ["tiny.L0.E0", "tiny.L0.E1"])] == [True, True]


def test_registry_state_survives_a_checkpoint(tmp_path):
    spec = ModelSpec(name="tiny", d_model=4, d_ff=8, n_layers=1, n_experts=2)
    optimizer = OptimizerConfig(name="adam", lr=1e-2, update_every=2)
    uids = ("tiny.L0.E0", "tiny.L0.E1")
    source = ExpertRegistry(spec, uids, seed=0, optimizer=optimizer)
    for seed in range(3):  # one step and one accumulated row
        g = torch.Generator().manual_seed(seed)
        source.backward("tiny.L0.E0", torch.randn(1, 4, generator=g), torch.randn(1, 4, generator=g))
    for uid in uids:
        save_expert_checkpoint(tmp_path, uid, source.state_dict([uid]))

    target = ExpertRegistry(spec, uids, seed=1, optimizer=optimizer)
    assert [target.load_state_dict(state) for state, _, _ in iter_checkpoints(tmp_path, uids)] == [[uid] for uid in uids]  # weights_only
    assert target.fingerprint() == source.fingerprint() == {"tiny.L0.E0": (1, 1, 0), "tiny.L0.E1": (0, 0, 0)}
    assert target.fingerprint(["tiny.L0.E1"]) == {"tiny.L0.E1": (0, 0, 0)}
    for uid in uids:
        restored = dict(target.experts[uid].module.named_parameters())
        for name, p in source.experts[uid].module.named_parameters():
            assert torch.equal(p, restored[name]) and (p.grad is None) == (restored[name].grad is None), name
            assert p.grad is None or torch.equal(p.grad, restored[name].grad), name


@pytest.mark.parametrize("contents", [b"", b"not a torch file", b"PK\x03\x04garbage"])
@pytest.mark.parametrize("name", ["experts/tiny.L0.E0.pt", CHECKPOINT_NAME])
def test_corrupt_checkpoint_raises_naming_its_path(tmp_path, contents, name):
    (tmp_path / "experts").mkdir()
    (tmp_path / name).write_bytes(contents)
    with pytest.raises(ConfigError) as info:
        list(iter_checkpoints(tmp_path, ["tiny.L0.E0"]))
    assert str(tmp_path / name) in str(info.value)
    assert "move it away" in str(info.value)
    assert "weights_only" not in str(info.value)  # torch's advice to unpickle anyway is not for a damaged file


def test_truncated_checkpoint_raises(tmp_path):
    path = save_expert_checkpoint(tmp_path, "tiny.L0.E0", {"w": torch.zeros(1000)})
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ConfigError, match="unreadable"):
        load_checkpoint(path)


def test_identity_is_created_once_and_reloaded(tmp_path):
    first = load_or_create_identity(tmp_path)
    key_file = tmp_path / P2P_IDENTITY_NAME
    assert key_file.exists()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    second = load_or_create_identity(tmp_path)
    assert second.get_public_key().to_bytes() == first.get_public_key().to_bytes()
    # The reloaded key signs, and the original's public key verifies it.
    assert first.get_public_key().verify(b"record", second.sign(b"record"))


def test_the_signing_key_is_the_libp2p_identity(tmp_path):
    """p2pd reads the same file, so the node's peer id is the one readers derive from its records' signer."""
    from hivemind.p2p.p2p_daemon_bindings.datastructures import PeerID

    key = load_or_create_identity(tmp_path)
    assert str(PeerID.from_identity((tmp_path / P2P_IDENTITY_NAME).read_bytes())) == signer_peer_id(dht_subkey(key))
    # and a key file hivemind wrote (a node of an earlier version) is read as it is
    from hivemind.p2p import P2P

    hivemind_made = tmp_path / "hivemind"
    hivemind_made.mkdir()
    P2P.generate_identity(str(hivemind_made / P2P_IDENTITY_NAME))
    again = load_or_create_identity(hivemind_made)
    assert str(PeerID.from_identity((hivemind_made / P2P_IDENTITY_NAME).read_bytes())) == signer_peer_id(dht_subkey(again))


def test_an_identity_that_is_not_an_rsa_libp2p_key_is_a_config_error(tmp_path):
    from hivemind.proto import crypto_pb2

    (tmp_path / P2P_IDENTITY_NAME).write_bytes(crypto_pb2.PrivateKey(key_type=crypto_pb2.Ed25519, data=b"k" * 64).SerializeToString())
    with pytest.raises(ConfigError, match="holds a Ed25519 key, but a node signs its DHT entries with its libp2p key, which must be RSA"):
        load_or_create_identity(tmp_path)
    (tmp_path / P2P_IDENTITY_NAME).write_bytes(b"\xff\xff not protobuf")
    with pytest.raises(ConfigError, match="is not a libp2p key"):
        load_or_create_identity(tmp_path)


def test_a_restarted_node_keeps_its_dht_node_id(tmp_path):
    """Under a new node id, peers that did not see it die keep the old one as a second entry for its
    peer id, and their stores reach it twice (see dht_node_id)."""
    from moeswarm.protocol.dht import dht_node_id

    first = dht_node_id(load_or_create_identity(tmp_path))
    assert dht_node_id(load_or_create_identity(tmp_path)) == first != dht_node_id(load_or_create_identity(None))


def test_identity_without_state_dir_is_fresh_each_time():
    a, b = load_or_create_identity(None), load_or_create_identity(None)
    assert a.get_public_key().to_bytes() != b.get_public_key().to_bytes()


def test_a_state_dir_that_cannot_be_a_directory_is_a_config_error(tmp_path):
    taken = tmp_path / "a-file"
    taken.write_bytes(b"")
    for path in (taken, taken / "below-a-file"):
        with pytest.raises(ConfigError, match=f"state_dir='{path}' is not a directory this node can write"):
            lock_state_dir(path)


def test_unfinished_writes_are_removed_and_nothing_else(tmp_path):
    (tmp_path / "experts").mkdir()
    left = [tmp_path / ".identity.key.a1b2.tmp", tmp_path / "experts" / ".m.L0.E0.pt.x9y8.tmp"]
    kept = [tmp_path / "identity.key", tmp_path / "experts" / "m.L0.E0.pt", tmp_path / "experts" / ".hidden", tmp_path / "notes.tmp"]
    for path in left + kept:
        path.write_bytes(b"x")
    assert remove_unfinished_writes(tmp_path) == 2
    assert not any(path.exists() for path in left) and all(path.exists() for path in kept)


def _trained_registry(uids) -> ExpertRegistry:
    spec = ModelSpec(name="tiny", d_model=4, d_ff=8, n_layers=1, n_experts=2)
    return ExpertRegistry(spec, uids, seed=0, optimizer=OptimizerConfig(name="sgd", lr=0.1, update_every=1))


def _checkpointer(tmp_path, registry, write=save_expert_checkpoint) -> Checkpointer:
    async def fingerprint(uids):
        return registry.fingerprint(uids)

    async def snapshot(uid):
        return registry.fingerprint([uid]), registry.state_dict([uid])

    return Checkpointer(tmp_path, fingerprint, snapshot, write=write)


def _saved_version(tmp_path, uid) -> int:
    return load_checkpoint(expert_checkpoint_path(tmp_path, uid))["experts"][uid]["version"]


def test_checkpointer_writes_only_the_experts_that_changed(tmp_path):
    uids = ["tiny.L0.E0", "tiny.L0.E1"]
    registry = _trained_registry(uids)
    checkpointer = _checkpointer(tmp_path, registry)
    assert asyncio.run(checkpointer.save(uids)) == 2  # fresh experts are written once
    assert asyncio.run(checkpointer.save(uids)) == 0
    registry.backward(uids[1], torch.ones(1, 4), torch.ones(1, 4))
    assert asyncio.run(checkpointer.save(uids)) == 1
    assert [_saved_version(tmp_path, uid) for uid in uids] == [0, 1]


def test_the_single_file_of_older_nodes_is_kept_while_it_holds_experts_the_node_no_longer_hosts(tmp_path):
    """An upgraded node whose experts list changed: deleting the old single file once the node's own
    experts had files of their own lost the training of the experts it had hosted before."""
    uids = ["tiny.L0.E0", "tiny.L0.E1"]
    older = _trained_registry(uids)
    older.backward(uids[1], torch.ones(1, 4), torch.ones(1, 4))
    torch.save(older.state_dict(), tmp_path / CHECKPOINT_NAME)
    registry = _trained_registry(uids[:1])  # now hosts E0 alone
    assert asyncio.run(_checkpointer(tmp_path, registry).save(uids[:1])) == 1
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)["experts"][uids[1]]["version"] == 1
    everything = _trained_registry(uids)  # hosting all it held again: the single file has served its purpose
    assert asyncio.run(_checkpointer(tmp_path, everything).save(uids)) == 2
    assert not (tmp_path / CHECKPOINT_NAME).exists()


def test_a_cancelled_checkpoint_write_never_lands_after_a_newer_one(tmp_path):
    uid = "tiny.L0.E0"
    registry = _trained_registry([uid])
    first_started, release_first = threading.Event(), threading.Event()

    def slow_first_write(state_dir, uid, state):
        if not first_started.is_set():
            first_started.set()
            release_first.wait(10)
        return save_expert_checkpoint(state_dir, uid, state)

    async def scenario():
        checkpointer = _checkpointer(tmp_path, registry, write=slow_first_write)
        periodic = asyncio.create_task(checkpointer.save([uid]))  # copies version 0, then writes slowly
        await asyncio.to_thread(first_started.wait, 10)
        periodic.cancel()  # the node is stopping
        registry.backward(uid, torch.ones(1, 4), torch.ones(1, 4))  # version 1: the last save must hold it
        final = asyncio.create_task(checkpointer.save([uid]))
        await asyncio.sleep(0.2)
        release_first.set()
        assert await final == 1

    asyncio.run(scenario())
    assert _saved_version(tmp_path, uid) == 1
