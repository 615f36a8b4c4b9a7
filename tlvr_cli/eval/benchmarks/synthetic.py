"""The synthetic held-out split: ``<root>/eval.jsonl`` in the GRPO NextQA row format (formats §1):
``problem`` (question + "\\nA. …" option lines), ``solution`` ("<answer>X</answer>"),
``video_filename`` ("./NextQA/NExTVideo/…", relative to the root) and ``problem_id``."""

from __future__ import annotations

from pathlib import Path

from ...data.records import problem_options
from ...data.tags import answer_block_stripped
from ...errors import TlvrError
from ...jobs import EvalConfig
from ...video.decode import FrameSpec
from ..items import EvalItem, finish_prompt, read_jsonl, require_keys, video_under

NAME = "synthetic"
AGGREGATE = "micro"


def load_items(data_dir: Path, cfg: EvalConfig) -> list[EvalItem]:
    data_dir = Path(data_dir)
    path = data_dir / "eval.jsonl"
    items = []
    for i, row in enumerate(read_jsonl(path, "synthetic eval split")):
        where = f"{path} line {i + 1}"
        require_keys(row, ("problem", "solution", "video_filename"), where)
        options = problem_options(row["problem"])
        gold = answer_block_stripped(row["solution"])
        if not options or gold is None:
            raise TlvrError(f"{where}: expected 'A. …' option lines in problem and '<answer>X</answer>' in solution")
        # names are relative to the root, "./" or "/" in front (formats §1); "../" may not climb out of it
        rel = row["video_filename"]
        video = video_under(data_dir, rel.lstrip("/") if isinstance(rel, str) else rel, where)
        items.append(EvalItem(
            item_id=str(row.get("problem_id", i)),
            task=str(row.get("question_type") or row.get("task") or "all"),
            video=video,
            video_key=row["video_filename"],
            frame_spec=FrameSpec(kind="uniform"),
            prompt=finish_prompt(row["problem"], cfg.mode),
            choices=list(options),
            gold=gold[:1].upper(),
            meta={"option_texts": options},
        ))
    return items
