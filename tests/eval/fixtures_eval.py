"""Builders of fake benchmark trees with the real file names and layouts (formats.md "Fixture
recipe"). Videos are a few placeholder bytes: the readers never decode them."""

from __future__ import annotations

import json
from pathlib import Path

PLACEHOLDER = b"\x00\x00\x00\x18ftypmp42"


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(PLACEHOLDER)
    return path


def _write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    return path


VIDEOMME_ROWS = [
    # (video_id, duration, videoID, question_id, task_type, answer)
    ("001", "short", "fFjv93ACGo8", "001-1", "Counting Problem", "C"),
    ("001", "short", "fFjv93ACGo8", "001-2", "Object Recognition", "A"),
    ("001", "short", "fFjv93ACGo8", "001-3", "Counting Problem", "D"),
    ("301", "medium", "mEdIuMvid01", "301-1", "Action Reasoning", "B"),
    ("302", "medium", "missingvid1", "302-1", "Action Reasoning", "A"),  # its video is absent
    ("601", "long", "LoNgVideo99", "601-1", "Temporal Perception", "D"),
]


def build_videomme(root: Path) -> Path:
    """``Video-MME/videomme/test-00000-of-00001.parquet`` + ``data/<videoID>.mp4`` + one subtitle."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols: dict[str, list] = {k: [] for k in ("video_id", "duration", "domain", "sub_category", "url", "videoID",
                                             "question_id", "task_type", "question", "options", "answer")}
    for video_id, duration, vid, qid, task, answer in VIDEOMME_ROWS:
        cols["video_id"].append(video_id)
        cols["duration"].append(duration)
        cols["domain"].append("Knowledge")
        cols["sub_category"].append("Humanity & History")
        cols["url"].append(f"https://www.youtube.com/watch?v={vid}")
        cols["videoID"].append(vid)
        cols["question_id"].append(qid)
        cols["task_type"].append(task)
        cols["question"].append(f"Question {qid}: how many apples are shown?")
        cols["options"].append(["A. Apples.", "B. Candles.", "C. Berries.",
                                "D. The three kinds are of the same number."])
        cols["answer"].append(answer)
    schema = pa.schema([(k, pa.list_(pa.string()) if k == "options" else pa.string()) for k in cols])
    path = root / "videomme" / "test-00000-of-00001.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols, schema=schema), path)
    for vid in ("fFjv93ACGo8", "mEdIuMvid01", "LoNgVideo99"):
        _touch(root / "data" / f"{vid}.mp4")
    srt = root / "subtitle" / "fFjv93ACGo8.srt"
    srt.parent.mkdir(parents=True, exist_ok=True)
    srt.write_text('1\n00:00:00,000 --> 00:00:01,000\n<font color="white" size=".72c">hello</font>\n')
    return root


MVBENCH_FILES = [
    ("fine_grained_pose.json", "nturgbd/", ".avi", False),
    ("episodic_reasoning.json", "tvqa/frames_fps3_hq/", "", True),
    ("action_sequence.json", "star/Charades_v1_480/", ".mp4", True),
    ("action_prediction.json", "star/Charades_v1_480/", ".mp4", True),
    ("action_antonym.json", "ssv2_video/", ".webm", False),
    ("fine_grained_action.json", "Moments_in_Time_Raw/videos/", ".mp4", False),
    ("unexpected_action.json", "FunQA_test/test/", ".mp4", False),
    ("object_existence.json", "clevrer/video_validation/", ".mp4", False),
    ("object_interaction.json", "star/Charades_v1_480/", ".mp4", True),
    ("object_shuffle.json", "perception/videos/", ".mp4", False),
    ("moving_direction.json", "clevrer/video_validation/", ".mp4", False),
    ("action_localization.json", "sta/sta_video/", ".mp4", True),
    ("scene_transition.json", "scene_qa/video/", ".mp4", False),
    ("action_count.json", "perception/videos/", ".mp4", False),
    ("moving_count.json", "clevrer/video_validation/", ".mp4", False),
    ("moving_attribute.json", "clevrer/video_validation/", ".mp4", False),
    ("state_change.json", "perception/videos/", ".mp4", False),
    ("character_order.json", "perception/videos/", ".mp4", False),
    ("egocentric_navigation.json", "vlnqa/", ".mp4", False),
    ("counterfactual_inference.json", "clevrer/video_validation/", ".mp4", False),
]


def build_mvbench(root: Path) -> Path:
    """``MVBench/json/<task>.json`` (2 items each) and ``video/<prefix>/<file>``; one gold answer not
    among the candidates (object_shuffle item 1), one missing video (scene_transition item 1), and
    one clip only under ``video/data0613/`` (moving_count item 1)."""
    for json_name, prefix, ext, bound in MVBENCH_FILES:
        stem = json_name[:-5]
        records = []
        for i in range(2):
            video = f"{stem}_{i}{ext}" if ext else f"{stem}_clip{i}"
            rec = {"video": video, "question": f"What happens in {stem} {i}?",
                   "candidates": ["Not sure", "Scattering something down", "Piling something up"],
                   "answer": "Piling something up" if i == 0 else "Not sure"}
            if bound:
                rec["start"], rec["end"] = 1.5 + i, 7.25 + i
            records.append(rec)
            if stem == "object_shuffle" and i == 1:
                rec["answer"] = "Something else entirely"
            if stem == "scene_transition" and i == 1:
                continue
            base = root / "video" / ("data0613/" if stem == "moving_count" and i == 1 else "") / prefix
            if ext:
                _touch(base / video)
            else:  # a JPEG frame folder at 3 fps
                for k in range(1, 13):
                    _touch(base / video / f"{k:05d}.jpg")
        _write_json(root / "json" / json_name, records)
    return root


MLVU_FILES = ["1_plotQA", "2_needle", "3_ego", "4_count", "5_order", "6_anomaly_reco", "7_topic_reasoning"]


def build_mlvu(root: Path) -> Path:
    """``MLVU/json/<n_task>.json`` (2 records each, 4 candidates) and ``video/<n_task>/<video>``;
    open-ended 8_/9_ files that must be ignored; one gold text not among the candidates (4_count item 1)."""
    for stem in MLVU_FILES:
        records = []
        for i in range(2):
            video = f"{stem.split('_', 1)[1]}_{i}.mp4"
            records.append({"video": video, "duration": 246, "question": f"What color is the car in {stem} {i}?",
                            "candidates": ["Yellow", "Red", "Green", "Blue"], "answer": ["Yellow", "Green"][i],
                            "question_type": "findNeedle" if stem == "2_needle" else stem.split("_", 1)[1]})
            _touch(root / "video" / stem / video)
        if stem == "4_count":
            records[1]["answer"] = "Purple"
        _write_json(root / "json" / f"{stem}.json", records)
    for stem in ("8_sub_scene", "9_summary"):
        _write_json(root / "json" / f"{stem}.json", [{"video": "x.mp4", "question": "Describe.", "answer": "text"}])
    return root


MMVU_URL = "https://huggingface.co/datasets/yale-nlp/MMVU/resolve/main"


def build_mmvu(root: Path) -> Path:
    """``MMVU/validation.json`` with 3 multiple-choice records (A–E) and 1 open-ended one, and the
    videos at ``videos/<Subject>/<n>.mp4`` (one missing)."""
    choices = {"A": "Mitosis", "B": "Meiosis", "C": "Osmosis", "D": "Diffusion", "E": "Apoptosis"}
    records = []
    for i, (subject, qtype, answer) in enumerate([("Biology", "multiple-choice", "B"),
                                                  ("Chemistry", "open-ended", "ionic bond"),
                                                  ("Biology", "multiple-choice", "E"),
                                                  ("Physics", "multiple-choice", "A")]):
        rec = {"id": f"val_{i}", "video": f"{MMVU_URL}/videos/{subject}/{i}.mp4", "youtube_url": "https://youtu.be/x",
               "question_type": qtype,
               "metadata": {"subject": subject, "textbook": "t", "rationale": "r", "knowledge": "k"},
               "question": f"Which process is shown in video {i}?", "answer": answer}
        if qtype == "multiple-choice":
            rec["choices"] = dict(choices)
        records.append(rec)
        if i != 3:
            _touch(root / "videos" / subject / f"{i}.mp4")
    _write_json(root / "validation.json", records)
    return root


def build_synthetic(root: Path) -> Path:
    """``eval.jsonl`` in the GRPO NextQA row format with its videos."""
    rows = []
    for i, (vid, gold) in enumerate([("0000/1111.mp4", "B"), ("0000/2222.mp4", "E"), ("0001/3333.mp4", "A")]):
        rows.append({"problem_id": i,
                     "problem": f"What did the man do after {i}?\nA. clap\nB. jump\nC. sit\nD. run\nE. wave",
                     "data_type": "video", "problem_type": "multiple choice", "solution": f"<answer>{gold}</answer>",
                     "video_filename": f"./NextQA/NExTVideo/{vid}", "question_type": "temporal" if i else "causal"})
        _touch(root / "NextQA" / "NExTVideo" / vid)
    root.mkdir(parents=True, exist_ok=True)
    (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root
