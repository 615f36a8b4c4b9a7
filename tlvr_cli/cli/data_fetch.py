"""``tlvr data fetch TARGET...``: released checkpoints, NextQA training data and the four benchmarks."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from .data import data_app

console = Console(highlight=False)


def _default_root() -> Path:
    try:
        from ..data.records import data_root
    except ImportError:  # same rule as records.data_root
        import os

        return Path(os.environ.get("TLVR_DATA") or Path.home() / ".cache" / "tlvr")
    return data_root()


@data_app.command("fetch")
def fetch(
    targets: Optional[list[str]] = typer.Argument(None, help="r1, coldstart, base, nextqa, videomme, mvbench, mlvu, mmvu."),
    root: Optional[Path] = typer.Option(None, "--root", help="Data root (default $TLVR_DATA or ~/.cache/tlvr)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would be downloaded and its size; download nothing."),
    list_targets: bool = typer.Option(False, "--list", help="Show the targets and where each one goes."),
    delete_archives: bool = typer.Option(False, "--delete-archives", help="Remove each archive once extracted."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Download weights and datasets from the Hugging Face hub into the data root (resumable, idempotent)."""
    from ..data.fetch import fetch_targets, plan_table, targets_table
    from ..errors import TlvrError

    data_root = root.expanduser() if root else _default_root()
    if list_targets:
        console.print(targets_table(data_root))
        return
    if not targets:
        raise TlvrError("name at least one target (see `tlvr data fetch --list`)")
    results = fetch_targets(list(targets), data_root, dry_run=dry_run, progress=not quiet,
                            keep_archives=not delete_archives)
    console.print(plan_table(results))
    if any(r.problems for r in results):
        raise typer.Exit(1)
