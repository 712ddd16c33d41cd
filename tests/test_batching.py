"""The service's micro-batcher: concurrent requests share model calls, answers stay in order, errors reach all."""

from __future__ import annotations

import asyncio
import time

import pytest

from toolkit.serving.batching import MicroBatcher


def slow_upper(texts: list[str]) -> list[str]:
    time.sleep(0.02)
    return [t.upper() for t in texts]


def test_concurrent_requests_are_merged_and_answered_in_order():
    batcher = MicroBatcher(slow_upper, max_batch_size=8)

    async def main():
        singles = [batcher.submit([f"t{i}"]) for i in range(30)]
        return await asyncio.gather(*singles, batcher.submit(["a", "b", "c"]))

    answers = asyncio.run(main())
    assert answers[:30] == [[f"T{i}"] for i in range(30)]
    assert answers[30] == ["A", "B", "C"]
    assert sum(batcher.batches) == 33 and max(batcher.batches) <= 8
    assert len(batcher.batches) < 10  # 33 texts in a handful of model calls, not 31


def test_a_failing_model_call_fails_its_requests_and_the_next_call_works():
    calls = []

    def flaky(texts):
        calls.append(texts)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return texts

    batcher = MicroBatcher(flaky, max_batch_size=4)

    async def main():
        with pytest.raises(RuntimeError, match="boom"):
            await batcher.submit(["x"])
        return await batcher.submit(["y"])

    assert asyncio.run(main()) == ["y"]


def test_lanes_run_model_calls_at_the_same_time():
    """Two lanes: while one runs a call, the other takes what is queued (two 0.2 s calls take about 0.2 s)."""
    batcher = MicroBatcher([slow_upper_for(0.2), slow_upper_for(0.2)], max_batch_size=1)

    async def main():
        start = time.perf_counter()
        answers = await asyncio.gather(batcher.submit(["a"]), batcher.submit(["b"]))
        return answers, time.perf_counter() - start

    answers, seconds = asyncio.run(main())
    assert answers == [["A"], ["B"]] and batcher.batches == [1, 1]
    assert seconds < 0.35, seconds


def test_a_request_that_waits_past_its_timeout_gets_timeout_error():
    batcher = MicroBatcher(slow_upper_for(0.3), max_batch_size=4)

    async def main():
        with pytest.raises(asyncio.TimeoutError):
            await batcher.submit(["late"], timeout=0.05)
        return await batcher.submit(["next"], timeout=5)  # the batcher carries on

    assert asyncio.run(main()) == ["NEXT"]


class Asyncio310TimeoutError(Exception):
    """asyncio.TimeoutError as Python 3.10 has it: a class of its own, not the builtin TimeoutError."""


@pytest.fixture
def python310_timeouts(monkeypatch):
    """asyncio's timeouts as Python 3.10 raises them (3.11 made asyncio.TimeoutError the builtin), so that code
    catching the builtin TimeoutError fails here as it would there. Yields the real wait_for."""
    real_wait_for = asyncio.wait_for
    if asyncio.TimeoutError is not TimeoutError:  # Python 3.10 itself: nothing to emulate
        return real_wait_for

    async def wait_for(awaitable, timeout):
        try:
            return await real_wait_for(awaitable, timeout)
        except TimeoutError:
            raise Asyncio310TimeoutError from None

    monkeypatch.setattr(asyncio, "TimeoutError", Asyncio310TimeoutError)
    monkeypatch.setattr(asyncio, "wait_for", wait_for)
    return real_wait_for


