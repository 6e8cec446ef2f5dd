"""node/checkpoint.py under damage: checksummed files, checkpoints in the wrong place, writes the disk refuses."""

import errno

import pytest
import torch

from moeswarm.node.checkpoint import (
    LOCK_NAME, P2P_IDENTITY_NAME, TRAILER, holds_lock, iter_checkpoints, load_checkpoint, load_or_create_identity,
    lock_state_dir, os_failure, save_expert_checkpoint,
)
from moeswarm.protocol.errors import CheckpointError, ConfigError

UID = "tiny.L0.E0"


def expert_state(uid: str = UID, version: int = 1) -> dict:
    return {"model": {"name": "tiny"}, "experts": {uid: {"w": torch.arange(2000.0), "version": version}}}


def test_a_flipped_bit_in_a_tensor_is_refused_naming_the_file(tmp_path):
    # Before: torch.load read it without complaint, and the node served the damaged weights.
    path = save_expert_checkpoint(tmp_path, UID, expert_state())
    data = bytearray(path.read_bytes())
    at = bytes(data).index(torch.arange(2000.0)[1000:1002].numpy().tobytes())  # inside the tensor's bytes
    data[at] ^= 0x04
    path.write_bytes(bytes(data))
    with pytest.raises(ConfigError) as info:
        list(iter_checkpoints(tmp_path, [UID]))
    assert str(path) in str(info.value) and "checksum does not match" in str(info.value) and "move it away" in str(info.value)


def test_bytes_appended_to_a_checkpoint_are_refused(tmp_path):
    path = save_expert_checkpoint(tmp_path, UID, expert_state())
    data = path.read_bytes()
    path.write_bytes(data[: -TRAILER.size] + b"\0" * 10 + data[-TRAILER.size :])
    with pytest.raises(ConfigError, match="is damaged"):
        load_checkpoint(path)


def test_a_checkpoint_written_before_checksums_still_loads(tmp_path):
    (tmp_path / "experts").mkdir()
    torch.save(expert_state(version=4), tmp_path / "experts" / f"{UID}.pt")
    [(state, own, _)] = iter_checkpoints(tmp_path, [UID])
    assert own and state["experts"][UID]["version"] == 4


def test_an_empty_checkpoint_says_so(tmp_path):
    (tmp_path / "experts").mkdir()
    (tmp_path / "experts" / f"{UID}.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"is damaged \(the file is empty\)"):
        list(iter_checkpoints(tmp_path, [UID]))


def test_a_directory_in_place_of_a_checkpoint_is_refused(tmp_path):
    (tmp_path / "experts" / f"{UID}.pt").mkdir(parents=True)
    with pytest.raises(ConfigError, match=f"cannot read checkpoint {tmp_path / 'experts' / UID}.pt \\(Is a directory\\)"):
        list(iter_checkpoints(tmp_path, [UID]))


def test_a_file_in_place_of_the_experts_folder_is_refused(tmp_path):
    # Before: every expert looked checkpoint-less, so the node started them all afresh without a word.
    (tmp_path / "experts").write_bytes(b"x")
    with pytest.raises(ConfigError, match="cannot read checkpoint .* \\(Not a directory\\)"):
        list(iter_checkpoints(tmp_path, [UID]))


def test_an_experts_file_holding_another_expert_is_refused(tmp_path):
    # Before: the expert found nothing of its own in it and started afresh; a node hosting the other
    # expert too loaded that one from it.
    other = save_expert_checkpoint(tmp_path, "tiny.L0.E1", expert_state("tiny.L0.E1"))
    other.rename(tmp_path / "experts" / f"{UID}.pt")
    with pytest.raises(ConfigError, match=f"holds experts \\['tiny.L0.E1'\\], not {UID}: was it copied"):
        list(iter_checkpoints(tmp_path, [UID, "tiny.L0.E1"]))


def test_an_experts_file_yields_that_expert_alone(tmp_path):
    state = expert_state()
    state["experts"]["tiny.L0.E1"] = state["experts"][UID]
    save_expert_checkpoint(tmp_path, UID, state)
    [(loaded, _, _)] = iter_checkpoints(tmp_path, [UID, "tiny.L0.E1"])
    assert list(loaded["experts"]) == [UID]


def test_an_identity_key_that_cannot_be_read_is_a_config_error(tmp_path):
    (tmp_path / P2P_IDENTITY_NAME).mkdir()
    with pytest.raises(ConfigError, match=f"cannot read {tmp_path / P2P_IDENTITY_NAME} \\(Is a directory\\)"):
        load_or_create_identity(tmp_path)


def test_a_lock_that_is_a_directory_is_named(tmp_path):
    (tmp_path / LOCK_NAME).mkdir()
    with pytest.raises(ConfigError, match=f"Is a directory: {tmp_path / LOCK_NAME}"):
        lock_state_dir(tmp_path)


def test_a_write_the_disk_refuses_is_a_checkpoint_error_naming_the_file(tmp_path):
    (tmp_path / "experts").write_bytes(b"")  # the folder cannot be made (as with a read-only disk, which root would write anyway)
    with pytest.raises(CheckpointError, match=f"cannot write {tmp_path / 'experts' / UID}.pt: File exists \\(EEXIST\\); the checkpoint before stays"):
        save_expert_checkpoint(tmp_path, UID, expert_state())


def test_a_removed_state_dir_is_not_made_again_by_a_write(tmp_path):
    state_dir = tmp_path / "state"
    with pytest.raises(CheckpointError, match="No such file or directory \\(ENOENT\\): the state directory was removed"):
        save_expert_checkpoint(state_dir, UID, expert_state())
    assert not state_dir.exists()


def test_a_full_disk_seen_through_torchs_runtime_error_is_named():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1920 vs 1814")
    except RuntimeError as e:
        assert os_failure(e) == "No space left on device (ENOSPC): free some disk space"
    assert os_failure(RuntimeError("a bug")) is None


def test_the_lock_is_known_gone_once_the_state_dir_is_removed(tmp_path):
    lock = lock_state_dir(tmp_path / "state")
    try:
        assert holds_lock(tmp_path / "state", lock)
        (tmp_path / "state" / LOCK_NAME).unlink()
        assert not holds_lock(tmp_path / "state", lock)
        (tmp_path / "state" / LOCK_NAME).write_text("")
        assert not holds_lock(tmp_path / "state", lock)  # another file under its name
    finally:
        lock.close()
