"""GRPO (spec §5), written out: the run loop around ``GRPOStep`` — data, checkpoints, metrics.

Differences from the reference, all numerics-neutral or optional:
* rollouts run through the KV-cache engine, G completions sharing one prefill (the reference samples
  G times without a cache); the sampling distribution is the same (T 1.0, top-k 50, top-p 1.0);
* several prompts per rank per step (the reference overwrites all but the last, spec §5.2 step 2);
* log-probs come from a vocabulary-chunked log-softmax in fp32 over sequences cut at their first
  eos; the reference takes a bf16 log-softmax over full logits (same values up to rounding);
* the frozen tower runs once per video per step and may be cached (``data.feature_cache_gb``);
* a prompt whose video fails to decode is replaced by one drawn next from the data order (counted;
  the run stops once more than ``data.max_skip_fraction`` of the data failed), where the reference
  crashes (spec §7 item 11);
* a prompt must fit the model's context with its completion (a one-line error names the row),
  where the reference's splice cuts it to ``tokenizer_model_max_length`` without a word.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import replace
from pathlib import Path

import torch

from ..data.records import read_grpo_rows
from ..errors import TlvrError
from ..jobs import GRPOConfig
from ..model.checkpoint import generation_from_sampling, load_model
from ..progress import JobProgress
from ..runtime import init_distributed
from . import run_dir as R
from .grpo_step import GRPOStep
from .lora import BaseReference
from .metrics import plot_run
from .optim import build_optimizer, build_scheduler
from .parallel import Parallel
from .policy import PolicyLogprobs
from .rollout import FeatureCache, PromptDraws, PromptLoader, check_prompts_fit, prompt_ids
from .rollout_parallel import check_rollout_processes, rollout_engine, rollout_group
from .setup import apply_job_tuning, read_samples


def run_grpo(cfg: GRPOConfig, *, resume: str | None = None, force: bool = False, show_progress: bool = True) -> Path:
    """Run GRPO and return the final model directory (released layout); ``resume``/``force`` follow the
    run-directory rule of ``run_dir.plan_run``."""
    ctx = init_distributed(cfg.model.device, cfg.dist.backend, need_group=cfg.dist.strategy == "fsdp2",
                           timeout_minutes=cfg.dist.timeout_minutes)
    if cfg.data.prompts_per_step % ctx.world_size:
        raise TlvrError(f"data.prompts_per_step={cfg.data.prompts_per_step} must be divisible by the "
                        f"{ctx.world_size} processes")
    check_rollout_processes(cfg, ctx.world_size)
    run_dir = Path(cfg.output.run_dir)
    rows, n_skipped_report = read_samples(read_grpo_rows, cfg.data, "rows")
    total = R.total_steps(len(rows), cfg.data.prompts_per_step, cfg.optim.epochs, cfg.optim.max_steps)
    plan = R.plan_run(run_dir, resume, cfg, total, force=force, announce=ctx.is_main)  # before any model loads
    if plan.complete:
        return run_dir / "final"

    R.seed_everything(cfg.seed)
    lora = cfg.tune.lora.enabled
    if lora and cfg.dist.strategy == "fsdp2":
        # fsdp2 keeps its shards in fp32: the frozen LLM would double in size
        raise TlvrError("tune.lora trains with dist.strategy ddp or none, not fsdp2")
    model = load_model(replace(cfg.model, device=str(ctx.device)))
    tp_group = rollout_group(cfg, ctx, model.language_model)  # before a run directory is written
    apply_job_tuning(model, cfg.tune, cfg.optim)
    ref = None
    if cfg.algo.beta > 0 and lora and not cfg.ref_model:
        ref = BaseReference(model)  # the start model is the policy with its adapters off: no second LLM
    elif cfg.algo.beta > 0:  # with beta 0 the KL term vanishes: no reference model in memory at all
        ref = load_reference(cfg, model, ctx.device, lora)
    par = Parallel(PolicyLogprobs(model), model, ctx, cfg.dist.strategy, prefix="model.")

    optimizer = build_optimizer(model, cfg.optim, cfg.tune)
    # with num_iterations or mini_batches > 1 every rollout batch takes several optimizer (and scheduler) steps
    scheduler = build_scheduler(optimizer, cfg.optim, total * cfg.algo.num_iterations * cfg.algo.mini_batches)
    config_yaml = plan.config_yaml
    st, logger = R.start_run(plan, par, optimizer, scheduler, output=cfg.output)

    cache = FeatureCache(int(cfg.data.feature_cache_gb * 1e9)) if cfg.data.feature_cache_gb > 0 else None
    loader = PromptLoader(model.tokenizer, cfg.data.question_template, cfg.video.frame_args(), cfg.video.backend,
                          model.config.vision_config.image_size, cfg.data.num_workers, cache)
    # the engine's cache holds the longest prompt of the data set (text + visual tokens) and its completion
    visual = model.config.num_queries  # the <image> token becomes this many embeddings
    lengths = [len(prompt_ids(model.tokenizer, r, cfg.data.question_template)) - 1 + visual for r in rows]
    check_prompts_fit(rows, lengths, cfg.rollout.max_new_tokens, model.config.tokenizer_model_max_length)
    engine = rollout_engine(cfg, model.language_model, par, max(lengths) + cfg.rollout.max_new_tokens, tp_group)
    grpo_step = GRPOStep(cfg, model, ref, par, optimizer, scheduler, engine, cache, tp_group=tp_group)

    progress = JobProgress("grpo", total, enabled=show_progress and ctx.is_main, plain_every=cfg.output.log_every)
    stop = R.StopRequest(progress.note if ctx.is_main else lambda _: None)
    progress.start(st.step)
    # counted over the run, across resumes: skipped (reported up front + failed), failed, drawn, extra draws
    tally = {"skipped": n_skipped_report, "broken": 0, "drawn": 0, "extra_prompts": 0}
    tally.update({k: int(st.extra[k]) for k in tally if k in st.extra})
    try:
        while st.step < total:
            t_start = time.perf_counter()
            if ctx.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(ctx.device)
            # the step's prompts come from the cursor, further draws too; each draw decodes the next one ahead
            draws = PromptDraws(rows, loader, st.cursor, cfg.seed, ctx.rank, ctx.world_size)
            out = grpo_step.run(draws.draw, st.step)
            for err in out.errors:
                progress.warn(f"skipped {err}")
            st.step, st.cursor = st.step + 1, draws.cursor
            c = out.counts
            tally = {"skipped": tally["skipped"] + c["broken"], "broken": tally["broken"] + c["broken"],
                     "drawn": tally["drawn"] + c["drawn"], "extra_prompts": tally["extra_prompts"] + c["extra"]}
            st.extra.update(tally)
            skip_fraction = tally["broken"] / max(tally["drawn"], len(rows))
            m = out.metrics
            m.update({"data/skipped": tally["skipped"], "data/skip_fraction": skip_fraction,
                      "data/extra_prompts": tally["extra_prompts"]})
            m["time/step_s"] = time.perf_counter() - t_start
            m["perf/tokens_per_s"] = out.tokens / m["time/step_s"]
            if ctx.device.type == "cuda":
                m["perf/peak_mem_gb"] = torch.cuda.max_memory_allocated(ctx.device) / 1e9
            m = _gather_metrics(m, ctx)
            if st.step % cfg.output.log_every == 0 or st.step == total:
                logger.log(st.step, m)
            parts = {k.removeprefix("rewards/").removesuffix("_reward"): v for k, v in m.items()
                     if k.startswith("rewards/")}
            progress.update(st.step, {"reward": m["reward"], **parts, "len": m["completion_length"], "kl": m["kl"],
                                      "s/it": m["time/step_s"]})
            if ctx.is_main and cfg.sample_every and (st.step % cfg.sample_every == 0 or st.step == 1):
                logger.log_samples(st.step, out.samples)
            too_many = skip_fraction > cfg.data.max_skip_fraction
            save_now = cfg.output.save_every and st.step % cfg.output.save_every == 0
            saved = None
            if save_now or stop.requested or st.step == total or too_many:
                saved = R.save_checkpoint(run_dir, st, par, optimizer, scheduler, config_yaml, cfg.output.keep_last)
            if too_many:
                raise TlvrError(f"step {st.step}: {tally['broken']} prompts had a video that failed to decode, "
                                f"{skip_fraction:.1%} of the data "
                                f"(data.max_skip_fraction={cfg.data.max_skip_fraction}): scan the videos with "
                                "`tlvr data check` and pass its report as data.skip_report")
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


def load_reference(cfg: GRPOConfig, policy: torch.nn.Module, device: torch.device,
                   lora: bool = False) -> torch.nn.Module:
    """The frozen reference model on ``device``. From the policy's own start checkpoint (the default)
    it is a device-side copy of ``policy``, which must not have trained yet: the weights are read from
    disk and moved to the device once instead of twice. A LoRA policy holds adapters: always loaded."""
    path = cfg.ref_model or cfg.model.path
    if path == cfg.model.path and not lora:
        ref = copy.deepcopy(policy, memo={id(policy.tokenizer): policy.tokenizer})  # one tokenizer for both
    else:
        ref = load_model(replace(cfg.model, device=str(device), path=path))
    ref.requires_grad_(False)
    ref.eval()
    return ref


def _gather_metrics(m: dict, ctx) -> dict:
    """Average numeric metrics over ranks (each rank holds the same number of groups; a rank that trained
    on none reports NaN and is left out); counts (data/*, dynamic/*) are the same on every rank."""
    if not ctx.enabled:
        return m
    allm = ctx.all_gather_objects(m)
    out = dict(m)
    for k in dict.fromkeys(k for d in allm for k in d):
        vals = [d[k] for d in allm if isinstance(d.get(k), (int, float)) and math.isfinite(d[k])]
        out[k] = sum(vals) / len(vals) if vals else float("nan")
    return out
