"""Reading run directories: what a cold-start or GRPO run ended at (the last logged value of each metric,
step time, peak memory), the ``tlvr eval`` results found under it, a table comparing runs and one PNG
overlaying their curves (``tlvr runs compare``)."""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from .errors import TlvrError
from .train.metrics import curve_keys, read_metrics, running_mean

# the metrics a run is summed up by: GRPO's reward, each reward function, length and KL; the cold start's loss
FINAL_METRICS = ("reward", "rewards/*", "completion_length", "kl", "train/loss")


@dataclass
class EvalResult:
    """One results.json written by ``tlvr eval`` (accuracies in percent), with its eval config's settings."""

    label: str  # the results directory, relative to the directory searched
    benchmark: str
    headline: float
    ci95: tuple[float, float]
    n_scored: int
    protocol: str = ""
    mode: str = ""
    duration: str = ""
    model: str = ""  # the eval config's model.path
    reflection_rate: float | None = None

    @property
    def name(self) -> str:
        """The benchmark, with the Video-MME split and the protocol: 'videomme short, greedy'."""
        split = f" {self.duration}" if self.benchmark == "videomme" and self.duration else ""
        return f"{self.benchmark}{split}" + (f", {self.protocol}" if self.protocol else "")

    def score(self) -> str:
        return f"{self.headline:.1f} ({self.ci95[0]:.1f}–{self.ci95[1]:.1f})"


@dataclass
class RunSummary:
    path: Path
    job: str
    steps: int
    final: dict[str, float]  # the last logged value of each FINAL_METRICS key
    step_time_s: float | None  # median over the logged steps (the first steps compile and warm up)
    peak_mem_gb: float | None
    evals: list[EvalResult] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name

    def to_json(self) -> dict:
        out = asdict(self)
        out["path"] = str(self.path)
        return out


def find_eval_results(root: Path) -> list[EvalResult]:
    """Every ``tlvr eval`` results.json under ``root`` (step checkpoints left out), sorted by directory."""
    root = Path(root)
    found = []
    for path in sorted(root.rglob("results.json")):
        if "checkpoints" in path.relative_to(root).parts:
            continue
        result = read_eval_result(path, root)
        if result is not None:
            found.append(result)
    return found


