"""node/checkpoint.py: atomic writes, checkpoint round trips, and the node's persistent RSA identity."""

import os
import stat

import pytest
import torch

from moeswarm.node.checkpoint import (
    CHECKPOINT_NAME,
    IDENTITY_NAME,
    load_checkpoint,
    load_or_create_identity,
    save_checkpoint,
    write_atomic,
)
from moeswarm.node.config import OptimizerConfig
from moeswarm.node.registry import ExpertRegistry
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
    assert load_checkpoint(tmp_path) is None


def test_checkpoint_round_trip(tmp_path):
    state = {"model": {"name": "tiny"}, "experts": {"tiny.L0.E0": {"w": torch.arange(6.0).view(2, 3), "version": 3}}}
    path = save_checkpoint(tmp_path, state)
    assert path == tmp_path / CHECKPOINT_NAME
    loaded = load_checkpoint(tmp_path)
    assert loaded["model"] == {"name": "tiny"} and loaded["experts"]["tiny.L0.E0"]["version"] == 3
    assert torch.equal(loaded["experts"]["tiny.L0.E0"]["w"], state["experts"]["tiny.L0.E0"]["w"])


def test_registry_state_survives_a_checkpoint(tmp_path):
    spec = ModelSpec(name="tiny", d_model=4, d_ff=8, n_layers=1, n_experts=1)
    optimizer = OptimizerConfig(name="adam", lr=1e-2, update_every=2)
    source = ExpertRegistry(spec, ("tiny.L0.E0",), seed=0, optimizer=optimizer)
    for seed in range(3):  # one step and one accumulated row
        g = torch.Generator().manual_seed(seed)
        source.backward("tiny.L0.E0", torch.randn(1, 4, generator=g), torch.randn(1, 4, generator=g))
    save_checkpoint(tmp_path, source.state_dict())

    target = ExpertRegistry(spec, ("tiny.L0.E0",), seed=1, optimizer=optimizer)
    assert target.load_state_dict(load_checkpoint(tmp_path)) == ["tiny.L0.E0"]  # loads with weights_only=True
    assert target.fingerprint() == source.fingerprint() == {"tiny.L0.E0": (1, 1, 0)}
    restored = dict(target.experts["tiny.L0.E0"].module.named_parameters())
    for name, p in source.experts["tiny.L0.E0"].module.named_parameters():
        assert torch.equal(p, restored[name]) and torch.equal(p.grad, restored[name].grad), name


@pytest.mark.parametrize("contents", [b"", b"not a torch file", b"PK\x03\x04garbage"])
def test_corrupt_checkpoint_raises_naming_its_path(tmp_path, contents):
    (tmp_path / CHECKPOINT_NAME).write_bytes(contents)
    with pytest.raises(RuntimeError) as info:
        load_checkpoint(tmp_path)
    assert str(tmp_path / CHECKPOINT_NAME) in str(info.value)
    assert "move it away" in str(info.value)


def test_truncated_checkpoint_raises(tmp_path):
    save_checkpoint(tmp_path, {"w": torch.zeros(1000)})
    path = tmp_path / CHECKPOINT_NAME
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(RuntimeError, match="unreadable"):
        load_checkpoint(tmp_path)


def test_identity_is_created_once_and_reloaded(tmp_path):
    first = load_or_create_identity(tmp_path)
    key_file = tmp_path / IDENTITY_NAME
    assert key_file.exists()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    second = load_or_create_identity(tmp_path)
    assert second.get_public_key().to_bytes() == first.get_public_key().to_bytes()
    # The reloaded key signs, and the original's public key verifies it.
    assert first.get_public_key().verify(b"record", second.sign(b"record"))


def test_identity_without_state_dir_is_fresh_each_time():
    a, b = load_or_create_identity(None), load_or_create_identity(None)
    assert a.get_public_key().to_bytes() != b.get_public_key().to_bytes()
