"""Run a benchmark: decode videos ahead in worker processes, stream the questions through the
engine (kept full over the whole benchmark), append each answer to ``answers.jsonl`` as it finishes
(flushed, so a killed run resumes where it stopped), then score.

Resume reuses only rows written under the same resume key (``resume.py``: model and weights,
benchmark, split, protocol, mode, frames, dtype, max tokens, and the seed when sampling); a torn
last line is cut before appending. Questions about the same video share its frames and tower
features (``share_features``) and the prefill of their common prompt part (``share_prefix``); each
question's tokens are sampled with a key hashed from its id, so its answer does not depend on the
batch size, the resume point or the number of processes.

Protocols (spec §6): ``greedy`` decodes greedily and counts unparseable answers as wrong; ``paper``
samples at T 1.0 / top-k 50 as the authors did and picks a random option when parsing fails, with a
per-item seeded RNG so the fallback is reproducible.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from ..config import to_yaml
from ..data.template import build_prompt, tokenize_with_image
from ..engine.generate import Engine, Request, SharedPrefix
from ..engine.sampling import SamplingParams
from ..files import write_json_atomic, write_text_atomic
from ..jobs import EvalConfig
from ..model.checkpoint import frame_size, load_model, read_weights_ahead
from ..progress import JobProgress
from ..runtime import host_to_device
from ..video.preprocess import normalize_frames
from .answer import parse_option_answer, parse_reason_answer
from .answers import (
    rank_answers_path,
    rank_speed_path,
    read_all_answers,
    read_answers,
    truncate_torn_tail,
    write_answers,
)
from .benchmarks import load_eval_items
from .decode_ahead import Decoded, DecodePool, VideoJob, decode_video, usable_workers, video_jobs
from .items import EvalItem
from .report import Report, score_answers, write_report
from .resume import check_resume, default_dir_name, read_provenance, run_settings, weights_fingerprint, write_provenance


def output_dir(cfg: EvalConfig, model: torch.nn.Module | None = None) -> Path:
    """``cfg.output_dir``, or the default directory of this model and these settings."""
    return Path(cfg.output_dir) if cfg.output_dir else default_dir_name(cfg, run_settings(cfg, _dtype_of(model)))


def _dtype_of(model: torch.nn.Module | None) -> torch.dtype | None:
    return None if model is None else next(model.parameters()).dtype


def item_row_key(item_id: str) -> int:
    """The engine's sampling key of an item: a stable hash of its id (not of its position in a batch)."""
    return int.from_bytes(hashlib.sha256(item_id.encode("utf-8")).digest()[:8], "big") >> 2


def _parse(cfg: EvalConfig, output: str, item: EvalItem):
    rng = random.Random(f"{cfg.seed}:{item.item_id}") if cfg.protocol == "paper" else None
    if cfg.mode == "reason":
        return parse_reason_answer(output, item.choices, rng)
    return parse_option_answer(output, item.choices, rng, option_texts=item.meta.get("option_texts"))


def prepare_output(cfg: EvalConfig, model: torch.nn.Module | None = None) -> Path:
    """The output directory, checked against the resume key (refused, or cleared with
    ``overwrite_stale``, when it holds answers of another model or settings), with the key and the
    config recorded in it before any answer is written."""
    settings = run_settings(cfg, _dtype_of(model))
    out_dir = Path(cfg.output_dir) if cfg.output_dir else default_dir_name(cfg, settings)
    provenance = read_provenance(out_dir)
    digest, files = weights_fingerprint(cfg.model.path, model, provenance["files"] if provenance else None)
    key = {"model": settings.pop("model"), "weights": digest, **settings}
    check_resume(out_dir, key, provenance, overwrite=cfg.overwrite_stale)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_provenance(out_dir, key, files)
    write_text_atomic(out_dir / "config.yaml", to_yaml(cfg))
    return out_dir


