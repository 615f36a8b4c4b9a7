"""Run a benchmark: decode videos, generate answers in batches through the engine, append them to
``answers.jsonl`` (flushed per item, so a killed run resumes where it stopped), then score.

Protocols (spec §6): ``greedy`` decodes greedily and counts unparseable answers as wrong; ``paper``
samples at T 1.0 / top-k 50 as the authors did and picks a random option when parsing fails, with a
per-item seeded RNG so the fallback is reproducible.
"""

from __future__ import annotations

import json
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ..config import to_yaml
from ..data.template import build_prompt, tokenize_with_image
from ..engine.generate import Engine
from ..engine.sampling import SamplingParams
from ..errors import TlvrError
from ..files import write_text_atomic
from ..jobs import EvalConfig, VideoConfig
from ..model.checkpoint import load_model
from ..progress import JobProgress
from ..runtime import resolve_root
from ..video.decode import read_video
from ..video.preprocess import preprocess_frames
from .answer import parse_option_answer, parse_reason_answer
from .answers import rank_answers_path, read_answers
from .benchmarks import get_benchmark
from .items import EvalItem
from .report import Report, score_answers, write_report

# items handed to one engine.generate call, in engine batches: rows that finish early are refilled
# from the same call, and the next items' videos decode in the background meanwhile
BATCHES_PER_CALL = 4


def default_output_dir(cfg: EvalConfig) -> Path:
    name = cfg.benchmark + (f"-{cfg.duration}" if cfg.benchmark == "videomme" else "")
    return Path("runs") / "eval" / name


def output_dir(cfg: EvalConfig) -> Path:
    return Path(cfg.output_dir) if cfg.output_dir else default_output_dir(cfg)


def load_eval_items(cfg: EvalConfig) -> list[EvalItem]:
    """The benchmark's items in its order (the first ``cfg.limit`` when set)."""
    data_dir = resolve_root(cfg.data_dir, cfg.benchmark)
    items = get_benchmark(cfg.benchmark).load_items(data_dir, cfg)
    if cfg.limit:
        items = items[: cfg.limit]
    if not items:
        raise TlvrError(f"{cfg.benchmark}: no items found under {data_dir}")
    return items


def _decode(item: EvalItem, video: VideoConfig, image_size: int):
    frames = read_video(item.video, item.frame_spec, **video.frame_args(item.frame_spec))
    return preprocess_frames(frames.frames, size=image_size), list(frames.indices)


def _parse(cfg: EvalConfig, output: str, item: EvalItem):
    rng = random.Random(f"{cfg.seed}:{item.item_id}") if cfg.protocol == "paper" else None
    if cfg.mode == "reason":
        return parse_reason_answer(output, item.choices, rng)
    return parse_option_answer(output, item.choices, rng, option_texts=item.meta.get("option_texts"))


