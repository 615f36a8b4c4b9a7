"""Shared fixtures: the embedded tiny model and tokenizer, and synthetic videos written with PyAV."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one thread is fastest and does not stall when other work shares the CPU."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def hub_online(monkeypatch) -> None:
    """The hub's offline switch off (the environment variable and the value huggingface_hub read at import)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)


@pytest.fixture()
def refused_endpoint(hub_online) -> str:
    """A local URL nobody listens on (the connection is refused at once), with the hub's offline switch off."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from tlvr_cli.model.tiny import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture()
def tiny_model():
    from tlvr_cli.model.tiny import build_tiny_model

    return build_tiny_model(seed=0).eval()


def write_video(path: Path, frames: np.ndarray, fps: int = 8) -> Path:
    """Write uint8 (T, H, W, 3) frames as an mpeg4 .mp4 (every frame a keyframe-friendly GOP)."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"qscale": "2"}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


@pytest.fixture()
def make_video(tmp_path):
    """``make_video(name, n=20, size=(32, 48))``: frame i is a flat grey of level 10·i."""

    def make(name: str = "v.mp4", n: int = 20, size: tuple[int, int] = (32, 48), fps: int = 8) -> Path:
        frames = np.stack([np.full((size[0], size[1], 3), min(255, 10 * i), dtype=np.uint8) for i in range(n)])
        return write_video(tmp_path / name, frames, fps)

    return make
