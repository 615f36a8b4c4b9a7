"""What every video reader returns (:class:`Frames`) and how it fails (:class:`VideoError`).

Decoder libraries never print to the terminal through this module's readers: PyAV/ffmpeg messages
raised on the decoding thread go to the ``tlvr.video`` logger at DEBUG, and the reason a video
cannot be read is the one line of its :class:`VideoError`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ..errors import TlvrError

VIDEO_ERROR_KINDS = ("missing", "unreadable", "zero_frames", "too_short")
LOGGER = logging.getLogger("tlvr.video")


class VideoError(TlvrError):
    """A video that cannot give frames: missing, unreadable, empty, or too short for the bound."""

    def __init__(self, path: str | os.PathLike, kind: str, detail: str) -> None:
        self.path = str(path)
        self.kind = kind
        self.detail = " ".join(str(detail).split())  # the message must stay on one line
        super().__init__(f"{self.path}: {kind}: {self.detail}")


@dataclass
class Frames:
    """Decoded frames plus where they came from."""

    frames: np.ndarray  # uint8 RGB, (T, H, W, 3)
    indices: list[int]  # frame index of each row (PTS-derived for the seek path)
    total: int  # frames in the whole video (files in a frame folder)
    fps: float

    @property
    def distinct(self) -> int:
        """How many different source frames the rows show; fewer than asked means a short or cut video."""
        return len(set(self.indices))


@contextlib.contextmanager
def _ffmpeg_logs_to_logger(path: str | os.PathLike) -> Iterator[None]:
    """Send what PyAV's ffmpeg logs on this thread to ``tlvr.video`` (DEBUG) instead of the terminal.

    PyAV keeps ffmpeg silent unless an application raises ``av.logging``'s level; when it does,
    messages from our decoding would otherwise reach the ``libav`` loggers, whose last-resort
    handler prints them to stderr between our own one-line errors.
    """
    import av.logging

    with av.logging.Capture(local=True) as logs:
        try:
            yield
        finally:
            for _level, name, message in logs:
                LOGGER.debug("%s: ffmpeg %s: %s", path, name or "libav", message.strip())


@contextlib.contextmanager
def as_video_error(path: str | os.PathLike) -> Iterator[None]:
    """Turn any decoder exception into a one-line ``unreadable`` VideoError; keep decoder logs quiet."""
    try:
        with _ffmpeg_logs_to_logger(path):
            yield
    except VideoError:
        raise
    except Exception as exc:  # decord and PyAV raise many unrelated types
        lines = str(exc).strip().splitlines() or [""]
        # decord appends a C++ stack trace to its messages; the first line is the useful part.
        raise VideoError(path, "unreadable", f"{type(exc).__name__}: {lines[0][:300]}") from exc
