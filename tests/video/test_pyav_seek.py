"""The PyAV keyframe-seek reader gives the full decode's indices and bit-identical frames, or falls back."""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import av
import numpy as np
import pytest
from videos import band_ids, write_video

import tlvr_cli.video.pyav_reader as pyav_reader
from tlvr_cli.video.decode import read_frames, sample_frame_indices
from tlvr_cli.video.pyav_reader import UnsafeSeek, pyav_read, seek_unsafe_reason

N = 30
COUNTS = [1, 5, 16, 30, 47]
FULL_DECODE = "decoding every frame"

needs_x264 = pytest.mark.skipif("libx264" not in av.codecs_available, reason="no libx264")
needs_x265 = pytest.mark.skipif("libx265" not in av.codecs_available, reason="no libx265")

# (file name, codec, encoder options, whether the band names frames exactly)
SEEKABLE = [
    pytest.param("g1.mp4", "libx264", {"g": "1"}, True, marks=needs_x264),
    pytest.param("g5_bf2.mp4", "libx264", {"g": "5", "bf": "2"}, True, marks=needs_x264),
    pytest.param("g12_bf3.mp4", "libx264", {"g": "12", "bf": "3", "b_strategy": "0"}, True, marks=needs_x264),
    pytest.param("g250.mp4", "libx264", {"g": "250", "bf": "3"}, True, marks=needs_x264),
    pytest.param("mpeg4_g5.mp4", "mpeg4", {"g": "5"}, True),
    pytest.param("mpeg4_bf2.avi", "mpeg4", {"g": "12", "bf": "2"}, False),
    pytest.param("hevc.mp4", "libx265", {"g": "10", "x265-params": "log-level=error"}, True, marks=needs_x265),
]


def both_paths(path: Path, count: int):
    def choose(total: int, fps: float) -> list[int]:
        return sample_frame_indices(total, count)

    return pyav_read(path, choose, seek=True), pyav_read(path, choose, seek=False)


def assert_identical(seek, full) -> None:
    assert seek.indices == full.indices and seek.total == full.total and seek.fps == full.fps
    assert seek.frames.dtype == np.uint8 and np.array_equal(seek.frames, full.frames)


@pytest.mark.parametrize("name,codec,options,exact_band", SEEKABLE)
def test_seek_matches_full_decode(tmp_path, caplog, name, codec, options, exact_band):
    path = write_video(tmp_path / name, N, codec=codec, options=options)
    caplog.set_level(logging.DEBUG, logger="tlvr.video")
    for count in COUNTS:
        seek, full = both_paths(path, count)
        assert_identical(seek, full)
        assert seek.indices == sample_frame_indices(N, count) and seek.total == N
        if exact_band:
            assert band_ids(seek) == seek.indices
    assert FULL_DECODE not in caplog.text  # every read above took the seek path


@needs_x264
def test_nearby_frames_share_one_seek(tmp_path, monkeypatch):
    path = write_video(tmp_path / "g250.mp4", N, options={"g": "250", "bf": "3"})
    seeks: list[int] = []
    real_open = pyav_reader.open_video_stream

    class CountingSeeks:
        def __init__(self, container):
            self.container = container

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.container.close()

        def __getattr__(self, name):
            return getattr(self.container, name)

        def seek(self, offset, **kwargs):
            seeks.append(offset)
            return self.container.seek(offset, **kwargs)

    def counting_open(p, **kwargs):
        container, stream = real_open(p, **kwargs)
        return CountingSeeks(container), stream

    monkeypatch.setattr(pyav_reader, "open_video_stream", counting_open)
    got = read_frames(path, 8, backend="pyav")
    assert band_ids(got) == got.indices == sample_frame_indices(N, 8)
    assert len(seeks) == 1  # one keyframe for the whole clip: decode forward through every target


@pytest.mark.parametrize("name,codec,options", [
    pytest.param("g10.mp4", "libx264", {"g": "10", "bf": "2"}, marks=needs_x264),  # MP4 seeks by PTS
    pytest.param("g12_bf2.avi", "mpeg4", {"g": "12", "bf": "2"}),  # AVI seeks by DTS
])
def test_seeks_land_on_the_keyframe_before_the_target(tmp_path, monkeypatch, name, codec, options):
    path = write_video(tmp_path / name, N, codec=codec, options=options)
    landings: list[tuple[int, int]] = []
    real_seek_to = pyav_reader._seek_to_keyframe

    def recording_seek_to(container, stream, index, k_key, position):
        packets, landed = real_seek_to(container, stream, index, k_key, position)
        landings.append((index.keyframes[k_key], landed))
        return packets, landed

    monkeypatch.setattr(pyav_reader, "_seek_to_keyframe", recording_seek_to)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        index = pyav_reader.read_packet_index(container, stream)
        assert index.unsafe is None and len(index.keyframes) >= 3
        kept = pyav_reader.seek_decode(container, stream, index, [3, 14, 27])
    assert sorted(kept) == [3, 14, 27] and len(landings) >= 2
    assert all(landed == key for key, landed in landings)


