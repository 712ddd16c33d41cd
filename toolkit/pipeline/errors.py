"""Errors of a run as a whole (the stages' own errors are wrapped in `StageError`)."""

from __future__ import annotations

from toolkit.errors import ToolkitError


class StageError(ToolkitError, RuntimeError):
    """A stage failed; the message names the stage and the reason, the manifest keeps the details."""
