"""Damaged videos: decoder libraries stay off the terminal, and cut files say how much they hold."""

from __future__ import annotations

import logging
from pathlib import Path

import av
import av.logging
import pytest
from videos import band_ids, write_video

from tlvr_cli.video.decode import FrameSpec, VideoError, read_frames, read_video

BACKENDS = ["auto", "decord", "pyav"]


def first_bytes(path: Path, size: int, out: Path) -> Path:
    out.write_bytes(path.read_bytes()[:size])
    return out


@pytest.fixture(scope="module")
def damaged(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("damaged")
    regular = write_video(folder / "regular.mp4", 30, codec="mpeg4", options={"g": "5"})  # index at the end
    faststart = write_video(folder / "faststart.mp4", 30, codec="mpeg4", options={"g": "5"}, movflags="faststart")
    data = faststart.read_bytes()
    (folder / "headers_only.mp4").write_bytes(data[: data.index(b"mdat") + 4])
    (folder / "garbage.mp4").write_bytes(b"this is not a video\n" * 200)
    return {
        "garbage": folder / "garbage.mp4",
        "no_index": first_bytes(regular, 5000, folder / "no_index.mp4"),  # "moov atom not found"
        "headers_only": folder / "headers_only.mp4",
        "first_5kb": first_bytes(faststart, 5000, folder / "first_5kb.mp4"),  # index, then a few frames
    }


def read_quietly(path: Path, kind: str, backend: str) -> str:
    """Read one video; return the error kind, or "ok"."""
    try:
        read_video(path, FrameSpec(kind=kind), 8, backend=backend)
    except VideoError as err:
        assert "\n" not in str(err)
        return err.kind
    return "ok"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["uniform", "midpoints"])
def test_damaged_files_print_nothing(damaged, capfd, backend, kind):
    kinds = {name: read_quietly(path, kind, backend) for name, path in damaged.items()}
    assert kinds["garbage"] == kinds["no_index"] == "unreadable"
    assert kinds["headers_only"] in ("zero_frames", "unreadable")
    assert kinds["first_5kb"] == ("unreadable" if backend == "decord" else "ok")  # decord refuses cut files
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""


def test_damaged_files_print_nothing_pts_seek(damaged, capfd):
    kinds = {name: read_quietly(path, "pts_seek", "pyav") for name, path in damaged.items()}
    assert kinds["garbage"] == kinds["no_index"] == "unreadable"
    assert capfd.readouterr().err == ""


def test_ffmpeg_logs_go_to_the_tlvr_logger(damaged, capfd, caplog):
    previous = av.logging.get_level()
    av.logging.set_level(av.logging.VERBOSE)  # an application that turned PyAV's ffmpeg logging on
    try:
        caplog.set_level(logging.DEBUG, logger="tlvr.video")
        with pytest.raises(VideoError) as err:
            read_frames(damaged["no_index"], 8, backend="pyav")
    finally:
        av.logging.set_level(previous)
    assert err.value.kind == "unreadable"
    ffmpeg = [r for r in caplog.records if r.name == "tlvr.video" and "moov atom not found" in r.getMessage()]
    assert ffmpeg and all(r.levelno == logging.DEBUG for r in ffmpeg)
    assert capfd.readouterr().err == ""


# ----------------------------------------------------------------------------- distinct frames


@pytest.mark.parametrize("backend", ["auto", "pyav"])
def test_cut_file_has_fewer_distinct_frames(damaged, backend):
    got = read_frames(damaged["first_5kb"], 16, backend=backend)
    assert len(got.frames) == len(got.indices) == 16
    assert got.distinct == got.total == len(set(got.indices)) < 16  # only the frames before the cut
    whole = [(band, i) for band, i in zip(band_ids(got), got.indices) if i < got.total - 1]
    assert [band for band, _ in whole] == [i for _, i in whole]  # the last frame is partly cut off


def test_distinct_on_whole_videos(tmp_path):
    path = write_video(tmp_path / "clip.mp4", 30, codec="mpeg4", options={"g": "5"})
    assert read_frames(path, 16).distinct == 16
    assert read_frames(path, 40).distinct == 30  # more rows than frames: every frame once, some twice
    assert read_video(path, FrameSpec(kind="pts_seek"), 40).distinct == 30
    short = write_video(tmp_path / "short.mp4", 4, codec="mpeg4")
    assert read_frames(short, 16, backend="pyav").distinct == 4
