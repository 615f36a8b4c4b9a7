"""MLVU dev, the 7 multiple-choice tasks (spec §6.3; formats §5).

Layout: ``<root>/json/<n_task>.json`` and ``<root>/video/<n_task>/<video>``. The open-ended tasks
(8_sub_scene, 9_summary) are not read. The headline is the macro mean of the task accuracies.
"""

from __future__ import annotations

from pathlib import Path

from ...jobs import EvalConfig
from ...video.decode import FrameSpec
from ..items import (
    EvalItem,
    choice_letters,
    finish_prompt,
    gold_letter,
    read_json,
    require_dir,
    require_keys,
    video_under,
)

NAME = "mlvu"
AGGREGATE = "macro"  # spec §6.3: Avg = mean of the 7 task accuracies

# (task, annotation stem = video sub-folder) in the reference's evaluation order
TASKS: list[tuple[str, str]] = [
    ("count", "4_count"),
    ("ego", "3_ego"),
    ("needle", "2_needle"),
    ("order", "5_order"),
    ("plotQA", "1_plotQA"),
    ("anomaly_reco", "6_anomaly_reco"),
    ("topic_reasoning", "7_topic_reasoning"),
]


def build_prompt(question: str, candidates: list[str], mode: str) -> str:
    # spec §6.3: no "Options:" header, options written "(A) text", right-stripped (both modes)
    letters = choice_letters(len(candidates))
    body = question + "\n" + "".join(f"({k}) {c}\n" for k, c in zip(letters, candidates))
    return finish_prompt(body.rstrip(), mode)


def load_items(data_dir: Path, cfg: EvalConfig) -> list[EvalItem]:
    data_dir = Path(data_dir)
    json_dir = require_dir(data_dir / "json", "MLVU annotations")
    kind = "pts_seek" if cfg.frame_protocol == "paper" else "uniform"  # spec §2.B
    items = []
    for task, stem in TASKS:
        records = read_json(json_dir / f"{stem}.json", f"MLVU {task}")
        for i, rec in enumerate(records):
            where = f"{json_dir / stem}.json item {i}"
            require_keys(rec, ("video", "question", "candidates", "answer"), where)
            candidates = [str(c) for c in rec["candidates"]]
            letters = choice_letters(len(candidates))
            items.append(EvalItem(
                item_id=f"{stem}/{i}",
                task=task,
                video=video_under(data_dir / "video" / stem, rec["video"], where),
                video_key=f"{stem}/{rec['video']}",
                frame_spec=FrameSpec(kind=kind),
                prompt=build_prompt(rec["question"], candidates, cfg.mode),
                choices=letters,
                gold=gold_letter(candidates, rec["answer"]),
                meta={"question_type": rec.get("question_type"), "duration": rec.get("duration"),
                      "answer_text": rec["answer"], "option_texts": dict(zip(letters, candidates))},
            ))
    return items
