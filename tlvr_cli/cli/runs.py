"""``tlvr runs compare RUN...``: final metrics, timings and eval scores of runs side by side, curves overlaid."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from .common import help_when_bare

runs_app = typer.Typer(help="Look at training run directories.", callback=help_when_bare, invoke_without_command=True,
                       rich_markup_mode=None)
console = Console(highlight=False)


@runs_app.command()
def compare(
    runs: list[Path] = typer.Argument(..., metavar="RUN_DIR...",
                                      help="Run directories (each with config.yaml and metrics.jsonl)."),
    out: Path | None = typer.Option(None, "--out", "-o", metavar="PATH", help="PNG of the overlaid curves (default: "
                                    "compare.png in the directory holding the runs)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summaries as one JSON object instead of a table."),
) -> None:
    """A table of the runs' last logged reward, accuracy, format, length, KL or loss, step time, peak memory and
    eval scores, and one PNG overlaying their curves."""
    from ..runs import compare_runs, comparison_rows

    summaries, png = compare_runs(runs, out)
    if as_json:
        print(json.dumps({"runs": [s.to_json() for s in summaries], "curves": str(png)}, ensure_ascii=False))
        return
    columns, rows = comparison_rows(summaries)
    table = Table(*columns)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    console.print(f"curves: {png}", soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.add_typer(runs_app, name="runs")
