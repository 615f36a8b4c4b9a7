"""The user-facing error types: the CLI prints each as a single line and exits with its code."""

from __future__ import annotations

from pathlib import Path


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, for a one-line error; its type's name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class TlvrError(Exception):
    """A problem the user can fix (bad input, missing file, wrong key); printed as one line."""

    def __init__(self, message: str, *, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Interrupted(TlvrError):
    """Ctrl-C stopped a job where it could stop cleanly; ``saved`` is the checkpoint it wrote, if any
    (the CLI adds the command that resumes from it). Exit status 130, as a shell gives for SIGINT."""

    def __init__(self, message: str, *, saved: Path | None = None) -> None:
        super().__init__(message, exit_code=130)
        self.saved = saved
