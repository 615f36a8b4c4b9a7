"""MVBench, 20 tasks (spec §6.2; formats §4).

Layout: ``<root>/json/<task>.json`` and videos under ``<root>/video/<prefix>/<video>``; clips that
moved to ``<root>/video/data0613/<prefix>/<video>`` are found there too (formats §4).

Frames. ``frame_protocol=paper`` copies the reference: ``video`` tasks take path A over the whole
clip and ignore start/end (spec §7.12), avi/webm tasks take segment midpoints (path C), and the
Episodic Reasoning JPEG folders take midpoints at 3 fps inside the bound (path D).
``frame_protocol=uniform`` uses path A everywhere but passes the start/end bound along
(``FrameSpec(kind="uniform", bound=...)``), so a bound-aware decoder samples inside it; the JPEG
folders stay on path D, which is the only reader of a folder.
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

NAME = "mvbench"
AGGREGATE = "micro"  # spec §6.2: Avg = correct / total over all items

# (task, json file, folder under video/, reader, has start/end) in the reference's evaluation order
TASKS: list[tuple[str, str, str, str, bool]] = [
    ("Fine-grained Pose", "fine_grained_pose.json", "nturgbd/", "video_avi", False),
    ("Episodic Reasoning", "episodic_reasoning.json", "tvqa/frames_fps3_hq/", "frame", True),
    ("Action Sequence", "action_sequence.json", "star/Charades_v1_480/", "video", True),
    ("Action Prediction", "action_prediction.json", "star/Charades_v1_480/", "video", True),
    ("Action Antonym", "action_antonym.json", "ssv2_video/", "video_webm", False),
    ("Fine-grained Action", "fine_grained_action.json", "Moments_in_Time_Raw/videos/", "video", False),
    ("Unexpected Action", "unexpected_action.json", "FunQA_test/test/", "video", False),
    ("Object Existence", "object_existence.json", "clevrer/video_validation/", "video", False),
    ("Object Interaction", "object_interaction.json", "star/Charades_v1_480/", "video", True),
    ("Object Shuffle", "object_shuffle.json", "perception/videos/", "video", False),
    ("Moving Direction", "moving_direction.json", "clevrer/video_validation/", "video", False),
    ("Action Localization", "action_localization.json", "sta/sta_video/", "video", True),
    ("Scene Transition", "scene_transition.json", "scene_qa/video/", "video", False),
    ("Action Count", "action_count.json", "perception/videos/", "video", False),
    ("Moving Count", "moving_count.json", "clevrer/video_validation/", "video", False),
    ("Moving Attribute", "moving_attribute.json", "clevrer/video_validation/", "video", False),
    ("State Change", "state_change.json", "perception/videos/", "video", False),
    ("Character Order", "character_order.json", "perception/videos/", "video", False),
    ("Egocentric Navigation", "egocentric_navigation.json", "vlnqa/", "video", False),
    ("Counterfactual Inference", "counterfactual_inference.json", "clevrer/video_validation/", "video", False),
]


def frame_spec(reader: str, bound: tuple[float, float] | None, frame_protocol: str) -> FrameSpec:
    if reader == "frame":
        return FrameSpec(kind="folder", bound=bound, folder_fps=3.0)
    if frame_protocol == "paper":
        if reader == "video":
            return FrameSpec(kind="uniform")  # spec §6.2: the reference drops the bound here
        return FrameSpec(kind="midpoints", bound=bound)
    return FrameSpec(kind="uniform", bound=bound)


def build_prompt(question: str, candidates: list[str], mode: str) -> str:
    letters = choice_letters(len(candidates))
    if mode == "reason":
        body = question + "\nOptions:\n" + "".join(f"{k}. {c}\n" for k, c in zip(letters, candidates))
    else:  # spec §3.3: the TV evaluator writes "(A) cand" without a header
        body = question + "\n" + "".join(f"({k}) {c}\n" for k, c in zip(letters, candidates))
    return finish_prompt(body.rstrip(), mode)


def _video_path(video_root: Path, prefix: str, video, where: str) -> Path:
    path = video_under(video_root / prefix, video, where)
    if not path.exists():
        moved = video_under(video_root / "data0613" / prefix, video, where)
        if moved.exists():
            return moved
    return path


def load_items(data_dir: Path, cfg: EvalConfig) -> list[EvalItem]:
    data_dir = Path(data_dir)
    json_dir = require_dir(data_dir / "json", "MVBench annotations")
    video_root = data_dir / "video"
    items = []
    for task, json_name, prefix, reader, has_bound in TASKS:
        records = read_json(json_dir / json_name, f"MVBench {task}")
        for i, rec in enumerate(records):
            where = f"{json_dir / json_name} item {i}"
            require_keys(rec, ("video", "question", "candidates", "answer") + (("start", "end") if has_bound else ()),
                         where)
            candidates = [str(c) for c in rec["candidates"]]
            bound = (float(rec["start"]), float(rec["end"])) if has_bound else None
            letters = choice_letters(len(candidates))
            items.append(EvalItem(
                item_id=f"{json_name[:-5]}/{i}",
                task=task,
                video=_video_path(video_root, prefix, rec["video"], where),
                video_key=prefix + rec["video"],
                frame_spec=frame_spec(reader, bound, cfg.frame_protocol),
                prompt=build_prompt(rec["question"], candidates, cfg.mode),
                choices=letters,
                gold=gold_letter(candidates, rec["answer"]),
                meta={"reader": reader, "bound": bound, "answer_text": rec["answer"],
                      "option_texts": dict(zip(letters, candidates))},
            ))
    return items