def test_requests_that_time_out_while_queued_leave_the_queue_and_never_reach_the_model(python310_timeouts):
    """Three requests time out and one is cancelled (a disconnect) behind a running call: at that moment they stop
    counting toward the load bound, and the next call holds the one live request only."""
    seen = []

    def model(texts: list[str]) -> list[str]:
        seen.append(texts)
        time.sleep(0.5)
        return texts

    batcher = MicroBatcher(model, max_batch_size=8)

    async def main():
        busy = asyncio.ensure_future(batcher.submit(["busy"]))
        while batcher.running == 0:  # the lane is in the model call
            await asyncio.sleep(0.01)
        late = [asyncio.ensure_future(batcher.submit([f"late{i}"], timeout=0.05)) for i in range(3)]
        live = asyncio.ensure_future(batcher.submit(["live"]))
        gone = asyncio.ensure_future(batcher.submit(["gone"]))
        await asyncio.sleep(0)
        assert (batcher.queued, batcher.load) == (5, 6)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        for request in late:
            with pytest.raises(asyncio.TimeoutError):
                await request
        assert batcher.running == 1, "the model call should still run: make it slower"
        assert (batcher.queued, batcher.load) == (1, 2)  # "live" waits, "busy" runs
        return await busy, await live

    assert asyncio.run(main()) == (["busy"], ["live"])
    assert seen == [["busy"], ["live"]] and batcher.load == 0


def test_a_request_that_times_out_in_the_queue_is_not_sent_even_before_its_waiter_resumes():
    """A lane may take the queue between a waiter's timeout and its resuming: the cancelled request is dropped."""
    seen = []
    batcher = MicroBatcher(lambda texts: seen.append(texts) or texts, max_batch_size=8)

    async def main():
        await batcher.submit(["start"])  # the lane exists and waits
        request = asyncio.ensure_future(batcher.submit(["dropped"]))
        await asyncio.sleep(0)
        batcher.pending[0][1].cancel()  # as a timeout does, before the waiter runs again
        answer = await batcher.submit(["kept"])
        with pytest.raises(asyncio.CancelledError):
            await request
        return answer

    assert asyncio.run(main()) == ["kept"]
    assert seen == [["start"], ["kept"]] and batcher.load == 0


def test_the_lane_survives_a_fill_wait_that_times_out(python310_timeouts):
    """The fill wait after a call times out when no client sends more: on Python 3.10 with asyncio's own
    TimeoutError, which the builtin does not catch there; the lane must go on to the next request."""
    batcher = MicroBatcher(slow_upper_for(0.02), max_batch_size=8, fill_wait=1.0)

    async def main():
        first = await batcher.submit(["a"])
        await asyncio.sleep(0.1)  # the fill wait (at most the call's 0.02 s) has timed out
        return first, await python310_timeouts(batcher.submit(["b"]), 5)

    assert asyncio.run(main()) == (["A"], ["B"])


def slow_upper_for(seconds: float):
    def upper(texts: list[str]) -> list[str]:
        time.sleep(seconds)
        return [t.upper() for t in texts]

    return upper


def test_fill_wait_lets_answered_clients_join_the_next_call():
    """Closed-loop clients (each sends its next text once answered): without a fill wait the calls split them
    into two halves that alternate; waiting a little after each call lets them all join the next one."""

    def mean_call_size(fill_wait: float) -> float:
        batcher = MicroBatcher(slow_upper_for(0.02), max_batch_size=64, fill_wait=fill_wait)

        async def client(n: int, first_delay: float):
            await asyncio.sleep(first_delay)
            for i in range(n):
                await batcher.submit([f"t{i}"])
                await asyncio.sleep(0.001)  # the answer travels, the next request arrives

        async def main():
            # half the clients start while the first call runs: the two-halves pattern
            await asyncio.gather(*(client(12, 0.0 if c < 4 else 0.005) for c in range(8)))

        asyncio.run(main())
        return sum(batcher.batches) / len(batcher.batches)

    without, waiting = mean_call_size(0.0), mean_call_size(0.5)
    print(f"mean call size: {without:.1f} without a fill wait, {waiting:.1f} with")
    assert waiting > without + 1.5, (without, waiting)
    assert waiting >= 6.5  # most calls hold all 8 clients
