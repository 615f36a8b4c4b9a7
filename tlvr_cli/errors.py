"""The one user-facing error type: the CLI prints it as a single line and exits with its code."""

from __future__ import annotations


class TlvrError(Exception):
    """A problem the user can fix (bad input, missing file, wrong key); printed as one line."""

    def __init__(self, message: str, *, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code
