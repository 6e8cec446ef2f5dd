"""node/batcher.py with a plain-Python compute function: merging, splitting, limits and failures."""

import asyncio
import concurrent.futures
import threading

import pytest
import torch

from moeswarm.node.batcher import Batcher

UID, OTHER_UID = "tiny.L0.E0", "tiny.L0.E1"
WAIT_S = 5.0  # every wait is bounded: a hang fails the test instead of freezing it


class FakeCompute:
    """Records each batch; forward is 2x+1, backward is x*g. Blocks while `gate` is closed."""

    def __init__(self, fail_over_rows: int | None = None):
        self.batches: list[tuple[str, str, int]] = []
        self.tags: list[list[tuple[str, int]]] = []  # per batch: (tag, rows) of each merged request
        self.gate, self.started = threading.Event(), threading.Event()
        self.gate.set()
        self.fail_over_rows = fail_over_rows

    def __call__(self, uid, op, x_ND, g_ND, tags):
        self.batches.append((uid, op, x_ND.shape[0]))
        self.tags.append(list(tags))
        self.started.set()
        if not self.gate.wait(WAIT_S):
            raise TimeoutError("test never opened the gate")
        if self.fail_over_rows is not None and x_ND.shape[0] > self.fail_over_rows:
            raise ValueError(f"boom on {x_ND.shape[0]} rows")
        return x_ND * 2 + 1 if op == "forward" else x_ND * g_ND

    def hold(self) -> None:
        self.gate.clear()
        self.started.clear()


def _rows(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 4, generator=torch.Generator().manual_seed(seed))


async def _until_computing(compute: FakeCompute) -> None:
    assert await asyncio.wait_for(asyncio.to_thread(compute.started.wait, WAIT_S), WAIT_S + 1)


async def _start(batcher: Batcher, uid: str, op: str, x_ND, g_ND=None, tag: str = "") -> asyncio.Task:
    task = asyncio.create_task(batcher.submit(uid, op, x_ND, g_ND, tag))
    await asyncio.sleep(0)  # let it enqueue
    return task


def _run(scenario, compute: FakeCompute, max_rows: int):
    async def main():
        with concurrent.futures.ThreadPoolExecutor(1) as executor:
            batcher = Batcher(compute, executor, max_rows=max_rows)
            return await asyncio.wait_for(scenario(batcher), WAIT_S * 2)

    return asyncio.run(main())


def test_lone_request_runs_at_once():
    compute = FakeCompute()

    async def scenario(batcher):
        x_ND = _rows(3, seed=0)
        out_ND = await batcher.submit(UID, "forward", x_ND)
        assert torch.equal(out_ND, x_ND * 2 + 1)
        assert batcher.queued_rows == 0

    _run(scenario, compute, max_rows=16)
    assert compute.batches == [(UID, "forward", 3)]


def test_requests_arriving_during_a_batch_are_merged_and_split_back():
    compute = FakeCompute()
    inputs = [_rows(n, seed=i) for i, n in enumerate([3, 2, 1, 4])]

    async def scenario(batcher):
        compute.hold()
        first = await _start(batcher, UID, "forward", inputs[0])
        await _until_computing(compute)
        rest = [await _start(batcher, UID, "forward", x_ND) for x_ND in inputs[1:]]
        assert batcher.queued_rows == 2 + 1 + 4  # the running batch is no longer queued
        compute.gate.set()
        outputs = await asyncio.gather(first, *rest)
        assert batcher.queued_rows == 0
        assert batcher.meter.rate() == pytest.approx(10 / batcher.meter.window_s)
        return outputs

    outputs = _run(scenario, compute, max_rows=16)
    assert compute.batches == [(UID, "forward", 3), (UID, "forward", 7)]
    for x_ND, out_ND in zip(inputs, outputs):
        assert torch.equal(out_ND, x_ND * 2 + 1)


def test_each_merged_request_keeps_its_tag_and_row_count():
    compute = FakeCompute()
    inputs = [_rows(n, seed=20 + i) for i, n in enumerate([1, 2, 3, 1])]
    tags = ["f-0", "f-1", "", "f-3"]

    async def scenario(batcher):
        compute.hold()
        first = await _start(batcher, UID, "forward", inputs[0], tag=tags[0])
        await _until_computing(compute)
        rest = [await _start(batcher, UID, "forward", x_ND, tag=tag) for x_ND, tag in zip(inputs[1:], tags[1:])]
        compute.gate.set()
        await asyncio.gather(first, *rest)

    _run(scenario, compute, max_rows=16)
    assert compute.tags == [[("f-0", 1)], [("f-1", 2), ("", 3), ("f-3", 1)]]


