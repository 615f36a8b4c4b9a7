"""Archive extraction for ``tlvr data fetch``: zip and tar archives extracted next to themselves
through a staging directory, members that would land outside refused, and a marker file that
says the extraction finished (without it, the next run extracts again from scratch)."""

from __future__ import annotations

import os
import shutil
import tarfile
import time
import zipfile
import zlib
from pathlib import Path

from ..errors import TlvrError, first_line
from ..files import write_json_atomic

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")


def now_utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def is_archive(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_SUFFIXES)


def extraction_marker(archive: Path) -> Path:
    return archive.parent / f".extracted-{archive.name}"


def _safe_member(name: str, archive: Path) -> None:
    parts = Path(name).parts
    if name.startswith(("/", "\\")) or Path(name).is_absolute() or ".." in parts or (parts and ":" in parts[0]):
        raise TlvrError(f"{archive}: unsafe member {name!r} (it points outside the archive); nothing extracted")


def _extract_into(archive: Path, into: Path) -> None:
    if archive.name.lower().endswith(".zip"):
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                _safe_member(name, archive)
            zf.extractall(into)
        return
    with tarfile.open(archive) as tf:
        members = tf.getmembers()
        for m in members:
            _safe_member(m.name, archive)
            if m.issym() or m.islnk():
                _safe_member(os.path.normpath(os.path.join(os.path.dirname(m.name), m.linkname))
                             if m.issym() else m.linkname, archive)
            elif not (m.isfile() or m.isdir()):
                raise TlvrError(f"{archive}: member {m.name!r} is a device or fifo; nothing extracted")
        tf.extractall(into, members=members, filter="data")


def _merge_move(src: Path, dst: Path) -> None:
    if src.is_dir() and not src.is_symlink() and dst.is_dir() and not dst.is_symlink():
        for child in src.iterdir():
            _merge_move(child, dst / child.name)
        src.rmdir()
        return
    if dst.is_dir() and not dst.is_symlink():
        shutil.rmtree(dst)
    elif dst.exists() or dst.is_symlink():
        dst.unlink()  # left over from an interrupted extraction
    os.replace(src, dst)


def extract_archive(archive: Path, size: int | None = None) -> bool:
    """Extract ``archive`` next to itself unless its marker says it is done; True if it was extracted now."""
    marker = extraction_marker(archive)
    if marker.exists():
        return False
    into = archive.parent
    stage = into / f".tlvr-extract-{archive.name}"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir()
    try:
        try:
            _extract_into(archive, stage)
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error) as exc:  # cut short or damaged
            raise TlvrError(f"{archive}: damaged archive, nothing extracted ({first_line(exc)}): delete it and run "
                            f"`tlvr data fetch` for it again") from exc
        for entry in sorted(stage.iterdir()):
            _merge_move(entry, into / entry.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    write_json_atomic(marker, {"archive": archive.name, "size": size if size is not None else archive.stat().st_size,
                         "time": now_utc()})
    return True
