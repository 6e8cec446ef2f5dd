"""The dispatcher's event loop, run by the threads that call it: the sync<->async bridge.

A synchronous caller (a RemoteMoE forward or backward, a decoding step) runs the loop itself for the
length of its call, instead of handing the call to a loop thread and sleeping until that thread
answers. Each hand-off between threads wakes a thread whose CPU went idle, and on a virtual machine
that costs tens of microseconds. Measured on the 2-core VM: a 1 KiB echo over an open gRPC stream,
with 0.7 ms of torch work between calls, took 404-413 us through a loop thread and 313-339 us with
the loop run by the caller; `bench/generate.py` (full runs, alternating) put a batch-1 decoding step
0.11 ms per MoE layer lower (1.11-1.13 -> 0.99-1.03 ms over the local step; 0.15 ms with
`--replicas 2`), batch 8 and `bench/remote_moe.py` unchanged. Keeping the loop spinning while a call
is in flight (never sleeping) cut that echo to 189 us but slowed decoding (1.09 -> 1.32-1.37 ms per
layer): the core it spins on is one the nodes need.

At most one thread runs the loop at a time. A thread that calls while another runs it schedules its
coroutine there and waits; when the runner's own call ends first, a waiter takes the loop over. A
caller whose thread already runs an event loop of its own (a notebook cell, an async program calling
the synchronous API) cannot run a second one there: its call runs on a helper thread. Between calls
nobody runs the loop; what is left on it (a dropped channel's close after its grace period, a hedge
that lost) goes on at the next call, and close() finishes it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from typing import Any, Coroutine

logger = logging.getLogger(__name__)
_CANCELLED = (asyncio.CancelledError, concurrent.futures.CancelledError)


class LoopRunner:
    def __init__(self, loop: asyncio.AbstractEventLoop, name: str = "moeswarm-dispatch"):
        self.loop, self._name = loop, name
        self._running = threading.Lock()  # held by the thread that runs the loop
        self._handoff = threading.Condition()  # notified when the loop is free or a waited-on call ended
        self._helpers: concurrent.futures.ThreadPoolExecutor | None = None
        self._helpers_lock = threading.Lock()

    def run(self, coro: Coroutine, bound_s: float) -> Any:
        """Run `coro` on the loop from any thread and return its result (or raise its exception).
        After bound_s it is cancelled and TimeoutError raised; a KeyboardInterrupt cancels it too."""
        running = asyncio._get_running_loop()
        if running is self.loop:
            coro.close()
            raise RuntimeError("a blocking dispatcher call from a coroutine on its own loop would never end; await it instead")
        if running is not None:
            return self._helper_pool().submit(self._run, coro, bound_s).result()
        return self._run(coro, bound_s)

    def hold(self) -> bool:
        """Take the loop without running it, for synchronous work on what it owns (Dispatcher.forward_blocking):
        False if another thread runs it now, or the caller's thread runs an event loop. Then release()
        it, or run_held() a coroutine on it. Calls from other threads meanwhile wait their turn."""
        if asyncio._get_running_loop() is not None:
            return False
        return self._running.acquire(blocking=False)

    def release(self) -> None:
        self._release()

    def run_held(self, coro: Coroutine, bound_s: float) -> Any:
        """run() for the thread that holds the loop (hold()); the loop is released when it returns."""
        return self._drive(self.loop.create_task(coro), time.monotonic() + bound_s, bound_s)

    def close(self, timeout_s: float = 5.0) -> None:
        """Cancel what is left on the loop, let it finish, and close the loop (once it is free)."""
        running = asyncio._get_running_loop()
        if running is None:
            self._close(timeout_s)
        elif running is not self.loop:  # (called from async code: on a helper thread, as run() does)
            self._helper_pool().submit(self._close, timeout_s).result()
        if self._helpers is not None:
            self._helpers.shutdown(wait=False)

    def _close(self, timeout_s: float) -> None:
        if not self._running.acquire(timeout=timeout_s):
            return  # a call still runs the loop: leave the loop open rather than close it under that call
        try:
            pending = [task for task in asyncio.all_tasks(self.loop) if not task.done()]
            for task in pending:
                task.cancel()
            if pending:  # (asyncio.wait returns at the timeout; wait_for would wait on a task that ignores its cancel)
                self.loop.run_until_complete(asyncio.wait(pending, timeout=timeout_s))
        except _CANCELLED:
            pass
        finally:
            self.loop.close()
            self._release()

    def _run(self, coro: Coroutine, bound_s: float) -> Any:
        deadline = time.monotonic() + bound_s
        if self._running.acquire(blocking=False):
            return self._drive(self.loop.create_task(coro), deadline, bound_s)
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        future.add_done_callback(self._notify)
        while True:
            with self._handoff:
                while not future.done() and self._running.locked() and time.monotonic() < deadline:
                    self._handoff.wait(deadline - time.monotonic())
            if future.done():
                return future.result()
            if time.monotonic() >= deadline:
                future.cancel()  # runs on the loop with the next call that runs it
                raise _timeout(bound_s)
            if self._running.acquire(blocking=False):  # the runner left: run the loop for this call
                return self._drive(asyncio.wrap_future(future, loop=self.loop), deadline, bound_s)

    def _drive(self, future: asyncio.Future, deadline: float, bound_s: float) -> Any:
        """Run the loop (this thread holds _running) until `future` is done, at most until deadline."""
        expired = []
        timer = self.loop.call_later(max(0.0, deadline - time.monotonic()), lambda: expired.append(future.cancel()))
        try:
            return self.loop.run_until_complete(future)
        except _CANCELLED:
            if expired:
                raise _timeout(bound_s) from None
            raise
        except BaseException:  # Ctrl-C inside the loop: stop the call, not just the wait for it
            future.cancel()
            raise
        finally:
            timer.cancel()
            self._release()

    def _release(self) -> None:
        with self._handoff:
            self._running.release()
            self._handoff.notify_all()

    def _notify(self, _future) -> None:
        with self._handoff:
            self._handoff.notify_all()

    def _helper_pool(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._helpers_lock:
            if self._helpers is None:
                self._helpers = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix=self._name)
            return self._helpers


def _timeout(bound_s: float) -> TimeoutError:
    return TimeoutError(f"no result within {bound_s:.3g} s (the dispatcher's bound for one call)")


def new_event_loop() -> asyncio.AbstractEventLoop:
    """The client's loop: asyncio's own, not uvloop (nodes use uvloop). The calling thread runs it for
    each call (LoopRunner), and uvloop, run from the main thread, makes and closes a
    socket pair and sets Python's signal wakeup fd at every run: a run of an empty coroutine took
    70 us against 43-46 us for asyncio's loop, with the caches cold as between two decoding layers.
    bench/generate.py --quick, 2 alternating pairs: batch 1, 0.638 / 0.654 against 0.719 / 0.723 ms
    per MoE layer over the local step; batch 8 and bench/remote_moe.py within their noise."""
    loop = asyncio.new_event_loop()
    loop.set_exception_handler(_skip_expected_loop_errors)
    return loop


def _skip_expected_loop_errors(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """grpc.aio's poller queues every completion event of the process, and whichever bound loop reads
    the queue hands each event to the loop its call was made on. An event that comes after that loop
    was closed (another client of this process, closed a moment before) raises "Event loop is closed"
    in the loop that read it, a traceback in the user's output. Its call was over: nothing waits for
    the event, and the other events stay queued for the next read. Skip those; report the rest.
    Also skipped: a Ctrl-C's KeyboardInterrupt left in a task it ended (the caller's thread runs the loop,
    so Python's SIGINT handler may run inside a task); the same exception ended the caller's call."""
    error, handle = context.get("exception"), context.get("handle")
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed" and "PollerCompletionQueue" in repr(handle):
        logger.debug("skipped a gRPC completion event of a closed event loop")
        return
    if isinstance(error, (KeyboardInterrupt, SystemExit)) and "never retrieved" in context.get("message", ""):
        return
    loop.default_exception_handler(context)
