"""Run checkpoints: one directory per step with everything needed to resume exactly.

``<run_dir>/checkpoints/step-000040/`` holds the model in the released layout (loadable by
``tlvr infer`` and by the reference code), ``trainer_state.pt`` (optimizer, scheduler, RNG states,
data cursor, step) and the resolved ``config.yaml``. Directories are written under a temporary
name and renamed, so a crash never leaves a half checkpoint that ``--resume auto`` would pick.
"""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import TlvrError

STATE_FILE = "trainer_state.pt"


@dataclass
class DataCursor:
    """Where the data order stands: epoch, position in that epoch's permutation, and the seed."""

    epoch: int = 0
    position: int = 0
    seed: int = 0


@dataclass
class TrainState:
    step: int = 0
    cursor: DataCursor = field(default_factory=DataCursor)
    extra: dict = field(default_factory=dict)


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The sample order of one epoch: a seeded permutation, reproducible on resume."""
    if not shuffle:
        return list(range(n))
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:06d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp") and (p / STATE_FILE).exists()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def resolve_resume(run_dir: Path, resume: str | None) -> Path | None:
    """``None``/'' → start fresh; 'auto' → the latest checkpoint if any; else an explicit directory."""
    if not resume:
        return None
    if resume == "auto":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).exists():
        raise TlvrError(f"--resume {resume}: not a checkpoint directory (no {STATE_FILE})")
    return path


def save_checkpoint(
    run_dir: Path,
    state: TrainState,
    model: torch.nn.Module,
    optimizer_state: dict,
    scheduler: Any,
    config_yaml: str,
    *,
    keep_last: int = 2,
    weights: dict[str, torch.Tensor] | None = None,
    weights_dtype: torch.dtype | None = None,
) -> Path:
    """Write ``step-N`` atomically and prune older step checkpoints beyond ``keep_last``.

    The model goes out in the released layout (``weights`` when given, e.g. gathered from shards,
    else ``model``'s own state, rounded to ``weights_dtype`` when given); ``optimizer_state`` is
    the layout-tagged dict ``Parallel.save_checkpoint`` builds."""
    from ..model.checkpoint import save_model

    final = checkpoint_dir(run_dir, state.step)
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, tmp, state=weights, dtype=weights_dtype)
    payload = {
        "step": state.step,
        "cursor": state.cursor.__dict__,
        "extra": state.extra,
        "optimizer": optimizer_state,
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
    }
    torch.save(payload, tmp / STATE_FILE)
    (tmp / "config.yaml").write_text(config_yaml)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    if keep_last > 0:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def read_trainer_state(ckpt: Path) -> dict:
    """The ``trainer_state.pt`` payload of a checkpoint directory (on CPU)."""
    return torch.load(Path(ckpt) / STATE_FILE, map_location="cpu", weights_only=False)


def restore_trainer_state(payload: dict, scheduler: Any) -> TrainState:
    """Restore the scheduler and RNG from a ``trainer_state.pt`` payload; the caller restores
    weights and optimizer (their layout depends on ``dist.strategy``)."""
    scheduler.load_state_dict(payload["scheduler"])
    set_rng_state(payload["rng"])
    return TrainState(step=payload["step"], cursor=DataCursor(**payload["cursor"]), extra=payload.get("extra", {}))
