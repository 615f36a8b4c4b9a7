"""``tlvr push CHECKPOINT REPO_ID``: publish a checkpoint with its model card on the Hugging Face hub."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

console = Console(highlight=False)


def push(
    checkpoint: Path = typer.Argument(..., metavar="CHECKPOINT",
                                      help="A checkpoint in the released layout, e.g. RUN_DIR/final."),
    repo_id: str = typer.Argument(..., metavar="REPO_ID", help="The model repo to create or update, owner/name."),
    private: bool = typer.Option(False, "--private", help="Create the repo private (an existing one stays as it is)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the files, their sizes and the card; upload nothing."),
) -> None:
    """Upload a checkpoint with a model card (training config, eval results, curves) to the hub (needs HF_TOKEN)."""
    from ..publish import plan_lines, push_checkpoint

    result = push_checkpoint(checkpoint, repo_id, private=private, dry_run=dry_run)
    if dry_run:
        console.print(f"would upload to {repo_id}{' (private)' if private else ''}:", soft_wrap=True)
        for line in plan_lines(result.plan):
            console.print(line, soft_wrap=True, markup=False)
        console.print(f"\n--- {result.plan.files[-1].path_in_repo} ---", markup=False)
        console.print(result.plan.card, soft_wrap=True, markup=False, end="")
        return
    console.print(f"[green]pushed[/] {len(result.plan.files)} files to {result.url} ({result.commit_url})",
                  soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command()(push)
