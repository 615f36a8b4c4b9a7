"""Scan videos before a long run: every one must exist, open, have frames, and decode at the sampled indices.

The report is JSON (``tlvr data check --report``); training reads its bad list through
:func:`load_skip_set` (``data.skip_report``) and skips those videos up front instead of mid-run.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..errors import TlvrError
from ..files import resolve_root, write_json_atomic
from .records import read_coldstart_records, read_grpo_rows

VIDEO_SUFFIXES = (".mp4", ".avi", ".webm", ".mkv")
NAMED_TARGETS = {
    # name: (default root under data_root(), annotation files relative to the root)
    "nextqa": ("train", ("nextqa_0-30s.jsonl",)),
    "coldstart": ("train", ("nextqa-coldstart-16.json",)),
    "synthetic": ("synthetic", ("nextqa_0-30s.jsonl", "eval.jsonl", "coldstart.json")),
}


@dataclass
class CheckResult:
    """The outcome for one video; ``kind`` is ``ok`` or a decoder error kind (missing, unreadable, ...)."""

    path: Path
    ok: bool
    kind: str
    detail: str
    frames: int  # frames in the whole video (0 when it could not be opened)
    seconds: float  # time spent checking it


def check_video(path: Path, num_frames: int = 16, *, backend: str = "auto", min_frames: int = 1) -> CheckResult:
    """Decode the ``num_frames`` linspace-sampled frames of one video, as training would."""
    from ..video.decode import VideoError, read_frames

    t0 = time.perf_counter()
    try:
        frames = read_frames(path, num_frames, backend=backend)
    except VideoError as e:
        return CheckResult(Path(path), False, e.kind, e.detail, 0, time.perf_counter() - t0)
    except Exception as e:  # any other decoder failure is still a bad video, not a crash of the scan
        detail = " ".join(f"{type(e).__name__}: {e}".split())
        return CheckResult(Path(path), False, "unreadable", detail, 0, time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    if frames.total <= 0 or len(frames.frames) == 0:
        return CheckResult(Path(path), False, "zero_frames", "no frames decoded", frames.total, seconds)
    if frames.total < min_frames:
        return CheckResult(Path(path), False, "too_short", f"{frames.total} frames < min_frames={min_frames}",
                           frames.total, seconds)
    return CheckResult(Path(path), True, "ok", "", frames.total, seconds)


def _unique(paths: list[Path]) -> list[Path]:
    seen: set[str] = set()
    out = []
    for p in paths:
        if str(p) not in seen:
            seen.add(str(p))
            out.append(Path(p))
    return out


def check_videos(paths: list[Path], num_frames: int = 16, *, backend: str = "auto", workers: int = 4,
                 min_frames: int = 1, progress: bool = True) -> list[CheckResult]:
    """Check each unique video in parallel threads (the decoders release the GIL); results keep input order."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    unique = _unique(paths)
    results: list[CheckResult] = []
    columns = (TextColumn("checking videos"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True, disable=not progress) as bar, \
            ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        task = bar.add_task("check", total=len(unique))
        for result in pool.map(lambda p: check_video(p, num_frames, backend=backend, min_frames=min_frames), unique):
            results.append(result)
            bar.advance(task)
    return results


def summarize(results: list[CheckResult]) -> dict[str, int]:
    """Videos per kind, ``ok`` first."""
    counts = Counter(r.kind for r in results)
    return {k: counts[k] for k in sorted(counts, key=lambda k: (k != "ok", k))}


def write_report(results: list[CheckResult], path: Path, target: str) -> dict:
    """Write the JSON report (target, counts per kind, the bad videos) atomically and return it."""
    report = {
        "target": target,
        "total": len(results),
        "counts": summarize(results),
        "bad": [{"path": str(r.path), "abs_path": os.path.abspath(r.path), "kind": r.kind, "detail": r.detail}
                for r in results if not r.ok],
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, report, indent=1)
    return report


def load_skip_set(path: Path) -> set[str]:
    """Paths (as checked, and absolute) of the bad videos in a ``tlvr data check`` report."""
    path = Path(path)
    if not path.is_file():
        raise TlvrError(f"{path}: check report not found (write one with `tlvr data check ... --report {path}`)")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TlvrError(f"{path}: not a readable check report ({e})") from None
    bad = report.get("bad") if isinstance(report, dict) else None
    if not isinstance(bad, list) or not all(isinstance(b, dict) and isinstance(b.get("path"), str) for b in bad):
        raise TlvrError(f"{path}: not a check report (expected an object with a 'bad' list of {{path, kind, detail}})")
    skip: set[str] = set()
    for b in bad:
        skip.add(b["path"])
        if isinstance(b.get("abs_path"), str):
            skip.add(b["abs_path"])
    return skip


def _videos_in_annotations(path: Path, root: Path) -> list[Path]:
    if path.suffix == ".jsonl":
        return [r.video_path for r in read_grpo_rows(path, root)]
    if path.suffix == ".json":
        return [r.video_path for r in read_coldstart_records(path, root)]
    raise TlvrError(f"{path}: expected a .jsonl (GRPO rows) or .json (cold-start list) annotation file")


def videos_for_target(target: str, root: Path | None = None) -> list[Path]:
    """The unique videos a target names: nextqa, coldstart, synthetic, an annotation file, or a directory.

    ``root`` defaults to ``$TLVR_DATA/train`` (``/synthetic`` for the synthetic set) for named targets
    and to the annotation file's folder for a file.
    """
    if target in NAMED_TARGETS:
        sub, files = NAMED_TARGETS[target]
        base = resolve_root(root, sub)
        paths: list[Path] = []
        for name in files:
            paths += _videos_in_annotations(base / name, base)
        return _unique(paths)
    p = Path(target)
    if p.is_dir():
        return sorted(f for f in p.rglob("*") if f.suffix.lower() in VIDEO_SUFFIXES and f.is_file())
    if p.is_file():
        return _unique(_videos_in_annotations(p, Path(root) if root is not None else p.parent))
    if p.suffix in (".json", ".jsonl") or os.sep in target:
        raise TlvrError(f"{target}: not found")
    names = ", ".join(NAMED_TARGETS)
    raise TlvrError(f"unknown check target {target!r}: expected one of {names}, an annotation file (.jsonl/.json) "
                    "or a directory")


def default_report_path(target: str, root: Path | None = None) -> Path:
    """Where ``tlvr data check`` writes its report unless told: beside the data it checked (the
    named target's root, the annotation file's folder, or the video directory itself)."""
    if target in NAMED_TARGETS:
        return resolve_root(root, NAMED_TARGETS[target][0]) / f"check-{target}.json"
    p = Path(target)
    return (p if p.is_dir() else p.parent) / f"check-{p.stem or 'videos'}.json"
