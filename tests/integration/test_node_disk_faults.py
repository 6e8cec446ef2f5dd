"""A node whose state directory fails under it (disk full, read-only, removed): it serves on, reports
the failure once, keeps the last good checkpoint and writes again once it can."""

from __future__ import annotations

import errno
import os
import pathlib
import shutil
import signal
import subprocess
import time

import pytest
import torch
from conftest import MODEL
from procs import probe, run, train_step, wait_for

D = MODEL["d_model"]
UID = "itest.L0.E0"


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs (mounting takes root): a checkpoint of the test model is about 20 KiB."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)]).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)  # lazily: a node killed at teardown may still hold files


def fill(disk: pathlib.Path) -> pathlib.Path:
    """Take every free byte of `disk` with one file; returns it (unlink it to free the space)."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 1024)
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def config_on(state_dir: pathlib.Path, uids=(UID,)) -> dict:
    return dict(experts=list(uids), state_dir=str(state_dir), checkpoint_interval_s=0.2, optimizer=dict(name="sgd", lr=0.1, update_every=1))


def train(node, uid: str = UID) -> tuple[torch.Tensor, int]:
    """One optimizer step; (the forward of a fixed input after it, the expert's version)."""
    torch.manual_seed(0)
    x = torch.randn(2, D)
    out, versions = run(train_step(node.ready["endpoint"], MODEL["name"], uid, x, torch.randn(2, D)))
    return out, versions[uid]


def forward(node, uid: str = UID) -> tuple[torch.Tensor, int]:
    torch.manual_seed(0)
    out, versions = run(probe(node.ready["endpoint"], MODEL["name"], uid, torch.randn(2, D)))
    return out, versions[uid]


def test_a_full_disk_keeps_the_last_checkpoint_is_reported_once_and_passes(small_disk, node_factory):
    # Before: a traceback at every interval, and the failed last checkpoint at SIGTERM ended the node with one.
    state = small_disk / "state"
    node = node_factory("n1", **config_on(state))
    train(node)
    wait_for(lambda: "checkpoint written" in node.log, what="a first checkpoint")
    checkpoint = state / "experts" / f"{UID}.pt"
    saved = checkpoint.read_bytes()
    filler = fill(small_disk)
    train(node)
    wait_for(lambda: "checkpoint failed" in node.log, what="a failed checkpoint")
    time.sleep(1.0)  # five more intervals on a full disk
    assert node.log.count("checkpoint failed") == 1 and "Traceback" not in node.log
    assert f"cannot write {checkpoint}: No space left on device (ENOSPC): free some disk space" in node.log
    assert checkpoint.read_bytes() == saved and os.listdir(state / "experts") == [checkpoint.name]  # no temp file left
    assert forward(node)[1] == 2  # serving on
    filler.unlink()
    wait_for(lambda: "checkpoints are written to" in node.log, what="a checkpoint once space is free")
    written, _ = forward(node)

    filler = fill(small_disk)
    assert train(node)[1] == 3
    os.kill(node.popen.pid, signal.SIGTERM)
    assert node.popen.wait(15) == 1
    assert "the last checkpoint failed, so the updates since the one before are lost: cannot write" in node.log
    assert "Traceback" not in node.log
    filler.unlink()
    restarted = node_factory("n2", **config_on(state))
    resumed, version = forward(restarted)
    assert version == 2 and torch.equal(resumed, written)


def test_a_state_dir_that_turns_read_only_is_reported_once_and_written_again_after(node_factory, tmp_path):
    state = tmp_path / "state"
    node = node_factory("n1", **config_on(state))
    train(node)
    wait_for(lambda: "checkpoint written" in node.log, what="a first checkpoint")
    # A read-only bind mount over it (remounting a whole filesystem read-only fails while the node holds its lock file open)
    if os.geteuid() != 0 or subprocess.run(["mount", "--bind", str(state), str(state)]).returncode:
        pytest.skip("a read-only bind mount needs root")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(state)], check=True)
        train(node)
        wait_for(lambda: "checkpoint failed" in node.log, what="a failed checkpoint")
        time.sleep(1.0)  # five more intervals
        assert node.log.count("checkpoint failed") == 1 and "Traceback" not in node.log
        assert "Read-only file system (EROFS): the filesystem is read-only" in node.log
    finally:
        subprocess.run(["umount", str(state)], check=True)
    wait_for(lambda: "checkpoints are written to" in node.log, what="a checkpoint once writable")
    assert torch.load(state / "experts" / f"{UID}.pt", weights_only=True)["experts"][UID]["version"] == 2


@pytest.mark.slow  # three node starts, about 16 s: `pytest -m slow`
def test_a_state_dir_removed_while_the_node_runs_is_written_again_in_full(node_factory, tmp_path):
    # Before: the next checkpoint made the folder again with the experts changed since alone: the
    # others' training, the node's identity and its lock were gone, and a second node could take it.
    state = tmp_path / "state"
    uids = ("itest.L0.E0", "itest.L0.E1")
    node = node_factory("n1", **config_on(state, uids))
    for uid in uids:
        train(node, uid)
    wait_for(lambda: len(list(state.glob("experts/*.pt"))) == 2, what="both experts checkpointed")
    shutil.rmtree(state)
    train(node, uids[0])
    wait_for(lambda: "was removed or replaced while this node ran" in node.log, what="the state_dir made again")
    wait_for(lambda: len(list(state.glob("experts/*.pt"))) == 2, what="both experts written again")
    expected = [forward(node, uid) for uid in uids]
    with pytest.raises(RuntimeError, match="is in use by another node"):
        node_factory("n2", **config_on(state, uids))
    node.kill()
    restarted = node_factory("n3", **config_on(state, uids))
    for uid, (out, version) in zip(uids, expected):
        resumed, resumed_version = forward(restarted, uid)
        assert resumed_version == version and torch.equal(resumed, out)
    assert restarted.ready["peer_id"] == node.ready["peer_id"]