def run_eval(cfg: EvalConfig, *, model=None, show_progress: bool = True, rank: int = 0, world_size: int = 1,
             prepared: bool = False) -> Report | None:
    """Evaluate ``cfg.model`` (or ``model``) on ``cfg.benchmark``; returns the scored report (also
    written to disk). With several processes each evaluates its share (``rank::world_size``) and
    returns None: the caller prepares the directory once before (``prepared``) and merges the rank
    files after (``eval.distributed``)."""
    started = time.perf_counter()
    items = load_eval_items(cfg)
    out_dir = output_dir(cfg, model)
    answers_path = rank_answers_path(out_dir, rank, world_size)
    mine = items[rank::world_size]
    todo = _unanswered(mine, out_dir)

    def decode_ahead(pool: DecodePool, todo: list[EvalItem]) -> Iterator[tuple[VideoJob, Decoded]]:
        if not todo:
            return (pair for pair in ())  # a generator too: closed like the others
        size = model.config.vision_config.image_size if model is not None else frame_size(cfg.model.path)
        decode = functools.partial(decode_video, video=cfg.video, image_size=size)
        return pool.decode(video_jobs(todo, cfg.share_features), decode)

    # the workers start, and decode the first videos, while the checkpoint is fingerprinted (a new
    # checkpoint is read whole: seconds) and while the model loads; none for a finished run (rescoring),
    # whose videos then decode in this process should overwrite_stale clear its answers. The weights
    # are read onto the device meanwhile too (a thread; dropped should the resume check refuse)
    with DecodePool(usable_workers(cfg.decode_workers) if todo else 0) as pool:
        decoded = decode_ahead(pool, todo)
        try:
            weights = read_weights_ahead(cfg.model) if todo and model is None else None
            if not prepared:
                prepare_output(cfg, model)  # may clear answers of another model (overwrite_stale)
            truncate_torn_tail(answers_path)  # a run killed mid-write: the next row must start on its own line
            if (now := _unanswered(mine, out_dir)) != todo:
                decoded.close()
                todo, decoded = now, decode_ahead(pool, now)
            if todo:
                t = time.perf_counter()
                if model is None:
                    model = load_model(cfg.model, weights=weights)
                model.eval()
                load_s = time.perf_counter() - t
                speed = _generate_answers(cfg, model, decoded, answers_path, len(mine) - len(todo), len(mine),
                                          show_progress)
                speed.update(wall_s=round(time.perf_counter() - started, 4), load_s=round(load_s, 4),
                             already_answered=len(mine) - len(todo))
                write_json_atomic(rank_speed_path(out_dir, rank, world_size), speed)
        finally:
            decoded.close()
    if world_size > 1:
        return None
    order = {it.item_id: i for i, it in enumerate(items)}
    written = read_all_answers(out_dir)  # with the rows of an earlier run of several processes
    rows = sorted((r for r in written if r["item_id"] in order), key=lambda r: order[r["item_id"]])
    if len(rows) == len(written) and rows != read_answers(answers_path):
        write_answers(answers_path, rows)  # answered in the order they finished, or in several files: one, in order
    report = score_answers(rows, cfg.benchmark, n_boot=cfg.bootstrap, seed=cfg.seed, phrases=cfg.reflection.phrases)
    write_report(report, out_dir)
    return report


def _unanswered(items: list[EvalItem], out_dir: Path) -> list[EvalItem]:
    done = {r["item_id"] for r in read_all_answers(out_dir)}
    return [it for it in items if it.item_id not in done]


def eval_engine(cfg: EvalConfig, model) -> Engine:
    """The engine an evaluation decodes with: ``cfg.engine``'s settings, room for the longest prompt
    the checkpoint takes and ``sampling.max_new_tokens``."""
    return Engine(model.language_model, max_seq_len=model.config.tokenizer_model_max_length
                  + cfg.sampling.max_new_tokens, **cfg.engine.engine_kwargs())


