"""One evaluation question (``EvalItem``) and the small helpers every benchmark reader shares:
option letters, gold-letter lookup, the instruction suffix, and annotation loading with clear errors."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.records import resolve_under_root
from ..data.template import OPTION_INSTRUCTION, REASON_INSTRUCTION, video_question
from ..errors import TlvrError
from ..video.decode import FrameSpec

# spec §6.2: a gold answer missing from the candidates keeps index -1, i.e. chr(ord('A') - 1).
GOLD_NOT_IN_CANDIDATES = "@"


@dataclass
class EvalItem:
    """A multiple-choice question about one video, ready for the runner."""

    item_id: str  # unique and stable across runs: the answers file is keyed by it (resume)
    task: str  # breakdown key in the report
    video: Path  # a video file, or a JPEG frame folder (MVBench Episodic Reasoning)
    video_key: str  # the video as the annotation names it
    frame_spec: FrameSpec
    prompt: str  # full user message: "<image>\n" + body + "\n" + instruction
    choices: list[str]  # option letters, e.g. ["A", "B", "C", "D"]
    gold: str  # gold letter ("@" when the gold text is not among the candidates)
    meta: dict[str, Any] = field(default_factory=dict)


def choice_letters(n: int) -> list[str]:
    """The letters of ``n`` candidates: A, B, C, ..."""
    return [chr(ord("A") + i) for i in range(n)]


def gold_letter(candidates: list[str], answer: str) -> str:
    """Letter of the candidate equal to ``answer`` (first match); "@" when none matches (spec §6.2)."""
    for i, cand in enumerate(candidates):
        if cand == answer:
            return chr(ord("A") + i)
    return GOLD_NOT_IN_CANDIDATES


def finish_prompt(body: str, mode: str) -> str:
    """The user message: the video, ``body`` and the reason (spec §3.3) or option instruction."""
    return video_question(body, REASON_INSTRUCTION if mode == "reason" else OPTION_INSTRUCTION)


def video_under(folder: Path, rel, where: str) -> Path:
    """The annotation's video ``rel`` inside ``folder`` (the folder the reference joins it onto); a
    name that climbs out with ``..`` or is absolute is refused, naming the annotation."""
    if not isinstance(rel, str):
        raise TlvrError(f"{where}: video path must be a string, got {type(rel).__name__}")
    try:
        return resolve_under_root(folder, rel, allow_absolute=False)
    except TlvrError as e:
        raise TlvrError(f"{where}: {e}") from None


def require_file(path: Path, what: str) -> Path:
    """``path`` if it is a file; else a one-line error naming the command that writes it."""
    if not path.is_file():
        from ..data.sources import missing_hint

        raise TlvrError(f"{what}: missing {path}{missing_hint(path, '--data-dir')}")
    return path


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        from ..data.sources import missing_hint

        raise TlvrError(f"{what}: missing directory {path}{missing_hint(path, '--data-dir')}")
    return path


def read_json(path: Path, what: str) -> Any:
    require_file(path, what)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TlvrError(f"{what}: {path} is not valid JSON ({e.msg} at line {e.lineno})") from None


def read_jsonl(path: Path, what: str) -> list[dict]:
    require_file(path, what)
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise TlvrError(f"{what}: {path} line {n} is not valid JSON ({e.msg})") from None
    return rows


def require_keys(row: dict, keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise TlvrError(f"{where}: record lacks {', '.join(missing)}")
