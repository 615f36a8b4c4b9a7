"""GRPO (spec §5), written out: prompts → videos → rollouts → rewards → advantages → log-probs → loss → step.

Differences from the reference, all numerics-neutral or optional:
* rollouts run through the KV-cache engine, G completions sharing one prefill (the reference samples
  G times without a cache); the sampling distribution is the same (T 1.0, top-k 50, top-p 1.0);
* several prompts per rank per step (the reference overwrites all but the last, spec §5.2 step 2);
* log-probs come from a vocabulary-chunked log-softmax in fp32 over sequences cut at their first
  eos; the reference takes a bf16 log-softmax over full logits (same values up to rounding);
* the frozen tower runs once per video per step and may be cached (``data.feature_cache``);
* bad videos are skipped with a count instead of crashing.
"""

from __future__ import annotations

import json
import math
import signal
import time
from pathlib import Path

import torch

from ..config import to_yaml
from ..data.records import data_root, read_grpo_rows
from ..engine.generate import Engine, row_seed
from ..engine.sampling import SamplingParams
from ..errors import TlvrError
from ..jobs import GRPOConfig
from . import state as S
from .dist import Parallel, init_distributed
from .grpo_math import completion_mask, group_advantages, policy_loss
from .metrics import plot_metrics
from .optim import build_optimizer, build_scheduler, clip_gradients
from .policy import PolicyLogprobs, micro_batch_order, sequence_logprobs
from .progress import TrainProgress
from .rewards import reward_name, score_completions
from .rollout import FeatureCache, PromptLoader, pad_completions, tower_features
from .setup import apply_tuning, load_skip_set_if_any, prepare_model, start_run


def _seed(cfg: GRPOConfig, step: int, salt: int) -> int:
    # per-step seeds derived from (seed, step): a resumed run draws exactly what an uninterrupted one did
    return (cfg.seed * 1_000_003 + step * 7919 + salt) % (2**63 - 1)