def test_wrong_metadata_frame_count(tmp_path, caplog):
    path = write_video(tmp_path / "clip.avi", N, codec="mpeg4", options={"g": "5"})
    data = bytearray(path.read_bytes())
    strh = data.index(b"strh")
    struct.pack_into("<I", data, strh + 8 + 32, 12)  # the stream header's dwLength: claim 12 frames
    path.write_bytes(bytes(data))
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 12
    caplog.set_level(logging.DEBUG, logger="tlvr.video")
    for count in COUNTS:
        seek, full = both_paths(path, count)
        assert_identical(seek, full)
        assert seek.total == N and band_ids(seek) == seek.indices == sample_frame_indices(N, count)
    assert "container frame count 12 differs from 30 packets" in caplog.text


def test_no_frame_count_falls_back(tmp_path, caplog):
    path = write_video(tmp_path / "clip.mkv", N, codec="mpeg4", options={"g": "5"})
    caplog.set_level(logging.DEBUG, logger="tlvr.video")
    seek, full = both_paths(path, 7)
    assert_identical(seek, full)
    assert band_ids(seek) == seek.indices == sample_frame_indices(N, 7)
    assert "container frame count 0 differs" in caplog.text


@needs_x264
def test_unexpected_seek_falls_back_to_full_decode(tmp_path, monkeypatch, caplog):
    path = write_video(tmp_path / "g5.mp4", N, options={"g": "5", "bf": "2"})
    full = both_paths(path, 9)[1]

    def refuse(*args, **kwargs):
        raise UnsafeSeek("seek landed after keyframe")

    monkeypatch.setattr(pyav_reader, "seek_decode", refuse)
    caplog.set_level(logging.DEBUG, logger="tlvr.video")
    assert_identical(both_paths(path, 9)[0], full)
    assert "seek landed after keyframe" in caplog.text


def test_truncated_file_falls_back(tmp_path, caplog):
    path = write_video(tmp_path / "cut.mp4", N, codec="mpeg4", options={"g": "5"}, movflags="faststart")
    data = path.read_bytes()
    mdat = data.index(b"mdat")
    path.write_bytes(data[: mdat + (len(data) - mdat) // 3])  # the index still lists 30 frames
    caplog.set_level(logging.DEBUG, logger="tlvr.video")
    seek, full = both_paths(path, 16)
    assert_identical(seek, full)
    assert 0 < seek.total < N and band_ids(seek) == seek.indices
    assert FULL_DECODE in caplog.text


# ----------------------------------------------------------------------------- the safety rule

GOOD = [(0, -2, True, False, False), (2, -1, False, False, False), (1, 0, False, False, False),
        (3, 1, True, False, False)]


def test_safe_packets():
    assert seek_unsafe_reason(GOOD, 4) is None
    jitter = [(0, 0, True, False, False), (33, 33, False, False, False), (67, 67, False, False, False)]
    assert seek_unsafe_reason(jitter, 3) is None  # millisecond timestamps of 30 fps


@pytest.mark.parametrize("packets,frames,reason", [
    ([], 0, "no packets"),
    (GOOD, 0, "container frame count 0 differs from 4 packets"),
    (GOOD, 5, "container frame count 5 differs"),
    ([GOOD[0], (None, -1, False, False, False)] + GOOD[2:], 4, "without timestamps"),
    (GOOD[:3] + [(3, 1, True, True, False)], 4, "corrupt or discarded"),
    (GOOD[:3] + [(3, 1, True, False, True)], 4, "corrupt or discarded"),
    ([GOOD[0], GOOD[2], GOOD[1], GOOD[3]], 4, "decode timestamps not increasing"),
    ([(p[0], p[1], False, False, False) for p in GOOD], 4, "does not start on a keyframe"),
    ([(1, -2, True, False, False), (0, -1, False, False, False), (2, 0, False, False, False), GOOD[3]], 4,
     "shown before the first keyframe"),
    (GOOD[:3] + [(2, 1, True, False, False)], 4, "duplicate presentation timestamps or variable"),
    (GOOD[:3] + [(5, 1, True, False, False)], 4, "variable frame rate"),
])
def test_unsafe_packets(packets, frames, reason):
    assert reason in seek_unsafe_reason(packets, frames)
