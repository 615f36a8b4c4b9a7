"""Per-frame image preprocessing for the SigLIP tower (spec §1.3)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

# spec §1.3: SigLIP normalises with mean = std = 0.5, mapping [0, 1] onto [-1, 1].
IMAGE_MEAN = 0.5
IMAGE_STD = 0.5


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


def preprocess_frames(frames: np.ndarray | Sequence, size: int = 384) -> torch.Tensor:
    """uint8 RGB frames (T,H,W,3) or PIL images -> float32 (T, 3, size, size) in [-1, 1]."""
    out = []
    for frame in frames:
        # spec §1.3: squash to size x size (aspect ratio not kept), PIL bicubic on uint8, no crop.
        resized = _to_pil(frame).resize((size, size), resample=Image.BICUBIC)
        # Rescale in float64 then cast, as the HF processor does, so values match to the last bit.
        x = (np.asarray(resized, dtype=np.float64) * (1 / 255)).astype(np.float32)
        out.append((x - IMAGE_MEAN) / IMAGE_STD)
    if not out:
        return torch.empty((0, 3, size, size), dtype=torch.float32)
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()