def run_grpo(cfg: GRPOConfig, *, resume: str | None = None, show_progress: bool = True) -> Path:
    """Run GRPO and return the final model directory (released layout)."""
    ctx = init_distributed(cfg.model.device, cfg.dist.backend, need_group=cfg.dist.strategy == "fsdp2")
    if cfg.data.prompts_per_step % ctx.world_size:
        raise TlvrError(f"data.prompts_per_step={cfg.data.prompts_per_step} must be divisible by the {ctx.world_size} processes")
    run_dir = Path(cfg.output.run_dir)
    root = Path(cfg.data.root) if cfg.data.root else data_root() / "train"
    rows = read_grpo_rows(root / cfg.data.annotations, root)
    skip = load_skip_set_if_any(cfg.data.skip_report)
    n_skipped_report = sum(str(r.video_path) in skip for r in rows)
    rows = [r for r in rows if str(r.video_path) not in skip]
    if not rows:
        raise TlvrError(f"{root / cfg.data.annotations}: no usable rows")

    S.seed_everything(cfg.seed)
    model = prepare_model(cfg.model, ctx)
    apply_tuning(model, cfg.tune, gradient_checkpointing=cfg.optim.gradient_checkpointing)
    ref = None
    if cfg.algo.beta > 0:
        ref = prepare_model(type(cfg.model)(**{**cfg.model.__dict__, "path": cfg.ref_model or cfg.model.path}), ctx)
        ref.requires_grad_(False)
        ref.eval()
    par = Parallel(PolicyLogprobs(model), model, ctx, cfg.dist.strategy, prefix="model.")
    tok = model.tokenizer
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    G = cfg.algo.num_generations

    per_step = cfg.data.prompts_per_step
    steps_per_epoch = math.ceil(len(rows) / per_step)
    total = steps_per_epoch * cfg.optim.epochs
    if cfg.optim.max_steps:
        total = min(total, cfg.optim.max_steps)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, total * cfg.algo.num_iterations)
    config_yaml = to_yaml(cfg)
    st, logger = start_run(run_dir, resume, par, optimizer, scheduler, config_yaml, seed=cfg.seed,
                           tensorboard=cfg.output.tensorboard)

    cache = FeatureCache(int(8e9)) if cfg.data.feature_cache else None
    loader = PromptLoader(tok, cfg.data.question_template, cfg.video.num_frames, cfg.video.backend,
                          model.config.vision_config.image_size, cfg.data.num_workers, cache)
    max_prompt = max(model.config.num_queries + 512, 1024)
    engine = Engine(model.language_model, max_batch=cfg.perf.engine_max_batch,
                    max_seq_len=max_prompt + cfg.rollout.max_new_tokens, cuda_graphs=cfg.perf.cuda_graphs,
                    compile=cfg.perf.engine_compile, fuse_weights=cfg.perf.engine_fused_weights, copy_weights=par.sharded)
    params = SamplingParams(temperature=cfg.rollout.temperature, top_k=cfg.rollout.top_k, top_p=cfg.rollout.top_p)

    def step_rows(step: int) -> list:
        order = S.epoch_order(len(rows), cfg.seed, step // steps_per_epoch)
        k = step % steps_per_epoch
        mine = order[k * per_step:(k + 1) * per_step][ctx.rank::ctx.world_size]
        return [rows[i] for i in mine]

    interrupted = {"flag": False}
    old_handler = signal.signal(signal.SIGINT, lambda *_: interrupted.__setitem__("flag", True))
    progress = TrainProgress("grpo", total, enabled=show_progress and ctx.is_main)
    progress.start(st.step)
    skipped_total = int(st.extra.get("skipped", n_skipped_report))
    samples_path = run_dir / "samples.jsonl"
    try:
        while st.step < total:
            t_start = time.perf_counter()
            if ctx.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(ctx.device)
            batch = loader.load(step_rows(st.step))
            if st.step + 1 < total:
                loader.prefetch(step_rows(st.step + 1))
            for err in batch.errors:
                progress.warn(f"skipped {err}")
            skipped_total += len(batch.errors)
            m = _grpo_step(cfg, model, ref, engine, params, batch, st.step, ctx, optimizer, scheduler, eos, pad, G, cache, par)
            st.step += 1
            st.extra["skipped"] = skipped_total
            m["data/skipped"] = skipped_total
            m["time/step_s"] = time.perf_counter() - t_start
            m["perf/tokens_per_s"] = m.pop("_tokens") / m["time/step_s"]
            if ctx.device.type == "cuda":
                m["perf/peak_mem_gb"] = torch.cuda.max_memory_allocated(ctx.device) / 1e9
            m = _gather_metrics(m, ctx)
            if st.step % cfg.output.log_every == 0 or st.step == total:
                logger.log(st.step, {k: v for k, v in m.items() if not k.startswith("_")})
            parts = {k.removeprefix("rewards/").removesuffix("_reward"): v for k, v in m.items() if k.startswith("rewards/")}
            progress.update(st.step, {"reward": m["reward"], **parts, "len": m["completion_length"], "kl": m["kl"],
                                      "s/it": m["time/step_s"]})
            if ctx.is_main and cfg.sample_every and (st.step % cfg.sample_every == 0 or st.step == 1):
                with samples_path.open("a") as f:
                    f.write(json.dumps({"step": st.step, "samples": m["_samples"]}) + "\n")
            save_now = cfg.output.save_every and st.step % cfg.output.save_every == 0
            if save_now or interrupted["flag"] or st.step == total:
                par.save_checkpoint(run_dir, st, optimizer, scheduler, config_yaml, cfg.output.keep_last)
            if interrupted["flag"]:
                raise KeyboardInterrupt
    finally:
        signal.signal(signal.SIGINT, old_handler)
        progress.stop()
        loader.close()
        logger.close()
    final = par.save_final(run_dir)
    if ctx.is_main:
        reward_keys = [f"rewards/{reward_name(spec.function)}" for spec in cfg.algo.rewards]
        plot_metrics(run_dir / "metrics.jsonl", run_dir / "curves.png", ["reward", *reward_keys, "completion_length", "kl"],
                     title="GRPO")
    return final


def _grpo_step(cfg, model, ref, engine, params, batch, step, ctx, optimizer, scheduler, eos, pad, G, cache,
               par: Parallel | None = None) -> dict:
    par = par if par is not None else Parallel(PolicyLogprobs(model), model, ctx, "none", prefix="model.")
    t0 = time.perf_counter()
    device = ctx.device
    B = len(batch.rows)
    timings: dict[str, float] = {}
    if B == 0:
        raise TlvrError(f"step {step + 1}: every video of this step's prompts failed to decode")
    feats = tower_features(model, batch, device, cache)
    timings["time/vision_s"] = time.perf_counter() - t0

    # 1. rollouts: G samples per prompt, sharing the prompt's prefill
    t1 = time.perf_counter()
    model.eval()
    with torch.no_grad(), par.full_params():  # fsdp2: the engine reads the gathered weights
        prompts = model.prompt_embeddings(batch.input_ids, model.connector(feats))
        # rows keyed by dataset index: the same samples however the step's prompts are split over ranks
        outs = engine.generate(prompts, params, cfg.rollout.max_new_tokens, eos, num_samples=G, seed=_seed(cfg, step, 1),
                               ignore_eos=cfg.perf.force_max_new_tokens,
                               row_keys=[r.index * G + j for r in batch.rows for j in range(G)])
    completions = pad_completions([o.tokens for o in outs], pad, device)
    mask = completion_mask(completions, eos)
    lengths = mask.sum(1)
    seq_prompt = [i // G for i in range(B * G)]
    timings["time/rollout_s"] = time.perf_counter() - t1

    # 2. rewards and group advantages
    t2 = time.perf_counter()
    texts = model.tokenizer.batch_decode(completions.tolist(), skip_special_tokens=True)
    texts = [t.strip() for t in texts]
    columns = {"solution": [r.solution for r in batch.rows for _ in range(G)],
               "problem": [r.problem for r in batch.rows for _ in range(G)]}
    rewards, components = score_completions(texts, columns, cfg.algo)
    rewards_t = torch.tensor(rewards, dtype=torch.float32, device=device)
    # noise keyed by the prompt's dataset index, like the rollouts
    adv = group_advantages(rewards_t.cpu(), G, scale=cfg.algo.scale_rewards, eps=cfg.algo.std_eps,
                           noise_std=cfg.algo.advantage_noise_std,
                           noise_seeds=[row_seed(_seed(cfg, step, 2), r.index) for r in batch.rows]).to(device)
    group_std = rewards_t.view(B, G).std(dim=1)
    timings["time/score_s"] = time.perf_counter() - t2

    # 3. log-probs, loss, backward: micro-batches of similar length
    t3 = time.perf_counter()
    groups = micro_batch_order(lengths.tolist(), cfg.perf.micro_batch_size)
    ref_logp = old_logp = None
    with torch.no_grad():
        if ref is not None:
            ref_feats = feats.to(next(ref.connector.parameters()).dtype)
            ref_logp = torch.zeros(mask.shape, device=device)
            for rows in groups:
                ref_logp[rows] = sequence_logprobs(ref, ref_feats, batch.input_ids, seq_prompt, completions, lengths, rows,
                                                   chunk_size=cfg.perf.logprob_chunk_size).float()
        if cfg.algo.num_iterations > 1:
            old_logp = torch.zeros(mask.shape, device=device)
            for rows in groups:
                old_logp[rows] = par.module(feats, batch.input_ids, seq_prompt, completions, lengths, rows,
                                            chunk_size=cfg.perf.logprob_chunk_size).float()
    timings["time/ref_logprob_s"] = time.perf_counter() - t3
    model.train()
    model.vision_tower.eval()
    stats_sum: dict[str, float] = {}
    grad_norm = 0.0
    lr = optimizer.param_groups[0]["lr"]
    t4 = time.perf_counter()
    # every rank runs the same number of micro-batches (a rank that lost rows to broken videos repeats
    # its first one with weight 0), so DistributedDataParallel's collective calls line up
    n_micro = ctx.all_reduce_max(len(groups))
    plan = [(rows, 1.0) for rows in groups] + [(groups[0], 0.0)] * (n_micro - len(groups))
    for _ in range(cfg.algo.num_iterations):
        for j, (rows, weight) in enumerate(plan):
            with par.no_sync(j < len(plan) - 1):
                logp = par.module(feats, batch.input_ids, seq_prompt, completions, lengths, rows,
                              chunk_size=cfg.perf.logprob_chunk_size).float()
                loss, stats = policy_loss(
                    logp, None if ref_logp is None else ref_logp[rows], adv[rows], mask[rows].float(),
                    beta=cfg.algo.beta, aggregation=cfg.algo.loss_aggregation,
                    old_logp=None if old_logp is None else old_logp[rows], clip_eps=cfg.algo.clip_eps,
                    kl_estimator=cfg.algo.kl_estimator, kl_clamp=cfg.algo.kl_clamp,
                    max_tokens=cfg.rollout.max_new_tokens, num_sequences=B * G, num_tokens=int(mask.sum()),
                )
                (loss * weight).backward()
            for k, v in stats.items():
                stats_sum[k] = stats_sum.get(k, 0.0) + weight * float(v) * len(rows)
        grad_norm = clip_gradients(model, cfg.optim.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    timings["time/backward_s"] = time.perf_counter() - t4
    n_it = cfg.algo.num_iterations * B * G
    m = {
        "completion_length": float(lengths.float().mean()),
        "reward": float(rewards_t.mean()),
        "reward_std": float(group_std.mean()),
        "kl": stats_sum.get("kl", 0.0) / n_it,
        "clip_fraction": stats_sum.get("clip_fraction", 0.0) / n_it,
        "frac_zero_std": float((group_std == 0).float().mean()),
        "lr": lr,
        "grad_norm": grad_norm,
        **{f"rewards/{k}": sum(v) / len(v) for k, v in components.items()},
        **timings,
        "_tokens": int(lengths.sum()),
        "_samples": [{"problem": batch.rows[i // G].problem, "solution": batch.rows[i // G].solution,
                      "completion": texts[i], "reward": rewards[i]} for i in range(0, B * G, max(1, G // 2))][:8],
    }
    return m


def _gather_metrics(m: dict, ctx) -> dict:
    """Average numeric metrics over ranks (each rank holds the same number of groups)."""
    if not ctx.enabled:
        return m
    allm = ctx.all_gather_objects({k: v for k, v in m.items() if not k.startswith("_")})
    out = dict(m)
    for k in allm[0]:
        vals = [d[k] for d in allm if isinstance(d.get(k), (int, float))]
        if vals:
            out[k] = sum(vals) if k in ("data/skipped",) else sum(vals) / len(vals)
    out["_samples"] = m["_samples"]
    return out