def run_eval(cfg: EvalConfig, *, model=None, show_progress: bool = True, rank: int = 0, world_size: int = 1) -> Report | None:
    """Evaluate ``cfg.model`` on ``cfg.benchmark``; returns the scored report (also written to disk).
    With several processes each evaluates its share (``rank::world_size``) and returns None: the
    caller merges the rank files (``eval.distributed``)."""
    items = load_eval_items(cfg)
    out_dir = output_dir(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    answers_path = rank_answers_path(out_dir, rank, world_size)
    if rank == 0:
        write_text_atomic(out_dir / "config.yaml", to_yaml(cfg))
    done = {r["item_id"] for r in read_answers(answers_path)}
    mine = items[rank::world_size]
    todo = [it for it in mine if it.item_id not in done]

    if todo:
        if model is None:
            model = load_model(cfg.model)
        model.eval()
        _generate_answers(cfg, model, todo, answers_path, len(mine) - len(todo), len(mine), show_progress)
    if world_size > 1:
        return None
    order = {it.item_id: i for i, it in enumerate(items)}
    rows = sorted((r for r in read_answers(answers_path) if r["item_id"] in order), key=lambda r: order[r["item_id"]])
    report = score_answers(rows, cfg.benchmark, n_boot=cfg.bootstrap, seed=cfg.seed, phrases=cfg.reflection.phrases)
    write_report(report, out_dir)
    return report


def _generate_answers(cfg: EvalConfig, model, todo: list[EvalItem], answers_path: Path, already: int, total: int,
                      show_progress: bool) -> None:
    tok = model.tokenizer
    device = model.device
    dtype = next(model.vision_tower.parameters()).dtype
    image_size = model.config.vision_config.image_size
    params = SamplingParams(temperature=0.0) if cfg.protocol == "greedy" else SamplingParams(
        temperature=cfg.sampling.temperature, top_k=cfg.sampling.top_k, top_p=cfg.sampling.top_p)
    max_new = cfg.sampling.max_new_tokens
    engine = Engine(model.language_model, max_batch=cfg.engine.max_batch,
                    max_seq_len=model.config.tokenizer_model_max_length + max_new, cuda_graphs=cfg.engine.cuda_graphs,
                    compile=cfg.engine.compile, fuse_weights=cfg.engine.fused_weights)
    chunk = cfg.engine.max_batch * BATCHES_PER_CALL
    pool = ThreadPoolExecutor(max_workers=cfg.decode_workers)
    progress = JobProgress(cfg.benchmark, total, enabled=show_progress)
    progress.start(already)
    done, correct, seen, skipped = already, 0, 0, 0
    try:
        with answers_path.open("a") as out:
            futures = [pool.submit(_decode, it, cfg.video, image_size) for it in todo[:chunk]]
            for start in range(0, len(todo), chunk):
                items = todo[start:start + chunk]
                decoded = [f.result() if not f.exception() else f.exception() for f in futures]
                # the next chunk's videos decode while this chunk generates
                nxt = todo[start + chunk:start + 2 * chunk]
                futures = [pool.submit(_decode, it, cfg.video, image_size) for it in nxt]
                t0 = time.perf_counter()
                good, rows = [], []
                for it, dec in zip(items, decoded):
                    if isinstance(dec, BaseException):  # a broken video is recorded as skipped, not fatal
                        rows.append({"item_id": it.item_id, "task": it.task, "video": str(it.video), "video_key": it.video_key,
                                     "gold": it.gold, "skipped": True, "error": f"{type(dec).__name__}: {dec}"})
                    else:
                        good.append((it, dec))
                if good:
                    with torch.no_grad():
                        # path B can return fewer frames for some videos: encode a list when shapes differ
                        pix = [d[0].to(device=device, dtype=dtype) for _, d in good]
                        feats = model.encode_videos(torch.stack(pix) if len({p.shape for p in pix}) == 1 else pix)
                        ids = [tokenize_with_image(tok, build_prompt(it.prompt)) for it, _ in good]
                        prompts = model.prompt_embeddings(ids, feats)
                    outs = engine.generate(prompts, params, max_new, tok.eos_token_id, seed=_chunk_seed(cfg, items[0]))
                    secs = (time.perf_counter() - t0) / len(good)
                    for (it, (_, idx)), o in zip(good, outs):
                        text = tok.decode(o.tokens, skip_special_tokens=True).strip()
                        parsed = _parse(cfg, text, it)
                        ok = parsed.letter is not None and parsed.letter == it.gold
                        rows.append({"item_id": it.item_id, "task": it.task, "video": str(it.video), "video_key": it.video_key,
                                     "frame_indices": idx, "output": text, "parsed": parsed.letter, "parse_how": parsed.how,
                                     "gold": it.gold, "correct": ok, "new_tokens": len(o.tokens), "seconds": round(secs, 4)})
                for row in rows:
                    out.write(json.dumps(row, ensure_ascii=False) + "\n")
                    out.flush()
                    if row.get("skipped"):
                        skipped += 1
                    else:
                        seen += 1
                        correct += row["correct"]
                done += len(items)
                progress.update(done, {"acc %": 100 * correct / max(1, seen), "skipped": skipped})
    finally:
        progress.stop()
        pool.shutdown(wait=False, cancel_futures=True)


def _chunk_seed(cfg: EvalConfig, first: EvalItem) -> int:
    return random.Random(f"{cfg.seed}:{first.item_id}").getrandbits(63)