def _generate_answers(cfg: EvalConfig, model, decoded: Iterator[tuple[VideoJob, Decoded]], answers_path: Path,
                      already: int, total: int, show_progress: bool) -> dict:
    """Answer the decoded videos' questions, appending each row as it finishes; returns this run's speed
    (``speed.json``'s fields from the engine's start on)."""
    tok = model.tokenizer
    params = SamplingParams(temperature=0.0) if cfg.protocol == "greedy" else SamplingParams(
        temperature=cfg.sampling.temperature, top_k=cfg.sampling.top_k, top_p=cfg.sampling.top_p)
    max_new = cfg.sampling.max_new_tokens
    start = time.perf_counter()
    engine = eval_engine(cfg, model)
    progress = JobProgress(cfg.benchmark, total, enabled=show_progress)
    progress.start(already)
    counts = {"done": already, "correct": 0, "seen": 0, "skipped": 0, "tokens": 0}
    first = None
    try:
        with answers_path.open("a") as out:
            def write(row: dict) -> None:
                nonlocal first
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
                out.flush()
                first = first or time.perf_counter() - start
                counts["done"] += 1
                counts["tokens"] += row.get("new_tokens", 0)
                if row.get("skipped"):
                    counts["skipped"] += 1
                else:
                    counts["seen"] += 1
                    counts["correct"] += row["correct"]
                progress.update(counts["done"], {"acc %": 100 * counts["correct"] / max(1, counts["seen"]),
                                                 "skipped": counts["skipped"]})

            def skip(job: VideoJob, error: str) -> None:  # a broken video is recorded as skipped, not fatal
                for it in job.items:
                    write({"item_id": it.item_id, "task": it.task, "video": str(it.video), "video_key": it.video_key,
                           "gold": it.gold, "skipped": True, "error": error})

            requests = _requests(model, decoded, skip, cfg.share_prefix)
            for fin in engine.generate_stream(requests, params, max_new, tok.eos_token_id, seed=cfg.seed):
                it, indices, ready = fin.request.tag
                text = tok.decode(fin.completion.tokens, skip_special_tokens=True).strip()
                parsed = _parse(cfg, text, it)
                write({"item_id": it.item_id, "task": it.task, "video": str(it.video), "video_key": it.video_key,
                       "frame_indices": indices, "output": text, "parsed": parsed.letter, "parse_how": parsed.how,
                       "gold": it.gold, "correct": parsed.letter is not None and parsed.letter == it.gold,
                       "new_tokens": len(fin.completion.tokens), "seconds": round(time.perf_counter() - ready, 4)})
    finally:
        progress.stop()
    seconds = time.perf_counter() - start
    done = counts["done"] - already
    speed = {"questions": done, "skipped": counts["skipped"], "generated_tokens": counts["tokens"],
             "generate_s": round(seconds, 4), "first_answer_s": round(first or seconds, 4),
             "tokens_per_s": round(counts["tokens"] / seconds, 1), "questions_per_s": round(done / seconds, 2),
             "prompt_positions": engine.prompt_positions, "prefilled_positions": engine.prefilled_positions,
             "engine_max_batch": engine.max_batch, "device": str(model.device)}
    if show_progress:
        shared = (f"; prefilled {engine.prefilled_positions:,} of {engine.prompt_positions:,} prompt positions"
                  if engine.prefilled_positions < engine.prompt_positions else "")
        progress.note(f"{done} questions in {seconds:.1f} s: {speed['tokens_per_s']:,.0f} generated tok/s, "
                      f"{speed['questions_per_s']:.2f} questions/s (engine of {engine.max_batch} rows{shared})")
    return speed


def _requests(model, decoded: Iterator[tuple[VideoJob, Decoded]], skip: Callable[[VideoJob, str], None],
              share_prefix: bool = True) -> Iterator[Request]:
    """The engine's requests, produced as it asks for them: per decoded video, the tower and
    connector once (one video's frames in one batch, so its features do not depend on its neighbours),
    then each question's prompt embedding; with ``share_prefix`` its questions' common leading part
    (system prompt and visual tokens) as one ``SharedPrefix``, which the engine prefills once.
    ``seconds`` in a row counts from here to its last token."""
    tok = model.tokenizer
    device = model.device
    dtype = next(model.vision_tower.parameters()).dtype
    for job, result in decoded:
        if isinstance(result, str):
            skip(job, result)
            continue
        frames, indices = result
        with torch.no_grad():
            # normalised where the tower runs: the host neither converts nor waits for the GPU
            pixels = normalize_frames(host_to_device(frames, device), dtype)
            visual = model.encode_videos(pixels[None])
            ids = [tokenize_with_image(tok, build_prompt(it.prompt)) for it in job.items]
            prompts = model.prompt_embeddings(ids, visual.expand(len(ids), -1, -1))
        shared = model.shared_prefix_length(ids, visual.shape[1], [p.shape[0] for p in prompts]) if share_prefix else 0
        prefix = SharedPrefix(shared) if shared else None
        ready = time.perf_counter()
        for it, prompt in zip(job.items, prompts):
            yield Request(prompt, [item_row_key(it.item_id)], tag=(it, indices, ready), prefix=prefix)
