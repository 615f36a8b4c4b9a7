"""Run directories built by hand, as `tlvr grpo` / `tlvr coldstart` and `tlvr eval` write them: the
resolved config, a metrics log with known values, curves, the final model and eval reports."""

from __future__ import annotations

import json
from pathlib import Path

from tlvr_cli.config import load_config, to_yaml
from tlvr_cli.eval.report import score_answers, write_report
from tlvr_cli.files import write_text_atomic
from tlvr_cli.jobs import ColdstartConfig, EvalConfig, GRPOConfig
from tlvr_cli.model.checkpoint import generation_from_sampling, save_model
from tlvr_cli.model.tiny import build_tiny_model
from tlvr_cli.train.metrics import plot_run


def grpo_rows(steps: int, reward0: float = -1.0, slope: float = 0.1) -> list[dict]:
    return [{"step": s, "reward": reward0 + slope * s, "rewards/accuracy_reward": 0.05 * s,
             "rewards/format_reward": min(1.0, 0.1 * s), "completion_length": 200.0 - s, "kl": 0.001 * s,
             "time/step_s": 9.0 + (s == 1) * 30.0, "perf/peak_mem_gb": 70.0 + s / 10} for s in range(1, steps + 1)]


def make_run(root: Path, name: str, *, job: str = "grpo", overrides: tuple[str, ...] = (),
             rows: list[dict] | None = None, final: bool = True) -> Path:
    run = root / name
    run.mkdir(parents=True)
    cls, preset = (GRPOConfig, "nextqa") if job == "grpo" else (ColdstartConfig, "coldstart")
    cfg = load_config(cls, preset, list(overrides), extra={"output": {"run_dir": str(run)}})
    write_text_atomic(run / "config.yaml", to_yaml(cfg))
    rows = grpo_rows(12) if rows is None else rows
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plot_run(run, "curves.png" if job == "grpo" else "loss.png")
    if final:
        save_model(build_tiny_model(), run / "final", generation=generation_from_sampling(1.0, 50, 1.0, 512))
    return run


def add_eval(run_dir: Path, out: str, benchmark: str, correct: list[bool], *, model: Path, protocol: str = "greedy",
             extra: dict | None = None) -> Path:
    """An eval report as `tlvr eval` writes it (answers scored, results.json + the eval's config.yaml)."""
    out_dir = run_dir / out
    rows = [{"item_id": f"short/{i}" if benchmark == "videomme" else str(i), "task": "t", "gold": "A",
             "parsed": "A" if ok else "B", "correct": ok} for i, ok in enumerate(correct)]
    report = score_answers(rows, benchmark, n_boot=200, seed=0)
    report.extra.update(extra or {})
    write_report(report, out_dir)
    cfg = load_config(EvalConfig, None, extra={"benchmark": benchmark, "protocol": protocol,
                                               "model": {"path": str(model)}})
    write_text_atomic(out_dir / "config.yaml", to_yaml(cfg))
    return out_dir
