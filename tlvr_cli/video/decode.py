"""Video decoding and frame sampling: the four reference paths of spec §2 (A–D).

Every reader returns a :class:`Frames` holding uint8 RGB frames (T, H, W, 3). Decoder failures
never escape raw: they become a one-line :class:`VideoError` naming the file and what went wrong.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from ..errors import TlvrError

VIDEO_ERROR_KINDS = ("missing", "unreadable", "zero_frames", "too_short")
JPEG_SUFFIXES = (".jpg", ".jpeg")


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


def one_fps_count(duration_s: float, cap: int | None) -> int:
    """Frame count in "1 fps" mode: one per whole second, at least 1, at most ``cap`` (spec §2.A)."""
    count = max(1, int(duration_s))
    return count if cap is None else min(cap, count)


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


def _check_exists(path: str | os.PathLike) -> None:
    if not os.path.exists(path):
        raise VideoError(path, "missing", "no such file or directory")


@contextlib.contextmanager
def _as_video_error(path: str | os.PathLike) -> Iterator[None]:
    """Turn any decoder exception into a one-line ``unreadable`` VideoError."""
    try:
        yield
    except VideoError:
        raise
    except Exception as exc:  # decord and PyAV raise many unrelated types
        lines = str(exc).strip().splitlines() or [""]
        # decord appends a C++ stack trace to its messages; the first line is the useful part.
        raise VideoError(path, "unreadable", f"{type(exc).__name__}: {lines[0][:300]}") from exc


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


def _batch_to_numpy(batch) -> np.ndarray:
    # Another library may have switched decord's bridge to torch; accept either result type.
    arr = batch.asnumpy() if hasattr(batch, "asnumpy") else batch.numpy()
    return np.ascontiguousarray(arr, dtype=np.uint8)


def _decord_read(path, choose: Callable[[int, float], list[int]]) -> Frames:
    """Open with decord (1 thread), pick indices from (total, fps), fetch them as one batch."""
    import decord

    with _as_video_error(path):
        reader = decord.VideoReader(str(path), num_threads=1)
        total, fps = len(reader), float(reader.get_avg_fps())
        if total <= 0:
            raise VideoError(path, "zero_frames", "the video has no frames")
        indices = choose(total, fps)
        frames = _batch_to_numpy(reader.get_batch(indices))
    return Frames(frames=frames, indices=indices, total=total, fps=fps)


def _open_video_stream(path):
    import av

    container = av.open(str(path))
    if not container.streams.video:
        container.close()
        raise VideoError(path, "unreadable", "no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    return container, stream


def _stream_fps(stream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 0.0


def _pyav_count_frames(path) -> int:
    container, stream = _open_video_stream(path)
    with container:
        return sum(1 for _ in container.decode(stream))


def _pyav_read(path, choose: Callable[[int, float], list[int]]) -> Frames:
    """Decode sequentially with PyAV, keeping the frames whose decode index ``choose`` selects.

    Container frame counts can be wrong, so the decoded count is checked; if it differs from the
    metadata the indices are recomputed and the video decoded once more.
    """
    with _as_video_error(path):
        container, stream = _open_video_stream(path)
        with container:
            expected, fps = int(stream.frames or 0), _stream_fps(stream)
        if expected <= 0:
            expected = _pyav_count_frames(path)
        for _ in range(2):
            if expected <= 0:
                raise VideoError(path, "zero_frames", "the video has no frames")
            indices = choose(expected, fps)
            wanted = set(indices)
            kept: dict[int, np.ndarray] = {}
            container, stream = _open_video_stream(path)
            with container:
                count = 0
                for frame in container.decode(stream):
                    if count in wanted:
                        kept[count] = frame.to_ndarray(format="rgb24")
                    count += 1
            if count == expected:
                frames = np.stack([kept[i] for i in indices]).astype(np.uint8, copy=False)
                return Frames(frames=frames, indices=indices, total=count, fps=fps)
            expected = count
    raise VideoError(path, "unreadable", "frame count changed between two decodes")


def _read_with(path, backend: str, choose: Callable[[int, float], list[int]]) -> Frames:
    """Decode with the chosen backend; "auto" retries with PyAV when decord cannot read a file."""
    _check_exists(path)
    if _resolve_backend(backend) == "pyav":
        return _pyav_read(path, choose)
    try:
        return _decord_read(path, choose)
    except VideoError as err:
        # decord rejects some files (odd frame sizes, unusual codecs) that ffmpeg via PyAV decodes.
        if backend != "auto" or err.kind != "unreadable":
            raise
        return _pyav_read(path, choose)


# ----------------------------------------------------------------------------- path A


def read_frames(path: str | os.PathLike, num_frames: int, *, backend: str = "auto") -> Frames:
    """Path A (spec §2.A): linspace over every frame of the video, then decode those frames.

    ``num_frames <= 0`` is the uncapped 1-fps mode (one frame per whole second of video).
    """
    def choose(total: int, fps: float) -> list[int]:
        count = num_frames if num_frames > 0 else one_fps_count(total / fps if fps > 0 else 0.0, None)
        return sample_frame_indices(total, count)

    return _read_with(path, backend, choose)


# ----------------------------------------------------------------------------- path B


def _read_pts_seek(path: str | os.PathLike, num_frames: int) -> Frames:
    """Path B (spec §2.B, Video-MME/MLVU): seek to target PTS values, keyframe-backward."""
    _check_exists(path)
    with _as_video_error(path):
        container, stream = _open_video_stream(path)
        with container:
            total = int(stream.frames or 0)
            if stream.average_rate != stream.base_rate or total <= 0 or not stream.base_rate:
                return _read_pts_naive(path, num_frames)
            fps = float(stream.base_rate)
            time_base = stream.time_base
            unique_idx = np.unique(np.linspace(0, total - 1, num_frames, dtype=int))
            # Assumes constant frame rate and PTS starting at 0, as the reference does.
            pending = [int(float(Fraction(int(i)) / time_base) / fps) for i in unique_idx]
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


def _read_pts_naive(path: str | os.PathLike, num_frames: int) -> Frames:
    """Variable-frame-rate fallback of path B: sequential decode, unique linspace indices."""
    def choose(total: int, fps: float) -> list[int]:
        return [int(i) for i in np.unique(np.linspace(0, total - 1, num_frames, dtype=int))]

    return _pyav_read(path, choose)


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

    _check_exists(path)
    folder = Path(path)
    if not folder.is_dir():
        raise VideoError(path, "unreadable", "expected a folder of JPEG frames")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in JPEG_SUFFIXES)
    if not files:
        raise VideoError(path, "zero_frames", "no .jpg files in the folder")
    max_frame = len(files)  # spec §6.2: files are numbered from 1, so the count is the last index
    start_idx, end_idx = _bounded_range(path, bound, folder_fps, 1, max_frame)
    indices = segment_midpoint_indices(start_idx, end_idx, num_frames)
    with _as_video_error(path):
        images = []
        for i in indices:
            with Image.open(files[min(max(i, 1), max_frame) - 1]) as img:
                images.append(np.asarray(img.convert("RGB"), dtype=np.uint8))
        frames = np.stack(images)
    return Frames(frames=frames, indices=indices, total=max_frame, fps=float(folder_fps))


def read_video(path: str | os.PathLike, spec: FrameSpec, num_frames: int, *,
               backend: str = "auto") -> Frames:
    """Decode ``num_frames`` frames the way ``spec.kind`` says (spec §2 paths A–D)."""
    if spec.kind == "uniform":
        if spec.bound is None:
            return read_frames(path, num_frames, backend=backend)
        if num_frames <= 0:
            raise TlvrError("a bounded uniform frame spec needs num_frames > 0")

        def choose(total: int, fps: float) -> list[int]:
            # path A restricted to the [start, end] seconds of the bound (MVBench, --frame-protocol uniform)
            start, end = _bounded_range(path, spec.bound, fps, 0, total - 1)
            return [start + i for i in sample_frame_indices(end - start + 1, num_frames)]

        return _read_with(path, backend, choose)
    if num_frames <= 0:
        raise TlvrError(f"frame spec {spec.kind!r} needs num_frames > 0 (1-fps mode is path A only)")
    if spec.kind == "pts_seek":
        return _read_pts_seek(path, num_frames)
    if spec.kind == "midpoints":
        return _read_midpoints(path, spec.bound, num_frames, backend)
    if spec.kind == "folder":
        return _read_frame_folder(path, spec.bound, num_frames, spec.folder_fps)
    raise TlvrError(f"unknown frame spec kind {spec.kind!r} (expected uniform, pts_seek, midpoints or folder)")
