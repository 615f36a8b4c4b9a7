"""Per-frame image preprocessing for the SigLIP tower (spec §1.3), in two halves: the resize
(``resize_frames``: PIL bicubic on uint8, on the host) and the rescale and normalisation
(``normalize_frames``: a lookup of each uint8 level, on any device). A decoder process can hand the
resized uint8 frames over (a quarter of the float32 bytes) and the GPU normalises them."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

# spec §1.3: SigLIP normalises with mean = std = 0.5, mapping [0, 1] onto [-1, 1].
IMAGE_MEAN = 0.5
IMAGE_STD = 0.5


def _levels() -> np.ndarray:
    """The normalised value of every uint8 level, computed as the HF processor computes each pixel:
    rescaled in float64, cast to float32, then ``(x - mean) / std`` in float32. A pixel's value depends
    on its level alone, so looking it up here gives the processor's result to the last bit."""
    x = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
    return (x - IMAGE_MEAN) / IMAGE_STD


LEVELS = _levels()


@functools.cache
def _levels_on(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``LEVELS`` on ``device`` in ``dtype``, copied there once (a copy per call would be a pageable one)."""
    return torch.from_numpy(LEVELS).to(device=device, dtype=dtype)


def _to_pil(frame) -> Image.Image:
    if isinstance(frame, Image.Image):
        return frame.convert("RGB")
    arr = np.asarray(frame)
    if arr.dtype != np.uint8:
        # Float frames in [0, 255] (decord tensors) become uint8 the same way the HF resize does.
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"expected an HxWx3 RGB frame, got shape {arr.shape}")
    return Image.fromarray(arr)


def resize_frames(frames: np.ndarray | Sequence, size: int = 384) -> torch.Tensor:
    """uint8 RGB frames (T,H,W,3) or PIL images -> uint8 (T, size, size, 3): spec §1.3's resize,
    squashed to size x size (aspect ratio not kept), PIL bicubic on uint8, no crop."""
    out = np.empty((len(frames), size, size, 3), dtype=np.uint8)
    for i, frame in enumerate(frames):
        out[i] = np.asarray(_to_pil(frame).resize((size, size), resample=Image.BICUBIC))
    return torch.from_numpy(out)


def normalize_frames(resized: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Resized uint8 frames (T, S, S, 3) -> (T, 3, S, S) in [-1, 1], in ``dtype``, on their device: each
    level looked up in ``LEVELS`` (the processor's float32 value, rounded once to ``dtype``)."""
    if resized.device.type == "cpu":  # numpy's lookup: a few times torch's on the host
        return torch.from_numpy(LEVELS[np.ascontiguousarray(resized.numpy().transpose(0, 3, 1, 2))]).to(dtype)
    t, h, w, c = resized.shape
    index = resized.permute(0, 3, 1, 2).reshape(-1).int()
    return _levels_on(resized.device, dtype).index_select(0, index).view(t, c, h, w)


def preprocess_frames(frames: np.ndarray | Sequence, size: int = 384) -> torch.Tensor:
    """uint8 RGB frames (T,H,W,3) or PIL images -> float32 (T, 3, size, size) in [-1, 1]."""
    return normalize_frames(resize_frames(frames, size))
