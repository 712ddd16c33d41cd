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
        fn: Callable[[list[str]], list[Any]],
        max_batch_size: int,
        on_batch: Callable[[int], None] | None = None,
    ):
        self.fn = fn
        self.max_batch_size = max_batch_size
        self.on_batch = on_batch  # told each model call's size (metrics)
        self.pending: deque[tuple[list[str], asyncio.Future]] = deque()
        self.wake: asyncio.Event | None = None
        self.batches: list[int] = []  # sizes of the last model calls (kept short), for tests and logs
        self.queued = 0  # texts waiting for a model call
        self.running = 0  # texts in the model call under way

    @property
    def load(self) -> int:
        """Texts accepted and not answered yet."""
        return self.queued + self.running

    async def submit(self, texts: list[str]) -> list[Any]:
        if self.wake is None:  # created lazily: the event loop exists only once the server runs
            self.wake = asyncio.Event()
            asyncio.get_running_loop().create_task(self._loop())
        future = asyncio.get_running_loop().create_future()
        self.pending.append((texts, future))
        self.queued += len(texts)
        self.wake.set()
        return await future

    def _take(self) -> list[tuple[list[str], asyncio.Future]]:
        taken = [self.pending.popleft()]
        size = len(taken[0][0])
        while self.pending and size + len(self.pending[0][0]) <= self.max_batch_size:
            texts, future = self.pending.popleft()
            taken.append((texts, future))
            size += len(texts)
        return taken

    async def _loop(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            while self.pending:
                taken = self._take()
                texts = [t for chunk, _ in taken for t in chunk]
                self.batches = [*self.batches[-99:], len(texts)]
                self.queued -= len(texts)
                self.running = len(texts)
                if self.on_batch is not None:
                    self.on_batch(len(texts))
                try:
                    results = await asyncio.to_thread(self.fn, texts)
                except Exception as exc:  # every waiting request gets the error, the loop carries on
                    for _, future in taken:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                finally:
                    self.running = 0
                start = 0
                for chunk, future in taken:
                    if not future.done():
                        future.set_result(results[start : start + len(chunk)])
                    start += len(chunk)
