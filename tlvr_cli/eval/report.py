"""Score an answers file: per-task and headline accuracy with seeded bootstrap 95% CIs, and a paired
comparison of two answers files.

Rows marked ``skipped`` (a video that failed to decode) are left out of every accuracy and counted
in ``n_skipped``; ``extra["acc_skipped_as_wrong"]`` gives the headline with them counted wrong.
The headline aggregates as the benchmark says (spec §6): ``micro`` is the item mean, ``macro`` the
mean of the task accuracies (MLVU). Bootstrap resamples items; for ``macro`` it resamples within
each task so task sizes stay fixed.

Reports also carry the reflection ("aha moment") metrics of the answers' ``<think>`` text
(``data/reflection.py``): the share of answers with a marker, markers per answer, think length in
characters, and accuracy with and without a marker, per task and overall; a comparison shows their
change from A to B on the common items.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import yaml

from ..data.reflection import DEFAULT_REFLECTION_PHRASES, completion_reflection, reflection_summary
from ..data.tags import think_block
from ..errors import TlvrError
from ..files import write_json_atomic, write_text_atomic
from ..jobs import EvalConfig
from .answers import read_answers
from .benchmarks import get_benchmark

NO_ANSWER_HOWS = ("none", "empty", "random")  # parse rules that found no letter in the text
BOOTSTRAP = EvalConfig.bootstrap  # resamples for the 95% CIs: the eval config's default


@dataclass
class Report:
    """Accuracies in percent (0–100)."""

    benchmark: str
    headline: float
    n: int
    n_scored: int
    n_skipped: int
    n_unparseable: int
    by_task: dict[str, dict]  # task -> {"acc", "n", "ci95": [low, high]}
    ci95: tuple[float, float]
    aggregate: str = "micro"
    headline_label: str = ""
    extra: dict = field(default_factory=dict)
    reflection: dict = field(default_factory=dict)  # {"overall": {...}, "by_task": {task: {...}}}; {} without <think>

    def to_json(self) -> dict:
        out = asdict(self)
        out["ci95"] = list(self.ci95)
        return out

    def markdown(self) -> str:
        lo, hi = self.ci95
        lines = [f"### {self.benchmark}: {self.headline:.1f} (95% CI {lo:.1f}–{hi:.1f})", "",
                 f"{self.headline_label}. {self.n_scored} scored, {self.n_skipped} skipped (video not decoded), "
                 f"{self.n_unparseable} without a parseable answer.", "",
                 "| task | n | acc % | 95% CI |", "|---|---:|---:|---|"]
        for task, t in self.by_task.items():
            lines.append(f"| {task} | {t['n']} | {t['acc']:.1f} | {t['ci95'][0]:.1f}–{t['ci95'][1]:.1f} |")
        for key, t in self.extra.get("by_duration", {}).items():
            lines.append(f"| duration: {key} | {t['n']} | {t['acc']:.1f} | {t['ci95'][0]:.1f}–{t['ci95'][1]:.1f} |")
        lines.append(f"| **{self.aggregate} avg** | {self.n_scored} | **{self.headline:.1f}** | {lo:.1f}–{hi:.1f} |")
        if self.n_skipped:
            lines += ["", f"Counting skipped items as wrong: {self.extra['acc_skipped_as_wrong']:.1f}."]
        if self.reflection:
            lines += ["", "Reflection markers in the `<think>` text:", "",
                      "| task | n | reflecting % | markers / answer | think chars | acc with % | acc without % |",
                      "|---|---:|---:|---:|---:|---:|---:|"]
            rows = [*self.reflection["by_task"].items(), ("**overall**", self.reflection["overall"])]
            for task, r in rows:
                lines.append(f"| {task} | {r['n']} | {r['rate']:.1f} | {r['markers']:.2f} | {r['think_chars']:.0f} | "
                             f"{_pct_or_dash(r['acc_with'])} | {_pct_or_dash(r['acc_without'])} |")
        return "\n".join(lines) + "\n"


def _pct_or_dash(x: float | None) -> str:
    return "–" if x is None else f"{x:.1f}"


# ----------------------------------------------------------------------------- reflection


def _reflection_pct(summary: dict) -> dict:
    """A ``reflection_summary`` in report units: rates and accuracies in %, lengths in characters."""
    def pct(x):
        return None if x is None else 100.0 * x

    return {"n": summary["n"], "n_with": summary["n_with"], "rate": pct(summary["rate"]), "markers": summary["markers"],
            "think_chars": summary["think_length"], "answer_chars": summary["answer_length"],
            "acc_with": pct(summary.get("acc_with")), "acc_without": pct(summary.get("acc_without"))}


def reflection_report(rows: list[dict], phrases: Sequence[str] = DEFAULT_REFLECTION_PHRASES) -> dict:
    """Reflection metrics of scored answer rows, per task and overall (``{}`` when no output has a
    ``<think>`` block, e.g. in option mode)."""
    rows = [r for r in rows if not r.get("skipped") and isinstance(r.get("output"), str)]
    if not any(think_block(r["output"]) is not None for r in rows):
        return {}
    stats = [completion_reflection(r["output"], phrases) for r in rows]
    correct = [float(is_correct(r)) for r in rows]
    tasks = [str(r.get("task", "all")) for r in rows]
    by_task = {}
    for task in dict.fromkeys(tasks):
        idx = [i for i, t in enumerate(tasks) if t == task]
        by_task[task] = _reflection_pct(reflection_summary([stats[i] for i in idx], [correct[i] for i in idx]))
    return {"overall": _reflection_pct(reflection_summary(stats, correct)), "by_task": by_task,
            "phrases": list(phrases)}


def reflection_phrases_beside(answers: Path) -> list[str]:
    """The ``reflection.phrases`` of the config.yaml beside an answers file (the defaults without one)."""
    cfg = Path(answers).parent / "config.yaml"
    if cfg.is_file():
        data = yaml.safe_load(cfg.read_text()) or {}
        phrases = (data.get("reflection") or {}).get("phrases") if isinstance(data, dict) else None
        if isinstance(phrases, list) and all(isinstance(p, str) for p in phrases):
            return phrases
    return list(DEFAULT_REFLECTION_PHRASES)


# ----------------------------------------------------------------------------- statistics


def aggregate_accuracy(values: np.ndarray, task_ids: np.ndarray, aggregate: str) -> float:
    """Item mean (micro) or mean of per-task means (macro) of 0/1 (or paired -1/0/1) values, in %."""
    if len(values) == 0:
        return 0.0
    if aggregate == "micro":
        return float(values.mean() * 100)
    return float(np.mean([values[task_ids == t].mean() for t in np.unique(task_ids)]) * 100)


def bootstrap_ci(values: np.ndarray, task_ids: np.ndarray, aggregate: str, n_boot: int,
                 seed: int | list[int]) -> tuple[float, float]:
    """Percentile 95% interval of the aggregate over ``n_boot`` item resamples (seeded)."""
    if len(values) == 0 or n_boot <= 0:
        point = aggregate_accuracy(values, task_ids, aggregate)
        return (point, point)
    rng = np.random.default_rng(seed)
    values = values.astype(np.float64)
    if aggregate == "micro":
        stats = np.empty(n_boot)
        step = max(1, 4_000_000 // len(values))  # bound memory on large benchmarks
        for s in range(0, n_boot, step):
            k = min(step, n_boot - s)
            stats[s:s + k] = values[rng.integers(0, len(values), (k, len(values)))].mean(axis=1)
    else:  # stratified: resample inside each task, then average the task means
        per_task = []
        for t in np.unique(task_ids):
            v = values[task_ids == t]
            per_task.append(v[rng.integers(0, len(v), (n_boot, len(v)))].mean(axis=1))
        stats = np.mean(per_task, axis=0)
    lo, hi = np.percentile(stats * 100, [2.5, 97.5])
    return (float(lo), float(hi))


def _task_seed(seed: int, task: str) -> list[int]:
    return [seed, zlib.crc32(task.encode("utf-8"))]


def mcnemar_p(a_only: int, b_only: int) -> float:
    """Exact two-sided McNemar p-value from the discordant counts."""
    n = a_only + b_only
    if n == 0:
        return 1.0
    k = min(a_only, b_only)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


# ----------------------------------------------------------------------------- scoring


def is_correct(row: dict) -> bool:
    if "correct" in row:
        return bool(row["correct"])
    return row.get("parsed") is not None and row.get("parsed") == row.get("gold")


def _dedupe(rows: list[dict]) -> list[dict]:
    latest = {}
    for row in rows:
        latest[row["item_id"]] = row  # a re-run item keeps its last answer
    return list(latest.values())


def _group_stats(values: np.ndarray, labels: list[str], n_boot: int, seed: int) -> dict[str, dict]:
    out = {}
    for label in dict.fromkeys(labels):
        v = values[np.array([x == label for x in labels])]
        ones = np.zeros(len(v), dtype=int)
        lo, hi = bootstrap_ci(v, ones, "micro", n_boot, _task_seed(seed, label))
        out[label] = {"acc": float(v.mean() * 100), "n": len(v), "ci95": [lo, hi]}
    return out


def score_answers(rows: list[dict], benchmark: str, *, n_boot: int = BOOTSTRAP, seed: int = 0,
                  phrases: Sequence[str] = DEFAULT_REFLECTION_PHRASES) -> Report:
    """Report for answers.jsonl rows ``{item_id, task, gold, parsed, correct, output, skipped?, ...}``;
    ``phrases`` are the reflection markers counted in the outputs."""
    bench = get_benchmark(benchmark)
    rows = _dedupe(rows)
    scored = [r for r in rows if not r.get("skipped")]
    values = np.array([is_correct(r) for r in scored], dtype=np.float64)
    tasks = [str(r.get("task", "all")) for r in scored]
    task_ids = np.array(tasks, dtype=object)
    headline = aggregate_accuracy(values, task_ids, bench.aggregate)

    all_values = np.array([0.0 if r.get("skipped") else float(is_correct(r)) for r in rows])
    all_tasks = np.array([str(r.get("task", "all")) for r in rows], dtype=object)
    extra: dict = {
        "acc_skipped_as_wrong": aggregate_accuracy(all_values, all_tasks, bench.aggregate),
        "micro": aggregate_accuracy(values, task_ids, "micro"),
        "macro": aggregate_accuracy(values, task_ids, "macro"),
        "n_random_fallback": sum(r.get("parse_how") == "random" for r in scored),
        "n_gold_not_in_candidates": sum(not str(r.get("gold", "")).isalpha() for r in scored),
        "n_bootstrap": n_boot,
        "seed": seed,
    }
    if benchmark == "videomme":  # item ids are "<duration>/<question_id>"
        durations = [str(r["item_id"]).split("/", 1)[0] for r in scored]
        extra["by_duration"] = _group_stats(values, durations, n_boot, seed)
    return Report(
        benchmark=benchmark,
        headline=headline,
        n=len(rows),
        n_scored=len(scored),
        n_skipped=len(rows) - len(scored),
        n_unparseable=sum(r.get("parsed") is None or r.get("parse_how") in NO_ANSWER_HOWS for r in scored),
        by_task=_group_stats(values, tasks, n_boot, seed) if scored else {},
        ci95=bootstrap_ci(values, task_ids, bench.aggregate, n_boot, seed),
        aggregate=bench.aggregate,
        headline_label=bench.headline_label,
        extra=extra,
        reflection=reflection_report(scored, phrases),
    )


def write_report(report: Report, out_dir: Path) -> None:
    """Write ``results.json`` and ``results.md`` into ``out_dir`` (each replaced atomically)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "results.json", report.to_json())
    write_text_atomic(out_dir / "results.md", report.markdown())


