"""Video decoding paths A-D and SigLIP preprocessing, on small synthetic videos written with PyAV."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tlvr_cli.errors import TlvrError
from tlvr_cli.video.decode import (
    Frames,
    FrameSpec,
    VideoError,
    one_fps_count,
    read_frames,
    read_video,
    sample_frame_indices,
    segment_midpoint_indices,
)
from tlvr_cli.video.preprocess import normalize_frames, preprocess_frames, resize_frames

NUM_FRAMES, HEIGHT, WIDTH, FPS = 20, 48, 32, 8
BACKENDS = ["decord", "pyav"]


def frame_level(i: int) -> int:
    """Red intensity that identifies frame ``i`` (12 levels apart survives lossy coding)."""
    return 10 + 12 * i


def synthetic_frames(n: int = NUM_FRAMES) -> np.ndarray:
    frames = np.zeros((n, HEIGHT, WIDTH, 3), dtype=np.uint8)
    for i in range(n):
        frames[i, ..., 0] = frame_level(i)
        frames[i, ..., 1] = 255 - frame_level(i)
        frames[i, ..., 2] = 128
    return frames


def write_video(path: Path, frames: np.ndarray, fps: int = FPS, codec: str = "mpeg4") -> Path:
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        # A keyframe every 5 frames, so seeking is exercised; x264 also reorders with B-frames.
        stream.options = {"qscale": "2", "g": "5"} if codec == "mpeg4" else {"crf": "10", "g": "5", "bf": "2"}
        for f in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(stream.encode())
    return path


def decoded_ids(frames: Frames) -> list[int]:
    """Which synthetic frame each decoded row shows, read back from its red level."""
    red = frames.frames[..., 0].reshape(len(frames.frames), -1).mean(axis=1)
    return [int(round((r - 10) / 12)) for r in red]


@pytest.fixture(scope="module")
def mp4(tmp_path_factory) -> Path:
    return write_video(tmp_path_factory.mktemp("video") / "clip.mp4", synthetic_frames())


@pytest.fixture(scope="module")
def mkv(tmp_path_factory) -> Path:
    # Matroska stores no frame count, so PyAV must count by decoding.
    return write_video(tmp_path_factory.mktemp("video") / "clip.mkv", synthetic_frames())


# ----------------------------------------------------------------------------- index rules


def test_linspace_indices_match_reference():
    assert sample_frame_indices(100, 16) == [0, 6, 13, 19, 26, 33, 39, 46, 52, 59, 66, 72, 79, 85, 92, 99]
    assert sample_frame_indices(5, 8) == [0, 0, 1, 1, 2, 2, 3, 4]  # duplicates kept
    assert sample_frame_indices(1, 3) == [0, 0, 0]
    with pytest.raises(ValueError):
        sample_frame_indices(10, 0)


def test_one_fps_count():
    assert one_fps_count(12.9, 16) == 12
    assert one_fps_count(40.0, 16) == 16
    assert one_fps_count(0.3, 16) == 1
    assert one_fps_count(40.0, None) == 40


def test_segment_midpoints():
    assert segment_midpoint_indices(0, 19, 4) == [2, 7, 12, 16]
    assert segment_midpoint_indices(4, 16, 4) == [5, 8, 11, 14]


# ----------------------------------------------------------------------------- path A


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_frames_uniform(mp4, backend):
    got = read_frames(mp4, 8, backend=backend)
    expected = [0, 2, 5, 8, 10, 13, 16, 19]
    assert got.indices == expected
    assert got.frames.dtype == np.uint8 and got.frames.shape == (8, HEIGHT, WIDTH, 3)
    assert got.total == NUM_FRAMES and got.fps == pytest.approx(FPS)
    assert decoded_ids(got) == expected
    assert np.abs(got.frames.astype(int) - synthetic_frames()[expected].astype(int)).mean() < 4


def test_read_frames_pyav_counts_frames_without_metadata(mkv):
    got = read_frames(mkv, 4, backend="pyav")
    assert got.total == NUM_FRAMES
    assert got.indices == decoded_ids(got) == [0, 6, 12, 19]


def test_read_frames_more_frames_than_video(mp4):
    got = read_frames(mp4, 32, backend="pyav")
    assert len(got.frames) == 32 and decoded_ids(got) == got.indices == sample_frame_indices(20, 32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_file(tmp_path, backend):
    with pytest.raises(VideoError) as err:
        read_frames(tmp_path / "nope.mp4", 4, backend=backend)
    assert err.value.kind == "missing" and isinstance(err.value, TlvrError)
    assert str(err.value) == f"{tmp_path / 'nope.mp4'}: missing: no such file or directory"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["uniform", "midpoints"])
def test_garbage_file_is_unreadable(tmp_path, backend, kind):
    path = tmp_path / "garbage.mp4"
    path.write_bytes(b"this is not a video\n" * 200)
    with pytest.raises(VideoError) as err:
        read_video(path, FrameSpec(kind=kind), 4, backend=backend)
    assert err.value.kind == "unreadable" and "\n" not in str(err.value)


def test_garbage_file_pts_seek(tmp_path):
    path = tmp_path / "garbage.mkv"
    path.write_bytes(bytes(range(256)) * 40)
    with pytest.raises(VideoError) as err:
        read_video(path, FrameSpec(kind="pts_seek"), 4)
    assert err.value.kind == "unreadable"


def test_unknown_backend_and_kind(mp4):
    with pytest.raises(TlvrError):
        read_frames(mp4, 4, backend="opencv")
    with pytest.raises(TlvrError):
        read_video(mp4, FrameSpec(kind="random"), 4)


# ----------------------------------------------------------------------------- path B


def test_pts_seek_constant_fps(mp4):
    got = read_video(mp4, FrameSpec(kind="pts_seek"), 8)
    assert got.indices == decoded_ids(got) == [0, 2, 5, 8, 10, 13, 16, 19]
    assert got.total == NUM_FRAMES and got.frames.dtype == np.uint8


@pytest.mark.skipif("libx264" not in __import__("av").codecs_available, reason="no libx264")
@pytest.mark.parametrize("kind", ["uniform", "pts_seek"])
def test_b_frame_video(tmp_path, kind):
    path = write_video(tmp_path / "x264.mp4", synthetic_frames(), codec="libx264")
    got = read_video(path, FrameSpec(kind=kind), 8, backend="pyav")
    assert got.indices == decoded_ids(got) == [0, 2, 5, 8, 10, 13, 16, 19]


def test_one_fps_mode(mp4):
    got = read_frames(mp4, 0, backend="pyav")  # 20 frames at 8 fps = 2.5 s -> 2 frames
    assert got.indices == decoded_ids(got) == [0, 19]
    with pytest.raises(TlvrError):
        read_video(mp4, FrameSpec(kind="pts_seek"), 0)


def test_pts_seek_drops_duplicate_indices(mp4):
    got = read_video(mp4, FrameSpec(kind="pts_seek"), 32)
    unique = sorted(set(sample_frame_indices(NUM_FRAMES, 32)))
    assert got.indices == decoded_ids(got) == unique  # fewer than 32 frames come back


def test_pts_seek_without_frame_count_falls_back_to_sequential(mkv):
    got = read_video(mkv, FrameSpec(kind="pts_seek"), 4)
    assert got.indices == decoded_ids(got) == [0, 6, 12, 19]


# ----------------------------------------------------------------------------- path C


@pytest.mark.parametrize("backend", BACKENDS)
def test_midpoints_whole_video(mp4, backend):
    got = read_video(mp4, FrameSpec(kind="midpoints"), 4, backend=backend)
    assert got.indices == decoded_ids(got) == [2, 7, 12, 16]


@pytest.mark.parametrize("backend", BACKENDS)
def test_midpoints_with_bound(mp4, backend):
    # bound 0.5-2.0 s at 8 fps -> frames 4..16, four segments of 3 frames.
    got = read_video(mp4, FrameSpec(kind="midpoints", bound=(0.5, 2.0)), 4, backend=backend)
    assert got.indices == decoded_ids(got) == [5, 8, 11, 14]


def test_midpoints_bound_past_the_end(mp4):
    with pytest.raises(VideoError) as err:
        read_video(mp4, FrameSpec(kind="midpoints", bound=(30.0, 40.0)), 4)
    assert err.value.kind == "too_short"


# ----------------------------------------------------------------------------- path D


@pytest.fixture()
def jpeg_folder(tmp_path) -> Path:
    folder = tmp_path / "frames"
    folder.mkdir()
    for k in range(1, 31):  # 10 s at 3 fps, files numbered from 1
        img = np.full((HEIGHT, WIDTH, 3), (8 * k, 255 - 8 * k, 60), dtype=np.uint8)
        Image.fromarray(img).save(folder / f"{k:05d}.jpg", quality=95)
    (folder / "notes.txt").write_text("ignored")
    return folder


def folder_ids(frames: Frames) -> list[int]:
    return [int(round(r / 8)) for r in frames.frames[..., 0].reshape(len(frames.frames), -1).mean(axis=1)]


def test_folder_with_bound(jpeg_folder):
    got = read_video(jpeg_folder, FrameSpec(kind="folder", bound=(2.0, 8.0)), 6)
    # start = max(1, round(2*3)) = 6, end = min(round(8*3), 30) = 24, segments of 3.
    assert got.indices == folder_ids(got) == [7, 10, 13, 16, 19, 22]
    assert got.total == 30 and got.fps == 3.0
    assert got.frames.dtype == np.uint8 and got.frames.shape == (6, HEIGHT, WIDTH, 3)


def test_folder_without_bound(jpeg_folder):
    got = read_video(jpeg_folder, FrameSpec(kind="folder"), 4)
    assert got.indices == folder_ids(got) == segment_midpoint_indices(1, 30, 4)


def test_folder_errors(tmp_path):
    with pytest.raises(VideoError) as err:
        read_video(tmp_path / "absent", FrameSpec(kind="folder"), 4)
    assert err.value.kind == "missing"
    (tmp_path / "empty").mkdir()
    with pytest.raises(VideoError) as err:
        read_video(tmp_path / "empty", FrameSpec(kind="folder"), 4)
    assert err.value.kind == "zero_frames"


# ----------------------------------------------------------------------------- preprocessing


def test_preprocess_shape_and_range():
    frames = np.random.default_rng(0).integers(0, 256, size=(3, 20, 30, 3), dtype=np.uint8)
    out = preprocess_frames(frames, size=16)
    assert out.shape == (3, 3, 16, 16) and out.dtype == torch.float32
    assert out.min() >= -1.0 and out.max() <= 1.0


def test_preprocess_black_and_white():
    frames = np.stack([np.zeros((10, 14, 3), np.uint8), np.full((10, 14, 3), 255, np.uint8)])
    out = preprocess_frames(frames, size=8)
    assert torch.all(out[0] == -1.0) and torch.all(out[1] == 1.0)


def test_preprocess_squashes_non_square_frames():
    frame = np.zeros((10, 40, 3), np.uint8)
    frame[:, 20:] = 255  # right half white
    out = preprocess_frames(frame[None], size=8)[0]
    assert torch.allclose(out[:, :, :3], torch.tensor(-1.0), atol=0.05)  # no crop, no padding
    assert torch.allclose(out[:, :, 5:], torch.tensor(1.0), atol=0.05)
    expected = np.asarray(Image.fromarray(frame).resize((8, 8), Image.BICUBIC), np.float32) / 255
    assert torch.allclose(out.permute(1, 2, 0), torch.from_numpy((expected - 0.5) / 0.5), atol=1e-6)


def test_preprocess_accepts_pil_and_array_lists():
    frames = np.random.default_rng(1).integers(0, 256, size=(2, 12, 9, 3), dtype=np.uint8)
    base = preprocess_frames(frames, size=6)
    assert torch.equal(preprocess_frames([Image.fromarray(f) for f in frames], size=6), base)
    assert torch.equal(preprocess_frames(list(frames), size=6), base)


@pytest.mark.parametrize("size", [24, 7])  # upscaled and downscaled (PIL's bicubic antialiases down)
def test_preprocess_equals_the_hf_siglip_processor_bit_for_bit(size):
    from transformers import SiglipImageProcessor

    processor = SiglipImageProcessor(size={"height": size, "width": size})
    frames = np.random.default_rng(2).integers(0, 256, size=(3, 17, 13, 3), dtype=np.uint8)
    frames[0, 0, 0] = (0, 128, 255)
    expected = processor(images=list(frames), return_tensors="pt")["pixel_values"]
    out = preprocess_frames(frames, size=size)
    assert out.is_contiguous() and torch.equal(out, expected)


def test_resize_then_normalize_is_preprocess_in_any_dtype():
    frames = np.random.default_rng(3).integers(0, 256, size=(2, 11, 19, 3), dtype=np.uint8)
    resized = resize_frames(frames, size=9)
    assert resized.dtype == torch.uint8 and resized.shape == (2, 9, 9, 3)
    full = preprocess_frames(frames, size=9)
    assert torch.equal(normalize_frames(resized), full)
    # one rounding of the float32 value, as casting the float32 pixels rounds them
    assert torch.equal(normalize_frames(resized, torch.bfloat16), full.to(torch.bfloat16))
    assert resize_frames([], size=9).shape == (0, 9, 9, 3) and preprocess_frames([], size=9).shape == (0, 3, 9, 9)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_normalize_on_the_gpu_equals_the_host():
    resized = resize_frames(np.random.default_rng(4).integers(0, 256, size=(4, 30, 50, 3), dtype=np.uint8), 16)
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(normalize_frames(resized.cuda(), dtype).cpu(), normalize_frames(resized, dtype))


# ----------------------------------------------------------------------------- edge cases


def test_video_without_frames(tmp_path):
    import av

    path = tmp_path / "headers_only.mp4"
    with av.open(str(path), "w", options={"movflags": "faststart"}) as out:  # index before data
        stream = out.add_stream("mpeg4", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for f in synthetic_frames(4):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(stream.encode())
    data = path.read_bytes()
    path.write_bytes(data[: data.index(b"mdat") + 4])  # metadata claims 4 frames; none decode
    for kind in ["uniform", "midpoints", "pts_seek"]:
        with pytest.raises(VideoError) as err:
            read_video(path, FrameSpec(kind=kind), 4, backend="pyav")
        assert err.value.kind == "zero_frames"


def test_auto_backend_falls_back_to_pyav(mp4, monkeypatch):
    from tlvr_cli.video import decode

    def broken(path, choose):
        raise VideoError(path, "unreadable", "decord cannot read this file")

    monkeypatch.setattr(decode, "_decord_read", broken)
    assert decoded_ids(read_frames(mp4, 4, backend="auto")) == [0, 6, 12, 19]
    with pytest.raises(VideoError):
        read_frames(mp4, 4, backend="decord")


def test_decord_bridge_left_alone(mp4):
    import decord

    read_frames(mp4, 2, backend="decord")
    assert isinstance(decord.VideoReader(str(mp4), num_threads=1)[0], decord.nd.NDArray)


def test_auto_reads_sizes_decord_rejects(tmp_path):
    # decord 0.6 fails on some small frame sizes (32x48 among them); "auto" still returns frames.
    frames = np.stack([np.full((32, 48, 3), frame_level(i), np.uint8) for i in range(NUM_FRAMES)])
    path = write_video(tmp_path / "wide.mp4", frames)
    got = read_frames(path, 4)
    assert got.frames.shape == (4, 32, 48, 3) and decoded_ids(got) == got.indices == [0, 6, 12, 19]


def test_uniform_with_bound_samples_inside_the_bound(tmp_path):
    from tlvr_cli.video.decode import FrameSpec, read_video

    frames = np.stack([np.full((32, 48, 3), 8 * i, dtype=np.uint8) for i in range(24)])
    path = tmp_path / "b.mp4"
    import av

    with av.open(str(path), "w") as out:
        st = out.add_stream("mpeg4", rate=8)
        st.width, st.height, st.pix_fmt = 48, 32, "yuv420p"
        for f in frames:
            for p in st.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(p)
        for p in st.encode():
            out.mux(p)
    got = read_video(path, FrameSpec(kind="uniform", bound=(1.0, 2.0)), 4, backend="pyav")
    assert got.indices == [8, 10, 13, 16]
