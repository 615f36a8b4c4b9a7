"""PyAV frame reading by decode index: keyframe seeks where the timestamps allow, else every frame.

Frame ``k`` of a video is the ``k``-th frame the decoder outputs when it decodes the whole stream
(the index path A's linspace is taken over). Decoding everything is exact but slow: 16 frames of a
5-minute clip cost a full decode. :func:`read_packet_index` reads every packet's timestamps without
decoding; when they map one-to-one onto decoded frames (see :func:`seek_unsafe_reason`), the
wanted frames are found by seeking to the keyframe before each one and decoding forward. Anything
unexpected during those seeks falls back to the full decode, so both give the same frames.
"""

from __future__ import annotations

import bisect
import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .frames import LOGGER, Frames, VideoError, as_video_error

# Codecs whose decoder may skip frames no other frame references (``nal_ref_idc == 0`` in H.264)
# without changing any other frame; elsewhere every frame after a seek is decoded.
SKIP_NONREF_CODECS = ("h264",)
# Timestamps in milliseconds (Matroska, WebM) round 1/30 s steps to 33 or 34 ticks.
CFR_JITTER_TICKS = 1


class UnsafeSeek(Exception):
    """Seeking met something the packet index did not predict; decode every frame instead."""


@dataclass(frozen=True)
class PacketIndex:
    """Presentation timestamps of every frame of a stream, read from its packets without decoding."""

    packets: int  # packets holding data (one per frame when ``unsafe`` is None)
    pts: list[int]  # sorted; position k is frame index k (empty when unsafe)
    keyframes: list[int]  # frame indices of the keyframes, ascending
    keyframe_dts: list[int]  # decode timestamp of each keyframe (AVI indexes seeks by DTS)
    unsafe: str | None  # why seeking could mis-number frames; None when it is exact


def open_video_stream(path: str | os.PathLike, thread_type: str = "AUTO"):
    import av

    container = av.open(str(path))
    if not container.streams.video:
        container.close()
        raise VideoError(path, "unreadable", "no video stream")
    stream = container.streams.video[0]
    stream.thread_type = thread_type
    return container, stream


