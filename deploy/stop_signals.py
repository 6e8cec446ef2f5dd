"""SIGINT/SIGTERM for the long-running commands (node, dht, swarm up), from the moment the command is
known until it stops: what a signal does in each phase, and the exit code it leaves."""

from __future__ import annotations

import os
import signal
import time

EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT) before the process was ready: 128 + 2, as a shell reports it
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
POLL_S = 0.05  # how often StopFlag.wait looks at the flag


def exit_code_when_stopped(signals: list[int]) -> int:
    """Exit code of a process stopped before it was ready: 130 after a SIGINT (Ctrl-C); 0 after a
    SIGTERM alone, as for a SIGTERM once ready (the way a supervisor stops it, not a failure)."""
    return EXIT_INTERRUPTED if signal.SIGINT in signals else 0


def exit_at_once_on_stop_signals() -> dict[int, object]:
    """From now until the command installs its own handlers, SIGINT or SIGTERM end the process at
    once; returns the handlers it replaced. The process only imports and parses then, with nothing
    to undo; Python's default, a KeyboardInterrupt raised wherever that import was, printed a
    traceback (a Ctrl-C in a command's first 0.2 s) and once left a half-imported numpy
    ("module 'numpy' has no attribute 'multiply'"), then a hung process."""
    return {sig: signal.signal(sig, _exit_now) for sig in STOP_SIGNALS}


def exit_at_once_on_ctrl_c() -> None:
    """From now on SIGINT ends the process at once with 130, unless it is ignored (nohup, &). For a
    command whose output is complete and that only closes what it used: a KeyboardInterrupt raised
    there can land in a finalizer or a weakref callback (the client's closing loop frees its tasks),
    where Python prints "Exception ignored ... KeyboardInterrupt" with a traceback and goes on.
    What the process started sees it go (the client DHT peer stops when its stdin closes). Main thread only."""
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, _exit_now)


def _exit_now(signum: int, _frame) -> None:
    os._exit(exit_code_when_stopped([signum]))


class StopFlag:
    """Records SIGINT and SIGTERM once installed; the main loop polls it (`wait`, `is_set`), with
    threading.Event's interface so code that takes an Event takes this too.

    The handler only appends to a list. It must not take a lock: it runs in the main thread between
    two bytecodes, possibly while that thread holds the very lock threading.Event.set() needs
    (Event.wait holds it around its wait). Ctrl-C at random moments of `swarm up`'s start hung it
    that way 2 times in 11, until a second Ctrl-C."""

    def __init__(self) -> None:
        self.signals: list[int] = []

    def install(self) -> "StopFlag":
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)
        return self

    def _on_signal(self, signum: int, _frame) -> None:
        self.signals.append(signum)

    def set(self) -> None:
        """Stop without a signal (0 stands for "asked in code")."""
        self.signals.append(0)

    def is_set(self) -> bool:
        return bool(self.signals)

    def wait(self, timeout_s: float) -> bool:
        """True once a stop came (at most POLL_S late); False after `timeout_s` without one."""
        deadline = time.monotonic() + timeout_s
        while not self.signals:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(left, POLL_S))
        return True