def infer_benchmark(answers: Path) -> str:
    """The ``benchmark:`` key of the config.yaml written beside an answers file."""
    cfg = Path(answers).parent / "config.yaml"
    if cfg.is_file():
        data = yaml.safe_load(cfg.read_text()) or {}
        if isinstance(data, dict) and data.get("benchmark"):
            return str(data["benchmark"])
    raise TlvrError(f"cannot tell the benchmark of {answers}: no config.yaml with 'benchmark:' beside it "
                    "(pass --benchmark)")


def score_answers_file(path: Path, benchmark: str | None = None, *, n_boot: int | None = None, seed: int = 0,
                       write: bool = False) -> Report:
    """Score an answers.jsonl (``n_boot`` None: the default resamples); with ``write`` the results go beside it."""
    path = Path(path)
    rows = read_answers(path, missing_ok=False)
    report = score_answers(rows, benchmark or infer_benchmark(path), n_boot=BOOTSTRAP if n_boot is None else n_boot,
                           seed=seed, phrases=reflection_phrases_beside(path))
    if write:
        write_report(report, path.parent)
    return report


# ----------------------------------------------------------------------------- comparison


@dataclass
class ComparisonReport:
    """B − A on the items both files scored, in percentage points."""

    benchmark: str
    aggregate: str
    n_common: int
    n_only_a: int
    n_only_b: int
    headline_a: float
    headline_b: float
    diff: float
    diff_ci95: tuple[float, float]
    by_task: dict[str, dict]  # task -> {"n", "acc_a", "acc_b", "diff", "ci95"}
    mcnemar: dict[str, float]  # a_right_b_wrong, a_wrong_b_right, both_right, both_wrong, p_value
    reflection: dict = field(default_factory=dict)  # {"a": report reflection, "b": ...} on the common items

    def to_json(self) -> dict:
        out = asdict(self)
        out["diff_ci95"] = list(self.diff_ci95)
        return out

    def markdown(self) -> str:
        lo, hi = self.diff_ci95
        m = self.mcnemar
        lines = [f"### {self.benchmark}: B − A = {self.diff:+.1f} (paired 95% CI {lo:+.1f} to {hi:+.1f})", "",
                 f"{self.n_common} common items ({self.n_only_a} only in A, {self.n_only_b} only in B; "
                 "skipped items left out).",
                 "", "| task | n | A % | B % | B − A | 95% CI |", "|---|---:|---:|---:|---:|---|"]
        for task, t in self.by_task.items():
            lines.append(f"| {task} | {t['n']} | {t['acc_a']:.1f} | {t['acc_b']:.1f} | {t['diff']:+.1f} | "
                         f"{t['ci95'][0]:+.1f} to {t['ci95'][1]:+.1f} |")
        lines.append(f"| **{self.aggregate} avg** | {self.n_common} | {self.headline_a:.1f} | {self.headline_b:.1f} | "
                     f"**{self.diff:+.1f}** | {lo:+.1f} to {hi:+.1f} |")
        lines += ["", f"McNemar: A right / B wrong {m['a_right_b_wrong']}, A wrong / B right {m['a_wrong_b_right']}, "
                      f"both right {m['both_right']}, both wrong {m['both_wrong']}; exact p = {m['p_value']:.3g}."]
        if self.reflection:
            lines += self._reflection_lines()
        return "\n".join(lines) + "\n"

    def _reflection_lines(self) -> list[str]:
        a, b = self.reflection["a"], self.reflection["b"]
        lines = ["", "Reflection markers in the `<think>` text, on the common items:", "",
                 "| | A | B | B − A |", "|---|---:|---:|---:|"]
        rows = [("reflecting %", a["overall"]["rate"], b["overall"]["rate"]),
                ("markers / answer", a["overall"]["markers"], b["overall"]["markers"]),
                ("think chars", a["overall"]["think_chars"], b["overall"]["think_chars"]),
                ("acc with reflection %", a["overall"]["acc_with"], b["overall"]["acc_with"]),
                ("acc without reflection %", a["overall"]["acc_without"], b["overall"]["acc_without"])]
        rows += [(f"reflecting %: {task}", a["by_task"][task]["rate"], b["by_task"].get(task, {}).get("rate"))
                 for task in a["by_task"]] if len(a["by_task"]) > 1 else []
        for name, x, y in rows:
            diff = "–" if x is None or y is None else f"{y - x:+.1f}"
            lines.append(f"| {name} | {_pct_or_dash(x)} | {_pct_or_dash(y)} | {diff} |")
        return lines


