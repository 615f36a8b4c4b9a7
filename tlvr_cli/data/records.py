"""Readers for the two NextQA training formats (spec formats §1): GRPO rows (JSONL) and cold-start records (JSON list).

Both resolve each video against the data root. The reference concatenates strings
(``root + video_filename[1:]``, which only works for ``./X``); here a relative name is joined under
the root after dropping a leading ``./``, an absolute name is kept, and a name that climbs out of
the root with ``..`` is an error. Every problem is one :class:`TlvrError` line naming ``file:line``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import TlvrError

GRPO_REQUIRED = ("problem", "solution", "video_filename")
_OPTION_LINE = re.compile(r"^\s*([A-Z])\.\s?(.*)$")


@dataclass
class GRPORow:
    """One GRPO prompt (spec §5.1): the question with its options, the gold ``<answer>X</answer>``, its video."""

    index: int
    problem: str
    solution: str
    video_filename: str
    video_path: Path
    extra: dict = field(default_factory=dict)  # every other field of the row (problem_id, data_type, ...)


@dataclass
class ColdstartRecord:
    """One LLaVA-style cold-start sample (spec §4): a video and its human/gpt turns."""

    index: int
    video: str
    video_path: Path
    conversations: list[dict]
    extra: dict = field(default_factory=dict)


def resolve_under_root(root: Path, rel: str, *, allow_absolute: bool = True) -> Path:
    """``rel`` joined under ``root`` (leading ``./`` dropped); escaping ``root`` is an error. Absolute
    paths are kept (training annotations may point anywhere) unless ``allow_absolute`` is off (benchmark
    annotations name files inside the benchmark's own folders)."""
    if not rel or not rel.strip():
        raise TlvrError("empty video path")
    if os.path.isabs(rel):
        if not allow_absolute:
            raise TlvrError(f"video path {rel!r} is absolute; expected a path under {root}")
        return Path(rel)
    norm = os.path.normpath(rel)
    if norm == ".." or norm.startswith(".." + os.sep) or norm == ".":
        raise TlvrError(f"video path {rel!r} escapes the data root {root}")
    return Path(root) / norm


def problem_options(problem: str) -> dict[str, str]:
    """The option lines (``"A. text"``) of a problem as letter → text, in order; a repeated letter keeps its
    first line."""
    options: dict[str, str] = {}
    for line in problem.splitlines():
        m = _OPTION_LINE.match(line)
        if m:
            options.setdefault(m.group(1), m.group(2))
    return options


def _read_text(path: Path, what: str) -> str:
    path = Path(path)
    if not path.is_file():
        from .sources import missing_hint

        hint = missing_hint(path, "--set data.root=") if not path.exists() else " (not a file)"
        raise TlvrError(f"{path}: {what} not found{hint}")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TlvrError(f"{path}: cannot read {what}: {e}") from None


def read_grpo_rows(path: Path, root: Path) -> list[GRPORow]:
    """Rows of a NextQA GRPO JSONL file; rows whose ``data_type`` is set and not ``video`` are dropped."""
    path = Path(path)
    rows: list[GRPORow] = []
    for lineno, line in enumerate(_read_text(path, "GRPO annotations").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise TlvrError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise TlvrError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        for key in GRPO_REQUIRED:
            if key not in obj:
                raise TlvrError(f"{where}: missing field '{key}'")
            if not isinstance(obj[key], str):
                raise TlvrError(f"{where}: field '{key}' must be a string, got {type(obj[key]).__name__}")
        if obj.get("data_type", "video") != "video":
            continue  # converters of this file keep only video rows
        try:
            video_path = resolve_under_root(Path(root), obj["video_filename"])
        except TlvrError as e:
            raise TlvrError(f"{where}: field 'video_filename': {e}") from None
        extra = {k: v for k, v in obj.items() if k not in GRPO_REQUIRED}
        rows.append(GRPORow(len(rows), obj["problem"], obj["solution"], obj["video_filename"], video_path, extra))
    return rows


def _check_conversations(conv, where: str) -> list[dict]:
    if not isinstance(conv, list) or not conv:
        raise TlvrError(f"{where}: field 'conversations' must be a non-empty list")
    for t, turn in enumerate(conv):
        if not isinstance(turn, dict):
            raise TlvrError(f"{where}: conversations[{t}] must be an object")
        for key in ("from", "value"):
            if not isinstance(turn.get(key), str):
                raise TlvrError(f"{where}: conversations[{t}] needs a string field '{key}'")
    if conv[0]["from"] != "human":
        raise TlvrError(f"{where}: conversations[0] must be from 'human', got {conv[0]['from']!r}")
    return conv


def read_coldstart_records(path: Path, root: Path) -> list[ColdstartRecord]:
    """Records of a LLaVA-style cold-start JSON list (``video`` + ``conversations``)."""
    path = Path(path)
    try:
        data = json.loads(_read_text(path, "cold-start annotations"))
    except json.JSONDecodeError as e:
        raise TlvrError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(data, list):
        raise TlvrError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    records: list[ColdstartRecord] = []
    for i, obj in enumerate(data):
        where = f"{path}: record {i}"
        if not isinstance(obj, dict):
            raise TlvrError(f"{where}: expected an object, got {type(obj).__name__}")
        if not isinstance(obj.get("video"), str):
            raise TlvrError(f"{where}: missing string field 'video'")
        conv = _check_conversations(obj.get("conversations"), where)
        try:
            video_path = resolve_under_root(Path(root), obj["video"])
        except TlvrError as e:
            raise TlvrError(f"{where}: field 'video': {e}") from None
        extra = {k: v for k, v in obj.items() if k not in ("video", "conversations")}
        records.append(ColdstartRecord(i, obj["video"], video_path, conv, extra))
    return records
