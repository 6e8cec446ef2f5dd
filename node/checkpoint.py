"""Atomic checkpoints of a node's experts and optimizer state, the node's persistent identity, and
the lock that keeps a second node off the same state directory.

A checkpoint is written to a temporary file, fsynced, renamed over the old one, and the directory
fsynced: a crash at any moment leaves either the previous or the new checkpoint, never a torn one.
"""

from __future__ import annotations

import fcntl
import logging
import os
import pathlib
import tempfile
from typing import Callable

import torch

from moeswarm.protocol.errors import ConfigError

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "experts.pt"
IDENTITY_NAME = "identity.key"
P2P_IDENTITY_NAME = "p2p_identity.key"  # libp2p key: the node keeps its DHT peer id across restarts
LOCK_NAME = "lock"


def write_atomic(path: pathlib.Path, write) -> None:
    """Call write(file) on a temp file beside `path`, fsync it, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        pathlib.Path(tmp_name).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(state_dir: pathlib.Path, state: dict) -> pathlib.Path:
    path = state_dir / CHECKPOINT_NAME
    write_atomic(path, lambda file: torch.save(state, file))
    return path


def load_checkpoint(state_dir: pathlib.Path) -> dict | None:
    """The last checkpoint, or None if there is none. A corrupt file raises with its path."""
    path = state_dir / CHECKPOINT_NAME
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RuntimeError(f"checkpoint {path} is unreadable ({e}); move it away to start from fresh weights") from e


def load_or_create_identity(state_dir: pathlib.Path | None):
    """The node's RSA key: kept in state_dir so a restarted node rewrites its own DHT entries."""
    from hivemind.utils.crypto import RSAPrivateKey

    if state_dir is None:
        return RSAPrivateKey()
    path = state_dir / IDENTITY_NAME
    if path.exists():
        key = RSAPrivateKey.__new__(RSAPrivateKey)
        key.__setstate__({"_private_key": path.read_bytes()})  # DER, as RSAPrivateKey pickles it
        return key
    key = RSAPrivateKey()
    write_atomic(path, lambda file: file.write(key.to_bytes()))
    os.chmod(path, 0o600)
    return key


def lock_state_dir(state_dir: pathlib.Path):
    """Hold an exclusive lock on state_dir for this process's lifetime (the kernel drops it when the
    process ends, kill -9 included); returns the open lock file to keep. Two nodes on one state
    directory would overwrite each other's checkpoints under one identity: the second one is refused."""
    state_dir.mkdir(parents=True, exist_ok=True)
    return hold_lock(state_dir / LOCK_NAME, lambda pid: f"state_dir={str(state_dir)!r} is in use by another node (pid {pid}); give each node its own")


def hold_lock(path: pathlib.Path, in_use: Callable[[str], str]):
    """Hold an exclusive lock on `path` (made if missing) while this process lives; returns the open
    file to keep. Taken: ConfigError(in_use(pid of the holder)). A POSIX record lock (lockf), not
    flock: it belongs to this process alone, so the DHT process forked from it does not hold it on
    after this process died."""
    file = open(path, "a+")
    try:
        fcntl.lockf(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        file.seek(0)
        holder = file.read().strip() or "unknown"
        file.close()
        raise ConfigError(in_use(holder)) from None
    file.truncate(0)
    file.write(str(os.getpid()))
    file.flush()
    return file
