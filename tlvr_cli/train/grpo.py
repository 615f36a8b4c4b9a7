"""GRPO (spec §5), written out: the run loop around ``GRPOStep`` — data, checkpoints, metrics.

Differences from the reference, all numerics-neutral or optional:
* rollouts run through the KV-cache engine, G completions sharing one prefill (the reference samples
  G times without a cache); the sampling distribution is the same (T 1.0, top-k 50, top-p 1.0);
* several prompts per rank per step (the reference overwrites all but the last, spec §5.2 step 2);
* log-probs come from a vocabulary-chunked log-softmax in fp32 over sequences cut at their first
  eos; the reference takes a bf16 log-softmax over full logits (same values up to rounding);
* the frozen tower runs once per video per step and may be cached (``data.feature_cache_gb``);
* bad videos are skipped with a count instead of crashing.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

import torch

from ..data.records import read_grpo_rows
from ..engine.generate import Engine
from ..errors import TlvrError
from ..jobs import GRPOConfig
from ..model.checkpoint import generation_from_sampling, load_model
from ..progress import JobProgress, note
from ..runtime import init_distributed, resolve_root
from . import run_dir as R
from .grpo_step import GRPOStep
from .metrics import plot_run
from .optim import build_optimizer, build_scheduler
from .parallel import Parallel
from .policy import PolicyLogprobs
from .rollout import FeatureCache, PromptLoader, prompt_ids
from .setup import apply_tuning, drop_reported_videos


def run_grpo(cfg: GRPOConfig, *, resume: str | None = None, force: bool = False, show_progress: bool = True) -> Path:
    """Run GRPO and return the final model directory (released layout); ``resume``/``force`` follow the
    run-directory rule of ``run_dir.plan_run``."""
    ctx = init_distributed(cfg.model.device, cfg.dist.backend, need_group=cfg.dist.strategy == "fsdp2",
                           timeout_minutes=cfg.dist.timeout_minutes)
    if cfg.data.prompts_per_step % ctx.world_size:
        raise TlvrError(f"data.prompts_per_step={cfg.data.prompts_per_step} must be divisible by the {ctx.world_size} processes")
    run_dir = Path(cfg.output.run_dir)
    root = resolve_root(cfg.data.root, "train")
    rows, n_skipped_report = drop_reported_videos(read_grpo_rows(root / cfg.data.annotations, root), cfg.data.skip_report)
    if not rows:
        raise TlvrError(f"{root / cfg.data.annotations}: no usable rows")
    per_step = cfg.data.prompts_per_step
    total = math.ceil(len(rows) / per_step) * cfg.optim.epochs
    if cfg.optim.max_steps:
        total = min(total, cfg.optim.max_steps)
    plan = R.plan_run(run_dir, resume, cfg, total, force=force)  # before any model is loaded
    if ctx.is_main and plan.message:
        note(plan.message)
    if plan.complete:
        return run_dir / "final"

    R.seed_everything(cfg.seed)
    model = load_model(replace(cfg.model, device=str(ctx.device)))
    apply_tuning(model, cfg.tune, gradient_checkpointing=cfg.optim.gradient_checkpointing)
    ref = None
    if cfg.algo.beta > 0:  # with beta 0 the KL term vanishes: no reference model in memory at all
        ref = load_model(replace(cfg.model, device=str(ctx.device), path=cfg.ref_model or cfg.model.path))
        ref.requires_grad_(False)
        ref.eval()
    par = Parallel(PolicyLogprobs(model), model, ctx, cfg.dist.strategy, prefix="model.")

    optimizer = build_optimizer(model, cfg.optim)
    # with num_iterations > 1 every rollout batch takes several optimizer (and scheduler) steps
    scheduler = build_scheduler(optimizer, cfg.optim, total * cfg.algo.num_iterations)
    config_yaml = plan.config_yaml
    st, logger = R.start_run(plan, par, optimizer, scheduler, output=cfg.output)

    cache = FeatureCache(int(cfg.data.feature_cache_gb * 1e9)) if cfg.data.feature_cache_gb > 0 else None
    loader = PromptLoader(model.tokenizer, cfg.data.question_template, cfg.video.num_frames, cfg.video.backend,
                          model.config.vision_config.image_size, cfg.data.num_workers, cache)
    # the engine's cache holds the longest prompt of the data set (text + visual tokens) and its completion
    longest = max(len(prompt_ids(model.tokenizer, r, cfg.data.question_template)) for r in rows) - 1 + model.config.num_queries
    engine = Engine(model.language_model, max_batch=cfg.engine.max_batch, max_seq_len=longest + cfg.rollout.max_new_tokens,
                    cuda_graphs=cfg.engine.cuda_graphs, compile=cfg.engine.compile, fuse_weights=cfg.engine.fused_weights,
                    copy_weights=par.sharded)
    grpo_step = GRPOStep(cfg, model, ref, par, optimizer, scheduler, engine, cache)

    def step_rows(cursor: R.DataCursor) -> tuple[list, R.DataCursor]:
        # the global batch comes from the cursor; each rank takes every world_size-th prompt of it
        indices, after = cursor.take(len(rows), per_step, cfg.seed)
        return [rows[i] for i in indices[ctx.rank::ctx.world_size]], after

    progress = JobProgress("grpo", total, enabled=show_progress and ctx.is_main, plain_every=cfg.output.log_every)
    stop = R.StopRequest(progress.note if ctx.is_main else lambda _: None)
    progress.start(st.step)
    skipped_total = int(st.extra.get("skipped", n_skipped_report))
    try:
        while st.step < total:
            t_start = time.perf_counter()
            if ctx.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(ctx.device)
            mine, after = step_rows(st.cursor)
            batch = loader.load(mine)
            if st.step + 1 < total:  # decode the next step's videos while this one trains
                loader.prefetch(step_rows(after)[0])
            for err in batch.errors:
                progress.warn(f"skipped {err}")
            skipped_total += len(batch.errors)
            out = grpo_step(batch, st.step)
            st.step, st.cursor = st.step + 1, after
            st.extra["skipped"] = skipped_total
            m = out.metrics
            m["data/skipped"] = skipped_total
            m["time/step_s"] = time.perf_counter() - t_start
            m["perf/tokens_per_s"] = out.tokens / m["time/step_s"]
            if ctx.device.type == "cuda":
                m["perf/peak_mem_gb"] = torch.cuda.max_memory_allocated(ctx.device) / 1e9
            m = _gather_metrics(m, ctx)
            if st.step % cfg.output.log_every == 0 or st.step == total:
                logger.log(st.step, m)
            parts = {k.removeprefix("rewards/").removesuffix("_reward"): v for k, v in m.items() if k.startswith("rewards/")}
            progress.update(st.step, {"reward": m["reward"], **parts, "len": m["completion_length"], "kl": m["kl"],
                                      "s/it": m["time/step_s"]})
            if ctx.is_main and cfg.sample_every and (st.step % cfg.sample_every == 0 or st.step == 1):
                logger.log_samples(st.step, out.samples)
            save_now = cfg.output.save_every and st.step % cfg.output.save_every == 0
            if save_now or stop.requested or st.step == total:
                saved = R.save_checkpoint(run_dir, st, par, optimizer, scheduler, config_yaml, cfg.output.keep_last)
            if stop.requested:
                raise R.interrupted(saved, st.step, total)
        if ctx.is_main:  # the curves go to the trackers too, before they close
            logger.log_image(st.step, "curves", plot_run(run_dir, title="GRPO"))
    finally:
        stop.close()
        progress.stop()
        loader.close()
        logger.close()
    # the final model records the sampling settings its policy was trained with
    r = cfg.rollout
    return R.save_final(run_dir, par, generation_from_sampling(r.temperature, r.top_k, r.top_p, r.max_new_tokens))


def _gather_metrics(m: dict, ctx) -> dict:
    """Average numeric metrics over ranks (each rank holds the same number of groups); counts are summed."""
    if not ctx.enabled:
        return m
    allm = ctx.all_gather_objects(m)
    out = dict(m)
    for k in allm[0]:
        vals = [d[k] for d in allm if isinstance(d.get(k), (int, float))]
        if vals:
            out[k] = sum(vals) if k in ("data/skipped",) else sum(vals) / len(vals)
    return out