def test_batches_never_exceed_max_rows():
    compute = FakeCompute()
    sizes = [1, 3, 3, 2, 4, 5, 1]
    inputs = [_rows(n, seed=10 + i) for i, n in enumerate(sizes)]

    async def scenario(batcher):
        compute.hold()
        first = await _start(batcher, UID, "forward", inputs[0])
        await _until_computing(compute)
        rest = [await _start(batcher, UID, "forward", x_ND) for x_ND in inputs[1:]]
        compute.gate.set()
        return await asyncio.gather(first, *rest)

    outputs = _run(scenario, compute, max_rows=5)
    assert [rows for _, _, rows in compute.batches] == [1, 3, 5, 4, 5, 1]
    for x_ND, out_ND in zip(inputs, outputs):
        assert torch.equal(out_ND, x_ND * 2 + 1)


def test_ops_and_experts_are_batched_separately():
    compute = FakeCompute()
    x_ND, g_ND = _rows(2, seed=20), _rows(2, seed=21)

    async def scenario(batcher):
        compute.hold()
        first = await _start(batcher, UID, "forward", _rows(1, seed=22))
        await _until_computing(compute)
        forward = await _start(batcher, UID, "forward", x_ND)
        backward = await _start(batcher, UID, "backward", x_ND, g_ND)
        other = await _start(batcher, OTHER_UID, "forward", x_ND)
        compute.gate.set()
        await first
        return await forward, await backward, await other

    forward, backward, other = _run(scenario, compute, max_rows=16)
    assert torch.equal(forward, x_ND * 2 + 1) and torch.equal(other, x_ND * 2 + 1)
    assert torch.equal(backward, x_ND * g_ND)
    assert compute.batches[0] == (UID, "forward", 1)
    assert sorted(compute.batches[1:]) == [(UID, "backward", 2), (UID, "forward", 2), (OTHER_UID, "forward", 2)]


class CountingExecutor(concurrent.futures.ThreadPoolExecutor):
    """One worker thread, like the node's; counts the jobs handed to it."""

    def __init__(self):
        super().__init__(max_workers=1)
        self.jobs = 0

    def submit(self, fn, /, *args, **kwargs):
        self.jobs += 1
        return super().submit(fn, *args, **kwargs)


def test_rows_enqueued_together_reach_the_compute_thread_in_one_round_with_a_failure_kept_to_its_batch():
    """A request for several experts of a node costs one hand-off to the compute thread, not one per
    expert; one expert's failure fails only that expert's callers."""
    compute = FakeCompute(fail_over_rows=4)
    inputs = {UID: _rows(2, seed=80), OTHER_UID: _rows(3, seed=81), "tiny.L0.E2": _rows(5, seed=82)}

    async def main():
        with CountingExecutor() as executor:
            batcher = Batcher(compute, executor, max_rows=16)
            futures = [batcher.enqueue(uid, "forward", x_ND) for uid, x_ND in inputs.items()]
            results = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), WAIT_S)
            return results, executor.jobs, batcher.queued_rows

    (first, second, third), jobs, queued = asyncio.run(main())
    assert jobs == 1 and queued == 0
    assert torch.equal(first, inputs[UID] * 2 + 1) and torch.equal(second, inputs[OTHER_UID] * 2 + 1)
    assert isinstance(third, ValueError) and "boom on 5 rows" in str(third)
    assert [uid for uid, _, _ in compute.batches] == list(inputs)


def test_merged_backward_splits_input_grads_per_caller():
    compute = FakeCompute()
    pairs = [(_rows(n, seed=30 + n), _rows(n, seed=40 + n)) for n in (2, 3, 1)]

    async def scenario(batcher):
        compute.hold()
        first = await _start(batcher, UID, "backward", *pairs[0])
        await _until_computing(compute)
        rest = [await _start(batcher, UID, "backward", x_ND, g_ND) for x_ND, g_ND in pairs[1:]]
        compute.gate.set()
        return await asyncio.gather(first, *rest)

    outputs = _run(scenario, compute, max_rows=16)
    assert compute.batches == [(UID, "backward", 2), (UID, "backward", 4)]
    for (x_ND, g_ND), out_ND in zip(pairs, outputs):
        assert torch.equal(out_ND, x_ND * g_ND)


def test_compute_error_reaches_every_caller_of_that_batch():
    compute = FakeCompute(fail_over_rows=1)

    async def scenario(batcher):
        compute.hold()
        first = await _start(batcher, UID, "forward", _rows(1, seed=50))
        await _until_computing(compute)
        merged = [await _start(batcher, UID, "forward", _rows(1, seed=51 + i)) for i in range(3)]
        compute.gate.set()
        results = await asyncio.gather(first, *merged, return_exceptions=True)
        assert batcher.queued_rows == 0
        # The batcher keeps serving after a failed batch.
        after = await batcher.submit(UID, "forward", _rows(1, seed=60))
        return results, after

    (first, *merged), after = _run(scenario, compute, max_rows=16)
    assert isinstance(first, torch.Tensor)
    assert all(isinstance(error, ValueError) and "boom on 3 rows" in str(error) for error in merged), merged
    assert torch.equal(after, _rows(1, seed=60) * 2 + 1)
    assert [rows for _, _, rows in compute.batches] == [1, 3, 1]


