"""``tlvr eval <benchmark>``, ``tlvr eval score`` and ``tlvr eval compare``."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markdown import Markdown

from ..config import load_config
from .common import help_when_bare

eval_app = typer.Typer(help="Evaluate on Video-MME, MVBench, MLVU, MMVU or the synthetic split; score and compare "
                       "answer files.",
                       callback=help_when_bare, invoke_without_command=True, rich_markup_mode=None)
console = Console(highlight=False)

BENCHMARKS = {
    "videomme": "Video-MME (wo sub): per duration and overall, micro average.",
    "mvbench": "MVBench: 20 tasks, micro average.",
    "mlvu": "MLVU dev: 7 multiple-choice tasks, macro average.",
    "mmvu": "MMVU validation, multiple-choice subset, micro average.",
    "synthetic": "The synthetic held-out split (after the demo: --data-dir runs/demo-data).",
}
# options only some benchmarks have: the command of every other benchmark leaves them out of its signature
ONLY_FOR = {"duration": "videomme"}


def _make_command(name: str):
    def command(
        model: str | None = typer.Option(None, "--model", "-m", metavar="PATH|ID",
                                         help="Checkpoint dir, hub id (local cache) or 'tiny'."),
        preset: str | None = typer.Option(None, "--preset", "-p", metavar="NAME",
                                          help="Eval preset (e.g. eval-paper)."),
        set_: list[str] = typer.Option([], "--set", metavar="KEY=VALUE",
                                       help="dotted.key=value override (repeatable)."),
        data_dir: str | None = typer.Option(None, "--data-dir", metavar="DIR",
                                            help=f"Benchmark root (default $TLVR_DATA/{name})."),
        duration: Annotated[str | None, typer.Option("--duration", metavar="short|medium|long|all",
                                                     help="Which Video-MME videos (default all).")] = None,
        mode: str | None = typer.Option(None, "--mode", metavar="reason|option",
                                        help="Reasoning prompt (default) or the option-letter prompt."),
        protocol: str | None = typer.Option(None, "--protocol", metavar="greedy|paper",
                                            help="greedy (default) or the paper's seeded sampling."),
        frame_protocol: str | None = typer.Option(None, "--frame-protocol", metavar="paper|uniform",
                                                  help="Frame sampling: the benchmark's own (default) or uniform."),
        frames: int | None = typer.Option(None, "--frames", metavar="N", help="Frames per video (default 16)."),
        dtype: str | None = typer.Option(None, "--dtype", metavar="DTYPE",
                                         help="float32 (the authors) | bfloat16 | float16 | auto."),
        device: str | None = typer.Option(None, "--device", metavar="DEVICE", help="cuda | cpu | auto."),
        batch_size: int | None = typer.Option(None, "--batch-size", metavar="N",
                                              help="Items decoded together (engine.max_batch)."),
        max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", metavar="N",
                                                  help="Most new tokens per answer."),
        limit: int | None = typer.Option(None, "--limit", metavar="N", help="Only the first N items."),
        seed: int | None = typer.Option(None, "--seed", metavar="N", help="Seed for sampling and the random fallback."),
        output_dir: str | None = typer.Option(None, "--output-dir", "-o", metavar="DIR",
                                              help="Where answers.jsonl and results.* go."),
    ) -> None:
        from ..eval.benchmarks import load_eval_items
        from ..jobs import EvalConfig

        extra: dict = {"benchmark": name, "model": {}, "video": {}, "engine": {}, "sampling": {}}
        for section, key, value in ((None, "data_dir", data_dir), (None, "duration", duration), (None, "mode", mode),
                                    (None, "protocol", protocol), (None, "frame_protocol", frame_protocol),
                                    (None, "limit", limit), (None, "seed", seed), (None, "output_dir", output_dir),
                                    ("engine", "max_batch", batch_size), ("sampling", "max_new_tokens", max_new_tokens),
                                    ("model", "path", model), ("model", "dtype", dtype), ("model", "device", device),
                                    ("video", "num_frames", frames)):
            if value is not None:
                (extra[section] if section else extra)[key] = value
        cfg = load_config(EvalConfig, preset, set_, extra=extra)
        load_eval_items(cfg)  # missing or empty data fails here, in a second, before torch is imported
        from ..eval.distributed import run_eval_sharded

        try:
            report = run_eval_sharded(cfg)
        except KeyboardInterrupt:
            from ..errors import Interrupted

            raise Interrupted("the answers written so far are kept: the same command resumes from them") from None
        if report is not None:
            console.print(Markdown(report.markdown()))

    signature = inspect.signature(command, eval_str=True)  # typer reads the options from real annotations
    command.__signature__ = signature.replace(parameters=[
        p for p in signature.parameters.values() if ONLY_FOR.get(p.name, name) == name])
    command.__doc__ = BENCHMARKS[name]
    return command


def score(
    answers: Path = typer.Argument(..., metavar="ANSWERS.jsonl", help="An answers.jsonl written by `tlvr eval`."),
    benchmark: str | None = typer.Option(None, "--benchmark", "-b", metavar="NAME",
                                         help="Benchmark (default: read from config.yaml beside the file)."),
    bootstrap: int | None = typer.Option(None, "--bootstrap", metavar="N",
                                         help="Bootstrap resamples (default: the eval config's, 1000)."),
    seed: int = typer.Option(0, "--seed", metavar="N", help="Bootstrap seed."),
    write: bool = typer.Option(True, "--write/--no-write",
                               help="Write results.json and results.md beside the answers."),
) -> None:
    """Recompute the report (per task, headline, 95% CIs) from an answers file."""
    from ..eval.report import score_answers_file

    report = score_answers_file(answers, benchmark, n_boot=bootstrap, seed=seed, write=write)
    console.print(Markdown(report.markdown()))


def compare(
    a: Path = typer.Argument(..., metavar="A.jsonl", help="Answers file A (baseline)."),
    b: Path = typer.Argument(..., metavar="B.jsonl", help="Answers file B."),
    benchmark: str | None = typer.Option(None, "--benchmark", "-b", metavar="NAME",
                                         help="Benchmark (default: from config.yaml beside A)."),
    bootstrap: int | None = typer.Option(None, "--bootstrap", metavar="N",
                                         help="Paired bootstrap resamples (default 1000)."),
    seed: int = typer.Option(0, "--seed", metavar="N", help="Bootstrap seed."),
) -> None:
    """Per-task difference B - A with a paired bootstrap 95% CI."""
    from ..eval.report import compare_answer_files

    report = compare_answer_files(a, b, benchmark, n_boot=bootstrap, seed=seed)
    console.print(Markdown(report.markdown()))


def register(app: typer.Typer) -> None:
    for name in BENCHMARKS:
        eval_app.command(name)(_make_command(name))
    eval_app.command()(score)
    eval_app.command()(compare)
    app.add_typer(eval_app, name="eval")
