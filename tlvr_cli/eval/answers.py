"""The answers file of an evaluation: one JSON object per item (``item_id`` first), appended and
flushed as each item is answered, so a killed run resumes where it stopped. A run killed mid-write
leaves a torn last line: ``truncate_torn_tail`` drops it before the next run appends."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import TlvrError
from ..files import write_text_atomic

ANSWERS = "answers.jsonl"
SPEED = "speed.json"  # how fast the last run that answered something answered


def read_answers(path: Path, *, missing_ok: bool = True) -> list[dict]:
    """The rows of an answers file, in file order; blank or torn lines (a run killed mid-write) and
    lines that are not answer rows are ignored. A missing file is empty unless ``missing_ok`` is off;
    then a file without a single answer row (a metrics.jsonl, a check report) is an error too."""
    path = Path(path)
    if not path.is_file():
        if missing_ok:
            return []
        raise TlvrError(f"answers file not found: {path}")
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "item_id" in row:
            rows.append(row)
    if not rows and not missing_ok:
        raise TlvrError(f"{path}: not an answers file (no line is an answer row with an item_id; `tlvr eval` writes "
                        f"{ANSWERS} in its output directory)")
    return rows


def truncate_torn_tail(path: Path) -> int:
    """Cut a last line that has no newline (a write cut short), so appended rows start on a line of
    their own; returns the bytes dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return 0
    keep = data.rfind(b"\n") + 1
    with path.open("rb+") as f:
        f.truncate(keep)
    return len(data) - keep


def answer_files(out_dir: Path) -> list[Path]:
    """Every answers file in ``out_dir``: ``answers.jsonl`` and the per-process ``answers.rank*.jsonl``."""
    out_dir = Path(out_dir)
    return [p for p in [out_dir / ANSWERS, *sorted(out_dir.glob("answers.rank*.jsonl"))] if p.is_file()]


def rank_answers_path(out_dir: Path, rank: int, world_size: int) -> Path:
    """Each process of a sharded evaluation appends to its own file; one process writes answers.jsonl."""
    return Path(out_dir) / (ANSWERS if world_size == 1 else f"answers.rank{rank}.jsonl")


def read_all_answers(out_dir: Path) -> list[dict]:
    """The rows of every answers file in ``out_dir``, one per item (``answers.jsonl``'s first): what runs
    with any number of processes answered, so a run resumes another's whatever their process counts."""
    rows: dict[str, dict] = {}
    for path in answer_files(out_dir):
        for row in read_answers(path):
            rows.setdefault(row["item_id"], row)
    return list(rows.values())


def merge_answers(out_dir: Path, item_order: list[str]) -> list[dict]:
    """Every answers file's rows in ``out_dir`` (``read_all_answers``) into one ``answers.jsonl`` in
    benchmark order (written atomically); returns them."""
    order = {k: i for i, k in enumerate(item_order)}
    merged = sorted(read_all_answers(out_dir), key=lambda row: order.get(row["item_id"], len(order)))
    write_answers(Path(out_dir) / ANSWERS, merged)
    return merged


def write_answers(path: Path, rows: list[dict]) -> None:
    """Replace an answers file by ``rows`` atomically (e.g. put in benchmark order once complete)."""
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def speed_files(out_dir: Path) -> list[Path]:
    """Every speed record in ``out_dir``: ``speed.json`` and the per-process ``speed.rank*.json``."""
    out_dir = Path(out_dir)
    return [p for p in [out_dir / SPEED, *sorted(out_dir.glob("speed.rank*.json"))] if p.is_file()]


def rank_speed_path(out_dir: Path, rank: int, world_size: int) -> Path:
    """Where a run records how fast it answered, per process like its answers file."""
    return Path(out_dir) / (SPEED if world_size == 1 else f"speed.rank{rank}.json")


def merge_speeds(speeds: list[dict]) -> dict:
    """One speed record for the processes of a sharded run (``speeds``: the records of those that answered
    something): counts summed, times of the slowest process, rates over those times."""
    total = {key: sum(s[key] for s in speeds) for key in (
        "questions", "skipped", "generated_tokens", "prompt_positions", "prefilled_positions", "already_answered")}
    seconds = max(s["generate_s"] for s in speeds)
    return {**total, "generate_s": seconds, "first_answer_s": min(s["first_answer_s"] for s in speeds),
            "tokens_per_s": round(total["generated_tokens"] / seconds, 1),
            "questions_per_s": round(total["questions"] / seconds, 2),
            "wall_s": max(s["wall_s"] for s in speeds), "load_s": max(s["load_s"] for s in speeds),
            "engine_max_batch": speeds[0]["engine_max_batch"], "processes": len(speeds),
            "devices": [s["device"] for s in speeds]}
