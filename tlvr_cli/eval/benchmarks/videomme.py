"""Video-MME, without subtitles (spec §6.1; formats §3).

Layout: ``<root>/videomme/test-00000-of-00001.parquet`` and ``<root>/data/<videoID>.mp4``.
One item per parquet row, in file order, filtered by ``cfg.duration`` (``all`` keeps the three).
The breakdown key is ``task_type``; the duration is the first part of ``item_id`` so the report
can also give per-duration accuracies from an answers file alone.
"""

from __future__ import annotations

from pathlib import Path

from ...errors import TlvrError
from ...jobs import EvalConfig
from ...video.decode import FrameSpec
from ..items import EvalItem, finish_prompt, require_file, require_keys, video_under

NAME = "videomme"
AGGREGATE = "micro"  # spec §6.1: per-item mean per duration; equal-size splits, so overall = mean
PARQUET = Path("videomme") / "test-00000-of-00001.parquet"
DURATIONS = ("short", "medium", "long")
_VIDEO_SUFFIXES = (".mp4", ".MP4", ".mkv")  # formats §3: lmms-eval also tries .MP4/.mkv


def _video_path(root: Path, video_id, where: str) -> Path:
    if not isinstance(video_id, str):
        raise TlvrError(f"{where}: videoID must be a string, got {type(video_id).__name__}")
    for suffix in _VIDEO_SUFFIXES:
        path = video_under(root / "data", f"{video_id}{suffix}", where)
        if path.exists():
            return path
    return video_under(root / "data", f"{video_id}.mp4", where)  # missing: the runner records it as skipped


def _option_text(option: str) -> str:
    # "A. Apples." -> "Apples" (the text the option-mode parser matches on)
    text = option.split(". ", 1)[1] if ". " in option else option
    return text.removesuffix(".")


def build_prompt(question: str, options: list[str], mode: str) -> str:
    if mode == "reason":
        body = question + "\nOptions:\n" + "\n".join(options)
    else:  # spec §3.3: the TV evaluator has no "Options:" header
        body = question + "\n" + "\n".join(options)
    return finish_prompt(body, mode)


def load_items(data_dir: Path, cfg: EvalConfig) -> list[EvalItem]:
    import pyarrow.parquet as pq

    data_dir = Path(data_dir)
    path = require_file(data_dir / PARQUET, "Video-MME annotations")
    rows = pq.read_table(path).to_pylist()
    if cfg.duration not in (*DURATIONS, "all"):
        raise TlvrError(f"Video-MME: duration must be short, medium, long or all, not {cfg.duration!r}")
    kind = "pts_seek" if cfg.frame_protocol == "paper" else "uniform"  # spec §2.B
    items = []
    for i, row in enumerate(rows):
        require_keys(row, ("duration", "videoID", "question", "options", "answer"), f"{path} row {i}")
        if cfg.duration != "all" and row["duration"] != cfg.duration:
            continue
        options = [str(o) for o in row["options"]]
        choices = [o.split(".")[0] for o in options]  # spec §6.1
        qid = row.get("question_id") or f"{row.get('video_id') or row['videoID']}-{i}"
        items.append(EvalItem(
            item_id=f"{row['duration']}/{qid}",
            task=row.get("task_type") or row["duration"],
            video=_video_path(data_dir, row["videoID"], f"{path} row {i}"),
            video_key=row["videoID"],
            frame_spec=FrameSpec(kind=kind),
            prompt=build_prompt(row["question"], options, cfg.mode),
            choices=choices,
            gold=str(row["answer"]).strip(),
            meta={"duration": row["duration"], "domain": row.get("domain"), "sub_category": row.get("sub_category"),
                  "question_id": qid, "option_texts": {c: _option_text(o) for c, o in zip(choices, options)}},
        ))
    return items