def read_eval_result(path: Path, root: Path) -> EvalResult | None:
    """The result in ``path`` (None when it is not a tlvr eval report) and the settings of the config.yaml beside it."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not {"benchmark", "headline", "ci95"} <= set(data):
        return None
    cfg = _read_yaml(path.parent / "config.yaml")
    return EvalResult(
        label=path.parent.relative_to(root).as_posix() if path.parent != root else ".",
        benchmark=str(data["benchmark"]), headline=float(data["headline"]),
        ci95=(float(data["ci95"][0]), float(data["ci95"][1])), n_scored=int(data.get("n_scored", 0)),
        protocol=str(cfg.get("protocol", "")), mode=str(cfg.get("mode", "")), duration=str(cfg.get("duration", "")),
        model=str((cfg.get("model") or {}).get("path", "")), reflection_rate=_reflection_rate(data))


def _reflection_rate(data: dict) -> float | None:
    # the first number whose key names reflection, at the top level or in "extra"
    for section in (data, data.get("extra") or {}):
        for key, value in section.items():
            if "reflection" in key and isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
    return None


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def is_run_dir(path: Path) -> bool:
    return (Path(path) / "metrics.jsonl").is_file() and (Path(path) / "config.yaml").is_file()


def read_run(path: Path) -> RunSummary:
    """The summary of a run directory (``config.yaml`` + ``metrics.jsonl``); a one-line error otherwise."""
    path = Path(path)
    if not is_run_dir(path):
        what = "does not exist" if not path.exists() else "is not a run directory (no config.yaml and metrics.jsonl)"
        raise TlvrError(f"{path} {what}")
    try:
        rows = read_metrics(path / "metrics.jsonl")
    except ValueError as e:
        raise TlvrError(f"{path / 'metrics.jsonl'}: unreadable ({e})") from None
    last: dict[str, float] = {}
    for row in rows:
        last.update({k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    keys = curve_keys(rows, FINAL_METRICS)
    times = [r["time/step_s"] for r in rows if isinstance(r.get("time/step_s"), (int, float))]
    mems = [r["perf/peak_mem_gb"] for r in rows if isinstance(r.get("perf/peak_mem_gb"), (int, float))]
    return RunSummary(path=path, job=str(_read_yaml(path / "config.yaml").get("job", "")),
                      steps=int(rows[-1]["step"]) if rows else 0, final={k: last[k] for k in keys},
                      step_time_s=statistics.median(times) if times else None, peak_mem_gb=max(mems) if mems else None,
                      evals=find_eval_results(path))


def metric_label(key: str) -> str:
    """'rewards/accuracy_reward' -> 'accuracy', 'completion_length' -> 'length', 'train/loss' -> 'loss'."""
    return {"completion_length": "length"}.get(key, key.split("/")[-1].removesuffix("_reward"))


def comparison_rows(runs: Sequence[RunSummary]) -> tuple[list[str], list[list[str]]]:
    """The comparison table, a column per run: job, steps, each final metric any run logged, step time,
    peak memory and each evaluation (matched across runs by its directory, benchmark and protocol);
    '–' where a run has no value."""
    metric_keys = list(dict.fromkeys(k for run in runs for k in run.final))
    eval_keys = list(dict.fromkeys((e.label, e.name) for run in runs for e in run.evals))
    evals = [{(e.label, e.name): e for e in run.evals} for run in runs]
    rows = [["job", *(run.job or "–" for run in runs)], ["steps", *(str(run.steps) for run in runs)]]
    rows += [[metric_label(k), *(_number(run.final.get(k)) for run in runs)] for k in metric_keys]
    rows += [["s/step", *(_number(run.step_time_s) for run in runs)],
             ["peak GB", *(_number(run.peak_mem_gb) for run in runs)]]
    rows += [[f"{label}: {name}", *(e[(label, name)].score() if (label, name) in e else "–" for e in evals)]
             for label, name in eval_keys]
    return ["", *(run.name for run in runs)], rows


def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:.4g}"


def plot_runs(runs: Sequence[RunSummary], out_png: Path) -> Path:
    """One PNG with a panel per curve any run logged and a line per run (atomic)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {run.name: read_metrics(run.path / "metrics.jsonl") for run in runs}
    keys = list(dict.fromkeys(k for r in rows.values() for k in curve_keys(r)))
    if not keys:
        raise TlvrError(f"none of the runs logged a curve ({', '.join(rows)})")
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.2 * len(keys)), sharex=True, squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key in zip(axes[:, 0], keys):
        for i, (name, run_rows) in enumerate(rows.items()):
            pts = [(r["step"], r[key]) for r in run_rows if isinstance(r.get(key), (int, float))]
            if not pts:
                continue
            xs, ys = zip(*pts)
            colour = colours[i % len(colours)]
            smooth = len(ys) >= 8  # long noisy curves: the raw values faint, their running mean on top
            ax.plot(xs, ys, lw=1.0, color=colour, alpha=0.35 if smooth else 1.0, label=None if smooth else name)
            if smooth:
                ax.plot(xs, running_mean(ys), lw=2.0, color=colour, label=name)
        ax.set_ylabel(key, fontsize=8)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_name(f".{out_png.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out_png)
    return out_png


def default_compare_png(paths: Sequence[Path]) -> Path:
    """compare.png in the directory holding the runs (their common parent)."""
    return Path(os.path.commonpath([Path(p).resolve().parent for p in paths])) / "compare.png"


def compare_runs(paths: Sequence[Path], out_png: Path | None = None) -> tuple[list[RunSummary], Path]:
    """Summaries of the runs (in the order given) and the PNG of their overlaid curves."""
    if not paths:
        raise TlvrError("name at least one run directory")
    runs = [read_run(Path(p)) for p in paths]
    return runs, plot_runs(runs, out_png or default_compare_png(paths))
