"""Frame-rate mode (spec §2.A, §2.B): ``fps`` frames per second of video, capped at ``max_frames``."""

from __future__ import annotations

import numpy as np
import pytest
from videos import band_ids, write_video

from tlvr_cli.errors import TlvrError
from tlvr_cli.video.decode import (
    FrameSpec,
    fps_frame_count,
    one_fps_count,
    read_frames,
    read_video,
)

# (frames, video fps): 0.5 s, 2.5 s, 7.5 s and 15 s of video
DURATIONS = [(4, 8), (20, 8), (30, 4), (30, 2)]
MODES = [(1.0, None), (1.0, 4), (2.0, 16), (0.5, None), (3.0, 8)]


def reference_count(duration_s: float, fps: float, cap: int | None) -> int:
    """The reference rule written out: min(cap, max(1, int(duration * fps)))."""
    count = max(1, int(duration_s * fps))
    return count if cap is None else min(cap, count)


def path_a_indices(total: int, count: int) -> list[int]:
    return np.linspace(0, total - 1, count, dtype=int).tolist()


def path_b_indices(total: int, count: int) -> list[int]:
    return np.unique(np.linspace(0, total - 1, count, dtype=int)).tolist()


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("durations")
    return {(n, fps): write_video(folder / f"{n}_at_{fps}.mp4", n, codec="mpeg4", options={"g": "5"}, fps=fps)
            for n, fps in DURATIONS}


def test_fps_frame_count():
    assert fps_frame_count(7.5, 2.0, None) == 15
    assert fps_frame_count(7.5, 2.0, 8) == 8
    assert fps_frame_count(0.4, 1.0, 16) == 1
    assert fps_frame_count(2.5, 0.5, None) == 1
    assert [one_fps_count(d, 4) for d in (0.3, 2.5, 9.0)] == [fps_frame_count(d, 1.0, 4) for d in (0.3, 2.5, 9.0)]


@pytest.mark.parametrize("backend", ["decord", "pyav"])
@pytest.mark.parametrize("n,video_fps", DURATIONS)
def test_path_a_fps_mode(clips, backend, n, video_fps):
    for fps, cap in MODES:
        got = read_frames(clips[n, video_fps], fps=fps, max_frames=cap, backend=backend)
        expected = path_a_indices(n, reference_count(n / video_fps, fps, cap))
        assert got.indices == band_ids(got) == expected, (fps, cap)
        assert got.total == n and len(got.frames) == len(expected)


@pytest.mark.parametrize("n,video_fps", DURATIONS)
def test_path_b_fps_mode(clips, n, video_fps):
    for fps, cap in MODES:
        got = read_video(clips[n, video_fps], FrameSpec(kind="pts_seek"), fps=fps, max_frames=cap)
        expected = path_b_indices(n, reference_count(n / video_fps, fps, cap))
        assert got.indices == band_ids(got) == expected, (fps, cap)


def test_path_b_fps_mode_without_frame_count(tmp_path):
    # Matroska stores no frame count: path B decodes sequentially; the duration is the container's.
    path = write_video(tmp_path / "clip.mkv", 30, codec="mpeg4", options={"g": "5"}, fps=2)
    got = read_video(path, FrameSpec(kind="pts_seek"), fps=1.0, max_frames=9)
    assert got.indices == band_ids(got) == path_b_indices(30, 9)
    got = read_video(path, FrameSpec(kind="pts_seek"), fps=0.25)
    assert got.indices == band_ids(got) == path_b_indices(30, 3)


def test_uniform_spec_passes_fps_to_path_a(clips):
    path = clips[30, 4]
    got = read_video(path, FrameSpec(kind="uniform"), fps=1.0, max_frames=5)
    assert got.indices == read_frames(path, fps=1.0, max_frames=5).indices == path_a_indices(30, 5)


def test_zero_num_frames_is_uncapped_one_fps(clips):
    path = clips[30, 2]
    assert read_frames(path, 0, backend="pyav").indices == read_frames(path, fps=1.0).indices == path_a_indices(30, 15)
    assert read_frames(path, -1, max_frames=6).indices == path_a_indices(30, 6)


@pytest.mark.parametrize("kwargs,message", [
    ({"num_frames": 8, "fps": 1.0}, "not both"),
    ({"fps": 0.0}, "fps must be a positive"),
    ({"fps": -2.0}, "fps must be a positive"),
    ({"num_frames": 8, "max_frames": 4}, "max_frames caps the fps mode"),
    ({"fps": 1.0, "max_frames": 0}, "max_frames must be > 0"),
    ({}, "give num_frames > 0, or fps"),
])
def test_invalid_count_arguments(clips, kwargs, message):
    with pytest.raises(TlvrError, match=message):
        read_frames(clips[20, 8], **kwargs)


def test_invalid_combinations_per_spec(clips):
    path = clips[20, 8]
    with pytest.raises(TlvrError, match="pts_seek' needs num_frames > 0 or fps"):
        read_video(path, FrameSpec(kind="pts_seek"), 0, max_frames=4)
    with pytest.raises(TlvrError, match="not both"):
        read_video(path, FrameSpec(kind="pts_seek"), 8, fps=1.0)
    for spec in [FrameSpec(kind="midpoints"), FrameSpec(kind="uniform", bound=(0.0, 1.0))]:
        with pytest.raises(TlvrError, match="fps and max_frames apply to uniform"):
            read_video(path, spec, fps=1.0)
        with pytest.raises(TlvrError, match="needs num_frames > 0"):
            read_video(path, spec, 0)
