"""Busy-polling after an answer (node config `busy_poll_us`): the event loop keeps running instead of
sleeping for a while, so the next request of a client that calls again at once (decoding: the next
layer, the next token) finds the node's CPU awake.

Why: on a virtual machine a CPU that went idle is handed back to the host, and waking it costs tens of
microseconds per hop, then the first code after the wake-up runs 2-5x slower than it would on a warm CPU.
Measured on the 2-core VM with a 256x1024 expert, batch-1 Forward over the Stream, one client calling
two nodes in turn: 0.600 ms median from the one sleeping between calls, 0.538 ms from the one polling
for 2 ms after each answer. Where no core is free (nodes and client sharing all of them) it gains nothing.

The cost is CPU: while a client keeps calling, the loop spins on one core. The poller yields the CPU
(sched_yield) at every turn, so other processes that need it run first, and it stops while the node's
compute thread has work (it would only contend with it for the GIL), when the node closes, and
`busy_poll_us` after the last answer, so an idle node sleeps as before.
"""

from __future__ import annotations

import asyncio
import os
from typing import Callable

_yield_cpu = getattr(os, "sched_yield", lambda: None)  # Unix; elsewhere the loop just turns


class BusyPoller:
    def __init__(self, seconds: float, compute_busy: Callable[[], bool] = lambda: False):
        """seconds: how long the loop spins after each kick(); 0 turns polling off.
        compute_busy: whether work runs on the compute thread (the poller then stops)."""
        self.seconds, self._compute_busy = seconds, compute_busy
        self._until = 0.0
        self._task: asyncio.Task | None = None
        self._closed = False
        self.turns = 0  # loop turns spent polling

    def kick(self) -> None:
        """An answer went out: poll for `seconds` from now. Call on the event loop."""
        if not self.seconds or self._closed:
            return
        loop = asyncio.get_running_loop()
        self._until = loop.time() + self.seconds
        if self._task is None:
            self._task = loop.create_task(self._poll())

    def close(self) -> None:
        """Stop polling now and for good (node shutdown)."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()  # (a task not started yet never runs its finally)
            self._task = None

    async def _poll(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while loop.time() < self._until and not self._closed and not self._compute_busy():
                _yield_cpu()  # any other runnable process on this CPU goes first
                await asyncio.sleep(0)  # one loop turn: I/O is polled without blocking
                self.turns += 1
        finally:
            if self._task is asyncio.current_task():
                self._task = None
