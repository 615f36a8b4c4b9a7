"""Metrics: one JSON line per logged step (namespaced keys), sample completions, PNG curves, and the
experiment trackers (``trackers``) that receive the same values."""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from ..files import write_text_atomic
from .trackers import Tracker


class MetricsLogger:
    """Appends ``{"step": N, ...}`` lines to ``metrics.jsonl`` (and sample completions to
    ``samples.jsonl``), flushing each one, and hands the same values to the open trackers.

    On resume both files are truncated to the steps before the resumed step, so the log of a resumed
    run equals the log of an uninterrupted one. A tracker that raises is reported once through
    ``warn`` and dropped: a tracker never stops training.
    """

    def __init__(self, run_dir: Path, *, resume_step: int | None = None, trackers: Sequence[Tracker] = (),
                 enabled: bool = True, warn: Callable[[str], None] | None = None) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.samples_path = Path(run_dir) / "samples.jsonl"
        self.enabled = enabled
        self.trackers = list(trackers) if enabled else []
        self.warn = warn or print_warning
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _truncate(self.path, resume_step)
        if self.samples_path.exists():
            _truncate(self.samples_path, resume_step)
        self.file = self.path.open("a")
        for tracker in self.trackers:
            if tracker.note:
                _note(tracker.note)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        numbers = {k: v for k, v in row.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        self._each(lambda t: t.log_metrics(step, numbers))

    def log_samples(self, step: int, samples: list[dict]) -> None:
        """One ``samples.jsonl`` line, and the samples as a table (a column per key, ``step`` first)."""
        if not self.enabled:
            return
        with self.samples_path.open("a") as f:
            f.write(json.dumps({"step": step, "samples": samples}) + "\n")
        columns = ["step", *dict.fromkeys(k for s in samples for k in s)]
        rows = [[step, *(_plain(s.get(c)) for c in columns[1:])] for s in samples]
        self._each(lambda t: t.log_table(step, "samples", columns, rows))

    def log_image(self, step: int, key: str, path: Path) -> None:
        if self.enabled:
            self._each(lambda t: t.log_image(step, key, Path(path)))

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self._each(lambda t: t.close())
            self.trackers = []

    def _each(self, call: Callable[[Tracker], None]) -> None:
        for tracker in list(self.trackers):
            try:
                call(tracker)
            except Exception as e:
                self.trackers.remove(tracker)
                self.warn(f"tracker {tracker.name} failed ({type(e).__name__}: {e}); it logs nothing more, "
                          f"training goes on")
                with contextlib.suppress(Exception):  # it already failed; closing may fail too
                    tracker.close()


def _truncate(path: Path, resume_step: int | None) -> None:
    """Keep the lines of steps up to ``resume_step`` (none on a fresh start)."""
    keep: list[str] = []
    if resume_step is not None and path.exists():
        keep = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step]
    write_text_atomic(path, "".join(line + "\n" for line in keep))


def print_warning(message: str) -> None:
    """One yellow warning line on stderr (shown above a running progress bar)."""
    Console(stderr=True, highlight=False).print(f"[yellow]warning:[/] {message}", soft_wrap=True)


def _note(message: str) -> None:
    Console(stderr=True, highlight=False).print(message, soft_wrap=True, markup=False)


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


UNSMOOTHED = ("lr",)  # metric names (after any namespace) plotted without the smoothed line


def running_mean(ys: Sequence[float]) -> list[float]:
    """The trailing mean over a tenth of the points (at least 2): the smoothed line drawn over a curve."""
    w = max(2, len(ys) // 10)
    return [sum(ys[max(0, i - w + 1): i + 1]) / len(ys[max(0, i - w + 1): i + 1]) for i in range(len(ys))]


def moving_mean(key: str, ys: Sequence[float]) -> tuple[list[float], int] | None:
    """The smoothed line drawn over a curve and its window; None for short curves and for schedules
    (the learning rate is exact as logged: a moving mean would only make it lag)."""
    if len(ys) < 8 or key.rsplit("/", 1)[-1] in UNSMOOTHED:
        return None
    return running_mean(ys), max(2, len(ys) // 10)


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
        ax.plot(xs, ys, lw=1.0, color="#3b6ea5", label="logged")
        smooth = moving_mean(key, ys)
        if smooth is not None:
            ax.plot(xs, smooth[0], lw=2.0, color="#d0572b", label=f"mean of the last {smooth[1]}")
            ax.legend(fontsize=7, loc="best")
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


RUN_CURVES = ("reward", "rewards/*", "completion_length", "kl", "reflection/rate", "reflection/think_tokens",
              "reflection/accuracy_*", "dynamic/filtered_fraction", "train/loss", "train/grad_norm", "train/lr")


def plot_run(run_dir: Path, name: str = "curves.png", title: str | None = None) -> Path | None:
    """The PNG of a run's training curves (GRPO: reward, each reward function, length, KL, reflection
    rate, think length and accuracy with/without reflection, filtered groups; cold start: loss,
    gradient norm, learning rate), from the metrics it logged; None when it logged no step."""
    metrics = Path(run_dir) / "metrics.jsonl"
    rows = read_metrics(metrics)
    if not rows:  # e.g. a finished run resumed into a fresh directory logs no step: nothing to draw, not an error
        warnings.warn(f"{metrics}: no metrics logged, so no curves plotted", stacklevel=2)
        return None
    keys = curve_keys(rows)
    return plot_metrics(metrics, Path(run_dir) / name, keys, title=Path(run_dir).name if title is None else title)


def curve_keys(rows: Sequence[dict], patterns: Sequence[str] = RUN_CURVES) -> list[str]:
    """The keys of ``patterns`` the metrics rows hold, in that order, each ``prefix/*`` expanded to the logged keys."""
    logged = {k for row in rows for k, v in row.items() if v is not None}
    return [k for pattern in patterns for k in (sorted(x for x in logged if x.startswith(pattern[:-1]))
                                                if pattern.endswith("*") else [pattern]) if k in logged]
