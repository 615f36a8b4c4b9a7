"""Video decoding and frame sampling: the four reference paths of spec §2 (A–D).

Every reader returns a :class:`Frames` holding uint8 RGB frames (T, H, W, 3). Decoder failures
never escape raw: they become a one-line :class:`VideoError` naming the file and what went wrong.
Paths A and B take a fixed ``num_frames`` or a frame rate (``fps`` frames per second of video, at
most ``max_frames``). PyAV reading by frame index (keyframe seeks) lives in ``pyav_reader``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from ..errors import TlvrError
from .frames import VIDEO_ERROR_KINDS, Frames, VideoError, as_video_error
from .pyav_reader import open_video_stream, pyav_read

__all__ = ["VIDEO_ERROR_KINDS", "FrameSpec", "Frames", "VideoError", "fps_frame_count", "one_fps_count",
           "read_frames", "read_video", "sample_frame_indices", "segment_midpoint_indices"]
JPEG_SUFFIXES = (".jpg", ".jpeg")
FRAME_SPEC_KINDS = ("uniform", "pts_seek", "midpoints", "folder")


@dataclass
class FrameSpec:
    """Which reference sampling path to use for one video (spec §2, §6.2)."""

    kind: str = "uniform"  # uniform (A) | pts_seek (B) | midpoints (C) | folder (D)
    bound: tuple[float, float] | None = None  # MVBench start/end in seconds (paths C and D only)
    folder_fps: float = 3.0  # spec §6.2: MVBench frame folders are sampled at 3 fps


# ----------------------------------------------------------------------------- index rules


def sample_frame_indices(total: int, num_frames: int) -> list[int]:
    """Evenly spaced indices over [0, total-1], truncated toward zero, duplicates kept (spec §2.A)."""
    if num_frames <= 0:
        raise ValueError("num_frames <= 0 is the 1-fps mode: compute the count with one_fps_count")
    return [int(i) for i in np.linspace(0, total - 1, num_frames, dtype=int)]


def fps_frame_count(duration_s: float, fps: float, cap: int | None) -> int:
    """Frames to sample at ``fps`` per second of video: at least 1, at most ``cap`` (spec §2.A)."""
    count = max(1, int(duration_s * fps))
    return count if cap is None else min(cap, count)


def one_fps_count(duration_s: float, cap: int | None) -> int:
    """Frame count in "1 fps" mode: one per whole second, at least 1, at most ``cap`` (spec §2.A)."""
    return fps_frame_count(duration_s, 1.0, cap)


def _count_rule(num_frames: int | None, fps: float | None, max_frames: int | None) -> Callable[[float], int]:
    """Check the count arguments once; return ``duration_s -> frames to sample``.

    Either a fixed ``num_frames > 0``, or ``fps`` frames per second of video capped at ``max_frames``
    (``None``: no cap). ``num_frames <= 0`` without ``fps`` is the reference's 1-fps mode (spec §2.A).
    """
    fixed = num_frames is not None and num_frames > 0
    if fps is not None and fixed:
        raise TlvrError(f"give num_frames or fps, not both (num_frames={num_frames}, fps={fps})")
    if fps is not None and not fps > 0:
        raise TlvrError(f"fps must be a positive number of frames per second of video, got {fps}")
    if max_frames is not None and fixed:
        raise TlvrError(f"max_frames caps the fps mode only; with num_frames={num_frames} leave it unset")
    if max_frames is not None and max_frames <= 0:
        raise TlvrError(f"max_frames must be > 0 (or unset for no cap), got {max_frames}")
    if fixed:
        return lambda duration_s: num_frames
    if fps is None and num_frames is None:
        raise TlvrError("give num_frames > 0, or fps (with an optional max_frames cap)")
    rate = 1.0 if fps is None else float(fps)
    return lambda duration_s: fps_frame_count(duration_s, rate, max_frames)


def segment_midpoint_indices(start_idx: int, end_idx: int, num_frames: int) -> list[int]:
    """MVBench rule (spec §6.2): the midpoint of each of ``num_frames`` equal segments."""
    seg = float(end_idx - start_idx) / num_frames
    return [int(start_idx + seg / 2 + np.round(seg * k)) for k in range(num_frames)]


def _bounded_range(path, bound, fps: float, first_idx: int, max_frame: int) -> tuple[int, int]:
    """Clip the MVBench ``bound`` (seconds) to frame indices; no bound means the whole video."""
    start_s, end_s = bound if bound is not None else (-100000.0, 100000.0)
    start_idx = max(first_idx, round(start_s * fps))
    end_idx = min(round(end_s * fps), max_frame)
    if end_idx < start_idx:
        raise VideoError(path, "too_short",
                         f"bound {start_s}-{end_s} s gives frames {start_idx}..{end_idx} (last frame {max_frame})")
    return start_idx, end_idx


# ----------------------------------------------------------------------------- shared helpers


def check_exists(path: str | os.PathLike) -> None:
    """A ``VideoError`` (kind "missing") unless ``path`` exists."""
    if not os.path.exists(path):
        raise VideoError(path, "missing", "no such file or directory")


def _resolve_backend(backend: str) -> str:
    if backend not in ("auto", "decord", "pyav"):
        raise TlvrError(f"unknown video backend {backend!r} (expected auto, decord or pyav)")
    if backend != "auto":
        return backend
    try:
        import decord  # noqa: F401
    except ImportError:
        return "pyav"
    return "decord"


def _check_opens(path) -> None:
    """Refuse files ffmpeg cannot open before decord sees them: decord prints its open failures
    ("ERROR opening: ...") from C++ to stderr, with no switch to silence them."""
    with as_video_error(path):
        container, _ = open_video_stream(path)
        container.close()


def _batch_to_numpy(batch) -> np.ndarray:
    # Another library may have switched decord's bridge to torch; accept either result type.
    arr = batch.asnumpy() if hasattr(batch, "asnumpy") else batch.numpy()
    return np.ascontiguousarray(arr, dtype=np.uint8)


def _decord_read(path, choose: Callable[[int, float], list[int]]) -> Frames:
    """Open with decord (1 thread), pick indices from (total, fps), fetch them as one batch."""
    import decord

    # decord's private copy of ffmpeg prints to stderr ("partial file", ...) and has no way to hand
    # its messages to Python logging; silence it (it serves decord alone) and keep decord's exception.
    decord.logging.set_level(decord.logging.QUIET)
    with as_video_error(path):
        reader = decord.VideoReader(str(path), num_threads=1)
        total, fps = len(reader), float(reader.get_avg_fps())
        if total <= 0:
            raise VideoError(path, "zero_frames", "the video has no frames")
        indices = choose(total, fps)
        frames = _batch_to_numpy(reader.get_batch(indices))
    return Frames(frames=frames, indices=indices, total=total, fps=fps)


def _read_with(path, backend: str, choose: Callable[[int, float], list[int]]) -> Frames:
    """Decode with the chosen backend; "auto" retries with PyAV when decord cannot read a file."""
    check_exists(path)
    if _resolve_backend(backend) == "pyav":
        return pyav_read(path, choose)
    _check_opens(path)
    try:
        return _decord_read(path, choose)
    except VideoError as err:
        # decord rejects some files (odd frame sizes, unusual codecs) that ffmpeg via PyAV decodes.
        if backend != "auto" or err.kind != "unreadable":
            raise
        return pyav_read(path, choose)


# ----------------------------------------------------------------------------- path A


def read_frames(path: str | os.PathLike, num_frames: int | None = None, *, fps: float | None = None,
                max_frames: int | None = None, backend: str = "auto") -> Frames:
    """Path A (spec §2.A): linspace over every frame of the video, then decode those frames.

    Give ``num_frames > 0``, or ``fps`` to sample that many frames per second of video, at most
    ``max_frames`` (the reference: ``fps=1.0, max_frames=16`` in eval, no cap in SFT).
    ``num_frames <= 0`` alone is the uncapped 1-fps mode.
    """
    count = _count_rule(num_frames, fps, max_frames)

    def choose(total: int, video_fps: float) -> list[int]:
        duration_s = total / video_fps if video_fps > 0 else 0.0  # spec §2.A: frames / average fps
        return sample_frame_indices(total, count(duration_s))

    return _read_with(path, backend, choose)


# ----------------------------------------------------------------------------- path B


def _unique_linspace(total: int, count: int) -> list[int]:
    return [int(i) for i in np.unique(np.linspace(0, total - 1, count, dtype=int))]


def _stream_seconds(container, stream) -> float | None:
    """Stream duration in seconds from metadata (the container's when the stream has none)."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    return container.duration / 1_000_000 if container.duration else None  # AV_TIME_BASE units


def _read_pts_seek(path: str | os.PathLike, count: Callable[[float], int]) -> Frames:
    """Path B (spec §2.B, Video-MME/MLVU): seek to target PTS values, keyframe-backward."""
    check_exists(path)
    with as_video_error(path):
        container, stream = open_video_stream(path)
        with container:
            total = int(stream.frames or 0)
            duration_s = _stream_seconds(container, stream)
            if stream.average_rate != stream.base_rate or total <= 0 or not stream.base_rate:
                return _read_pts_naive(path, count, duration_s)
            fps = float(stream.base_rate)
            time_base = stream.time_base
            # spec §2.B: the fps mode counts seconds of stream.duration; frames / fps when it is unset.
            unique_idx = _unique_linspace(total, count(duration_s if duration_s is not None else total / fps))
            # Assumes constant frame rate and PTS starting at 0, as the reference does.
            pending = [int(float(Fraction(i) / time_base) / fps) for i in unique_idx]
            kept: dict[int, np.ndarray] = {}
            while pending:
                container.seek(pending[-1], backward=True, any_frame=False, stream=stream)
                serving: list[int] | None = None
                for frame in container.decode(stream):
                    if frame.pts is None:
                        continue
                    if serving is None:
                        # Targets at or after the landing frame are served now; earlier ones wait
                        # for the next (earlier) seek. If none is later, serve them all here.
                        later = [t for t in pending if t >= frame.pts]
                        if later:
                            serving, pending = later, [t for t in pending if t < frame.pts]
                        else:
                            serving, pending = pending, []
                    if frame.pts >= serving[0]:
                        kept[frame.pts] = frame.to_ndarray(format="rgb24")
                        serving.pop(0)
                        if not serving:
                            break
                if serving is None:  # nothing decodable after the seek: give up on the rest
                    break
    if not kept:
        raise VideoError(path, "zero_frames", "no frame decoded at the sampled timestamps")
    order = sorted(kept)
    indices = [int(round(float(pts * time_base) * fps)) for pts in order]
    return Frames(frames=np.stack([kept[p] for p in order]), indices=indices, total=total, fps=fps)


def _read_pts_naive(path: str | os.PathLike, count: Callable[[float], int], duration_s: float | None) -> Frames:
    """Variable-frame-rate fallback of path B: frames by decode index, unique linspace indices.

    The reference passes ``stream.duration`` here in time-base units, not seconds (spec §2.B); the
    fps mode counts seconds instead, as the constant-rate branch does.
    """
    def choose(total: int, fps: float) -> list[int]:
        seconds = duration_s if duration_s is not None else (total / fps if fps > 0 else 0.0)
        return _unique_linspace(total, count(seconds))

    return pyav_read(path, choose)


# ----------------------------------------------------------------------------- paths C and D


def _read_midpoints(path, bound, num_frames: int, backend: str) -> Frames:
    """Path C (spec §6.2, MVBench avi/webm): segment midpoints over the optional bound."""
    def choose(total: int, fps: float) -> list[int]:
        start_idx, end_idx = _bounded_range(path, bound, fps, 0, total - 1)
        return segment_midpoint_indices(start_idx, end_idx, num_frames)

    return _read_with(path, backend, choose)


def _read_frame_folder(path, bound, num_frames: int, folder_fps: float) -> Frames:
    """Path D (spec §6.2, MVBench frame folders): 1-based JPEG files at ``folder_fps``."""
    from PIL import Image

    check_exists(path)
    folder = Path(path)
    if not folder.is_dir():
        raise VideoError(path, "unreadable", "expected a folder of JPEG frames")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in JPEG_SUFFIXES)
    if not files:
        raise VideoError(path, "zero_frames", "no .jpg files in the folder")
    max_frame = len(files)  # spec §6.2: files are numbered from 1, so the count is the last index
    start_idx, end_idx = _bounded_range(path, bound, folder_fps, 1, max_frame)
    indices = segment_midpoint_indices(start_idx, end_idx, num_frames)
    with as_video_error(path):
        images = []
        for i in indices:
            with Image.open(files[min(max(i, 1), max_frame) - 1]) as img:
                images.append(np.asarray(img.convert("RGB"), dtype=np.uint8))
        frames = np.stack(images)
    return Frames(frames=frames, indices=indices, total=max_frame, fps=float(folder_fps))


