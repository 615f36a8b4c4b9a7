"""Metrics: one JSON line per logged step (namespaced keys), optional TensorBoard, PNG curves."""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..files import write_text_atomic


class MetricsLogger:
    """Appends ``{"step": N, ...}`` lines to ``metrics.jsonl`` and flushes each one.

    On resume the file is truncated to the steps before the resumed step, so the log of a resumed
    run equals the log of an uninterrupted one.
    """

    def __init__(self, run_dir: Path, *, resume_step: int | None = None, tensorboard: bool = False, enabled: bool = True) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keep: list[str] = []
        if resume_step is not None and self.path.exists():
            keep = [line for line in self.path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= resume_step]
        write_text_atomic(self.path, "".join(line + "\n" for line in keep))
        self.file = self.path.open("a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError("output.tensorboard needs the tensorboard package: pip install tensorboard") from e
            self.tb = SummaryWriter(str(self.path.parent / "tensorboard"))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_metrics(metrics_path: Path, out_png: Path, keys: Sequence[str], title: str = "") -> Path:
    """Write one PNG with a panel per key present in the metrics file (atomic)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    keys = [k for k in keys if any(k in r and r[k] is not None for r in rows)]
    if not keys:
        raise ValueError(f"{metrics_path}: none of {list(keys)} was logged")
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.2 * len(keys)), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        xs, ys = zip(*pts)
        ax.plot(xs, ys, lw=1.0, color="#3b6ea5")
        if len(ys) >= 8:
            w = max(2, len(ys) // 10)
            smooth = [sum(ys[max(0, i - w + 1): i + 1]) / len(ys[max(0, i - w + 1): i + 1]) for i in range(len(ys))]
            ax.plot(xs, smooth, lw=2.0, color="#d0572b")
        ax.set_ylabel(key, fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_png = Path(out_png)
    tmp = out_png.with_name(out_png.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out_png)
    return out_png


RUN_CURVES = ("reward", "rewards/*", "completion_length", "kl", "train/loss", "train/grad_norm", "train/lr")


def plot_run(run_dir: Path, name: str = "curves.png", title: str | None = None) -> Path | None:
    """The PNG of a run's training curves (GRPO: reward, each reward function, length, KL; cold start:
    loss, gradient norm, learning rate), from the metrics it logged."""
    metrics = Path(run_dir) / "metrics.jsonl"
    logged = {k for row in read_metrics(metrics) for k in row}
    if not logged:  # e.g. a finished run resumed into a fresh directory logs no step: nothing to draw, not an error
        warnings.warn(f"{metrics}: no metrics logged, so no curves plotted", stacklevel=2)
        return None
    keys = [k for pattern in RUN_CURVES for k in (sorted(x for x in logged if x.startswith(pattern[:-1]))
                                                    if pattern.endswith("*") else [pattern])]
    return plot_metrics(metrics, Path(run_dir) / name, keys, title=Path(run_dir).name if title is None else title)
