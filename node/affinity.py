"""Where and how a node's threads run (Linux): pinned to chosen CPUs, so nodes sharing a machine each
keep their own cores; and, where they share it with a client, scheduled as batch work (see
batch_scheduling).

Measured (2-core VM, 2 nodes hosting 4 experts each, RemoteMoE forward at batch 256 alternating with a
LocalMoE in the client process): 15.6 ms per step with the nodes left to the scheduler, 11.2 ms with each
pinned to its own core; with the client idle between steps, 11.7-12.9 ms unpinned and 11.4-12.0 ms pinned.
A spin loop in the client slows the unpinned nodes as much as the LocalMoE does, so it is placement, not
cache: after the client was busy, the scheduler most likely woke both compute threads on one core.
"""

from __future__ import annotations

import os
from typing import Collection

from moeswarm.protocol.errors import ConfigError

_TASKS = "/proc/self/task"


def available_cpus() -> list[int] | None:
    """The CPUs this process may run on, sorted; None where the OS cannot pin (not Linux)."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    return sorted(os.sched_getaffinity(0))


def pin_process(cpus: Collection[int]) -> None:
    """Restrict every thread of this process, and every thread or process it starts later, to `cpus`.
    ConfigError, before anything changes, when a CPU is not available here."""
    allowed = available_cpus()
    if allowed is None:
        raise ConfigError("cpus: pinning a node to CPUs needs Linux (os.sched_setaffinity)")
    missing = sorted(set(cpus) - set(allowed))
    if missing:
        raise ConfigError(f"cpus={sorted(cpus)}: CPU {missing} is not available to this process (available: {format_cpus(allowed)})")
    for tid in _thread_ids():
        try:
            os.sched_setaffinity(tid, cpus)
        except ProcessLookupError:  # that thread ended meanwhile
            pass


def batch_scheduling() -> None:
    """Run every thread of this process, and every thread or process it starts later, under
    SCHED_BATCH: a node thread woken by a request then waits for the CPU's current task to block or
    use up its slice, instead of preempting it. Sending on a loopback TCP connection wakes the
    receiver onto the sender's CPU (a sync wake-up), so a client calling two nodes of its own machine
    lost its CPU to the first node until that node had answered, and only then sent to the second:
    the two computed one after the other. Measured (bench/generate.py, 2 alternating pairs of full runs
    on the 2-core VM): per MoE layer over the local step, batch 1 0.552-0.570 -> 0.476-0.478 ms, batch 8
    0.413-0.494 -> 0.280-0.318 ms. ConfigError where the OS has no SCHED_BATCH (not Linux)."""
    if not hasattr(os, "SCHED_BATCH"):
        raise ConfigError("sched_batch: needs Linux (os.SCHED_BATCH)")
    for tid in _thread_ids():
        try:
            os.sched_setscheduler(tid, os.SCHED_BATCH, os.sched_param(0))
        except ProcessLookupError:  # that thread ended meanwhile
            pass


def _thread_ids() -> list[int]:
    try:
        return [int(tid) for tid in os.listdir(_TASKS)]
    except OSError:  # no /proc: the calling thread only (threads started later inherit it)
        return [0]


def format_cpus(cpus: Collection[int]) -> str:
    """'0-3,6' for [0, 1, 2, 3, 6]."""
    runs: list[list[int]] = []
    for cpu in sorted(cpus):
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
