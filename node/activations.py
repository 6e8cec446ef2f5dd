"""Activations a training Forward kept for the Backward of the same rows, so the node need not
recompute them: keyed by (forward request id, expert uid), bounded in bytes and in time.

A miss is never an error: the backward recomputes the forward from its inputs, as any replica can.
An entry is used at most once, and only while the expert's weights are the ones that computed it.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Callable

import torch

KEEP_S = 60.0  # a Backward comes within a training step; older entries are dropped
MAX_ID_CHARS = 128
# What an entry costs besides its tensors' data (key strings, tensor and record objects: ~1.5 KB
# measured): counted against max_bytes, so many tiny entries cannot outgrow it.
ENTRY_OVERHEAD_BYTES = 2048


@dataclasses.dataclass(frozen=True)
class _Kept:
    revision: int  # the expert's weight revision (HostedExpert.revision) when these were computed
    rows: int
    tensors: tuple[torch.Tensor, ...]
    nbytes: int
    stored_at: float


class ActivationCache:
    def __init__(self, max_bytes: int, *, keep_s: float = KEEP_S, clock: Callable[[], float] = time.monotonic):
        self.max_bytes, self.keep_s, self._clock = max_bytes, keep_s, clock
        self._entries: collections.OrderedDict[tuple[str, str], _Kept] = collections.OrderedDict()
        self.bytes = 0
        self.reused_rows = 0  # backward rows served from kept activations, for Info

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, forward_id: str, uid: str, revision: int, tensors: tuple[torch.Tensor, ...]) -> None:
        """Keep `tensors` (each [rows, ...]); the oldest entries go first when over max_bytes.
        Nothing is kept for zero rows (a backward of zero rows recomputes nothing)."""
        nbytes = ENTRY_OVERHEAD_BYTES + sum(t.numel() * t.element_size() for t in tensors)
        if not forward_id or not tensors[0].shape[0] or nbytes > self.max_bytes:
            return
        self._pop((forward_id, uid))
        self._expire()
        while self._entries and self.bytes + nbytes > self.max_bytes:
            self._pop(next(iter(self._entries)))
        self._entries[(forward_id, uid)] = _Kept(revision, tensors[0].shape[0], tensors, nbytes, self._clock())
        self.bytes += nbytes

    def take(self, forward_id: str, uid: str, revision: int, rows: int) -> tuple[torch.Tensor, ...] | None:
        """The kept tensors, removed from the cache; None if absent, expired, or computed by other
        weights (revision) or for another number of rows."""
        self._expire()
        kept = self._pop((forward_id, uid))
        if kept is None or kept.revision != revision or kept.rows != rows:
            return None
        return kept.tensors

    def _pop(self, key: tuple[str, str]) -> _Kept | None:
        kept = self._entries.pop(key, None)
        if kept is not None:
            self.bytes -= kept.nbytes
        return kept

    def _expire(self) -> None:
        deadline = self._clock() - self.keep_s
        while self._entries and next(iter(self._entries.values())).stored_at < deadline:
            self._pop(next(iter(self._entries)))
