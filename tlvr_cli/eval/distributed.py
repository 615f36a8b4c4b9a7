"""Evaluation across processes: items are sharded by rank, each rank appends its own answers file,
and rank 0 merges them in benchmark order and scores — the same report as one process (greedy)."""

from __future__ import annotations

import os
from pathlib import Path

from ..jobs import EvalConfig


def run_eval_sharded(cfg: EvalConfig, *, model=None, show_progress: bool = True):
    """Run ``run_eval`` on this process's shard when launched with several processes; else plainly."""
    from .runner import default_output_dir, merge_rank_answers, run_eval

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return run_eval(cfg, model=model, show_progress=show_progress)
    from ..data.records import data_root
    from ..train.dist import init_distributed, shutdown_distributed
    from .benchmarks import get_benchmark
    from .report import score_answers, write_report

    ctx = init_distributed(cfg.model.device)
    if cfg.model.device in ("auto", "cuda"):
        cfg.model.device = str(ctx.device)
    run_eval(cfg, model=model, show_progress=show_progress and ctx.is_main, rank=ctx.rank, world_size=ctx.world_size)
    ctx.barrier()
    report = None
    if ctx.is_main:
        data_dir = Path(cfg.data_dir) if cfg.data_dir else data_root() / cfg.benchmark
        items = get_benchmark(cfg.benchmark).load_items(data_dir, cfg)
        if cfg.limit:
            items = items[: cfg.limit]
        out_dir = Path(cfg.output_dir) if cfg.output_dir else default_output_dir(cfg)
        rows = merge_rank_answers(out_dir, ctx.world_size, [it.item_id for it in items])
        report = score_answers(rows, cfg.benchmark, n_boot=cfg.bootstrap, seed=cfg.seed)
        write_report(report, out_dir)
    ctx.barrier()
    shutdown_distributed()
    return report
