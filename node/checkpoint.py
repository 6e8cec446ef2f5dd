"""Atomic checkpoints of a node's experts and optimizer state, the node's persistent identity, and
the lock that keeps a second node off the same state directory.

Each expert has its own checkpoint file, `experts/{uid}.pt` (an ExpertRegistry.state_dict of that
expert alone), so a node snapshots and writes one expert at a time and only the experts that changed.
Each file is written to a temporary file, fsynced, renamed over the old one, and the directory
fsynced: a crash at any moment leaves either the previous or the new checkpoint, never a torn one.
Each file ends with the length and CRC-32 of what torch.save wrote before it: torch.load does not
notice a flipped bit in a tensor, and a damaged disk or copy must not serve wrong weights silently.
Nodes before per-expert files wrote every expert into one `experts.pt`; it is still read, for the
experts that have no file of their own yet.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import pathlib
import struct
import zlib
from typing import Awaitable, Callable, Iterator

import torch

from moeswarm.protocol.durable import fsync_dir, write_atomic  # noqa: F401  (write_atomic: also for callers of this module)
from moeswarm.protocol.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

EXPERTS_DIR = "experts"  # one checkpoint per expert: experts/{uid}.pt
CHECKPOINT_NAME = "experts.pt"  # every expert in one file, as older nodes wrote it: read, never written
# The node's RSA key in libp2p's format: p2pd's identity (so its DHT peer id derives from it) and the
# key that signs its DHT entries (readers take an entry's peer id from its signer: protocol/records.py).
P2P_IDENTITY_NAME = "p2p_identity.key"
OLD_IDENTITY_NAME = "identity.key"  # the separate signing key of earlier versions: no longer read
LOCK_NAME = "lock"
# After torch.save's bytes: magic, their length, their CRC-32. torch.load reads past trailing bytes,
# so older versions still load these files; files without it (written before it) load unchecked.
TRAILER = struct.Struct("<16sQI")
TRAILER_MAGIC = b"moeswarm-crc32-1"
MOVE_AWAY = "move it away to start this expert from a replica in the swarm if there is one, else from fresh weights"


def expert_checkpoint_path(state_dir: pathlib.Path, uid: str) -> pathlib.Path:
    return state_dir / EXPERTS_DIR / f"{uid}.pt"  # UIDs are [a-z0-9_-] plus dots (protocol/spec.py)


def save_expert_checkpoint(state_dir: pathlib.Path, uid: str, state: dict) -> pathlib.Path:
    """Write one expert's state (ExpertRegistry.state_dict([uid])) atomically to its own file.
    CheckpointError where the disk refuses (full, read-only, state_dir gone): the old file stays."""
    folder = state_dir / EXPERTS_DIR
    path = expert_checkpoint_path(state_dir, uid)
    try:
        if not folder.is_dir():
            folder.mkdir(exist_ok=True)  # not state_dir: a removed one is the node's to make again, in full
            fsync_dir(state_dir)  # the new folder's entry survives a crash too
        write_atomic(path, lambda file: save_checked(state, file))
    except Exception as e:
        if (reason := os_failure(e)) is None:
            raise  # not the disk: a bug, with its traceback
        raise CheckpointError(f"cannot write {path}: {reason}; the checkpoint before stays", reason) from e
    return path


class _Crc32Writer:
    """The file torch.save writes through: counts the bytes and their CRC-32 on the way."""

    def __init__(self, file):
        self.file, self.length, self.crc = file, 0, 0

    def write(self, data) -> int:
        self.length += memoryview(data).nbytes
        self.crc = zlib.crc32(data, self.crc)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


def save_checked(state: dict, file) -> None:
    """torch.save(state) into `file`, then the TRAILER that lets load_checkpoint check it."""
    counted = _Crc32Writer(file)
    torch.save(state, counted)
    file.write(TRAILER.pack(TRAILER_MAGIC, counted.length, counted.crc))


def _damage(file) -> str | None:
    """What is wrong with an open checkpoint file that its TRAILER shows; None if nothing (or no trailer)."""
    size = os.fstat(file.fileno()).st_size
    if size == 0:
        return "the file is empty"
    if size < TRAILER.size:
        return None
    file.seek(size - TRAILER.size)
    magic, length, crc = TRAILER.unpack(file.read(TRAILER.size))
    if magic != TRAILER_MAGIC:
        return None  # written before trailers, or cut short: torch.load says which
    if length != size - TRAILER.size:
        return f"{size - TRAILER.size} bytes where it was written with {length}"
    file.seek(0)
    actual = 0
    while chunk := file.read(min(1 << 24, length)):
        actual = zlib.crc32(chunk, actual)
        length -= len(chunk)
    if actual != crc:
        return "its checksum does not match: bytes changed on disk since it was written"
    return None


_REMEDIES = {
    errno.ENOSPC: "free some disk space", errno.EDQUOT: "free some disk space (over quota)",
    errno.EROFS: "the filesystem is read-only: remount it read-write",
    errno.EACCES: "give the node's user write access", errno.EPERM: "give the node's user write access",
    errno.ENOENT: "the state directory was removed",
}


def os_failure(error: BaseException) -> str | None:
    """What the OS refused, with what to do, where `error` is or was caused by an OSError (torch.save
    reports a full disk as a RuntimeError raised while handling the OSError); None otherwise."""
    while error is not None and not isinstance(error, OSError):
        error = error.__cause__ or error.__context__
    if error is None:
        return None
    name = errno.errorcode.get(error.errno, "")
    reason = f"{error.strerror or error} ({name})" if name else str(error.strerror or error)
    return f"{reason}: {_REMEDIES[error.errno]}" if error.errno in _REMEDIES else reason


class Checkpointer:
    """Saves each expert that changed since its last checkpoint to its own file, one at a time: it is
    copied (`snapshot`, on the node's compute thread, so requests are served between experts) and
    written before the next is copied, so the node holds one expert's copy at a time, not a second
    copy of all of them. A save cancelled mid-write (the node stopping) lets that write finish before
    the next one starts: an older copy never lands after a newer one."""

    def __init__(
        self, state_dir: pathlib.Path, fingerprint: Callable[[list[str]], Awaitable[dict]],
        snapshot: Callable[[str], Awaitable[tuple[dict, dict]]], *, write=save_expert_checkpoint,
    ):
        """fingerprint(uids) -> {uid: value that changes with its state}, read where the state
        changes (the compute thread: read from another thread, a step halfway done could look like
        no change); snapshot(uid) -> (fingerprint([uid]), ExpertRegistry.state_dict([uid])), taken together."""
        self.state_dir, self._fingerprint, self._snapshot, self._write = state_dir, fingerprint, snapshot, write
        self.saved: dict[str, object] = {}  # uid -> fingerprint of its checkpoint file
        self._writing: asyncio.Future | None = None
        self._legacy_holds_others: bool | None = None  # whether CHECKPOINT_NAME holds experts not saved here (read once)

    async def save(self, uids: list[str]) -> int:
        """Write the experts of `uids` that changed; returns how many."""
        written = 0
        current = await self._fingerprint(uids)
        for uid in uids:
            if current[uid] == self.saved.get(uid):
                continue
            fingerprint, state = await self._snapshot(uid)
            if self._writing is not None and not self._writing.done():
                await asyncio.wait({self._writing})  # a cancelled save's write: it must not land after ours
            self._writing = asyncio.ensure_future(asyncio.to_thread(self._write, self.state_dir, uid, state))
            del state  # the write holds it until done; the next expert's copy is taken after
            await asyncio.shield(self._writing)
            self.saved.update(fingerprint)
            written += 1
        legacy = self.state_dir / CHECKPOINT_NAME
        if written and legacy.exists() and all(uid in self.saved for uid in uids):
            if self._legacy_holds_others is None:  # experts of an earlier config: their only state is in it
                held = (await asyncio.to_thread(load_checkpoint, legacy) or {}).get("experts") or {}
                self._legacy_holds_others = not set(held) <= set(uids)
            if not self._legacy_holds_others:
                legacy.unlink()  # every expert it held now has a newer file of its own
        return written


def iter_checkpoints(state_dir: pathlib.Path, uids) -> Iterator[tuple[dict, bool, pathlib.Path]]:
    """The last checkpoints of `uids`, one file at a time, for ExpertRegistry.load_state_dict (a caller
    that loads each before taking the next holds one expert's copy beside the weights, not a copy of
    all): (state, True, path) for each expert's own file, then (state, False, path) for the single file
    of older nodes narrowed to the experts without one, if any. A corrupt file, or an expert's file that
    holds no state of that expert (copied from another's), raises ConfigError with its path."""
    covered = set()
    for uid in uids:
        path = expert_checkpoint_path(state_dir, uid)
        state = load_checkpoint(path)
        if state is not None:
            experts = state.get("experts") if isinstance(state, dict) else None
            if not isinstance(experts, dict) or uid not in experts:
                held = f"experts {sorted(map(str, experts))[:3]}" if isinstance(experts, dict) else "no experts"
                raise ConfigError(f"checkpoint {path} holds {held}, not {uid}: was it copied from another expert's file? {MOVE_AWAY}")
            covered.add(uid)
            yield {**state, "experts": {uid: experts[uid]}}, True, path
        state = experts = None  # released before the next file is read
    path = state_dir / CHECKPOINT_NAME
    legacy = load_checkpoint(path)
    if legacy is None:
        return
    if not isinstance(legacy.get("experts"), dict):
        yield legacy, False, path  # malformed: load_state_dict says so
        return
    experts = {uid: expert for uid, expert in legacy["experts"].items() if uid in uids and uid not in covered}
    if experts:
        yield {**legacy, "experts": experts}, False, path


def load_checkpoint(path: pathlib.Path) -> dict | None:
    """One checkpoint file, or None if it does not exist. ConfigError, naming the file and what to do,
    for one that cannot be read, is damaged (TRAILER) or is no checkpoint."""
    try:
        with open(path, "rb") as file:
            damage = _damage(file)
    except FileNotFoundError:
        return None
    except OSError as e:  # a directory in its place, no read permission, a file where experts/ should be
        raise ConfigError(f"cannot read checkpoint {path} ({e.strerror or e}); give the node's user read access, or {MOVE_AWAY}") from e
    if damage is not None:
        raise ConfigError(f"checkpoint {path} is damaged ({damage}); {MOVE_AWAY}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"checkpoint {path} is unreadable ({_load_failure(e)}); {MOVE_AWAY}") from e


def _load_failure(error: Exception) -> str:
    text = str(error)
    if "WeightsUnpickler error:" in text:  # torch's advice to retry with weights_only=False is not for a damaged file
        text = "damaged, or not a checkpoint: " + text.split("WeightsUnpickler error:", 1)[1].strip().split("\n", 1)[0]
    else:  # e.g. "[Errno 22] Invalid argument" for a file cut short: torch's words alone do not say so
        text = f"cut short, damaged, or not a checkpoint: {text}"
    return " ".join(text.split())[:300]


def load_or_create_identity(state_dir: pathlib.Path | None):
    """The node's RSA key (see P2P_IDENTITY_NAME): kept in state_dir so a restarted node keeps its
    peer id and rewrites its own DHT entries; without a state_dir, a fresh one each start."""
    from hivemind.utils.crypto import RSAPrivateKey

    if state_dir is None:
        return RSAPrivateKey()
    if (state_dir / OLD_IDENTITY_NAME).exists():
        logger.info("%s is no longer used (the node signs its DHT entries with its libp2p key): it can be deleted", state_dir / OLD_IDENTITY_NAME)
    return load_or_create_key_file(state_dir / P2P_IDENTITY_NAME)


def load_or_create_key_file(path: pathlib.Path):
    """The RSA key of a libp2p key file (read_identity), written first (a new key) if there is none."""
    from hivemind.utils.crypto import RSAPrivateKey

    if path.exists():
        return read_identity(path)
    key = RSAPrivateKey()
    write_identity(key, path)
    return key


def write_identity(key, path: pathlib.Path) -> pathlib.Path:
    """Write an RSA key as libp2p's PrivateKey protobuf (what p2pd reads with -id; owner-only)."""
    from hivemind.proto import crypto_pb2

    data = crypto_pb2.PrivateKey(key_type=crypto_pb2.RSA, data=key.to_bytes()).SerializeToString()
    write_atomic(path, lambda file: file.write(data))  # mkstemp: mode 0o600
    return path


def read_identity(path: pathlib.Path):
    """The RSA key of a libp2p key file; ConfigError if it holds anything else."""
    from google.protobuf.message import DecodeError
    from hivemind.proto import crypto_pb2
    from hivemind.utils.crypto import RSAPrivateKey

    remedy = "move it away to make a new one (the node's peer id changes)"
    try:
        message = crypto_pb2.PrivateKey.FromString(path.read_bytes())
    except OSError as e:  # a directory in its place, no read permission
        raise ConfigError(f"cannot read {path} ({e.strerror or e}); give the node's user read access, or {remedy}") from e
    except DecodeError as e:
        raise ConfigError(f"{path} is not a libp2p key ({e}); {remedy}") from e
    if message.key_type != crypto_pb2.RSA:
        kind = crypto_pb2.KeyType.Name(message.key_type)
        raise ConfigError(f"{path} holds a {kind} key, but a node signs its DHT entries with its libp2p key, which must be RSA; {remedy}")
    key = RSAPrivateKey.__new__(RSAPrivateKey)
    try:
        key.__setstate__({"_private_key": message.data})  # DER, as RSAPrivateKey pickles it
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{path} holds a damaged RSA key ({e}); {remedy}") from e
    return key


def holds_lock(state_dir: pathlib.Path, lock_file) -> bool:
    """Whether state_dir's lock file is still the one `lock_file` (lock_state_dir's) holds: False once
    it was removed, with the whole directory or alone, or replaced."""
    try:
        on_disk = os.stat(state_dir / LOCK_NAME)
    except OSError:
        return False
    held = os.fstat(lock_file.fileno())
    return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)


def lock_state_dir(state_dir: pathlib.Path):
    """Hold an exclusive lock on state_dir for this process's lifetime (the kernel drops it when the
    process ends, kill -9 included); returns the open lock file to keep. Two nodes on one state
    directory would overwrite each other's checkpoints under one identity: the second one is refused."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        return hold_lock(state_dir / LOCK_NAME, lambda pid: f"state_dir={str(state_dir)!r} is in use by another node (pid {pid}); give each node its own")
    except OSError as e:
        where = f": {e.filename}" if e.filename and str(e.filename) != str(state_dir) else ""
        raise ConfigError(f"state_dir={str(state_dir)!r} is not a directory this node can write ({e.strerror or e}{where})") from e


def remove_unfinished_writes(state_dir: pathlib.Path) -> int:
    """Delete the temporary files of writes a crash (kill -9, power loss) cut short; returns how many.
    Call with the state_dir lock held: then no write of this directory is in progress."""
    removed = 0
    for folder in (state_dir, state_dir / EXPERTS_DIR):
        for path in folder.glob(".*.tmp"):  # write_atomic's names: .{name}.{random}.tmp
            path.unlink(missing_ok=True)
            removed += 1
    if removed:
        logger.info("removed %d unfinished checkpoint writes from %s", removed, state_dir)
    return removed


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
