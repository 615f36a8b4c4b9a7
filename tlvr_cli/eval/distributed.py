"""Evaluation across processes: items are sharded by rank, each rank appends its own answers file,
and rank 0 merges them in benchmark order and scores — the same report as one process (greedy) — and
merges the processes' speed records of this run into ``speed.json``.
Rank 0 checks the output directory against the resume key and records it before any rank writes."""

from __future__ import annotations

import json

from rich.console import Console

from ..errors import TlvrError
from ..files import write_json_atomic
from ..jobs import EvalConfig
from ..runtime import init_distributed, launch_world_size, shutdown_distributed
from .answers import SPEED, merge_answers, merge_speeds, rank_speed_path
from .benchmarks import load_eval_items
from .report import Report, score_answers, write_report
from .runner import output_dir, prepare_output, run_eval


def run_eval_sharded(cfg: EvalConfig, *, model=None, show_progress: bool = True) -> Report | None:
    """Run ``run_eval`` on this process's shard when launched with several processes; else plainly.
    Returns the report on rank 0 (None on the other ranks)."""
    if launch_world_size() == 1:
        return run_eval(cfg, model=model, show_progress=show_progress)
    ctx = init_distributed(cfg.model.device)
    if cfg.model.device in ("auto", "cuda"):
        cfg.model.device = str(ctx.device)
    refused, out_dir = None, None
    if ctx.is_main:
        try:
            out_dir = prepare_output(cfg, model)
        except TlvrError as e:
            refused = str(e)
    refused = ctx.all_gather_objects(refused)[0]  # every rank stops, not only the one that checked
    if refused is not None:
        shutdown_distributed()
        raise TlvrError(refused)
    # this process's speed record, if it answered something (the file it leaves otherwise is an older run's)
    speed_path = rank_speed_path(output_dir(cfg, model), ctx.rank, ctx.world_size)
    before = speed_path.read_bytes() if speed_path.is_file() else None
    run_eval(cfg, model=model, show_progress=show_progress and ctx.is_main, rank=ctx.rank, world_size=ctx.world_size,
             prepared=True)
    after = speed_path.read_bytes() if speed_path.is_file() else None
    speeds = ctx.all_gather_objects(json.loads(after) if after is not None and after != before else None)
    report = None
    if ctx.is_main:
        if answered := [s for s in speeds if s is not None]:
            speed = merge_speeds(answered)
            write_json_atomic(out_dir / SPEED, speed)
            if show_progress:
                Console(stderr=True, highlight=False).print(
                    f"{speed['questions']} questions in {speed['generate_s']:.1f} s on {speed['processes']} processes: "
                    f"{speed['tokens_per_s']:,.0f} generated tok/s, {speed['questions_per_s']:.2f} questions/s")
        rows = merge_answers(out_dir, [it.item_id for it in load_eval_items(cfg)])
        report = score_answers(rows, cfg.benchmark, n_boot=cfg.bootstrap, seed=cfg.seed, phrases=cfg.reflection.phrases)
        write_report(report, out_dir)
    ctx.barrier()
    shutdown_distributed()
    return report
