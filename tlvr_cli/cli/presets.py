"""``tlvr presets list|show``."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..config import list_presets, load_config, load_preset_dict, read_yaml, to_yaml
from ..errors import TlvrError
from ..jobs import JOBS
from .common import help_when_bare

presets_app = typer.Typer(help="List and show the YAML presets.", callback=help_when_bare, invoke_without_command=True,
                          rich_markup_mode=None)
console = Console(highlight=False)


@presets_app.command("list")
def list_() -> None:
    """List every preset with its job and the command that runs it."""
    # long cells fold onto the next line instead of being cut with an ellipsis, at any terminal width
    table = Table("preset", "job", "runs with", "file")
    for column in table.columns:
        column.overflow = "fold"
    for name, path in list_presets().items():
        data = read_yaml(path)
        first = path.read_text().splitlines()[0] if path.read_text() else ""
        command = first.lstrip("# ").strip() if first.startswith("#") else ""
        # cells are plain text: `tlvr[lora]` must not read as rich markup
        table.add_row(*(escape(cell) for cell in (name, str(data.get("job", "?")), command, str(path))))
    console.print(table)


@presets_app.command("show")
def show(
    name: str = typer.Argument(..., metavar="NAME|PATH", help="Preset name or YAML path."),
    set_: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="dotted.key=value override (repeatable)."),
    help_: bool = typer.Option(True, "--help-comments/--no-help-comments",
                               help="Annotate each key with its help text."),
) -> None:
    """Print the resolved preset (defaults, base presets and overrides merged) as YAML."""
    job = load_preset_dict(name).get("job")
    if job not in JOBS:
        raise TlvrError(f"preset {name}: 'job' must be one of {', '.join(JOBS)}, got {job!r}")
    cfg = load_config(JOBS[job], name, set_)
    print(to_yaml(cfg, with_help=help_), end="")


def register(app: typer.Typer) -> None:
    app.add_typer(presets_app, name="presets")
