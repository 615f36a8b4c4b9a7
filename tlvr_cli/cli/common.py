"""What the commands share: help texts, the bare-group rule, the command that resumes a run and the
quick exit of a one-shot command."""

from __future__ import annotations

import atexit
import os
import shlex
import sys

import typer

PRESET_HELP = "Preset name (see `tlvr presets list`) or path to a YAML file."
SET_HELP = "Override a preset key: dotted.key=value (repeatable), e.g. --set optim.lr=1e-6."
RESUME_HELP = ("Resume from 'auto' (the latest checkpoint in the run directory; a fresh start when there is none) "
               "or a checkpoint directory. Without it, a run directory that holds a run with the same config is "
               "continued, or reused when complete.")
RUN_DIR_HELP = "Output directory (overrides output.run_dir)."
FORCE_HELP = ("Go on in a run directory whose run has another config (beyond the keys that may change, see the "
              "README): resume it with the new config; both configs are kept (config.previous.yaml, "
              "config-changes.jsonl).")


def help_when_bare(ctx: typer.Context) -> None:
    """A group called without a subcommand prints its help and exits 2, as click's ``no_args_is_help``
    does; done here so that the help goes out as the normal help text, never as an exception."""
    if ctx.invoked_subcommand is None and not ctx.resilient_parsing:
        typer.echo(ctx.get_help())
        raise typer.Exit(2)


def resume_command(args: list[str], world_size: int = 1) -> str:
    """The command line that resumes an interrupted run: the same arguments with ``--resume auto``
    (any other ``--resume`` and ``--force`` dropped: the run directory now holds the new config)."""
    kept: list[str] = []
    skip = False
    for a in args:
        if skip:
            skip = False
            continue
        if a == "--resume":
            skip = True
            continue
        if a.startswith("--resume=") or a == "--force":
            continue
        kept.append(a)
    line = shlex.join([*kept, "--resume", "auto"])
    return f"tlvr {line}" if world_size == 1 else f"the same launcher with: -m tlvr_cli {line}"


_quick_exit = False  # set by a command whose process may end without the interpreter's teardown


def allow_quick_exit() -> None:
    """Let the console entry point end this process without the interpreter's teardown once the
    command returns successfully (``exit_now``). For one-shot commands with no threads or files left
    open (``tlvr infer``); a command called from Python (``main``, typer's test runner) is not affected."""
    global _quick_exit
    _quick_exit = True


def quick_exit_allowed() -> bool:
    return _quick_exit


def exit_now(code: int = 0) -> None:
    """End the process as a normal exit does, less the interpreter's teardown: flush the streams, run
    the atexit handlers (logging, weakref finalizers, ...), then ``os._exit``. With torch and
    transformers imported, that teardown (freeing every module's objects) takes about a second."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)
