"""Adaptive micro-batching inside one worker: requests that arrive while the model is busy are merged into the
next model call (up to `max_batch_size` texts). An idle worker runs a lone request at once, so light load
pays no batching wait and heavy load gets large batches."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any


class MicroBatcher:
    def __init__(
        self,
        fn: Callable[[list[str]], list[Any]] | list[Callable[[list[str]], list[Any]]],
        max_batch_size: int,
        on_batch: Callable[[int], None] | None = None,
        fill_wait: float = 0.0,
    ):
        # One function per lane: model calls that may run at the same time (each lane its own session and
        # threads); a lane that is free takes what is queued.
        self.lanes = list(fn) if isinstance(fn, list) else [fn]
        self.max_batch_size = max_batch_size
        self.on_batch = on_batch  # told each model call's size (metrics)
        self.pending: deque[tuple[list[str], asyncio.Future]] = deque()
        self.wake: asyncio.Event | None = None
        self.batches: list[int] = []  # sizes of the last model calls (kept short), for tests and logs
        self.queued = 0  # texts waiting for a model call
        self.running = 0  # texts in the model calls under way
        # After a call, wait up to this fraction of its duration for the clients it answered to send their next
        # texts, so that the next call holds them too (0: take what is queued at once).
        self.fill_wait = fill_wait

    @property
    def load(self) -> int:
        """Texts accepted and not answered yet."""
        return self.queued + self.running

    async def submit(self, texts: list[str], timeout: float | None = None) -> list[Any]:
        """The texts' results, once a model call has run them; asyncio.TimeoutError after `timeout` seconds. A
        request that times out (or is cancelled) while queued leaves the queue at once and never reaches the
        model; one already in a model call counts until that call ends, and its result is dropped."""
        if self.wake is None:  # created lazily: the event loop exists only once the server runs
            self.wake = asyncio.Event()
            for lane in self.lanes:
                asyncio.get_running_loop().create_task(self._loop(lane))
        entry = (texts, asyncio.get_running_loop().create_future())
        self.pending.append(entry)
        self.queued += len(texts)
        self.wake.set()
        try:
            # On a future, wait_for sets a timer and no task: cheaper per request than BentoML's timeout middleware.
            return await (entry[1] if timeout is None else asyncio.wait_for(entry[1], timeout))
        except (asyncio.TimeoutError, asyncio.CancelledError):  # asyncio's, not the builtin, on Python 3.10
            self._forget(entry)
            raise

    def _forget(self, entry: tuple[list[str], asyncio.Future]) -> None:
        """Nobody waits for `entry` any more: out of the queue and the load bound, if no model call took it."""
        try:
            self.pending.remove(entry)
        except ValueError:
            return
        self.queued -= len(entry[0])

    def _take(self) -> list[tuple[list[str], asyncio.Future]]:
        """The next call's requests, in order; those whose waiter gave up and has not run yet are dropped here."""
        taken, size = [], 0
        while self.pending and (not taken or size + len(self.pending[0][0]) <= self.max_batch_size):
            texts, future = self.pending.popleft()
            self.queued -= len(texts)
            if not future.done():
                taken.append((texts, future))
                size += len(texts)
        return taken

    async def _fill(self, target: int, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while self.queued < target and (left := deadline - loop.time()) > 0:
            self.wake.clear()
            try:
                await asyncio.wait_for(self.wake.wait(), left)
            except asyncio.TimeoutError:  # not the builtin TimeoutError on Python 3.10
                return

    async def _loop(self, fn: Callable[[list[str]], list[Any]]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.wake.wait()
            self.wake.clear()
            while self.pending:
                taken = self._take()
                if not taken:
                    continue
                texts = [t for chunk, _ in taken for t in chunk]
                self.batches = [*self.batches[-99:], len(texts)]
                self.running += len(texts)
                if self.pending:  # more than this call takes: another free lane may start on it
                    self.wake.set()
                if self.on_batch is not None:
                    self.on_batch(len(texts))
                started = loop.time()
                try:
                    results = await asyncio.to_thread(fn, texts)
                except Exception as exc:  # every waiting request gets the error, the loop carries on
                    for _, future in taken:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                finally:
                    self.running -= len(texts)
                start = 0
                for chunk, future in taken:
                    if not future.done():
                        future.set_result(results[start : start + len(chunk)])
                    start += len(chunk)
                if self.fill_wait > 0:
                    target = min(self.max_batch_size, self.queued + len(texts))
                    await self._fill(target, self.fill_wait * (loop.time() - started))
