"""Evaluation across processes: items are sharded by rank, each rank appends its own answers file,
and rank 0 merges them in benchmark order and scores — the same report as one process (greedy)."""

from __future__ import annotations

from ..jobs import EvalConfig
from ..runtime import init_distributed, launch_world_size, shutdown_distributed
from .answers import merge_rank_answers
from .report import Report, score_answers, write_report
from .runner import load_eval_items, output_dir, run_eval


def run_eval_sharded(cfg: EvalConfig, *, model=None, show_progress: bool = True) -> Report | None:
    """Run ``run_eval`` on this process's shard when launched with several processes; else plainly.
    Returns the report on rank 0 (None on the other ranks)."""
    if launch_world_size() == 1:
        return run_eval(cfg, model=model, show_progress=show_progress)
    ctx = init_distributed(cfg.model.device)
    if cfg.model.device in ("auto", "cuda"):
        cfg.model.device = str(ctx.device)
    run_eval(cfg, model=model, show_progress=show_progress and ctx.is_main, rank=ctx.rank, world_size=ctx.world_size)
    ctx.barrier()
    report = None
    if ctx.is_main:
        out_dir = output_dir(cfg)
        rows = merge_rank_answers(out_dir, ctx.world_size, [it.item_id for it in load_eval_items(cfg)])
        report = score_answers(rows, cfg.benchmark, n_boot=cfg.bootstrap, seed=cfg.seed, phrases=cfg.reflection.phrases)
        write_report(report, out_dir)
    ctx.barrier()
    shutdown_distributed()
    return report
