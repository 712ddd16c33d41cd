"""The one base of every error toolkit raises on purpose. A `ToolkitError`'s message is meant for the user as
it is (it names the key, the file and line, or the stage, and what to do); the CLI prints it as one line and
exits 1. Anything else that escapes is a bug: the CLI prints one line and the log file keeps the traceback."""

from __future__ import annotations


class ToolkitError(Exception):
    """An expected failure with a message that tells the user what to fix."""
