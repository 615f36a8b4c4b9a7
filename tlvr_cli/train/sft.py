"""Supervised cold start (spec §3.2, §4), written out: data → forward → loss → backward → clip → step.

What the reference does that we do differently, and why:
* a record whose label mask fails the §3.2 check is reported and skipped (the reference sleeps 5 s
  and trains on a fully masked sample, which contributes nothing);
* truncation to ``max_length`` warns instead of happening silently;
* a video that cannot be decoded is skipped with a count (the reference crashes, spec §7 item 11);
* ``global_batch_size`` fixes the samples per optimizer step however many processes run: the
  reference's 4 GPUs x 1 sample (4 steps of 4, DDP averaging the per-GPU losses) is, on one process,
  4 micro-batches of 1 accumulated (each loss divided by 4), the same mean.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from ..data.records import ColdstartRecord, read_coldstart_records
from ..data.template import build_sft_example
from ..errors import TlvrError
from ..jobs import ColdstartConfig
from ..model.checkpoint import load_model
from ..progress import JobProgress
from ..runtime import DistContext, init_distributed
from ..video.decode import read_frames
from ..video.preprocess import preprocess_frames
from . import run_dir as R
from .metrics import plot_run
from .optim import build_optimizer, build_scheduler, clip_gradients
from .parallel import Parallel
from .setup import apply_job_tuning, read_samples


@dataclass
class SFTSample:
    index: int
    input_ids: list[int] | None = None
    labels: list[int] | None = None
    pixels: torch.Tensor | None = None
    error: str = ""
    warning: str = ""


class ColdstartDataset(Dataset):
    """Decodes a record's video and builds its prompt and label mask; failures become error samples."""

    def __init__(self, records: list[ColdstartRecord], tokenizer, image_size: int, visual_tokens: int,
                 cfg: ColdstartConfig) -> None:
        self.records, self.tokenizer, self.image_size, self.cfg = records, tokenizer, image_size, cfg
        self.visual_tokens = visual_tokens

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> SFTSample:
        rec = self.records[i]
        ex = build_sft_example(self.tokenizer, rec.conversations, self.cfg.data.max_length, self.visual_tokens)
        if not ex.ok:
            return SFTSample(i, error=f"{rec.video}: label mask check failed ({ex.reason})")
        try:
            frames = read_frames(rec.video_path, **self.cfg.video.frame_args(), backend=self.cfg.video.backend)
        except TlvrError as e:
            return SFTSample(i, error=str(e))
        pixels = preprocess_frames(frames.frames, size=self.image_size)
        warning = f"{rec.video}: truncated to data.max_length={self.cfg.data.max_length} tokens" if ex.truncated else ""
        return SFTSample(i, ex.input_ids, ex.labels, pixels, warning=warning)


def _collate(samples: list[SFTSample]) -> list[SFTSample]:
    return samples


def grad_accum_steps(cfg: ColdstartConfig, world_size: int) -> int:
    """Micro-batches per optimizer step on each process: ``grad_accum``, or with ``global_batch_size``
    the count that makes batch_size x it x processes equal to it (a one-line error when none does)."""
    if not cfg.global_batch_size:
        return cfg.grad_accum
    if cfg.grad_accum != 1:
        raise TlvrError(f"give global_batch_size ({cfg.global_batch_size}) or grad_accum ({cfg.grad_accum}), not both")
    per_round = cfg.batch_size * world_size
    if cfg.global_batch_size % per_round:
        raise TlvrError(f"global_batch_size={cfg.global_batch_size} is not a multiple of batch_size={cfg.batch_size} "
                        f"x {world_size} processes: change one of them")
    return cfg.global_batch_size // per_round


def micro_batches(chunk: list[int], cfg: ColdstartConfig, ctx: DistContext,
                  accum: int | None = None) -> list[list[int]]:
    """This rank's micro-batches of one optimizer step's samples ``chunk`` (the global batch, rank-strided)."""
    out = []
    for j in range(cfg.grad_accum if accum is None else accum):
        start = (j * ctx.world_size + ctx.rank) * cfg.batch_size
        out.append(chunk[start:start + cfg.batch_size])
    return out