def compare_answers(rows_a: list[dict], rows_b: list[dict], benchmark: str, *, n_boot: int = BOOTSTRAP,
                    seed: int = 0, phrases: Sequence[str] = DEFAULT_REFLECTION_PHRASES) -> ComparisonReport:
    """Paired comparison on the items scored (not skipped) in both row lists."""
    bench = get_benchmark(benchmark)
    a = {r["item_id"]: r for r in _dedupe(rows_a) if not r.get("skipped")}
    b = {r["item_id"]: r for r in _dedupe(rows_b) if not r.get("skipped")}
    common = [k for k in a if k in b]
    va = np.array([is_correct(a[k]) for k in common], dtype=np.float64)
    vb = np.array([is_correct(b[k]) for k in common], dtype=np.float64)
    tasks = [str(a[k].get("task", "all")) for k in common]
    task_ids = np.array(tasks, dtype=object)
    d = vb - va
    by_task = {}
    for task in dict.fromkeys(tasks):
        mask = task_ids == task
        lo, hi = bootstrap_ci(d[mask], task_ids[mask], "micro", n_boot, _task_seed(seed, task))
        by_task[task] = {"n": int(mask.sum()), "acc_a": float(va[mask].mean() * 100),
                         "acc_b": float(vb[mask].mean() * 100), "diff": float(d[mask].mean() * 100), "ci95": [lo, hi]}
    a_only, b_only = int(((va == 1) & (vb == 0)).sum()), int(((va == 0) & (vb == 1)).sum())
    headline_a = aggregate_accuracy(va, task_ids, bench.aggregate)
    headline_b = aggregate_accuracy(vb, task_ids, bench.aggregate)
    return ComparisonReport(
        benchmark=benchmark, aggregate=bench.aggregate, n_common=len(common),
        n_only_a=len(set(a) - set(b)), n_only_b=len(set(b) - set(a)),
        headline_a=headline_a, headline_b=headline_b, diff=headline_b - headline_a,
        diff_ci95=bootstrap_ci(d, task_ids, bench.aggregate, n_boot, seed),
        by_task=by_task,
        mcnemar={"a_right_b_wrong": a_only, "a_wrong_b_right": b_only,
                 "both_right": int(((va == 1) & (vb == 1)).sum()), "both_wrong": int(((va == 0) & (vb == 0)).sum()),
                 "p_value": mcnemar_p(a_only, b_only)},
        reflection=_compare_reflection([a[k] for k in common], [b[k] for k in common], phrases),
    )


def _compare_reflection(rows_a: list[dict], rows_b: list[dict], phrases: Sequence[str]) -> dict:
    ra, rb = reflection_report(rows_a, phrases), reflection_report(rows_b, phrases)
    if not ra and not rb:
        return {}
    empty = {"overall": _reflection_pct(reflection_summary([], [])), "by_task": {}}
    return {"a": ra or empty, "b": rb or empty}


def compare_answer_files(a: Path, b: Path, benchmark: str | None = None, *, n_boot: int | None = None,
                         seed: int = 0) -> ComparisonReport:
    """Compare two answers files (benchmark from the config.yaml beside ``a`` when not given)."""
    name = benchmark or infer_benchmark(Path(a))
    return compare_answers(read_answers(Path(a), missing_ok=False), read_answers(Path(b), missing_ok=False), name,
                           n_boot=BOOTSTRAP if n_boot is None else n_boot, seed=seed,
                           phrases=reflection_phrases_beside(Path(a)))
