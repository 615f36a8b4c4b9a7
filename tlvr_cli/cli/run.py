"""``tlvr coldstart``, ``tlvr grpo``, ``tlvr demo``, ``tlvr infer`` and ``tlvr plot``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console

from ..config import load_config
from .common import FORCE_HELP, PRESET_HELP, RESUME_HELP, RUN_DIR_HELP, SET_HELP, allow_quick_exit

console = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def _done(final: Path) -> None:
    from ..runtime import launch_rank

    if launch_rank() == 0:  # once, not once per process under torchrun
        console.print(f"[green]done[/]: model saved to {final}")


def coldstart(
    preset: str = typer.Option("coldstart", "--preset", "-p", metavar="NAME|PATH", help=PRESET_HELP),
    set_: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help=SET_HELP),
    resume: str | None = typer.Option(None, "--resume", metavar="auto|DIR", help=RESUME_HELP),
    run_dir: str | None = typer.Option(None, "--run-dir", metavar="DIR", help=RUN_DIR_HELP),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
) -> None:
    """Supervised cold start: the 16 worked reasoning examples, 1 epoch at lr 1e-5 (preset coldstart)."""
    from ..data.records import read_coldstart_records
    from ..jobs import ColdstartConfig
    from ..train.setup import read_samples

    cfg = load_config(ColdstartConfig, preset, set_, extra={"output": {"run_dir": run_dir}} if run_dir else None)
    read_samples(read_coldstart_records, cfg.data, "records")  # missing or empty data fails here, before torch
    from ..train.sft import run_coldstart

    _done(run_coldstart(cfg, resume=resume, force=force))


def grpo(
    preset: str = typer.Option("nextqa", "--preset", "-p", metavar="NAME|PATH", help=PRESET_HELP),
    set_: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help=SET_HELP),
    resume: str | None = typer.Option(None, "--resume", metavar="auto|DIR", help=RESUME_HELP),
    run_dir: str | None = typer.Option(None, "--run-dir", metavar="DIR", help=RUN_DIR_HELP),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
) -> None:
    """GRPO: 8 prompts x 8 completions per step, k3 KL penalty, accuracy and format rewards (`--preset demo` runs
    the demo)."""
    from ..jobs import DemoConfig, GRPOConfig

    cfg = load_config(GRPOConfig, preset, set_, extra={"output": {"run_dir": run_dir}} if run_dir else None)
    if isinstance(cfg, DemoConfig):  # `tlvr grpo --preset demo` is `tlvr demo`
        from ..demo import run_demo

        run_demo(cfg, resume=resume, force=force)
        return
    from ..data.records import read_grpo_rows
    from ..train.setup import read_samples

    read_samples(read_grpo_rows, cfg.data, "rows")  # missing or empty data fails here, before torch is imported
    from ..train.grpo import run_grpo

    _done(run_grpo(cfg, resume=resume, force=force))


def demo(
    preset: str = typer.Option("demo", "--preset", "-p", metavar="NAME|PATH", help=PRESET_HELP),
    set_: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help=SET_HELP),
    resume: str | None = typer.Option(None, "--resume", metavar="auto|DIR", help=RESUME_HELP),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
) -> None:
    """The embedded demo on a CPU in minutes: synthetic set, tiny cold start, GRPO, before/after table."""
    from ..demo import run_demo
    from ..jobs import DemoConfig

    run_demo(load_config(DemoConfig, preset, set_), resume=resume, force=force)


def infer(
    video: Path = typer.Argument(..., metavar="VIDEO", help="Video file."),
    question: str = typer.Argument(..., metavar="QUESTION",
                                   help="Question, with one 'A. ...' line per option for multiple choice (in a shell: "
                                   "$'What is he doing?\\nA. running\\nB. cooking')."),
    model: str | None = typer.Option(None, "--model", "-m", metavar="PATH|ID",
                                     help="Checkpoint dir, hub id (local cache) or 'tiny'."),
    preset: str | None = typer.Option(None, "--preset", "-p", metavar="NAME|PATH", help=PRESET_HELP),
    set_: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help=SET_HELP),
    reason: bool | None = typer.Option(None, "--reason/--no-reason",
                                       help="Append the <think>/<answer> instruction (default on)."),
    greedy: bool = typer.Option(False, "--greedy", help="Greedy decoding (the default unless --temperature is given)."),
    temperature: float | None = typer.Option(None, "--temperature", metavar="T", help="Sample at this temperature."),
    top_k: int | None = typer.Option(None, "--top-k", metavar="K", help="Top-k when sampling."),
    top_p: float | None = typer.Option(None, "--top-p", metavar="P", help="Top-p when sampling."),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", metavar="N", help="Most tokens to generate."),
    frames: int | None = typer.Option(None, "--frames", metavar="N", help="Frames sampled from the video."),
    dtype: str | None = typer.Option(None, "--dtype", metavar="DTYPE", help="float32 | bfloat16 | float16 | auto."),
    device: str | None = typer.Option(None, "--device", metavar="DEVICE", help="cuda | cpu | auto."),
    seed: int | None = typer.Option(None, "--seed", metavar="N", help="Sampling seed."),
    as_json: bool = typer.Option(False, "--json",
                                 help="Print one JSON object (output, think, answer, timings, warnings)."),
) -> None:
    """Answer a question about a video, streaming the answer (greedy unless --temperature is given)."""
    from ..infer import answer_question, skip_unused_imports
    from ..jobs import InferConfig

    skip_unused_imports()  # before torch and transformers are imported

    extra: dict = {"model": {}, "sampling": {}, "video": {}}
    for section, key, value in (("model", "path", model), ("model", "dtype", dtype), ("model", "device", device),
                                ("sampling", "temperature", 0.0 if greedy else temperature),
                                ("sampling", "top_k", top_k), ("sampling", "top_p", top_p),
                                ("sampling", "max_new_tokens", max_new_tokens), ("video", "num_frames", frames)):
        if value is not None:
            extra[section][key] = value
    if reason is not None:
        extra["reason"] = reason
    if seed is not None:
        extra["seed"] = seed
    cfg = load_config(InferConfig, preset, set_, extra=extra)
    stream = None if as_json else (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    result = answer_question(cfg, video, question, on_text=stream)
    allow_quick_exit()  # nothing left to tear down but the modules: about a second with torch and transformers
    if as_json:
        print(json.dumps(result.to_json(), ensure_ascii=False))
        return
    print()
    for warning in result.warnings:
        err.print(f"[yellow]warning:[/] {warning}", soft_wrap=True)
    err.print(f"[dim]{result.new_tokens} tokens in {result.timings['generate_s']:.2f} s; answer: {result.answer}[/]")


def plot(run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="A coldstart or grpo run directory.")) -> None:
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
