"""``tlvr coldstart``, ``tlvr grpo``, ``tlvr demo``, ``tlvr infer`` and ``tlvr plot``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console

from ..config import load_config
from .common import PRESET_HELP, RESUME_HELP, SET_HELP

console = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def _done(final: Path) -> None:
    from ..runtime import launch_rank

    if launch_rank() == 0:  # once, not once per process under torchrun
        console.print(f"[green]done[/]: model saved to {final}")


def coldstart(
    preset: str = typer.Option("coldstart", "--preset", "-p", help=PRESET_HELP),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    resume: str | None = typer.Option(None, "--resume", help=RESUME_HELP),
    run_dir: str | None = typer.Option(None, "--run-dir", help="Output directory (overrides output.run_dir)."),
) -> None:
    """Supervised cold start (spec §4): the 16 reasoning samples, 1 epoch, lr 1e-5."""
    from ..jobs import ColdstartConfig
    from ..train.sft import run_coldstart

    cfg = load_config(ColdstartConfig, preset, set_, extra={"output": {"run_dir": run_dir}} if run_dir else None)
    _done(run_coldstart(cfg, resume=resume))


def grpo(
    preset: str = typer.Option("nextqa", "--preset", "-p", help=PRESET_HELP),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    resume: str | None = typer.Option(None, "--resume", help=RESUME_HELP),
    run_dir: str | None = typer.Option(None, "--run-dir", help="Output directory (overrides output.run_dir)."),
) -> None:
    """GRPO (spec §5): 8 prompts x 8 completions per step, k3 KL, the R1 reward (a demo preset runs the demo)."""
    from ..jobs import DemoConfig, GRPOConfig

    cfg = load_config(GRPOConfig, preset, set_, extra={"output": {"run_dir": run_dir}} if run_dir else None)
    if isinstance(cfg, DemoConfig):  # `tlvr grpo --preset demo` is `tlvr demo`
        from ..demo import run_demo

        run_demo(cfg, resume=resume)
        return
    from ..train.grpo import run_grpo

    _done(run_grpo(cfg, resume=resume))


def demo(
    preset: str = typer.Option("demo", "--preset", "-p", help=PRESET_HELP),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    resume: str | None = typer.Option(None, "--resume", help=RESUME_HELP),
) -> None:
    """The embedded demo on a CPU in minutes: synthetic set, tiny cold start, GRPO, before/after table."""
    from ..demo import run_demo
    from ..jobs import DemoConfig

    run_demo(load_config(DemoConfig, preset, set_), resume=resume)


def infer(
    video: Path = typer.Argument(..., help="Video file."),
    question: str = typer.Argument(..., help="Question (include the options for multiple choice)."),
    model: str | None = typer.Option(None, "--model", "-m", help="Checkpoint dir, hub id (local cache) or 'tiny'."),
    preset: str | None = typer.Option(None, "--preset", "-p", help=PRESET_HELP),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    reason: bool | None = typer.Option(None, "--reason/--no-reason", help="Append the <think>/<answer> instruction (default on)."),
    greedy: bool = typer.Option(False, "--greedy", help="Greedy decoding (the default unless --temperature is given)."),
    temperature: float | None = typer.Option(None, "--temperature", help="Sample at this temperature."),
    top_k: int | None = typer.Option(None, "--top-k", help="Top-k when sampling."),
    top_p: float | None = typer.Option(None, "--top-p", help="Top-p when sampling."),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", help="Most tokens to generate."),
    frames: int | None = typer.Option(None, "--frames", help="Frames sampled from the video."),
    dtype: str | None = typer.Option(None, "--dtype", help="float32 | bfloat16 | float16 | auto."),
    device: str | None = typer.Option(None, "--device", help="cuda | cpu | auto."),
    seed: int | None = typer.Option(None, "--seed", help="Sampling seed."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (output, think, answer, timings)."),
) -> None:
    """Answer a question about a video, streaming the answer."""
    from ..infer import answer_question
    from ..jobs import InferConfig

    extra: dict = {"model": {}, "sampling": {}, "video": {}}
    for section, key, value in (("model", "path", model), ("model", "dtype", dtype), ("model", "device", device),
                                ("sampling", "temperature", 0.0 if greedy else temperature), ("sampling", "top_k", top_k),
                                ("sampling", "top_p", top_p), ("sampling", "max_new_tokens", max_new_tokens),
                                ("video", "num_frames", frames)):
        if value is not None:
            extra[section][key] = value
    if reason is not None:
        extra["reason"] = reason
    if seed is not None:
        extra["seed"] = seed
    cfg = load_config(InferConfig, preset, set_, extra=extra)
    stream = None if as_json else (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    result = answer_question(cfg, video, question, on_text=stream)
    if as_json:
        print(json.dumps(result.to_json(), ensure_ascii=False))
    else:
        print()
        err.print(f"[dim]{result.new_tokens} tokens in {result.timings['generate_s']:.2f} s; answer: {result.answer}[/]")


def plot(run_dir: Path = typer.Argument(..., help="A coldstart or grpo run directory.")) -> None:
    """Write the PNG of a run's training curves (reward, accuracy, format, length, KL or loss)."""
    from ..errors import TlvrError
    from ..train.metrics import plot_run

    if not (run_dir / "metrics.jsonl").exists():
        raise TlvrError(f"{run_dir / 'metrics.jsonl'}: not found (is {run_dir} a run directory?)")
    try:
        out = plot_run(run_dir)
    except ValueError as e:
        raise TlvrError(str(e)) from None
    console.print(f"wrote {out}")


def register(app: typer.Typer) -> None:
    for command in (coldstart, grpo, demo, infer, plot):
        app.command()(command)
