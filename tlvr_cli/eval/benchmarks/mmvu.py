"""MMVU validation, multiple-choice questions only (spec §6.4; formats §6).

Layout: ``<root>/validation.json`` (a list) and the videos mirrored from the dataset repo, so the
download URL prefix maps onto ``<root>``. Open-ended questions are dropped at load time, as in the
reference: they count neither right nor wrong. The breakdown key is ``metadata.subject``.
"""

from __future__ import annotations

from pathlib import Path

from ...errors import TlvrError
from ...jobs import EvalConfig
from ...video.decode import FrameSpec
from ..items import EvalItem, finish_prompt, read_json, require_keys, video_under

NAME = "mmvu"
AGGREGATE = "micro"  # spec §6.4: item mean over the multiple-choice questions
URL_PREFIX = "https://huggingface.co/datasets/yale-nlp/MMVU/resolve/main"
ANNOTATIONS = "validation.json"


def build_prompt(question: str, choices: dict[str, str], mode: str) -> str:
    body = question + "\n" + "\n".join(f"{k}. {v}" for k, v in choices.items())
    return finish_prompt(body, mode)


def _video_path(root: Path, video, where: str) -> Path:
    rel = video.removeprefix(URL_PREFIX).lstrip("/") if isinstance(video, str) else video
    return video_under(root, rel, where)


def load_items(data_dir: Path, cfg: EvalConfig) -> list[EvalItem]:
    data_dir = Path(data_dir)
    path = data_dir / ANNOTATIONS
    records = read_json(path, "MMVU annotations")
    if not isinstance(records, list):
        raise TlvrError(f"MMVU annotations: {path} should hold a JSON list")
    items = []
    for i, rec in enumerate(records):
        require_keys(rec, ("question_type", "question", "answer", "video"), f"{path} item {i}")
        if rec["question_type"] != "multiple-choice":
            continue
        require_keys(rec, ("choices",), f"{path} item {i}")
        choices = {str(k): str(v) for k, v in rec["choices"].items()}
        subject = (rec.get("metadata") or {}).get("subject") or rec["question_type"]
        items.append(EvalItem(
            item_id=str(rec.get("id") or f"validation/{i}"),
            task=subject,
            video=_video_path(data_dir, rec["video"], f"{path} item {i}"),
            video_key=rec["video"],
            frame_spec=FrameSpec(kind="uniform"),  # path A in both frame protocols
            prompt=build_prompt(rec["question"], choices, cfg.mode),
            choices=list(choices),
            gold=str(rec["answer"]).strip(),
            meta={"question_type": rec["question_type"], "subject": subject, "option_texts": choices},
        ))
    return items
