"""Job-config keys with behaviour of their own: the frame-rate mode (video.fps / video.max_frames)."""

from __future__ import annotations

import numpy as np
import pytest

from tlvr_cli.config import load_config
from tlvr_cli.errors import TlvrError
from tlvr_cli.infer import answer_question
from tlvr_cli.jobs import EvalConfig, InferConfig, VideoConfig
from tlvr_cli.video.decode import FrameSpec, read_frames, read_video


def reference_eval_indices(total: int, video_fps: float, max_frame: int) -> list[int]:
    """The reference evaluators' "1 fps" rule (spec §2.A): num_frame -1 → min(max_frame, max(1, int(duration)))
    frames, linspace over every frame."""
    count = min(max_frame, max(1, int(total / video_fps)))
    return np.linspace(0, total - 1, count, dtype=int).tolist()


def test_frame_args_modes():
    assert VideoConfig().frame_args() == {"num_frames": 16}
    assert VideoConfig(fps=1.0, max_frames=16).frame_args() == {"fps": 1.0, "max_frames": 16}
    assert VideoConfig(fps=2.0).frame_args() == {"fps": 2.0, "max_frames": None}  # no cap (the SFT data set)
    with pytest.raises(TlvrError, match="video.max_frames=8 caps the frame-rate mode"):
        VideoConfig(max_frames=8).frame_args()
    fps = VideoConfig(fps=1.0, max_frames=4)
    # paths A (unbounded) and B sample at the frame rate; MVBench's fixed-count readers keep num_frames
    rate = {"fps": 1.0, "max_frames": 4}
    assert fps.frame_args(FrameSpec("uniform")) == fps.frame_args(FrameSpec("pts_seek")) == rate
    for spec in (FrameSpec("midpoints"), FrameSpec("folder"), FrameSpec("uniform", bound=(0.0, 1.0))):
        assert fps.frame_args(spec) == {"num_frames": 16}
    with pytest.raises(TlvrError, match="video.fps"):
        load_config(EvalConfig, None, ["video.fps=-1"])


@pytest.mark.parametrize("n,video_fps,cap", [(20, 4, 3), (20, 4, 16), (9, 8, 16), (40, 2, 7)])
def test_frame_rate_mode_matches_the_reference_formula(make_video, n, video_fps, cap):
    video = make_video(f"v{n}_{video_fps}.mp4", n=n, fps=video_fps)
    args = VideoConfig(fps=1.0, max_frames=cap).frame_args()
    expected = reference_eval_indices(n, video_fps, cap)
    assert read_frames(video, **args, backend="pyav").indices == expected
    assert read_video(video, FrameSpec("uniform"), **args).indices == expected


def test_infer_samples_at_the_frame_rate(make_video, tiny_model):
    video = make_video(n=20, fps=4)  # 5 s: 5 frames at 1 fps, capped at 3
    cfg = load_config(InferConfig, "tiny", ["sampling.max_new_tokens=2", "video.fps=1.0", "video.max_frames=3"])
    got = answer_question(cfg, video, "What color?", model=tiny_model).frame_indices
    assert got == reference_eval_indices(20, 4, 3)
