"""One GRPO optimizer step (spec §5.2), as a public API: the training loop (``grpo.run_grpo``) and
the step benchmark (``benchmarks/bench_grpo_step.py``) both call it.

    step = GRPOStep(cfg, model, ref, par, optimizer, scheduler, engine)
    out = step(batch, step_index)        # out.metrics, out.samples, out.tokens

A step: tower features → G rollouts per prompt → rewards → group advantages → reference (and, with
``num_iterations > 1``, old-policy) log-probs → policy log-probs, loss and backward per micro-batch
→ clip → AdamW. Seeds come from ``(cfg.seed, step)`` and the prompt's dataset index, so a resumed
run, or the same step split over any number of processes, draws exactly the same samples.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..engine.generate import Engine, row_seed
from ..engine.sampling import SamplingParams
from ..errors import TlvrError
from ..jobs import GRPOConfig
from .grpo_math import completion_mask, group_advantages, policy_loss
from .optim import clip_gradients
from .parallel import Parallel
from .policy import micro_batch_order, sequence_logprobs
from .rewards import score_completions
from .rollout import FeatureCache, PromptBatch, pad_completions, tower_features

SAMPLES_PER_STEP = 8  # completions kept for samples.jsonl: every other one of the first prompts' groups


def step_seed(seed: int, step: int, salt: int) -> int:
    """The seed of one random draw of a step (salt 1: rollouts, 2: advantage noise): a resumed run draws
    exactly what an uninterrupted one did."""
    return (seed * 1_000_003 + step * 7919 + salt) % (2**63 - 1)


@dataclass
class StepOutput:
    """What a step reports: scalar metrics (namespaced keys), a few sample completions, and the
    number of completion tokens generated."""

    metrics: dict[str, float]
    samples: list[dict] = field(default_factory=list)
    tokens: int = 0


class GRPOStep:
    """The GRPO update of ``par``'s model for one batch of prompts.

    ``ref`` is the frozen reference model (None when ``algo.beta == 0``: no KL, no reference
    forward); ``engine`` decodes the rollouts from the policy's current weights."""

    def __init__(self, cfg: GRPOConfig, model, ref, par: Parallel, optimizer, scheduler, engine: Engine,
                 cache: FeatureCache | None = None) -> None:
        self.cfg, self.model, self.ref, self.par = cfg, model, ref, par
        self.optimizer, self.scheduler, self.engine, self.cache = optimizer, scheduler, engine, cache
        tok = model.tokenizer
        self.eos = tok.eos_token_id
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else self.eos
        self.params = SamplingParams(temperature=cfg.rollout.temperature, top_k=cfg.rollout.top_k, top_p=cfg.rollout.top_p)
        # the flat log-prob layout calls the decoder layers' modules directly, which fsdp2's sharded layers refuse
        flat = not par.sharded
        self.layout = {"shared_prompt": cfg.perf.shared_prompt and flat, "packing": cfg.perf.packing and flat}

    def __call__(self, batch: PromptBatch, step: int) -> StepOutput:
        cfg, model, ctx = self.cfg, self.model, self.par.ctx
        G = cfg.algo.num_generations
        B = len(batch.rows)
        if B == 0:
            raise TlvrError(f"step {step + 1}: every video of this step's prompts failed to decode")
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        # the frozen tower runs once per video; the connector runs inside the loss so it gets gradients
        feats = tower_features(model, batch, ctx.device, self.cache)
        timings["time/vision_s"] = time.perf_counter() - t0

        t = time.perf_counter()
        completions = self._rollout(batch, feats, step)
        mask = completion_mask(completions, self.eos)
        lengths = mask.sum(1)  # up to and including the first eos, as the reference counts
        seq_prompt = [i // G for i in range(B * G)]  # sequence → its prompt within the batch
        timings["time/rollout_s"] = time.perf_counter() - t

        t = time.perf_counter()
        texts = [s.strip() for s in model.tokenizer.batch_decode(completions.tolist(), skip_special_tokens=True)]
        columns = {"solution": [r.solution for r in batch.rows for _ in range(G)],
                   "problem": [r.problem for r in batch.rows for _ in range(G)]}
        rewards, components = score_completions(texts, columns, cfg.algo)
        rewards_t = torch.tensor(rewards, dtype=torch.float32, device=ctx.device)
        # advantage noise keyed by the prompt's dataset index, like the rollouts
        adv = group_advantages(rewards_t.cpu(), G, scale=cfg.algo.scale_rewards, eps=cfg.algo.std_eps,
                               noise_std=cfg.algo.advantage_noise_std,
                               noise_seeds=[row_seed(step_seed(cfg.seed, step, 2), r.index) for r in batch.rows]).to(ctx.device)
        group_std = rewards_t.view(B, G).std(dim=1)
        timings["time/score_s"] = time.perf_counter() - t

        # micro-batches of similar length, so padding inside a micro-batch costs little; whole groups
        # together when their prompt is computed once
        groups = micro_batch_order(lengths.tolist(), cfg.perf.micro_batch_size,
                                   group_size=G if self.layout["shared_prompt"] else 1)
        inputs = (feats, batch.input_ids, seq_prompt, completions, lengths)
        t = time.perf_counter()
        ref_logp, old_logp = self._frozen_logprobs(inputs, groups, mask.shape)
        timings["time/ref_logprob_s"] = time.perf_counter() - t

        t = time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"]
        stats, grad_norm = self._update(inputs, groups, mask, adv, ref_logp, old_logp, B * G)
        timings["time/backward_s"] = time.perf_counter() - t

        n_it = cfg.algo.num_iterations * B * G
        metrics = {
            "completion_length": float(lengths.float().mean()),
            "reward": float(rewards_t.mean()),
            "reward_std": float(group_std.mean()),
            "kl": stats.get("kl", 0.0) / n_it,
            "clip_fraction": stats.get("clip_fraction", 0.0) / n_it,
            "frac_zero_std": float((group_std == 0).float().mean()),
            "lr": lr,
            "grad_norm": grad_norm,
            **{f"rewards/{k}": sum(v) / len(v) for k, v in components.items()},
            **timings,
        }
        samples = [{"problem": batch.rows[i // G].problem, "solution": batch.rows[i // G].solution,
                    "completion": texts[i], "reward": rewards[i]} for i in range(0, B * G, max(1, G // 2))]
        return StepOutput(metrics, samples[:SAMPLES_PER_STEP], int(lengths.sum()))

    # ------------------------------------------------------------------ parts of a step

    def _rollout(self, batch: PromptBatch, feats: torch.Tensor, step: int) -> torch.Tensor:
        """G completions per prompt, sharing the prompt's prefill, right-padded into (B·G, Lc)."""
        cfg, model, G = self.cfg, self.model, self.cfg.algo.num_generations
        model.eval()  # no dropout and no gradient checkpointing while sampling (spec §7.6)
        with torch.no_grad(), self.par.full_params():  # fsdp2: the engine reads the gathered weights
            prompts = model.prompt_embeddings(batch.input_ids, model.connector(feats))
            # rows keyed by dataset index: the same samples however the step's prompts are split over ranks
            outs = self.engine.generate(prompts, self.params, cfg.rollout.max_new_tokens, self.eos, num_samples=G,
                                        seed=step_seed(cfg.seed, step, 1), ignore_eos=cfg.perf.force_max_new_tokens,
                                        row_keys=[r.index * G + j for r in batch.rows for j in range(G)])
        return pad_completions([o.tokens for o in outs], self.pad, self.par.ctx.device)

    def _frozen_logprobs(self, inputs: tuple, groups: list[list[int]], shape: torch.Size):
        """Reference log-probs (for the KL) and, with several optimizer passes per rollout batch, the
        old policy's (for the PPO ratio); neither needs gradients."""
        cfg, device = self.cfg, self.par.ctx.device
        ref_logp = old_logp = None
        with torch.no_grad():
            if self.ref is not None:
                feats, *rest = inputs
                ref_feats = feats.to(next(self.ref.connector.parameters()).dtype)
                ref_logp = torch.zeros(shape, device=device)
                for rows in groups:
                    ref_logp[rows] = sequence_logprobs(self.ref, ref_feats, *rest, rows,
                                                       chunk_size=cfg.perf.logprob_chunk_size, **self.layout).float()
            if cfg.algo.num_iterations > 1:
                old_logp = torch.zeros(shape, device=device)
                for rows in groups:
                    old_logp[rows] = self.par.module(*inputs, rows, chunk_size=cfg.perf.logprob_chunk_size,
                                                     **self.layout).float()
        return ref_logp, old_logp

    def _update(self, inputs: tuple, groups: list[list[int]], mask: torch.Tensor, adv: torch.Tensor, ref_logp, old_logp,
                n_seq: int) -> tuple[dict[str, float], float]:
        """Loss and backward per micro-batch, then clip and step, ``num_iterations`` times; returns the
        summed per-sequence statistics and the last gradient norm."""
        cfg, model, ctx = self.cfg, self.model, self.par.ctx
        model.train()
        model.vision_tower.eval()
        # every rank runs the same number of micro-batches (a rank that lost rows to broken videos repeats
        # its first one with weight 0), so DistributedDataParallel's collective calls line up
        n_micro = ctx.all_reduce_max(len(groups))
        plan = [(rows, 1.0) for rows in groups] + [(groups[0], 0.0)] * (n_micro - len(groups))
        n_tokens = int(mask.sum())
        stats: dict[str, float] = {}
        grad_norm = 0.0
        for _ in range(cfg.algo.num_iterations):
            for j, (rows, weight) in enumerate(plan):
                # gradients are reduced across processes only on the last micro-batch of a pass
                with self.par.no_sync(j < len(plan) - 1):
                    logp = self.par.module(*inputs, rows, chunk_size=cfg.perf.logprob_chunk_size, **self.layout).float()
                    # each micro-batch's loss is normalised by the whole batch, so their sum is the batch loss
                    loss, part = policy_loss(
                        logp, None if ref_logp is None else ref_logp[rows], adv[rows], mask[rows].float(),
                        beta=cfg.algo.beta, aggregation=cfg.algo.loss_aggregation,
                        old_logp=None if old_logp is None else old_logp[rows], clip_eps=cfg.algo.clip_eps,
                        kl_estimator=cfg.algo.kl_estimator, kl_clamp=cfg.algo.kl_clamp,
                        max_tokens=cfg.rollout.max_new_tokens, num_sequences=n_seq, num_tokens=n_tokens,
                    )
                    (loss * weight).backward()
                for k, v in part.items():
                    stats[k] = stats.get(k, 0.0) + weight * float(v) * len(rows)
            grad_norm = clip_gradients(model, cfg.optim.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return stats, grad_norm
