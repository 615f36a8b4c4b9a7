"""One GRPO optimizer step (spec §5.2), as a public API: the training loop (``grpo.run_grpo``) and
the step benchmark (``benchmarks/bench_grpo_step.py``) both call it.

    step = GRPOStep(cfg, model, ref, par, optimizer, scheduler, engine)
    out = step(batch, step_index)          # one batch of prompts, every group trained on (the reference)
    out = step.run(draws.draw, step_index) # prompts drawn from the data cursor, as the run loop does

A step: tower features → G rollouts per prompt → rewards → (further draws: replacements for prompts
whose video failed and, with dynamic sampling, for groups without signal) → group advantages →
reference and old-policy log-probs → per mini-batch: policy log-probs, loss and backward per
micro-batch → clip → AdamW. Seeds come from ``(cfg.seed, step, draw)`` and the prompt's dataset
index, so a resumed run, or the same step split over any number of processes, draws the same samples.
With ``dist.rollout_parallel: tensor`` the processes of a group decode their prompts together, each
with a shard of the weights, and go on with their own rows (``rollout_parallel.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..data.reflection import completion_reflection, reflection_summary
from ..engine.generate import Engine, row_seed
from ..engine.sampling import SamplingParams
from ..errors import TlvrError
from ..jobs import GRPOConfig
from ..runtime import row_index
from .grpo_math import completion_mask, group_advantages, informative_groups, policy_loss
from .lora import reference_mode
from .optim import clip_gradients
from .parallel import Parallel
from .policy import connect_features, micro_batch_order, sequence_logprobs
from .rewards import overlong_penalty, score_completions
from .rollout import FeatureCache, PromptBatch, Rollouts, completions_tensor, concat_rollouts, tower_features
from .rollout_parallel import gather_prompts

SAMPLES_PER_STEP = 8  # completions kept for samples.jsonl: every other one of the first prompts' groups
ACCURACY_REWARD = "accuracy_reward"  # the reward whose values split the reflection metrics (spec §5.3's accuracy)
COUNTS = ("draws", "drawn", "extra", "broken", "decoded", "filtered", "groups")


def step_seed(seed: int, step: int, salt: int, draw: int = 0) -> int:
    """The seed of one random draw of a step (salt 1: rollouts, 2: advantage noise; a further prompt
    draw ``d`` of the step rolls out with its own seed): a resumed run draws what an uninterrupted one did."""
    return (seed * 1_000_003 + step * 7919 + salt + 2 * draw) % (2**63 - 1)


@dataclass
class StepOutput:
    """What a step reports: scalar metrics (namespaced keys), a few sample completions, the number of
    completion tokens generated, the prompt draws' counts over all processes (``COUNTS``), this rank's
    decoding errors and the dataset indices of the groups it trained on."""

    metrics: dict[str, float]
    samples: list[dict] = field(default_factory=list)
    tokens: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    groups: list[int] = field(default_factory=list)


class GRPOStep:
    """The GRPO update of ``par``'s model for one step's prompts.

    ``ref`` is the frozen reference model, or for LoRA the policy's base (``lora.BaseReference``; None
    when ``algo.beta == 0``: no KL, no reference forward); ``engine`` decodes the rollouts from the policy's
    current weights, tensor-parallel over ``tp_group`` when given (``rollout_parallel.rollout_engine``): the
    group's processes then decode each other's prompts too."""

    def __init__(self, cfg: GRPOConfig, model, ref, par: Parallel, optimizer, scheduler, engine: Engine,
                 cache: FeatureCache | None = None, tp_group: dist.ProcessGroup | None = None) -> None:
        self.cfg, self.model, self.ref, self.par = cfg, model, ref, par
        self.optimizer, self.scheduler, self.engine, self.cache = optimizer, scheduler, engine, cache
        self.tp_group = tp_group
        tok = model.tokenizer
        self.eos = tok.eos_token_id
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else self.eos
        r = cfg.rollout
        self.params = SamplingParams(temperature=r.temperature, top_k=r.top_k, top_p=r.top_p)
        self.timings: dict[str, float] = {}
        self.rollout_rows = 0  # completions this process's engine decoded in the step (tensor-parallel: its group's)
        # the flat log-prob layout calls the decoder layers' modules directly, which fsdp2's sharded layers refuse
        flat = not par.sharded
        self.layout = {"shared_prompt": cfg.perf.shared_prompt and flat, "packing": cfg.perf.packing and flat,
                       "varlen_attention": cfg.perf.varlen_attention, "compile_layers": cfg.perf.compile_layers}

    def __call__(self, batch: PromptBatch, step: int) -> StepOutput:
        """One step on ``batch`` as the reference takes it: one draw, every group trained on."""
        if not batch.rows:
            raise TlvrError(f"step {step + 1}: every video of this step's prompts failed to decode")
        return self.run(lambda size: batch, step, max_draws=1, filter_groups=False)

    def run(self, draw: Callable[[int], PromptBatch], step: int, *, max_draws: int | None = None,
            filter_groups: bool | None = None) -> StepOutput:
        """Draw prompts with ``draw(size)`` (this rank's share of the next ``size`` of the data order)
        until each rank has as many groups as its share of the first draw (replacing prompts whose video
        failed; with ``algo.dynamic_sampling``, keeping only groups whose metric varies) or
        ``max_draws`` (default ``data.max_draws``) is reached, then update on the groups kept."""
        cfg, ctx, G = self.cfg, self.par.ctx, self.cfg.algo.num_generations
        max_draws = cfg.data.max_draws if max_draws is None else max_draws
        dynamic = cfg.algo.dynamic_sampling if filter_groups is None else filter_groups
        self.timings, self.rollout_rows = {}, 0
        counts = dict.fromkeys(COUNTS, 0)
        kept: list[Rollouts] = []
        spare: Rollouts | None = None  # a decoded group for weight-0 passes when this rank keeps none
        errors: list[str] = []
        need = most = first = 0
        while True:
            # DAPO draws whole generation batches; replacements take just what the neediest rank lacks
            size = cfg.data.prompts_per_step if counts["draws"] == 0 or dynamic else ctx.world_size * most
            batch = draw(size)
            if counts["draws"] == 0:
                need = first = len(batch.rows) + len(batch.errors)  # this rank's share of the step
            counts["drawn"] += len(batch.rows) + len(batch.errors)
            counts["broken"] += len(batch.errors)
            errors += batch.errors
            ro = self.rollout(batch, step, counts["draws"])  # on every rank: fsdp2 gathers the weights collectively
            if ro is not None:
                ok = informative_groups(torch.tensor(self._filter_values(ro)), G) if dynamic else [True] * len(ro.rows)
                counts["decoded"] += len(ok)
                counts["filtered"] += ok.count(False)
                take = [g for g, good in enumerate(ok) if good][:need]
                if take:
                    kept.append(ro.select(take, G))
                    need -= len(take)
                spare = spare or ro.select([0], G)
            counts["draws"] += 1
            most = ctx.all_reduce_max(need)
            if most == 0 or counts["draws"] >= max_draws:
                break
        counts["groups"] = sum(len(r.rows) for r in kept)
        counts["extra"] = counts["drawn"] - first
        # totals over the processes; every rank made the same number of draws
        totals = ctx.all_reduce_sum(torch.tensor([float(counts[k]) for k in COUNTS[1:]], dtype=torch.float64,
                                                 device=ctx.device))
        counts.update({k: int(v) for k, v in zip(COUNTS[1:], totals.tolist())})
        out = self.update(concat_rollouts(kept, self.pad) if kept else None, spare, step)
        out.counts, out.errors = counts, errors
        out.metrics.update({"data/draws": counts["draws"], "data/prompts_drawn": counts["drawn"],
                            "data/groups": counts["groups"], "perf/rollout_rows": self.rollout_rows})
        if dynamic:
            out.metrics["dynamic/filtered_fraction"] = counts["filtered"] / max(1, counts["decoded"])
        return out

    # ------------------------------------------------------------------ rollouts

    def _sync(self) -> None:
        if self.par.ctx.device.type == "cuda":
            torch.cuda.synchronize(self.par.ctx.device)

    def _time(self, key: str, since: float) -> None:
        """Add the seconds since ``since`` to ``key``, once the GPU has finished the part's work: kernels
        queued in one part would otherwise be counted in the next (a handful of syncs per step)."""
        self._sync()
        self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - since

    def rollout(self, batch: PromptBatch, step: int, draw: int = 0) -> Rollouts | None:
        """G completions per prompt of ``batch`` (sharing the prompt's prefill), decoded and scored; None
        for a batch without a decoded prompt (called all the same: the weights are gathered collectively,
        and a tensor-parallel engine decodes the other processes' prompts with this one's shard)."""
        cfg, model, G, device = self.cfg, self.model, self.cfg.algo.num_generations, self.par.ctx.device
        t = time.perf_counter()
        # the frozen tower runs once per video; the connector runs inside the loss so it gets gradients
        feats = tower_features(model, batch, device, self.cache) if batch.rows else []
        self._time("time/vision_s", t)

        t = time.perf_counter()
        model.eval()  # no dropout and no gradient checkpointing while sampling (spec §7.6)
        with torch.no_grad(), self.par.full_params():  # fsdp2: the engine reads the gathered weights
            prompts, keys, start = [], [r.index for r in batch.rows], 0
            if batch.rows:
                visual = connect_features(model.connector, feats, list(range(len(feats))))
                prompts = model.prompt_embeddings(batch.input_ids, visual)
            if self.tp_group is not None:
                # every process of the group decodes the group's prompts, in one order, with its shard
                prompts, keys, start = gather_prompts(prompts, keys, self.tp_group,
                                                      model.language_model.get_input_embeddings().weight)
            # rows keyed by dataset index: the same samples however the step's prompts are split over ranks
            outs = self.engine.generate(prompts, self.params, cfg.rollout.max_new_tokens, self.eos, num_samples=G,
                                        seed=step_seed(cfg.seed, step, 1, draw),
                                        ignore_eos=cfg.perf.force_max_new_tokens,
                                        row_keys=[k * G + j for k in keys for j in range(G)])
        self.rollout_rows += len(outs)
        self._time("time/rollout_s", t)
        if not batch.rows:
            return None
        outs = outs[start * G:(start + len(batch.rows)) * G]  # this process's own rows
        completions, finished = completions_tensor(outs, self.eos, self.pad, device)

        t = time.perf_counter()
        texts = [s.strip() for s in model.tokenizer.batch_decode(completions.tolist(), skip_special_tokens=True)]
        columns = {"solution": [r.solution for r in batch.rows for _ in range(G)],
                   "problem": [r.problem for r in batch.rows for _ in range(G)]}
        rewards, components = score_completions(texts, columns, cfg.algo)
        if cfg.algo.overlong_buffer:  # DAPO's soft overlong punishment: an added term, logged on its own
            lengths = completion_mask(completions, self.eos).sum(1).tolist()
            penalty = overlong_penalty(lengths, cfg.rollout.max_new_tokens, cfg.algo.overlong_buffer,
                                       cfg.algo.overlong_penalty)
            rewards = [r + p for r, p in zip(rewards, penalty)]
            components["overlong_penalty"] = penalty
        self._time("time/score_s", t)
        return Rollouts(list(batch.rows), list(batch.input_ids), feats, completions, finished, texts, rewards,
                        components)

    def _filter_values(self, ro: Rollouts) -> list[float]:
        metric = self.cfg.algo.dynamic_sampling_metric
        if metric == "reward":
            return ro.rewards
        if metric not in ro.components:
            raise TlvrError(f"algo.dynamic_sampling_metric={metric!r}: no such reward (have: reward, "
                            f"{', '.join(ro.components)})")
        return ro.components[metric]

    # ------------------------------------------------------------------ the update

    def update(self, ro: Rollouts | None, spare: Rollouts | None, step: int) -> StepOutput:
        """Advantages, frozen log-probs, and the optimizer steps on ``ro`` (None: this rank trains on
        nothing and runs weight-0 passes on ``spare`` so the processes' collective calls line up)."""
        cfg, ctx, G = self.cfg, self.par.ctx, self.cfg.algo.num_generations
        # a step with no group anywhere, or a rank with nothing decoded to run its passes on, skips the update
        if ctx.all_reduce_max(int(ro is None and spare is None)) or not ctx.all_reduce_max(int(ro is not None)):
            return StepOutput({"reward": float("nan"), "completion_length": float("nan"), "kl": float("nan"),
                               "lr": self.optimizer.param_groups[0]["lr"], **self.timings})
        live = ro if ro is not None else spare
        assert live is not None
        B = len(live.rows)
        mask = completion_mask(live.completions, self.eos)
        # up to and including the first eos, as the reference counts; the log-prob passes read lengths and
        # completions from host copies, so no micro-batch waits for the GPU
        lengths = mask.sum(1).cpu()
        loss_mask = mask * live.finished[:, None] if cfg.algo.mask_truncated else mask  # DAPO overlong filtering
        rewards_t = torch.tensor(live.rewards, dtype=torch.float32, device=ctx.device)
        # advantage noise keyed by the prompt's dataset index, like the rollouts
        seeds = [row_seed(step_seed(cfg.seed, step, 2), r.index) for r in live.rows]
        adv = group_advantages(rewards_t.cpu(), G, scale=cfg.algo.scale_rewards, eps=cfg.algo.std_eps,
                               noise_std=cfg.algo.advantage_noise_std, noise_seeds=seeds).to(ctx.device)
        group_std = rewards_t.view(B, G).std(dim=1)
        inputs = (live.feats, live.input_ids, [i // G for i in range(B * G)], live.completions.cpu(), lengths)

        t = time.perf_counter()
        # micro-batches of similar length (padding inside one costs little), whole groups together when
        # their prompt is computed once
        share = G if self.layout["shared_prompt"] else 1
        trained = micro_batch_order(lengths.tolist(), cfg.perf.micro_batch_size, group_size=share)
        # the passes without gradients keep no activations: micro-batches of their own size, where it differs
        frozen_size = cfg.perf.frozen_micro_batch_size or cfg.perf.micro_batch_size
        frozen = (trained if frozen_size == cfg.perf.micro_batch_size
                  else micro_batch_order(lengths.tolist(), frozen_size, group_size=share))
        off_policy = cfg.algo.num_iterations > 1 or cfg.algo.mini_batches > 1
        ref_logp, old_logp = self._frozen_logprobs(inputs, frozen, mask.shape, off_policy, real=ro is not None)
        self._time("time/ref_logprob_s", t)

        t = time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"]
        parts = self._mini_batches(B) if ro is not None else [[] for _ in range(cfg.algo.mini_batches)]
        stats, grad_norm = self._update(inputs, parts, lengths, loss_mask.float(), adv, ref_logp, old_logp,
                                        trained[0])
        self._time("time/backward_s", t)
        if ro is None:
            return StepOutput({"reward": float("nan"), "completion_length": float("nan"), "kl": float("nan"),
                               "lr": lr, "grad_norm": grad_norm, **self.timings})

        n_upd = cfg.algo.num_iterations * B * G
        metrics = {
            "completion_length": float(lengths.float().mean()),
            "reward": float(rewards_t.mean()),
            "reward_std": float(group_std.mean()),
            "kl": stats.get("kl", 0.0) / n_upd,
            "clip_fraction": stats.get("clip_fraction", 0.0) / n_upd,
            "frac_zero_std": float((group_std == 0).float().mean()),
            "lr": lr,
            "grad_norm": grad_norm,
            **{f"rewards/{k}": sum(v) / len(v) for k, v in ro.components.items()},
            **self._reflection(ro),
            **self.timings,
        }
        return StepOutput(metrics, self._samples(ro), int(lengths.sum()), groups=[r.index for r in ro.rows])

    def _mini_batches(self, n_groups: int) -> list[list[int]]:
        """The sequences of each mini-batch: consecutive groups, ``algo.mini_batches`` parts."""
        k, G = self.cfg.algo.mini_batches, self.cfg.algo.num_generations
        bounds = [round(i * n_groups / k) for i in range(k + 1)]
        return [[s for g in range(bounds[i], bounds[i + 1]) for s in range(g * G, g * G + G)] for i in range(k)]

    def _frozen_logprobs(self, inputs: tuple, groups: list[list[int]], shape: torch.Size, need_old: bool, *,
                         real: bool = True):
        """Reference log-probs (for the KL) and, for off-policy updates (several per rollout batch), the
        rollout policy's (for the ratio); neither needs gradients. Without ``real`` groups (a rank that
        trains on nothing) only the policy's forward passes run, so the processes' calls line up."""
        cfg, ctx, device = self.cfg, self.par.ctx, self.par.ctx.device
        ref_logp = old_logp = None
        with torch.no_grad():
            if self.ref is not None and real:
                feats, *rest = inputs
                dtype = next(self.ref.connector.parameters()).dtype
                ref_feats = [f.to(dtype) for f in feats]
                ref_logp = torch.zeros(shape, device=device)
                with reference_mode(self.ref):  # a LoRA policy's base: its adapters off
                    for rows in groups:
                        ref_logp.index_copy_(0, row_index(rows, device), sequence_logprobs(
                            self.ref, ref_feats, *rest, rows, chunk_size=cfg.perf.logprob_chunk_size,
                            **self.layout).float())
            if need_old:
                old_logp = torch.zeros(shape, device=device)
                # as many forwards on every rank (a wrapped forward may gather weights or broadcast buffers)
                for i in range(ctx.all_reduce_max(len(groups) if real else 0)):
                    rows = groups[i] if real and i < len(groups) else groups[0]
                    out = self.par.module(*inputs, rows, chunk_size=cfg.perf.logprob_chunk_size, **self.layout).float()
                    if real and i < len(groups):
                        old_logp.index_copy_(0, row_index(rows, device), out)
        return ref_logp, (old_logp if real else None)

    def _update(self, inputs: tuple, parts: list[list[int]], lengths: torch.Tensor, mask: torch.Tensor,
                adv: torch.Tensor, ref_logp, old_logp, dummy: list[int]) -> tuple[dict[str, float], float]:
        """Loss and backward per micro-batch, then clip and step, for each mini-batch ``parts[k]``,
        ``num_iterations`` times; returns the summed per-sequence statistics and the last gradient norm."""
        cfg, model, ctx = self.cfg, self.model, self.par.ctx
        model.train()
        model.vision_tower.eval()
        # each mini-batch's sequences and loss tokens over all processes, per process: normalising by them
        # makes DDP's gradient average the mean over every process's sequences, however unevenly they fall
        counts = torch.tensor([[len(p), float(mask[p].sum()) if p else 0.0] for p in parts], dtype=torch.float64,
                              device=ctx.device)
        counts = (ctx.all_reduce_sum(counts) / ctx.world_size).tolist()
        size = cfg.perf.micro_batch_size
        share = cfg.algo.num_generations if self.layout["shared_prompt"] else 1  # a part holds whole groups
        n = lengths.tolist()
        micro = [[[p[i] for i in mb] for mb in micro_batch_order([n[s] for s in p], size, group_size=share)]
                 for p in parts]
        # every rank runs the same number of micro-batches (one short of groups repeats a sequence with
        # weight 0), so DistributedDataParallel's collective calls line up
        n_micro = [ctx.all_reduce_max(len(m)) for m in micro]
        stats: dict[str, torch.Tensor] = {}  # read once, at the end: no micro-batch waits for the GPU
        grad_norm = 0.0
        for _ in range(cfg.algo.num_iterations):
            for k, batches in enumerate(micro):
                plan = [(rows, 1.0) for rows in batches] + [(dummy, 0.0)] * (n_micro[k] - len(batches))
                n_seq, n_tok = counts[k]
                for j, (rows, weight) in enumerate(plan):
                    # gradients are reduced across processes only on the last micro-batch of a mini-batch
                    with self.par.no_sync(j < len(plan) - 1):
                        logp = self.par.module(*inputs, rows, chunk_size=cfg.perf.logprob_chunk_size,
                                               **self.layout).float()
                        if weight == 0.0:
                            (logp.sum() * 0.0).backward()
                            continue
                        # each micro-batch's loss is normalised by its mini-batch, so their sum is the mini-batch loss
                        idx = row_index(rows, ctx.device)
                        loss, part = policy_loss(
                            logp, None if ref_logp is None else ref_logp[idx], adv[idx], mask[idx],
                            beta=cfg.algo.beta, aggregation=cfg.algo.loss_aggregation,
                            old_logp=None if old_logp is None else old_logp[idx],
                            clip_eps_low=cfg.algo.clip_eps_low, clip_eps_high=cfg.algo.clip_eps_high,
                            importance_level=cfg.algo.importance_level, kl_estimator=cfg.algo.kl_estimator,
                            kl_clamp=cfg.algo.kl_clamp, max_tokens=cfg.rollout.max_new_tokens,
                            num_sequences=n_seq, num_tokens=n_tok,
                        )
                        loss.backward()
                    for key, v in part.items():
                        stats[key] = stats.get(key, 0.0) + v * len(rows)
                self._sync()
                t = time.perf_counter()
                grad_norm = clip_gradients(model, cfg.optim.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self._time("time/optimizer_s", t)  # also inside time/backward_s
        return {k: float(v) for k, v in stats.items()}, grad_norm

    # ------------------------------------------------------------------ what a step reports

    def _reflection(self, ro: Rollouts) -> dict[str, float]:
        """reflection/*: markers in the <think> text, think and answer lengths in tokens, and the
        accuracy reward of the completions with and without a marker (NaN when a side is empty)."""
        stats = [completion_reflection(t, self.cfg.reflection.phrases, self.model.tokenizer) for t in ro.texts]
        s = reflection_summary(stats, ro.components.get(ACCURACY_REWARD))
        out = {"reflection/rate": s["rate"], "reflection/markers": s["markers"],
               "reflection/think_tokens": s["think_length"], "reflection/answer_tokens": s["answer_length"]}
        if "acc_with" in s:
            nan = float("nan")
            out["reflection/accuracy_with"] = nan if s["acc_with"] is None else s["acc_with"]
            out["reflection/accuracy_without"] = nan if s["acc_without"] is None else s["acc_without"]
        return out

    def _samples(self, ro: Rollouts) -> list[dict]:
        G = self.cfg.algo.num_generations
        out = []
        for i in range(0, len(ro.texts), max(1, G // 2)):
            r = completion_reflection(ro.texts[i], self.cfg.reflection.phrases, self.model.tokenizer)
            out.append({"problem": ro.rows[i // G].problem, "solution": ro.rows[i // G].solution,
                        "completion": ro.texts[i], "reward": ro.rewards[i], "think_tokens": r.think_length,
                        "answer_tokens": r.answer_length, "reflection": r.markers})
            if len(out) == SAMPLES_PER_STEP:
                break
        return out