def run_coldstart(cfg: ColdstartConfig, *, resume: str | None = None, force: bool = False,
                  show_progress: bool = True) -> Path:
    """Train, checkpoint and return the final model directory (released layout); ``resume``/``force``
    follow the run-directory rule of ``run_dir.plan_run``."""
    ctx = init_distributed(cfg.model.device, cfg.dist.backend, need_group=cfg.dist.strategy == "fsdp2",
                           timeout_minutes=cfg.dist.timeout_minutes)
    run_dir = Path(cfg.output.run_dir)
    records, n_skipped_report = read_samples(read_coldstart_records, cfg.data, "records")
    # the global batch: batch_size samples x accum micro-batches x processes
    accum = grad_accum_steps(cfg, ctx.world_size)
    per_step = cfg.batch_size * accum * ctx.world_size
    total = R.total_steps(len(records), per_step, cfg.optim.epochs, cfg.optim.max_steps)
    plan = R.plan_run(run_dir, resume, cfg, total, force=force, announce=ctx.is_main)  # before any model loads
    if plan.complete:
        return run_dir / "final"

    R.seed_everything(cfg.seed)
    model = load_model(replace(cfg.model, device=str(ctx.device)))
    apply_job_tuning(model, cfg.tune, cfg.optim)
    par = Parallel(model, model, ctx, cfg.dist.strategy)
    train_model = par.module
    optimizer = build_optimizer(model, cfg.optim, cfg.tune)
    scheduler = build_scheduler(optimizer, cfg.optim, total)
    config_yaml = plan.config_yaml
    st, logger = R.start_run(plan, par, optimizer, scheduler, output=cfg.output)

    dataset = ColdstartDataset(records, model.tokenizer, model.config.vision_config.image_size,
                               model.config.num_queries, cfg)
    progress = JobProgress("cold start", total, enabled=show_progress and ctx.is_main, plain_every=cfg.output.log_every)
    stop = R.StopRequest(progress.note if ctx.is_main else lambda _: None)
    progress.start(st.step)
    skipped_total = int(st.extra.get("skipped", n_skipped_report))
    last_good = None
    try:
        while st.step < total:
            # plan the rest of this epoch from the data cursor: each step's global batch, then this rank's
            # micro-batches of it; one DataLoader decodes exactly those samples, in that order
            plan_steps, cursor, epoch = [], st.cursor, st.cursor.epoch
            while cursor.epoch == epoch and st.step + len(plan_steps) < total:
                chunk, cursor = cursor.take(len(records), per_step, cfg.seed)
                plan_steps.append((chunk, cursor))
            plan = [mb for chunk, _ in plan_steps for mb in micro_batches(chunk, cfg, ctx, accum)]
            loader = DataLoader(dataset, batch_sampler=plan, collate_fn=_collate, num_workers=cfg.data.num_workers,
                                persistent_workers=False,
                                multiprocessing_context="fork" if cfg.data.num_workers and os.name == "posix" else None)
            it = iter(loader)
            for _, after in plan_steps:
                t0 = time.perf_counter()
                loss_sum, tokens, skipped = 0.0, 0, 0
                train_model.train()
                for micro in range(accum):
                    batch = next(it)
                    good = [s for s in batch if not s.error]
                    for s in batch:
                        if s.error:
                            skipped += 1
                            progress.warn(f"skipped record {s.index}: {s.error}")
                        elif s.warning:
                            progress.warn(s.warning)
                    weight = 1.0
                    if not good:
                        if not ctx.enabled or last_good is None:
                            continue
                        good, weight = last_good, 0.0  # keep the ranks' collective calls in step
                    last_good = good
                    # gradients are reduced across processes only on the step's last micro-batch
                    with par.no_sync(micro < accum - 1):
                        pixels = [s.pixels.to(ctx.device) for s in good]  # frame counts may differ in fps mode
                        out = train_model(
                            input_ids=[s.input_ids for s in good],
                            labels=[s.labels for s in good],
                            videos=torch.stack(pixels) if len({p.shape for p in pixels}) == 1 else pixels,
                        )
                        (out.loss * weight / accum).backward()
                    loss_sum += weight * float(out.loss.detach()) / accum
                    tokens += int(weight) * sum(len(s.input_ids) for s in good)
                if ctx.enabled:
                    loss_sum = (float(ctx.all_reduce_sum(torch.tensor([loss_sum], device=ctx.device))[0])
                                / ctx.world_size)
                grad_norm = clip_gradients(model, cfg.optim.max_grad_norm)
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                st.step, st.cursor = st.step + 1, after
                skipped_total += skipped
                st.extra["skipped"] = skipped_total
                dt = time.perf_counter() - t0
                metrics = {"train/loss": loss_sum, "train/lr": lr, "train/grad_norm": grad_norm,
                           "train/tokens_per_s": tokens / dt if dt else 0.0, "train/skipped": skipped_total,
                           "time/step_s": dt}
                if st.step % cfg.output.log_every == 0 or st.step == total:
                    logger.log(st.step, metrics)
                progress.update(st.step, {"loss": loss_sum, "lr": lr, "gnorm": grad_norm})
                save_now = cfg.output.save_every and st.step % cfg.output.save_every == 0
                if save_now or stop.requested or st.step == total:
                    saved = R.save_checkpoint(run_dir, st, par, optimizer, scheduler, config_yaml, cfg.output.keep_last)
                if stop.requested:
                    raise R.interrupted(saved, st.step, total)
            del it, loader
        if ctx.is_main:  # the curves go to the trackers too, before they close
            logger.log_image(st.step, "curves", plot_run(run_dir, "loss.png", title="cold start"))
    finally:
        stop.close()
        progress.stop()
        logger.close()
    return R.save_final(run_dir, par)
