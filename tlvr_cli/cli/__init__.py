"""The ``tlvr`` command: a thin typer layer over the library (each command parses options and calls one function)."""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from .. import __version__
from ..errors import TlvrError
from . import data, eval, presets, push, run, runs

app = typer.Typer(
    name="tlvr",
    help="TinyLLaVA-Video-R1, fast and faithful: data, cold start, GRPO, evaluation and inference.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err_console = Console(stderr=True, highlight=False)


def _version(value: bool) -> None:
    if value:
        print(f"tlvr {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """TinyLLaVA-Video-R1, fast and faithful."""


presets.register(app)
app.add_typer(data.data_app, name="data")
run.register(app)
eval.register(app)
push.register(app)
runs.register(app)


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, standalone_mode=False)
    except TlvrError as e:
        err_console.print(f"[bold red]error:[/] {e}", soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:  # click usage errors
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(130)
        raise
