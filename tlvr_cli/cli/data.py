"""``tlvr data fetch|synth|check``: released checkpoints and datasets, the synthetic set, video scans."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from .common import PRESET_HELP, help_when_bare

data_app = typer.Typer(help="Fetch weights and datasets, write the synthetic set, scan videos.",
                       callback=help_when_bare, invoke_without_command=True, rich_markup_mode=None)
console = Console(highlight=False)


@data_app.command("fetch")
def fetch(
    targets: list[str] | None = typer.Argument(None, metavar="TARGET...",
                                               help="r1, coldstart, base, nextqa, videomme, mvbench, mlvu, mmvu."),
    root: Path | None = typer.Option(None, "--root", metavar="DIR",
                                     help="Data root (default $TLVR_DATA or ~/.cache/tlvr)."),
    dry_run: bool = typer.Option(False, "--dry-run",
                                 help="List what would be downloaded and its size; download nothing."),
    list_targets: bool = typer.Option(False, "--list", help="Show the targets and where each one goes."),
    delete_archives: bool = typer.Option(False, "--delete-archives", help="Remove each archive once extracted."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    verify: bool = typer.Option(False, "--verify",
                                help="Also hash the files already present and download those that changed."),
    workers: int | None = typer.Option(None, "--workers", metavar="N", help="Files downloaded at once (default 8)."),
) -> None:
    """Download weights and datasets from the Hugging Face hub into the data root (resumable, idempotent)."""
    from ..data.fetch import DOWNLOAD_WORKERS, fetch_targets, plan_table, targets_table
    from ..errors import TlvrError
    from ..files import resolve_root

    data_root = resolve_root(root, "")
    if list_targets:
        console.print(targets_table(data_root))
        return
    if not targets:
        raise TlvrError("name at least one target (see `tlvr data fetch --list`)")
    results = fetch_targets(list(targets), data_root, dry_run=dry_run, progress=not quiet,
                            keep_archives=not delete_archives, verify=verify,
                            workers=DOWNLOAD_WORKERS if workers is None else workers)
    console.print(plan_table(results))
    if any(r.problems for r in results):
        raise typer.Exit(1)


@data_app.command()
def synth(
    preset: str | None = typer.Option(None, "--preset", "-p", metavar="NAME|PATH", help=PRESET_HELP),
    set_: list[str] = typer.Option([], "--set", metavar="KEY=VALUE",
                                   help="Override a key: key=value (repeatable), e.g. --set train=512 --set seed=1."),
    root: Path | None = typer.Option(None, "--root", metavar="DIR",
                                     help="Output directory (default $TLVR_DATA/synthetic)."),
) -> None:
    """Write the synthetic video-QA set in the NextQA GRPO and cold-start formats."""
    from ..config import load_config
    from ..files import resolve_root
    from ..jobs import SynthConfig
    from ..synth import COLDSTART_FILE, EVAL_FILE, TRAIN_FILE, write_synthetic_dataset

    cfg = load_config(SynthConfig, preset, set_, extra={"root": str(root)} if root else None)
    cfg.root = str(resolve_root(cfg.root, "synthetic"))
    out = write_synthetic_dataset(cfg)
    videos = sum(1 for _ in (out / "NextQA").rglob("*.mp4"))
    console.print(f"synthetic set in [bold]{out}[/]: {cfg.train} train rows ({TRAIN_FILE}), {cfg.eval} eval rows "
                  f"({EVAL_FILE}), {cfg.coldstart} cold-start records ({COLDSTART_FILE}), {videos} videos",
                  soft_wrap=True)


@data_app.command()
def check(
    target: str = typer.Argument(..., metavar="TARGET", help="nextqa | coldstart | synthetic | an annotation file "
                                 "(.jsonl/.json) | a directory of videos."),
    root: Path | None = typer.Option(None, "--root", metavar="DIR", help="Data root the annotations resolve against "
                                     "(default: $TLVR_DATA/train, /synthetic, or the file's folder)."),
    frames: int = typer.Option(16, "--frames", metavar="N",
                               help="Frames sampled per video (linspace, as training does)."),
    workers: int = typer.Option(4, "--workers", metavar="N", help="Videos decoded in parallel."),
    min_frames: int = typer.Option(1, "--min-frames", metavar="N",
                                   help="Videos with fewer frames are reported as too_short."),
    backend: str = typer.Option("auto", "--backend", metavar="auto|decord|pyav", help="Decoder: auto | decord | pyav."),
    report: Path | None = typer.Option(None, "--report", metavar="PATH",
                                       help="JSON report path (default: beside the data, check-<target>.json)."),
) -> None:
    """Decode-scan every video a target uses; exit 1 if any is bad (pass the report as data.skip_report to skip
    them)."""
    from ..data.check import check_videos, default_report_path, videos_for_target, write_report

    paths = videos_for_target(target, root)
    results = check_videos(paths, frames, backend=backend, workers=workers, min_frames=min_frames,
                           progress=console.is_terminal)
    out = report if report is not None else default_report_path(target, root)
    summary = write_report(results, out, target)

    table = Table("kind", "videos", title=f"check {Path(target).name or target}", caption=f"{len(results)} videos")
    for kind, count in summary["counts"].items():
        table.add_row(kind, str(count), style="green" if kind == "ok" else "red")
    console.print(table)
    for bad in summary["bad"][:10]:
        console.print(f"[red]{bad['kind']}[/] {bad['path']}: {bad['detail']}", soft_wrap=True)
    if len(summary["bad"]) > 10:
        console.print(f"... and {len(summary['bad']) - 10} more")
    console.print(f"report: {out}", soft_wrap=True)
    if summary["bad"]:
        raise typer.Exit(1)
