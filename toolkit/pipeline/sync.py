"""The processes of a run: one, or several under `accelerate launch`. Main-only steps (a stage that is not
distributed, an evaluation, the selection) run on the main process, and every process learns the outcome, so a
failure stops all of them at once with its reason instead of leaving the others at a barrier until the
launcher's timeout."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclass
class Outcome(Generic[T]):
    result: T | None  # the step's value on the processes that ran it
    error: Exception | None  # this process's own failure
    failure: str | None  # the first failure on any process, as "Type: message"; None when every process succeeded

    @property
    def failed(self) -> bool:
        return self.failure is not None


class Sync:
    def __init__(self, state: Any):
        self.state = state

    @property
    def is_main(self) -> bool:
        return self.state.is_main_process

    @property
    def rank(self) -> int:
        return self.state.process_index

    @property
    def num_processes(self) -> int:
        return self.state.num_processes

    def wait(self) -> None:
        self.state.wait_for_everyone()

    def main_process_first(self):
        return self.state.main_process_first()

    def run(self, step: Callable[[], T], everywhere: bool = False) -> Outcome[T]:
        """`step` on the main process (or on every process), then a barrier at which every process learns
        whether any failed."""
        result, error = None, None
        try:
            if everywhere or self.is_main:
                result = step()
        except Exception as exc:  # relayed to every process, then raised by the caller
            error = exc
        return Outcome(result, error, self._first_failure(error))

    def decide(self, step: Callable[[], T]) -> T:
        """`step`'s value, computed on the main process and sent to every process (so that they all take the
        same branch, whatever each one's copy of the manifest says)."""
        outcome = self.run(step)
        if outcome.error is not None:
            raise outcome.error
        if outcome.failed:
            raise RuntimeError(f"the main process failed: {outcome.failure}")
        value = [outcome.result]
        if self.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(value)
        return value[0]

    def _first_failure(self, error: Exception | None) -> str | None:
        mine = f"{type(error).__name__}: {error}" if error is not None else None
        if self.num_processes == 1:
            return mine
        from accelerate.utils import gather_object

        failed = [m for m in gather_object([mine]) if m]
        return failed[0] if failed else None