def read_video(path: str | os.PathLike, spec: FrameSpec, num_frames: int | None = None, *,
               fps: float | None = None, max_frames: int | None = None, backend: str = "auto") -> Frames:
    """Decode frames the way ``spec.kind`` says (spec §2 paths A–D).

    ``num_frames > 0`` frames, or for paths A and B (``uniform`` without a bound, ``pts_seek``) ``fps``
    frames per second of video capped at ``max_frames``; see :func:`read_frames`.
    """
    if spec.kind not in FRAME_SPEC_KINDS:
        raise TlvrError(f"unknown frame spec kind {spec.kind!r} (expected {', '.join(FRAME_SPEC_KINDS)})")
    if spec.kind == "uniform" and spec.bound is None:
        return read_frames(path, num_frames, fps=fps, max_frames=max_frames, backend=backend)
    fixed = num_frames is not None and num_frames > 0
    if spec.kind == "pts_seek":
        if fps is None and not fixed:
            raise TlvrError("frame spec 'pts_seek' needs num_frames > 0 or fps (fps=1.0 is the reference's 1-fps mode)")
        return _read_pts_seek(path, _count_rule(num_frames, fps, max_frames))
    what = "a bounded uniform frame spec" if spec.kind == "uniform" else f"frame spec {spec.kind!r}"
    if fps is not None or max_frames is not None:
        raise TlvrError(f"{what} samples a fixed num_frames; fps and max_frames apply to uniform "
                        "(without a bound) and pts_seek only")
    if not fixed:
        raise TlvrError(f"{what} needs num_frames > 0")
    if spec.kind == "uniform":
        def choose(total: int, video_fps: float) -> list[int]:
            # path A restricted to the [start, end] seconds of the bound (MVBench, --frame-protocol uniform)
            start, end = _bounded_range(path, spec.bound, video_fps, 0, total - 1)
            return [start + i for i in sample_frame_indices(end - start + 1, num_frames)]

        return _read_with(path, backend, choose)
    if spec.kind == "midpoints":
        return _read_midpoints(path, spec.bound, num_frames, backend)
    return _read_frame_folder(path, spec.bound, num_frames, spec.folder_fps)
