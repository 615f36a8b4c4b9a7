"""Run a benchmark: decode videos, generate answers in batches through the engine, append them to
``answers.jsonl`` (flushed per item, so a killed run resumes where it stopped), then score.

Protocols (spec §6): ``greedy`` decodes greedily and counts unparseable answers as wrong; ``paper``
samples at T 1.0 / top-k 50 as the authors did and picks a random option when parsing fails, with a
per-item seeded RNG so the fallback is reproducible.
"""

from __future__ import annotations

import json
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..config import to_yaml
from ..data.records import data_root
from ..data.template import build_prompt, tokenize_with_image
from ..errors import TlvrError
from ..jobs import EvalConfig
from .answer import parse_option_answer, parse_reason_answer
from .benchmarks import get_benchmark
from .items import EvalItem


def default_output_dir(cfg: EvalConfig) -> Path:
    name = cfg.benchmark + (f"-{cfg.duration}" if cfg.benchmark == "videomme" else "")
    return Path("runs") / "eval" / name


def read_answers(path: Path) -> list[dict]:
    """Rows of an answers file; a torn last line (killed mid-write) is ignored."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _decode(item: EvalItem, num_frames: int, image_size: int):
    from ..video.decode import read_video
    from ..video.preprocess import preprocess_frames

    frames = read_video(item.video, item.frame_spec, num_frames)
    return preprocess_frames(frames.frames, size=image_size), list(frames.indices)


def _parse(cfg: EvalConfig, output: str, item: EvalItem):
    rng = random.Random(f"{cfg.seed}:{item.item_id}") if cfg.protocol == "paper" else None
    if cfg.mode == "reason":
        return parse_reason_answer(output, item.choices, rng)
    return parse_option_answer(output, item.choices, rng, option_texts=item.meta.get("option_texts"))


def run_eval(cfg: EvalConfig, *, model=None, show_progress: bool = True, rank: int = 0, world_size: int = 1):
    """Evaluate ``cfg.model`` on ``cfg.benchmark``; returns the scored report (also written to disk)."""
    from ..engine.generate import Engine
    from ..engine.sampling import SamplingParams
    from ..model.checkpoint import load_model
    from .report import score_answers, write_report

    bench = get_benchmark(cfg.benchmark)
    data_dir = Path(cfg.data_dir) if cfg.data_dir else data_root() / cfg.benchmark
    items = bench.load_items(data_dir, cfg)
    if cfg.limit:
        items = items[: cfg.limit]
    if not items:
        raise TlvrError(f"{cfg.benchmark}: no items found under {data_dir}")
    out_dir = Path(cfg.output_dir) if cfg.output_dir else default_output_dir(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    answers_path = out_dir / ("answers.jsonl" if world_size == 1 else f"answers.rank{rank}.jsonl")
    if rank == 0:
        (out_dir / "config.yaml").write_text(to_yaml(cfg))
    done = {r["item_id"] for r in read_answers(answers_path)}
    mine = items[rank::world_size]
    todo = [it for it in mine if it.item_id not in done]

    if todo:
        if model is None:
            model = load_model(cfg.model.path, dtype=cfg.model.dtype, device=cfg.model.device,
                               attn_implementation=cfg.model.attn_implementation)
        model.eval()
        _generate_answers(cfg, model, todo, answers_path, len(mine) - len(todo), len(mine), show_progress,
                          Engine, SamplingParams)
    if world_size > 1:
        return None  # the caller merges the rank files (see merge_rank_answers)
    order = {it.item_id: i for i, it in enumerate(items)}
    rows = sorted((r for r in read_answers(answers_path) if r["item_id"] in order), key=lambda r: order[r["item_id"]])
    report = score_answers(rows, cfg.benchmark, n_boot=cfg.bootstrap, seed=cfg.seed)
    write_report(report, out_dir)
    return report


def merge_rank_answers(out_dir: Path, world_size: int, item_order: list[str]) -> list[dict]:
    """Merge ``answers.rank*.jsonl`` into one ``answers.jsonl`` in benchmark order."""
    order = {k: i for i, k in enumerate(item_order)}
    rows = {}
    for r in range(world_size):
        for row in read_answers(out_dir / f"answers.rank{r}.jsonl"):
            rows[row["item_id"]] = row
    merged = sorted(rows.values(), key=lambda row: order.get(row["item_id"], len(order)))
    tmp = out_dir / "answers.jsonl.tmp"
    tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in merged))
    os.replace(tmp, out_dir / "answers.jsonl")
    return merged


def _generate_answers(cfg, model, todo, answers_path, already, total, show_progress, Engine, SamplingParams) -> None:
    tok = model.tokenizer
    device = next(model.parameters()).device
    dtype = next(model.vision_tower.parameters()).dtype
    image_size = model.config.vision_config.image_size
    greedy = cfg.protocol == "greedy"
    params = SamplingParams(temperature=0.0) if greedy else SamplingParams(
        temperature=cfg.sampling.temperature, top_k=cfg.sampling.top_k, top_p=cfg.sampling.top_p)
    max_new = cfg.max_new_tokens
    engine = Engine(model.language_model, max_batch=cfg.batch_size, max_seq_len=model.config.tokenizer_model_max_length + max_new,
                    cuda_graphs=cfg.cuda_graphs, compile=cfg.compile)
    chunk = max(1, cfg.batch_size * 4)  # several engine batches per call: finished rows are refilled
    pool = ThreadPoolExecutor(max_workers=4)
    console = Console(stderr=True, highlight=False)
    progress = Progress(TextColumn(f"[bold]{cfg.benchmark}[/]"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                        console=console, disable=not show_progress)
    correct = seen = 0
    with progress, answers_path.open("a") as out:
        task = progress.add_task("eval", total=total, completed=already, info="")
        futures = [pool.submit(_decode, it, cfg.video.num_frames, image_size) for it in todo[:chunk]]
        for start in range(0, len(todo), chunk):
            items = todo[start:start + chunk]
            decoded = [f.result() if not f.exception() else f.exception() for f in futures]
            nxt = todo[start + chunk:start + 2 * chunk]
            futures = [pool.submit(_decode, it, cfg.video.num_frames, image_size) for it in nxt]
            t0 = time.perf_counter()
            good, rows = [], []
            for it, dec in zip(items, decoded):
                if isinstance(dec, BaseException):
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
                if not row.get("skipped"):
                    seen += 1
                    correct += row["correct"]
            progress.update(task, advance=len(items), info=f"acc {100 * correct / max(1, seen):.1f}% | skipped {sum(r.get('skipped', False) for r in rows)}")
    pool.shutdown(wait=False, cancel_futures=True)


def _chunk_seed(cfg: EvalConfig, first: EvalItem) -> int:
    return random.Random(f"{cfg.seed}:{first.item_id}").getrandbits(63)
