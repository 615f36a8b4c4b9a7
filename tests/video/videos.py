"""Synthetic videos for the decoder tests, written with PyAV.

Frame ``i`` shows a seeded noise texture shifted by ``i`` pixels (so inter-coded frames carry real
motion) under a flat band of grey level ``10 + 8 i`` that survives lossy coding and names the frame.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tlvr_cli.video.frames import Frames

HEIGHT, WIDTH, BAND_ROWS, FPS = 48, 64, 16, 8


def band_level(i: int) -> int:
    return 10 + 8 * i


def write_video(path: Path, n: int = 30, *, codec: str = "libx264", options: dict[str, str] | None = None,
                fps: int = FPS, movflags: str | None = None) -> Path:
    """Write ``n`` frames (n <= 30 keeps the band levels apart); ``options`` go to the encoder."""
    import av

    rng = np.random.default_rng(0)
    texture = rng.integers(0, 256, (HEIGHT, WIDTH + n, 3), dtype=np.uint8)
    defaults = {"crf": "8"} if codec.startswith("lib") else {"qscale": "2"}
    with av.open(str(path), "w", options={"movflags": movflags} if movflags else {}) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.options = {**defaults, **(options or {})}
        for i in range(n):
            picture = np.ascontiguousarray(texture[:, i:i + WIDTH])
            picture[:BAND_ROWS] = band_level(i)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
        out.mux(stream.encode())
    return path


def band_ids(frames: Frames) -> list[int]:
    """Which frame each decoded row shows, read back from its band."""
    band = frames.frames[:, 2:BAND_ROWS - 2].reshape(len(frames.frames), -1).mean(axis=1)
    return [int(round((level - 10) / 8)) for level in band]
