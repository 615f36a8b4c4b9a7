"""Where tlvr's data lives (``data_root``, ``resolve_root``), and atomic file writes: a temp file in the
same directory, then ``os.replace``, so a reader (or a resumed run) never sees half a file. Imports
nothing heavy: commands check their inputs through it before torch is imported."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def data_root() -> Path:
    """Where datasets and fetched models live: ``$TLVR_DATA``, else ``~/.cache/tlvr``."""
    return Path(os.environ.get("TLVR_DATA") or Path.home() / ".cache" / "tlvr")


def resolve_root(value: str | os.PathLike | None, sub: str) -> Path:
    """A configured root (``data.root``, ``--root``, ``data_dir``) or, when empty, ``data_root()/<sub>``."""
    return Path(value).expanduser() if value else data_root() / sub


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; a failed write leaves the old file and no temp file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: int = 2) -> Path:
    """``obj`` as JSON (non-ASCII kept, trailing newline), written atomically."""
    return write_text_atomic(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")
