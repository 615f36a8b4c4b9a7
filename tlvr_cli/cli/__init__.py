"""The ``tlvr`` command: a thin typer layer over the library (each command parses options and calls one function).

``main`` owns the exit status: 0 on success, a command's own code (``typer.Exit``), 2 for usage errors and
``TlvrError``s (one line each, never a traceback), 130 for Ctrl-C.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from .. import __version__
from ..errors import Interrupted, TlvrError
from . import data, eval, presets, push, run, runs
from .common import exit_now, help_when_bare, quick_exit_allowed, resume_command

app = typer.Typer(
    name="tlvr",
    help="TinyLLaVA-Video-R1, fast and faithful: data, cold start, GRPO, evaluation and inference.",
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # plain click help: rich panels would label every flag with a <bool> type
)
err_console = Console(stderr=True, highlight=False)


def _version(value: bool) -> None:
    if value:
        print(f"tlvr {__version__}")
        raise typer.Exit()


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """TinyLLaVA-Video-R1, fast and faithful."""
    help_when_bare(ctx)


presets.register(app)
app.add_typer(data.data_app, name="data")
run.register(app)
eval.register(app)
push.register(app)
runs.register(app)


def _parse_error_types() -> tuple[type[BaseException], ...]:
    """The exceptions click raises for bad command lines: typer >= 0.24 bundles its own click, whose
    exceptions derive from ``typer.TyperException``; older typer raises click's own."""
    kinds: list[type[BaseException]] = []
    if isinstance(getattr(typer, "TyperException", None), type):
        kinds.append(typer.TyperException)
    try:
        import click

        kinds.append(click.ClickException)
    except ImportError:
        pass
    return tuple(kinds)


def _say(message: str) -> None:
    err_console.print(message, soft_wrap=True, markup=False)


def run_cli(args: list[str]) -> int:
    """Run the command line ``args`` (without the program name) and return its exit status."""
    command = typer.main.get_command(app)
    try:
        with command.make_context("tlvr", list(args)) as ctx:
            command.invoke(ctx)
        return 0
    except Interrupted as e:
        from ..runtime import launch_world_size

        resume = f"; resume with: {resume_command(list(args), launch_world_size())}" if e.saved else ""
        _say(f"interrupted: {e}{resume}")
        return e.exit_code
    except TlvrError as e:
        _say(f"error: {e}")
        return e.exit_code
    except typer.Exit as e:
        return e.exit_code
    except KeyboardInterrupt:
        _say("interrupted")
        return 130
    except typer.Abort:
        _say("aborted")
        return 1
    except BrokenPipeError:  # `tlvr presets list | head`: the reader left, nothing to report
        sys.stderr.close()
        return 1
    except _parse_error_types() as e:
        return _usage_error(e)


def _usage_error(e: BaseException) -> int:
    """One line: the error and, for a bad command line, the usage of the command it was meant for."""
    message = " ".join(e.format_message().split()) if hasattr(e, "format_message") else str(e)
    ctx = getattr(e, "ctx", None)
    if ctx is not None:
        usage = " ".join(ctx.get_usage().split()).removeprefix("Usage: ")
        message += f" (usage: {usage}; see `{ctx.command_path} --help`)"
    _say(f"error: {message}")
    return int(getattr(e, "exit_code", 2))


def main(argv: list[str] | None = None) -> None:
    """The ``tlvr`` entry point (also ``python -m tlvr_cli``): returns on success, else exits with the
    command's status (``SystemExit``), so that a caller in Python sees every failure."""
    code = run_cli(sys.argv[1:] if argv is None else argv)
    if code:
        sys.exit(code)


def console_main() -> None:
    """The console script ``tlvr`` and ``python -m tlvr_cli``: ``main``; a command that allows it
    (``common.allow_quick_exit``) then ends the process without the interpreter's teardown."""
    main()
    if quick_exit_allowed():
        exit_now(0)
