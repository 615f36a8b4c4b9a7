"""Where each input comes from: the exact command that writes a file or directory that is missing,
so that every "not found" error can name it (``tlvr data fetch videomme``, ``tlvr data synth --root DIR``)."""

from __future__ import annotations

import shlex
from pathlib import Path

from ..files import data_root
from .fetch import TARGETS

# the files `tlvr data synth` writes (synth.TRAIN_FILE, EVAL_FILE, COLDSTART_FILE: a test keeps them equal)
SYNTH_FILES = ("nextqa_0-30s.jsonl", "eval.jsonl", "coldstart.json")
SYNTH_DIR = "synthetic"  # where `tlvr data synth` writes without --root, under the data root
DEMO_DATA = Path("runs/demo-data")  # the demo preset's data.root (a test keeps them equal)


def fetch_target_of_repo(repo_id: str) -> str | None:
    """The `tlvr data fetch` target that downloads hub repo ``repo_id`` (None if none does)."""
    return next((t.name for t in TARGETS.values() if t.repo_id == repo_id), None)


def command_for(path: str | Path) -> str | None:
    """The command that writes ``path``: ``tlvr data fetch <target>`` (with ``--root`` unless it is the
    default data root) when a target's destination holds it, ``tlvr data synth`` for the synthetic
    set's files, else None."""
    path = Path(path).expanduser()
    default = data_root()
    for target in TARGETS.values():
        dest = Path(target.dest).parts
        root = _root_above(path, dest, default)
        if root is not None:
            return f"tlvr data fetch {target.name}" + ("" if root == default else f" --root {shlex.quote(str(root))}")
    if path.name in SYNTH_FILES:
        out = path.parent
        return "tlvr data synth" + ("" if out == default / SYNTH_DIR else f" --root {shlex.quote(str(out))}")
    return None


def _root_above(path: Path, dest: tuple[str, ...], default: Path) -> Path | None:
    """The data root ``R`` with ``path`` under ``R/dest``: the default root when it fits, else the
    outermost place the destination's folders appear in the path."""
    try:
        rel = path.relative_to(default).parts
        if rel[:len(dest)] == dest:
            return default
    except ValueError:
        pass
    parts = path.parts
    for i in range(len(parts) - len(dest) + 1):
        if parts[i:i + len(dest)] == dest:
            return Path(*parts[:i]) if i else Path(".")
    return None


def missing_hint(path: str | Path, option: str) -> str:
    """`` (write it with `…`)`` for a missing ``path``, '' when no command writes it; when the demo's
    copy of a synthetic file is in the current directory, also how to point at it (``option`` is how
    the job names its data directory: ``--data-dir``, ``--set data.root=``)."""
    path = Path(path)
    command = command_for(path)
    hints = [f"write it with `{command}`"] if command else []
    demo = DEMO_DATA / path.name
    if path.name in SYNTH_FILES and demo.is_file() and path.parent.resolve() != DEMO_DATA.resolve():
        sep = "" if option.endswith("=") else " "
        hints.append(f"or use the demo's with {option}{sep}{DEMO_DATA}")
    return f" ({' '.join(hints)})" if hints else ""
