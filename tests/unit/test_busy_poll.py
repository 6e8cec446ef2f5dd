"""BusyPoller (node config busy_poll_us): spins the event loop after an answer, then lets it sleep."""

from __future__ import annotations

import asyncio

from moeswarm.node.busy_poll import BusyPoller

WAIT_TURNS = 2000  # bound on the loops below that wait for the poller, 1 ms each


async def _until_stopped(poller: BusyPoller) -> bool:
    for _ in range(WAIT_TURNS):
        if poller._task is None:
            return True
        await asyncio.sleep(0.001)
    return False


def test_off_by_default_spins_nothing():
    async def main():
        poller = BusyPoller(0.0)
        poller.kick()
        await asyncio.sleep(0.01)
        return poller._task, poller.turns

    assert asyncio.run(main()) == (None, 0)


def test_it_spins_after_a_kick_and_stops_when_the_window_passed():
    async def main():
        poller = BusyPoller(0.05)
        poller.kick()
        assert poller._task is not None
        for _ in range(10):
            await asyncio.sleep(0)  # the loop keeps turning: the poller runs between our turns
        spun = poller.turns
        stopped = await _until_stopped(poller)
        turns = poller.turns
        await asyncio.sleep(0.02)
        return spun, stopped, turns, poller.turns

    spun, stopped, turns, later = asyncio.run(main())
    assert spun > 0 and stopped
    assert later == turns  # stopped for good: an idle node sleeps


def test_each_kick_moves_the_window_and_one_task_serves_them_all():
    async def main():
        poller = BusyPoller(10.0)
        poller.kick()
        first_until, task = poller._until, poller._task
        await asyncio.sleep(0.005)
        poller.kick()
        same_task = poller._task is task
        second_until = poller._until
        poller.close()
        await _until_stopped(poller)
        return first_until, second_until, same_task

    first_until, second_until, same_task = asyncio.run(main())
    assert second_until > first_until and same_task


def test_it_stops_while_the_compute_thread_has_work():
    busy = [False]

    async def main():
        poller = BusyPoller(10.0, lambda: busy[0])
        poller.kick()
        await asyncio.sleep(0)
        assert poller._task is not None
        busy[0] = True
        stopped = await _until_stopped(poller)
        busy[0] = False
        poller.kick()  # the next answer starts it again
        restarted = poller._task is not None
        poller.close()
        return stopped, restarted, await _until_stopped(poller)

    assert asyncio.run(main()) == (True, True, True)


def test_close_stops_it_and_later_kicks_do_nothing():
    async def main():
        poller = BusyPoller(10.0)
        poller.kick()
        await asyncio.sleep(0)
        poller.close()
        stopped = await _until_stopped(poller)
        poller.kick()
        return stopped, poller._task

    assert asyncio.run(main()) == (True, None)
