"""LoopRunner: the dispatcher's event loop is run by the threads that call it (model/loop_runner.py)."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import threading
import time

import pytest

from moeswarm.model.loop_runner import new_event_loop
from moeswarm.model.loop_runner import LoopRunner


@pytest.fixture
def runner():
    runner = LoopRunner(new_event_loop())
    yield runner
    runner.close()


async def _thread_name(delay_s: float = 0.0) -> str:
    await asyncio.sleep(delay_s)
    return threading.current_thread().name


async def _sleep_noting_the_end(ended: list) -> None:
    try:
        await asyncio.sleep(30)
    finally:
        ended.append(True)


def _wait_until_the_loop_runs(runner: LoopRunner) -> None:
    for _ in range(5000):
        if runner._running.locked():
            return
        time.sleep(0.001)
    raise AssertionError("no thread ran the loop within ~5 s")


def test_a_call_runs_on_the_callers_own_thread(runner):
    assert runner.run(_thread_name(), 5) == threading.current_thread().name
    done = []
    worker = threading.Thread(target=lambda: done.append(runner.run(_thread_name(), 5)), name="caller-2")
    worker.start()
    worker.join(10)
    assert done == ["caller-2"]


def test_concurrent_callers_all_finish_and_a_waiter_takes_the_loop_over(runner):
    """The first thread runs the loop for a short call; the others' longer calls, scheduled on it
    meanwhile, must finish after it left (one of them takes the loop over) instead of waiting out
    their bound."""
    results, errors = {}, []

    def call(index: int, delay_s: float) -> None:
        try:
            results[index] = runner.run(_thread_name(delay_s), 5)
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    first = threading.Thread(target=call, args=(0, 0.2), name="t0")
    first.start()
    _wait_until_the_loop_runs(runner)  # on t0
    others = [threading.Thread(target=call, args=(i, 0.4 + 0.1 * i), name=f"t{i}") for i in (1, 2, 3)]
    for thread in others:
        thread.start()
    for thread in [first, *others]:
        thread.join(15)
    assert errors == [] and sorted(results) == [0, 1, 2, 3]
    assert results[0] == "t0" and set(results.values()) <= {"t0", "t1", "t2", "t3"}


def test_a_call_past_its_bound_raises_timeout_and_is_cancelled(runner):
    ended = []
    with pytest.raises(TimeoutError, match="no result within 0.2 s"):
        runner.run(_sleep_noting_the_end(ended), 0.2)
    assert ended == [True]
    assert runner.run(_thread_name(), 5)  # the loop is free for the next call


def test_a_waiter_past_its_bound_raises_timeout_while_another_thread_runs_the_loop(runner):
    holder = threading.Thread(target=runner.run, args=(asyncio.sleep(1.0), 5))
    holder.start()
    try:
        _wait_until_the_loop_runs(runner)
        with pytest.raises(TimeoutError):
            runner.run(asyncio.sleep(30), 0.2)
    finally:
        holder.join(10)


def test_a_caller_inside_a_running_event_loop_is_served_on_a_helper_thread(runner):
    async def notebook_cell():  # a sync call made from async code, as in a Jupyter cell
        return runner.run(_thread_name(), 5)

    assert asyncio.run(notebook_cell()).startswith("moeswarm-dispatch")


def test_a_blocking_call_from_a_coroutine_on_its_own_loop_is_refused(runner):
    async def reentrant():
        inner = _thread_name()
        with pytest.raises(RuntimeError, match="await it instead"):
            runner.run(inner, 5)
        return "refused"

    assert runner.run(reentrant(), 5) == "refused"


def test_a_thread_holding_the_loop_keeps_others_waiting_then_runs_its_own_call_on_it(runner):
    """hold(): a blocking caller's own work on the loop's state (Dispatcher.forward_blocking); others
    wait for release(), or for the end of run_held(), and then take the loop themselves."""
    assert runner.hold()
    assert not runner.hold()  # held already (by this thread: it is not a reentrant lock)
    results = []
    other = threading.Thread(target=lambda: results.append(runner.run(_thread_name(), 10)), name="other-caller")
    other.start()
    time.sleep(0.2)
    assert results == []  # nobody ran the loop while it was held
    assert runner.run_held(_thread_name(), 5) == threading.current_thread().name  # ran here, then released
    other.join(10)
    assert results == [threading.current_thread().name]  # its coroutine, queued on the loop, ran with run_held
    assert runner.hold()  # free again
    runner.release()

    async def inside_a_loop():
        return runner.hold()

    assert asyncio.run(inside_a_loop()) is False  # a coroutine's thread cannot block on a call of its own


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals reach the main thread")
def test_ctrl_c_inside_a_call_cancels_it_and_leaves_the_loop_usable(runner):
    ended = []
    # the signal comes while the loop waits (not inside the coroutine, where it would end it anyway)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
        with pytest.raises(KeyboardInterrupt):
            runner.run(_sleep_noting_the_end(ended), 60)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert runner.run(_thread_name(), 5) == threading.current_thread().name
    assert ended == [True]  # cancelled, and the cancellation ran with the next call


def test_close_cancels_what_is_left_on_the_loop_and_closes_it():
    runner = LoopRunner(new_event_loop())
    ended = []

    async def start_and_leave():
        asyncio.ensure_future(_sleep_noting_the_end(ended))
        await asyncio.sleep(0)

    runner.run(start_and_leave(), 5)
    runner.close()
    assert ended == [True] and runner.loop.is_closed()


def test_close_from_async_code_closes_the_loop_too():
    runner = LoopRunner(new_event_loop())
    runner.run(_thread_name(), 5)

    async def teardown():  # e.g. an async test fixture closing its client
        runner.close()

    asyncio.run(teardown())
    assert runner.loop.is_closed()


def test_a_ctrl_c_that_ends_a_task_of_the_call_leaves_no_task_error_in_the_log(caplog):
    # The loop runs on the caller's (main) thread, so Python's SIGINT handler may run inside one of
    # the call's tasks: that task ends with the KeyboardInterrupt, which also ends the call. At close,
    # asyncio logged "Task exception was never retrieved" with a traceback under `generate`'s Ctrl-C.
    runner = LoopRunner(new_event_loop())

    async def one_node_call():
        await asyncio.sleep(0)
        raise KeyboardInterrupt  # where the handler happened to run

    async def layer_call():  # as Dispatcher._call_hedged waits for its primary call
        await asyncio.wait({asyncio.ensure_future(one_node_call())}, timeout=30)

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        with pytest.raises(KeyboardInterrupt):
            runner.run(layer_call(), 60)
        runner.close()  # as the client closes on the way out
        del runner
        gc.collect()
    assert [r.getMessage() for r in caplog.records] == []


def test_close_is_bounded_even_when_a_task_ignores_its_cancellation():
    # asyncio.wait_for(gather(...)) waited for the cancelled gather to end, so one task that kept
    # catching CancelledError hung close(), and with it SwarmClient.close(), for good.
    runner = LoopRunner(new_event_loop())

    async def stubborn():
        for _ in range(100):
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                continue

    async def start_and_leave():
        asyncio.ensure_future(stubborn())
        await asyncio.sleep(0)

    runner.run(start_and_leave(), 5)
    closing = threading.Thread(target=runner.close, kwargs={"timeout_s": 0.2})
    closing.start()
    closing.join(10)
    assert not closing.is_alive() and runner.loop.is_closed()
