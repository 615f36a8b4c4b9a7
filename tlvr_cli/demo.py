"""The embedded demo (``tlvr demo``, also ``tlvr grpo --preset demo``): synthetic data → tiny cold start
→ GRPO → before/after evaluation on the held-out synthetic split. Each stage reuses its output when it
is there: the training stages by the run-directory rule (``train/run_dir.plan_run``: the same config
reuses a complete run, resumes an interrupted one, refuses another config unless forced)."""

from __future__ import annotations

import dataclasses
import json
import shlex
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .config import load_config
from .errors import TlvrError
from .files import resolve_root, write_json_atomic
from .jobs import ColdstartConfig, DemoConfig, EvalConfig

console = Console(stderr=True, highlight=False)


@dataclass
class StageScore:
    model: str
    accuracy: float  # greedy
    format_rate: float
    unparseable: int
    n: int
    sampled_accuracy: float | None = None  # sampled as the rollouts are (prepare.eval_sampled)
    sampled_format_rate: float | None = None


def ensure_synthetic(cfg: DemoConfig) -> Path:
    """Write the synthetic set unless a complete one is there (the writer itself is idempotent)."""
    from .synth import write_synthetic_dataset

    root = resolve_root(cfg.data.root, "synthetic")
    synth = dataclasses.replace(cfg.prepare.synth, root=str(root))
    console.rule("[bold]1/4 synthetic data")
    write_synthetic_dataset(synth)
    return root


def ensure_coldstart(cfg: DemoConfig, data: Path, *, force: bool = False) -> Path:
    """Cold-start the tiny model with ``prepare.coldstart_preset`` into the run whose final model is
    ``model.path`` (reused when complete with that config); a ``model.path`` that is not the final
    model of a run directory is used as it is."""
    console.rule("[bold]2/4 cold start")
    if cfg.model.path == "tiny":  # the embedded random-init model, as it is: nothing to cold-start
        console.print("model.path=tiny: GRPO starts from the embedded random-init model")
        return Path("tiny")
    target = Path(cfg.model.path)
    run_dir = target.parent if target.name == "final" else target
    if (target / "config.json").exists() and not (run_dir / "config.yaml").exists():
        console.print(f"reusing {target}")
        return target
    from .train.sft import run_coldstart

    cs = load_config(ColdstartConfig, cfg.prepare.coldstart_preset, extra={
        "data": {"root": str(data)}, "output": {"run_dir": str(run_dir)}})
    final = run_coldstart(cs, resume="auto", force=force)
    if final.resolve() != target.resolve():
        raise TlvrError(f"model.path={cfg.model.path}: the cold start writes {final}; set model.path to a run "
                        "directory's final/ (e.g. runs/demo-coldstart/final)")
    return final


def _evaluate(model_path: str, data: Path, out_dir: Path, cfg: DemoConfig,
              protocol: str) -> tuple[float, float, int, int]:
    """(accuracy %, format %, unparseable, items) on the synthetic eval split with ``protocol``."""
    from .eval.answers import read_answers
    from .eval.runner import run_eval
    from .train.rewards import format_reward

    ev = load_config(EvalConfig, None, extra={
        "benchmark": "synthetic", "data_dir": str(data), "protocol": protocol, "output_dir": str(out_dir),
        "model": {**dataclasses.asdict(cfg.model), "path": model_path}, "sampling": dataclasses.asdict(cfg.rollout),
        "limit": cfg.prepare.eval_limit, "video": dataclasses.asdict(cfg.video),
        "engine": {"max_batch": cfg.prepare.eval_batch_size}, "seed": cfg.seed, "overwrite_stale": True})
    report = run_eval(ev)
    rows = [r for r in read_answers(out_dir / "answers.jsonl") if not r.get("skipped")]
    fmt = format_reward([r["output"] for r in rows]) if rows else []
    return (report.headline, 100.0 * sum(f > 0 for f in fmt) / max(1, len(fmt)),
            sum(r["parsed"] is None for r in rows), len(rows))


