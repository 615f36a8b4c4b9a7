"""A random-init checkpoint in the released layout, for the start-up and inference benchmarks.

``3b`` has the released model's shapes (Qwen2.5-3B + SigLIP-so400m at 384 px, 512 visual tokens:
3.6 B parameters, 7.2 GB in bf16) with the embedded tiny tokenizer; ``tiny`` is the embedded tiny
model. A directory that already holds the checkpoint is reused, so repeated runs read it from the
file cache as a user's second command does.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_grpo_step import build  # noqa: E402

from tlvr_cli.model.checkpoint import save_model  # noqa: E402


def random_checkpoint(out: Path, config: str, device: str, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write (or reuse) the ``config`` model, seeded, at ``out``; initialised on ``device`` (fast on a GPU)."""
    if (out / "config.json").exists():
        return out
    t = time.perf_counter()
    torch.manual_seed(0)
    model = build(config, torch.device(device), dtype)
    save_model(model, out, dtype=dtype)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    print(f"wrote the {config} random-init checkpoint to {out} in {time.perf_counter() - t:.1f} s", flush=True)
    return out


def repo_env() -> dict[str, str]:
    """The environment for a child process that imports this checkout's ``tlvr_cli``."""
    import os

    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env