def test_cancelled_caller_rows_are_skipped():
    compute = FakeCompute()
    kept_ND = _rows(3, seed=71)

    async def scenario(batcher):
        compute.hold()
        first = await _start(batcher, UID, "forward", _rows(1, seed=70))
        await _until_computing(compute)
        gone = await _start(batcher, UID, "forward", _rows(2, seed=72))
        kept = await _start(batcher, UID, "forward", kept_ND)
        gone.cancel()
        await asyncio.sleep(0)
        compute.gate.set()
        await first
        result = await kept
        assert gone.cancelled() and batcher.queued_rows == 0
        return result

    assert torch.equal(_run(scenario, compute, max_rows=16), kept_ND * 2 + 1)
    assert [rows for _, _, rows in compute.batches] == [1, 3]


def test_background_work_keeps_tiny_batches_off_the_loop_until_it_finished(caplog):
    """run_in_background (a deferred optimizer step) counts as compute in flight: a tiny batch that
    would run inline on the loop waits for the compute thread instead, so the two never overlap."""
    compute = FakeCompute()
    gate, on_loop = threading.Event(), []

    def step(fail: bool) -> None:
        if not gate.wait(WAIT_S):
            raise TimeoutError("test never opened the gate")
        if fail:
            raise ValueError("step failed")

    def tracking_compute(uid, op, x_ND, g_ND, tags):
        on_loop.append(threading.current_thread() is threading.main_thread())
        return compute(uid, op, x_ND, g_ND, tags)

    async def scenario():
        with concurrent.futures.ThreadPoolExecutor(1) as executor:
            batcher = Batcher(tracking_compute, executor, max_rows=64, inline_rows=8)
            await batcher.submit(UID, "forward", _rows(1, 0))  # idle compute thread: inline
            batcher.run_in_background(step, True)
            task = await _start(batcher, UID, "forward", _rows(1, 1))
            assert not task.done()  # queued behind the background step, not run on the loop
            gate.set()
            await asyncio.wait_for(task, WAIT_S)
            await asyncio.sleep(0.05)  # the background job's done-callback
            await batcher.submit(UID, "forward", _rows(1, 2))  # idle again: inline again
        return on_loop

    with caplog.at_level("ERROR"):
        assert asyncio.run(asyncio.wait_for(scenario(), WAIT_S * 2)) == [True, False, True]
    assert "background compute failed" in caplog.text


def test_work_queued_after_answers_waits_until_the_callers_have_their_results():
    """A backward's optimizer step is queued during its round (after_answers, as the node does from
    the compute thread) but starts only after the round's callers resumed with their results: the
    answer is not left competing with the step for the CPU."""
    events: list[str] = []

    async def main():
        loop = asyncio.get_running_loop()
        with concurrent.futures.ThreadPoolExecutor(1) as executor:

            def compute(uid, op, x_ND, g_ND, tags):  # on the compute thread, like ExpertNode._compute
                loop.call_soon_threadsafe(batcher.after_answers, lambda: events.append(f"step {uid}"))
                return x_ND * g_ND

            batcher = Batcher(compute, executor, max_rows=16)

            async def caller(uid):
                await batcher.enqueue(uid, "backward", _rows(2, seed=90), _rows(2, seed=91))
                events.append(f"answered {uid}")

            await asyncio.wait_for(asyncio.gather(caller(UID), caller(OTHER_UID)), WAIT_S)
            for _ in range(200):  # bounded: the steps follow within a few loop turns
                if len(events) == 4:
                    break
                await asyncio.sleep(0.01)

    asyncio.run(main())
    assert sorted(events[:2]) == sorted([f"answered {UID}", f"answered {OTHER_UID}"]), events
    assert sorted(events[2:]) == sorted([f"step {UID}", f"step {OTHER_UID}"]), events


def test_runs_inline_only_small_batches_while_the_compute_thread_is_idle():
    """runs_inline says what submit() will do; the servicer relies on it to skip gather() for a
    request whose expert batches all compute at once."""
    compute = FakeCompute()

    async def scenario():
        with concurrent.futures.ThreadPoolExecutor(1) as executor:
            batcher = Batcher(compute, executor, max_rows=64, inline_rows=4)
            assert batcher.runs_inline(UID, "forward", 4) and not batcher.runs_inline(UID, "forward", 5)
            assert not batcher.runs_inline(UID, "backward", 2)  # a backward costs ~3 forwards
            compute.hold()
            task = await _start(batcher, UID, "forward", _rows(8, 0))  # too big: the compute thread takes it
            await _until_computing(compute)
            assert not batcher.runs_inline(OTHER_UID, "forward", 1)  # the compute thread is busy
            compute.gate.set()
            await asyncio.wait_for(task, WAIT_S)
            await asyncio.sleep(0)  # the drainer finishes
            return batcher.runs_inline(OTHER_UID, "forward", 1)

    assert asyncio.run(asyncio.wait_for(scenario(), WAIT_S * 2))
