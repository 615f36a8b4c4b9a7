"""The synthetic video-QA set (``tlvr data synth``, the demo's data), in exactly the NextQA training
formats (spec formats §1).

Each video is a flat background with a coloured square that slides left, right, up, down, or stays
put, through the middle or along one of ``lanes`` parallel paths. Three multiple-choice questions
(background colour, square colour, direction) are answerable from the pixels, so the embedded tiny
model can learn them in minutes on a CPU. Like NextQA, several questions share a video (one per kind
asked); the eval split uses videos the training split never sees.

Layout written under the root::

    NextQA/NExTVideo/<4-digit dir>/<id>.mp4
    nextqa_0-30s.jsonl     GRPO rows (train)
    eval.jsonl             held-out rows, same format
    coldstart.json         LLaVA-style records with a written-out <think> reasoning
    .synth-complete        hash of the config that wrote the set (reruns with the same config do nothing)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data.template import GRPO_QUESTION_TEMPLATE, video_question
from .errors import TlvrError
from .files import write_text_atomic
from .jobs import SynthConfig

LETTERS = "ABCDE"
# Well-separated colours survive yuv420 compression, and every name is one short common word. Five of
# them, like the five directions, so every question lists its whole pool as options A-E.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 30),
    "blue": (30, 60, 220),
    "yellow": (230, 220, 40),
    "white": (240, 240, 240),
}
DIRECTIONS = ("left", "right", "up", "down", "nowhere")  # "nowhere": the square stays in the middle
QUESTIONS = {
    "background": "What color is the background?",
    "square": "What color is the square?",
    "direction": "Which way does the square move?",
}
TRAIN_FILE, EVAL_FILE, COLDSTART_FILE, MARKER = "nextqa_0-30s.jsonl", "eval.jsonl", "coldstart.json", ".synth-complete"
VIDEO_DIR = "NextQA/NExTVideo"


@dataclass(frozen=True)
class SynthVideo:
    background: str
    square: str
    direction: str
    rel: str  # "NextQA/NExTVideo/<dir>/<id>.mp4"
    lane: int = 0  # which of the parallel paths the square takes (0 of 1: through the middle)


@dataclass
class SynthQuestion:
    video: SynthVideo
    kind: str  # a key of QUESTIONS
    options: list[str]
    gold: int  # index into options

    @property
    def letter(self) -> str:
        return LETTERS[self.gold]

    @property
    def problem(self) -> str:
        lines = [QUESTIONS[self.kind]] + [f"{LETTERS[i]}. {text}" for i, text in enumerate(self.options)]
        return "\n".join(lines)


FORMAT_VERSION = 5  # bump when the written content changes for the same config


def config_hash(cfg: SynthConfig) -> str:
    """Hash of everything that shapes the files (the root itself excluded, so a moved set stays valid)."""
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "root"} | {"format_version": FORMAT_VERSION}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- content


def _answer_text(video: SynthVideo, kind: str) -> str:
    return {"background": video.background, "square": video.square, "direction": video.direction}[kind]


def _make_question(video: SynthVideo, kind: str, gold: int, rng: random.Random, order: str) -> SynthQuestion:
    """Options are the whole pool: shuffled around the gold position ``gold``, or (``order="fixed"``) in
    pool order, where the letter follows from the answer alone and ``gold`` is ignored."""
    answer = _answer_text(video, kind)
    pool = list(DIRECTIONS) if kind == "direction" else list(COLORS)
    if order == "fixed":
        return SynthQuestion(video, kind, pool, pool.index(answer))
    distractors = rng.sample([x for x in pool if x != answer], len(LETTERS) - 1)
    options = distractors[:gold] + [answer] + distractors[gold:]
    return SynthQuestion(video, kind, options, gold)


def _split_videos(n_train_q: int, n_eval_q: int, rng: random.Random, per_video: int = 3,
                  lanes: int = 1) -> tuple[list[SynthVideo], list[SynthVideo]]:
    """Disjoint train/eval videos: one per question kind (``per_video`` kinds) where the combinations
    (background × square × direction × lane) allow, shared otherwise."""
    combos = [(bg, sq, d, lane) for bg in COLORS for sq in COLORS if sq != bg for d in DIRECTIONS
              for lane in range(lanes)]
    rng.shuffle(combos)
    want_train, want_eval = math.ceil(n_train_q / per_video), math.ceil(n_eval_q / per_video)
    if want_train + want_eval > len(combos):
        want_eval = max(1, round(len(combos) * n_eval_q / (n_train_q + n_eval_q))) if n_eval_q else 0
        want_train = len(combos) - want_eval
    chosen = combos[:want_train + want_eval]
    ids = rng.sample(range(2_000_000_000, 9_999_999_999), len(chosen))  # NExT-QA style 10-digit ids
    videos = [SynthVideo(bg, sq, d, f"{VIDEO_DIR}/{1000 + k // 50:04d}/{vid}.mp4", lane)
              for k, ((bg, sq, d, lane), vid) in enumerate(zip(chosen, ids))]
    return videos[:want_train], videos[want_train:]


def _questions(videos: list[SynthVideo], n: int, rng: random.Random, order: str,
               kinds: list[str]) -> list[SynthQuestion]:
    """``n`` questions over ``videos``; question types balanced per video, gold letters balanced over A-E
    (for fixed option order: as balanced as the videos' attributes)."""
    if n == 0:
        return []
    golds = [i % len(LETTERS) for i in range(n)]
    rng.shuffle(golds)
    out = []
    for q in range(n):
        v = q % len(videos)
        kind = kinds[(q // len(videos) + v) % len(kinds)]
        out.append(_make_question(videos[v], kind, golds[q], rng, order))
    rng.shuffle(out)
    return out


def reasoning(q: SynthQuestion, style: str = "scene") -> str:
    """The written-out ``<think>`` text of a cold-start answer, ending with the letter it answers.

    ``scene``: the whole scene, the asked part, the letter. Every record describes all three
    attributes, so each one teaches the model to see colours and motion, also for question kinds the
    cold start leaves out; the answer is then a copy of a colour named earlier in the reasoning.
    ``asked``: the asked attribute, its value read from the video, the letter (shorter, and the only
    uncertain word is the answer). Either way the length does not depend on the letter beyond the
    answer word: the format reward grows with the reasoning's length, and a letter that came with
    shorter reasoning would be pushed up or down for that alone.
    """
    v = q.video
    motion = "stays in the middle" if v.direction == "nowhere" else f"moves {v.direction}"
    answer = _answer_text(v, q.kind)
    asked = {"background": "background color", "square": "square color", "direction": "direction"}[q.kind]
    choice = f"The option {answer} is {q.letter}, so the answer is {q.letter}."
    if style == "asked":
        found = {"background": f"The background is {answer}.", "square": f"The square is {answer}.",
                 "direction": f"The square {motion}."}[q.kind]
        return f"The question asks for the {asked}. {found} {choice}"
    scene = f"The video shows a {v.square} square on a {v.background} background. The square {motion}."
    return f"{scene} The question asks for the {asked}: {answer}. {choice}"


# ----------------------------------------------------------------------------- rendering


def render_frames(video: SynthVideo, frames: int, size: int, lanes: int = 1) -> np.ndarray:
    """uint8 (T, size, size, 3): the background colour with the square moved linearly along its direction,
    on lane ``video.lane`` of ``lanes`` parallel paths spread evenly across the frame (one: the middle)."""
    side = max(2, size // 4)
    far = size - side
    mid = far // 2
    lane = far * (2 * video.lane + 1) // (2 * lanes)
    start_end = {"left": ((far, lane), (0, lane)), "right": ((0, lane), (far, lane)),
                 "up": ((lane, far), (lane, 0)), "down": ((lane, 0), (lane, far)),
                 "nowhere": ((mid, lane), (mid, lane))}
    (x0, y0), (x1, y1) = start_end[video.direction]
    out = np.empty((frames, size, size, 3), dtype=np.uint8)
    out[:] = COLORS[video.background]
    for t in range(frames):
        a = t / max(1, frames - 1)
        x, y = round(x0 + (x1 - x0) * a), round(y0 + (y1 - y0) * a)
        out[t, y:y + side, x:x + side] = COLORS[video.square]
    return out


# Fixed x264 options, so the same frames always encode to the same bytes. Single-threaded: thread timing
# would otherwise shape the output. No macroblock tree: x264's AVX-512 mbtree_propagate_list handles 8
# macroblocks per step, so on frames not a multiple of 128 px wide (64 px: 4 macroblocks) it reads
# past the end of the lowres cost/motion arrays into uninitialised heap memory, and the qp offsets
# (hence pixels) of some videos varied with the process's allocation history.
X264_OPTIONS = {"preset": "veryfast", "crf": "12", "threads": "1", "mbtree": "0"}


def write_mp4(path: Path, frames: np.ndarray, fps: int) -> None:
    """Encode frames as an H.264 (else MPEG-4 part 2) mp4; the same frames give the same bytes."""
    import av

    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with av.open(str(tmp), "w", format="mp4") as out:
            try:
                stream = out.add_stream("libx264", rate=fps)
                stream.options = dict(X264_OPTIONS)
            except Exception:  # an FFmpeg build without x264
                stream = out.add_stream("mpeg4", rate=fps)
                stream.options = {"qscale": "2"}
            stream.width, stream.height = frames.shape[2], frames.shape[1]
            stream.pix_fmt = "yuv420p"
            stream.thread_count = 1
            for f in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- files


def grpo_row(problem_id: int, q: SynthQuestion) -> dict:
    return {"problem_id": problem_id, "problem": q.problem, "data_type": "video", "problem_type": "multiple choice",
            "solution": f"<answer>{q.letter}</answer>", "video_filename": f"./{q.video.rel}"}


def coldstart_record(q: SynthQuestion, style: str = "scene") -> dict:
    human = video_question(GRPO_QUESTION_TEMPLATE.format(Question=q.problem))
    gpt = f"<think>{reasoning(q, style)}</think>\n<answer>{q.letter}</answer>"
    return {"video": q.video.rel, "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]}


def _validate(cfg: SynthConfig) -> None:
    if not cfg.root:
        raise TlvrError("synth: root is empty (pass --root or set root=...)")
    for name in ("train", "eval", "coldstart"):
        if getattr(cfg, name) < 0:
            raise TlvrError(f"synth: {name}={getattr(cfg, name)} must be >= 0")
    if cfg.train == 0 and cfg.coldstart > 0:
        raise TlvrError("synth: coldstart records are drawn from the training videos, so train must be > 0")
    free = cfg.size - max(2, cfg.size // 4) + 1  # positions the square's corner can take across the frame
    if not 1 <= cfg.lanes <= free:
        raise TlvrError(f"synth: lanes={cfg.lanes} must be between 1 and {free} for size={cfg.size}")
    if cfg.frames < 1 or cfg.fps < 1:
        raise TlvrError(f"synth: frames={cfg.frames} and fps={cfg.fps} must be >= 1")
    for key in ("kinds", "coldstart_kinds"):
        kinds = getattr(cfg, key)
        unknown = [k for k in kinds if k not in QUESTIONS]
        if unknown or not kinds:
            raise TlvrError(f"synth: {key}={kinds} must be a non-empty list of {', '.join(QUESTIONS)}")
    if cfg.reasoning not in ("scene", "asked"):
        raise TlvrError(f"synth: reasoning={cfg.reasoning!r} must be 'scene' or 'asked'")
    for key in ("option_order", "coldstart_option_order"):
        if getattr(cfg, key) not in ("shuffled", "fixed"):
            raise TlvrError(f"synth: {key}={getattr(cfg, key)!r} must be 'shuffled' or 'fixed'")
    if cfg.size < 16 or cfg.size % 2:
        raise TlvrError(f"synth: size={cfg.size} must be an even number >= 16 (yuv420p needs even sides)")


def write_synthetic_dataset(cfg: SynthConfig, *, progress: bool = True) -> Path:
    """Write the set under ``cfg.root`` (nothing is rewritten when the same config already wrote it); returns the
    root."""
    _validate(cfg)
    root = Path(cfg.root)
    marker = root / MARKER
    digest = config_hash(cfg)
    complete = all((root / name).is_file() for name in (TRAIN_FILE, EVAL_FILE, COLDSTART_FILE))
    if complete and marker.is_file() and marker.read_text(encoding="utf-8").strip() == digest:
        return root
    root.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)

    rng = random.Random(cfg.seed)
    train_videos, eval_videos = _split_videos(cfg.train, cfg.eval, rng, len(cfg.kinds), cfg.lanes)
    train_q = _questions(train_videos, cfg.train, rng, cfg.option_order, cfg.kinds)
    eval_q = _questions(eval_videos, cfg.eval, rng, cfg.option_order, cfg.kinds)
    cold_q = _questions(train_videos, cfg.coldstart, random.Random(cfg.seed + 1), cfg.coldstart_option_order,
                        cfg.coldstart_kinds)

    from rich.progress import Progress

    videos = train_videos + eval_videos
    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task("writing synthetic videos", total=len(videos))
        for v in videos:
            write_mp4(root / v.rel, render_frames(v, cfg.frames, cfg.size, cfg.lanes), cfg.fps)
            bar.advance(task)

    def jsonl(qs: list[SynthQuestion]) -> str:
        return "".join(json.dumps(grpo_row(i, q), ensure_ascii=False) + "\n" for i, q in enumerate(qs))

    write_text_atomic(root / TRAIN_FILE, jsonl(train_q))
    write_text_atomic(root / EVAL_FILE, jsonl(eval_q))
    write_text_atomic(root / COLDSTART_FILE, json.dumps([coldstart_record(q, cfg.reasoning) for q in cold_q],
                                                        ensure_ascii=False, indent=1) + "\n")
    write_text_atomic(marker, digest + "\n")
    return root