def stream_fps(stream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 0.0


def seek_unsafe_reason(packets: list[tuple[int | None, int | None, bool, bool, bool]],
                       metadata_frames: int) -> str | None:
    """Why ``(pts, dts, keyframe, corrupt, discard)`` packets may not number frames as a full decode does.

    The full decode numbers frames in output order. Packet PTS give that order only when every
    packet becomes exactly one frame: the container must agree on the count (a truncated file keeps
    its original count), no packet may be cut short or dropped by an edit list, decode order must
    be monotonic and start on the keyframe shown first, and the frame rate must be constant.
    """
    if not packets:
        return "no packets"
    if metadata_frames != len(packets):
        return f"container frame count {metadata_frames} differs from {len(packets)} packets"
    if any(p[0] is None or p[1] is None for p in packets):
        return "packets without timestamps"
    if any(p[3] or p[4] for p in packets):
        return "corrupt or discarded packets"
    if any(b[1] <= a[1] for a, b in itertools.pairwise(packets)):
        return "decode timestamps not increasing"
    if not packets[0][2]:
        return "stream does not start on a keyframe"
    pts = sorted(p[0] for p in packets)
    if packets[0][0] != pts[0]:
        return "frames shown before the first keyframe"
    steps = np.diff(np.asarray(pts, dtype=np.int64))
    if len(steps) and (steps.min() <= 0 or steps.max() - steps.min() > CFR_JITTER_TICKS):
        return "duplicate presentation timestamps or variable frame rate"
    return None


def read_packet_index(container, stream) -> PacketIndex:
    """Demux the whole stream without decoding: reads the file once, far cheaper than decoding it."""
    import av

    try:
        packets = [(p.pts, p.dts, p.is_keyframe, p.is_corrupt, p.is_discard)
                   for p in container.demux(stream) if p.size]
    except av.FFmpegError as exc:
        return PacketIndex(packets=0, pts=[], keyframes=[], keyframe_dts=[], unsafe=f"demuxing failed ({exc})")
    unsafe = seek_unsafe_reason(packets, int(stream.frames or 0))
    if unsafe is not None:
        return PacketIndex(packets=len(packets), pts=[], keyframes=[], keyframe_dts=[], unsafe=unsafe)
    pts = sorted(p[0] for p in packets)
    position = {t: k for k, t in enumerate(pts)}
    keys = sorted((position[p[0]], p[1]) for p in packets if p[2])
    return PacketIndex(packets=len(packets), pts=pts, keyframes=[k for k, _ in keys],
                       keyframe_dts=[dts for _, dts in keys], unsafe=None)


def seek_decode(container, stream, index: PacketIndex, wanted: list[int]) -> dict[int, np.ndarray]:
    """RGB frames at the ``wanted`` indices: one keyframe seek per run of nearby indices, then decode forward.

    Raises :class:`UnsafeSeek` when a seek lands after its keyframe, a decoded frame's PTS is not in
    the index, frames come out of order or the decoder fails: the caller then decodes every frame.
    """
    import av

    try:
        return _seek_decode(container, stream, index, wanted)
    except av.FFmpegError as exc:
        raise UnsafeSeek(f"decoding after a seek failed ({exc})") from exc


def _seek_to_keyframe(container, stream, index: PacketIndex, k_key: int, position: dict[int, int]):
    """Seek so that demuxing starts on keyframe ``k_key`` or an earlier one; return (packets, landing index).

    Demuxers index seeks by PTS (MP4, Matroska) or by DTS (AVI): the keyframe's PTS is tried first,
    its DTS when that lands on a later keyframe.
    """
    key = index.keyframes[k_key]
    for timestamp in (index.pts[key], index.keyframe_dts[k_key]):
        container.seek(timestamp, stream=stream, backward=True, any_frame=False)
        packets = container.demux(stream)
        first = next(packets, None)
        landed = position.get(first.pts, key + 1) if first is not None and first.is_keyframe else key + 1
        if landed <= key:
            return itertools.chain([first], packets), landed
    raise UnsafeSeek(f"seeking to keyframe {key} landed on a later frame")


def _seek_decode(container, stream, index: PacketIndex, wanted: list[int]) -> dict[int, np.ndarray]:
    position = {t: k for k, t in enumerate(index.pts)}
    targets = sorted(set(wanted))
    target_set, target_pts = set(targets), {index.pts[k] for k in targets}
    codec = stream.codec_context
    skip_nonref = codec.name in SKIP_NONREF_CODECS
    kept: dict[int, np.ndarray] = {}
    packets, landed, last = None, 0, -1  # landed, last: frame indices since the latest seek
    for target in targets:
        k_key = bisect.bisect_right(index.keyframes, target) - 1
        if packets is None or index.keyframes[k_key] > last:
            # Decoding on from ``last`` would pass this keyframe anyway: jump straight to it.
            packets, landed = _seek_to_keyframe(container, stream, index, k_key, position)
            last = -1
        while target not in kept:
            packet = next(packets, None)
            if packet is None:
                raise UnsafeSeek(f"stream ended before frame {target}")
            if skip_nonref:
                # Only the wanted frames are converted; unreferenced others need not be decoded at all.
                codec.skip_frame = "DEFAULT" if packet.pts is None or packet.pts in target_pts else "NONREF"
            for frame in stream.decode(packet):
                k = position.get(frame.pts)
                if k is None or k <= last:
                    raise UnsafeSeek(f"decoded PTS {frame.pts} is not in the index or comes after frame {last}")
                last = k
                # Frames shown before the landing keyframe but decoded after it (open GOPs) may
                # reference frames from before the seek: never keep those.
                if k >= landed and k in target_set:
                    kept[k] = frame.to_ndarray(format="rgb24")
            if last > target and target not in kept:
                raise UnsafeSeek(f"frame {target} was not decoded")
    return kept


def count_frames(path: str | os.PathLike) -> int:
    container, stream = open_video_stream(path)
    with container:
        return sum(1 for _ in container.decode(stream))


def decode_every_frame(path, choose: Callable[[int, float], list[int]], expected: int, fps: float) -> Frames:
    """Decode sequentially, keeping the frames whose output index ``choose`` selects.

    ``expected`` is a guess of the frame count (container metadata or packet count); if the decode
    finds a different count the indices are recomputed and the video decoded once more.
    """
    for _ in range(2):
        if expected <= 0:
            raise VideoError(path, "zero_frames", "the video has no frames")
        indices = choose(expected, fps)
        wanted = set(indices)
        kept: dict[int, np.ndarray] = {}
        container, stream = open_video_stream(path)
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


def pyav_read(path: str | os.PathLike, choose: Callable[[int, float], list[int]], *, seek: bool = True) -> Frames:
    """Frames at the indices ``choose(total, fps)`` picks, by keyframe seeks when exact, else a full decode."""
    with as_video_error(path):
        # Frame threads refill their pipeline after every seek and wait on each other for small
        # frames: for short runs after a seek one decoding thread (slices aside) is faster.
        container, stream = open_video_stream(path, thread_type="SLICE" if seek else "AUTO")
        with container:
            fps, metadata_frames = stream_fps(stream), int(stream.frames or 0)
            index = read_packet_index(container, stream) if seek else None
            if index is not None and index.unsafe is None:
                indices = choose(len(index.pts), fps)
                try:
                    kept = seek_decode(container, stream, index, indices)
                    frames = np.stack([kept[i] for i in indices]).astype(np.uint8, copy=False)
                    return Frames(frames=frames, indices=indices, total=len(index.pts), fps=fps)
                except UnsafeSeek as why:
                    LOGGER.debug("%s: decoding every frame: %s", path, why)
            elif index is not None:
                LOGGER.debug("%s: decoding every frame: %s", path, index.unsafe)
        # The packet count, when the index read it, is a better first guess than the metadata.
        expected = index.packets if index is not None and index.packets > 0 else metadata_frames
        if expected <= 0:
            expected = count_frames(path)
        return decode_every_frame(path, choose, expected, fps)