def evaluate_synthetic(model_path: str, data: Path, out_dir: Path, cfg: DemoConfig, label: str) -> StageScore:
    """Greedy accuracy and format rate on the synthetic eval split (in ``out_dir``), and with
    ``prepare.eval_sampled`` the same for answers sampled as the rollouts are (in ``<out_dir>-sampled``;
    an unparseable sampled answer counts as a random letter, as in the paper protocol)."""
    acc, fmt, bad, n = _evaluate(model_path, data, out_dir, cfg, "greedy")
    score = StageScore(label, acc, fmt, bad, n)
    if cfg.prepare.eval_sampled:
        score.sampled_accuracy, score.sampled_format_rate, _, _ = _evaluate(
            model_path, data, out_dir.with_name(out_dir.name + "-sampled"), cfg, "paper")
    return score


def run_demo(cfg: DemoConfig, *, resume: str | None = None, force: bool = False) -> list[StageScore]:
    """Prepare what is missing, run GRPO, print the before/after table and the commands to go on with."""
    from .train.grpo import run_grpo

    data = ensure_synthetic(cfg)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=str(data)))
    coldstart = ensure_coldstart(cfg, data, force=force)
    run_dir = Path(cfg.output.run_dir)
    console.rule("[bold]3/4 GRPO")
    final = run_grpo(cfg, resume=resume or "auto", force=force)
    scores = []
    if cfg.prepare.evaluate:
        console.rule("[bold]4/4 evaluation on the held-out synthetic split")
        scores = [evaluate_synthetic(str(coldstart), data, run_dir / "eval-coldstart", cfg, "cold start"),
                  evaluate_synthetic(str(final), data, run_dir / "eval-grpo", cfg, "GRPO")]
        _print_table(scores, run_dir)
    console.print("next:", soft_wrap=True)
    for line in next_commands(final, data):
        console.print(f"  {line}", soft_wrap=True, markup=False)
    return scores


def next_commands(final: Path, data: Path) -> list[str]:
    """Commands that go on from the demo's outputs, with the demo's data directory spelled out."""
    rows = (data / "eval.jsonl").read_text(encoding="utf-8").splitlines()
    row = json.loads(rows[0]) if rows else None
    commands = [f"tlvr eval synthetic --model {shlex.quote(str(final))} --data-dir {shlex.quote(str(data))}"]
    if row is not None:
        video = data / row["video_filename"].removeprefix("./")
        commands.append(f"tlvr infer {shlex.quote(str(video))} {ansi_c_quote(row['problem'])} "
                        f"--model {shlex.quote(str(final))}")
    return commands


def ansi_c_quote(text: str) -> str:
    """``text`` as a bash ``$'…'`` word: its newlines reach the program as newlines, not as backslash-n."""
    return "$'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def _print_table(scores: list[StageScore], run_dir: Path) -> None:
    """Accuracy and format rate in % of the items; sampled (as the rollouts are) first when evaluated.
    demo.json also has the count of unparseable greedy answers."""
    sampled = any(s.sampled_accuracy is not None for s in scores)
    table = Table(title="synthetic eval split (% of items)")
    table.add_column("model", no_wrap=True)
    for name in [*(["accuracy sampled"] if sampled else []), "accuracy greedy",
                 *(["format sampled"] if sampled else []), "format greedy", "items"]:
        table.add_column(name, justify="right")
    for s in scores:
        table.add_row(s.model, *([_pct(s.sampled_accuracy)] if sampled else []), f"{s.accuracy:.1f}",
                      *([_pct(s.sampled_format_rate)] if sampled else []), f"{s.format_rate:.1f}", str(s.n))
    Console(highlight=False).print(table)
    out = run_dir / "demo.json"
    write_json_atomic(out, [dataclasses.asdict(s) for s in scores])
    console.print(f"curves: {run_dir / 'curves.png'}   table: {out}")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"
