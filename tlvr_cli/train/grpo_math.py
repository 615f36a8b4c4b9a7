"""GRPO tensor maths (spec §5.2 steps 4, 6, 8, 9) as small pure functions; every variant is picked
from a dict by its config string (``KL_ESTIMATORS``, ``LOG_RATIOS``, ``LOSS_AGGREGATIONS``).

With the defaults they compute the reference's loss: one update per rollout batch, so the ratio is
identically 1 and no clip ever binds. What the reference leaves out and the keys add:
* PPO clipping for off-policy updates (``num_iterations`` / ``mini_batches`` > 1), with DAPO's
  asymmetric range ``[1 − clip_eps_low, 1 + clip_eps_high]`` (arXiv 2503.14476, "clip-higher");
* GSPO's sequence-level ratio (arXiv 2507.18071): the length-normalised log-ratio of a sequence,
  clipped per sequence;
* token-mean (DAPO) and constant (Dr.GRPO, arXiv 2503.20783) normalisers besides the per-sequence mean;
* group filtering for DAPO's dynamic sampling (``informative_groups``).
Left out: value models, GAE and dual clipping, which none of these GRPO variants uses.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def completion_mask(completions: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 up to and including the first eos (padding is eos too), 0 after; all ones without an eos."""
    is_eos = completions == eos_id
    n = completions.shape[1]
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full_like(is_eos[:, 0], n, dtype=torch.long))
    return (torch.arange(n, device=completions.device)[None, :] <= first[:, None]).long()


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: bool = True, eps: float = 1e-4,
                     noise_std: float = 0.0, noise_seeds: list[int] | None = None) -> torch.Tensor:
    """``(r − μ_group) / (σ_group + eps)`` with the unbiased std, plus N(0, noise_std²) per sample,
    group ``g``'s noise drawn from a generator seeded ``noise_seeds[g]`` (key it by the prompt, and
    a group gets the same noise whichever process or batch it lands in)."""
    r = rewards.float().view(-1, group_size)
    adv = r - r.mean(1, keepdim=True)
    if scale:
        adv = adv / (r.std(1, keepdim=True) + eps)
    if noise_std:
        if noise_seeds is None or len(noise_seeds) != r.shape[0]:
            raise ValueError(f"advantage noise needs one seed per group ({r.shape[0]}), got {noise_seeds!r}")
        noise = torch.stack([torch.randn(group_size, generator=torch.Generator().manual_seed(s)) for s in noise_seeds])
        adv = adv + noise_std * noise.to(adv.device)
    return adv.flatten()


def informative_groups(values: torch.Tensor, group_size: int) -> list[bool]:
    """Per group, whether its values differ (DAPO dynamic sampling): a group whose completions all
    score the same has zero advantage before the noise, so no learning signal."""
    v = values.float().view(-1, group_size)
    return (v.amax(1) != v.amin(1)).tolist()


# ----------------------------------------------------------------------------- KL estimators

# each maps δ = ref_logp − logp (per token) to its KL(π‖π_ref) estimate
KL_ESTIMATORS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "k3": lambda d: torch.exp(d) - d - 1,  # TRL 0.14, the reference (spec §5.2 step 6)
    "k1": lambda d: -d,
    "k2": lambda d: 0.5 * d**2,
}


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3", clamp: float = 100.0) -> torch.Tensor:
    """Per-token KL(π‖π_ref) estimate with δ = ref − logp, clamped to [−clamp, clamp] (0: no clamp)."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}")
    kl = KL_ESTIMATORS[estimator](ref_logp - logp)
    return kl.clamp(-clamp, clamp) if clamp else kl


# ----------------------------------------------------------------------------- importance ratios


def token_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """PPO/GRPO: each token's own ``log π/π_old``."""
    return logp - old_logp


def sequence_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO: every token of a sequence carries the sequence's mean log-ratio ``(1/|y|) Σ_t log π/π_old``
    as its value, with the gradient of its own ``log π`` (GSPO-token form), so a sequence-mean loss
    has exactly the gradient of ``s_i · A_i`` with ``s_i = exp(mean log-ratio)``."""
    seq = ((logp - old_logp) * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)
    return logp - logp.detach() + seq.detach()


LOG_RATIOS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "token": token_log_ratio,
    "sequence": sequence_log_ratio,
}


def clipped_objective(ratio: torch.Tensor, adv: torch.Tensor, eps_low: float,
                      eps_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``min(ratio·A, clip(ratio, 1 − eps_low, 1 + eps_high)·A)`` and where the clip binds (1/0)."""
    unclipped = ratio * adv
    objective = torch.min(unclipped, ratio.clamp(1 - eps_low, 1 + eps_high) * adv)
    return objective, (unclipped > objective).float()


# ----------------------------------------------------------------------------- loss aggregations

# each maps (per-token loss, mask, sequences, tokens, max_new_tokens) of the whole batch to a scalar;
# micro-batches pass the whole batch's counts, so their losses add up to the batch's loss


def _sequence_mean(per_tok, mask, n_seq: float, n_tok: float, max_tokens: int) -> torch.Tensor:
    """Token mean per sequence, then mean over sequences (the reference, spec §5.2 step 9)."""
    return ((per_tok * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / n_seq


def _token_mean(per_tok, mask, n_seq: float, n_tok: float, max_tokens: int) -> torch.Tensor:
    """Mean over every token of the batch (DAPO)."""
    return (per_tok * mask).sum() / max(n_tok, 1)


def _dr_grpo(per_tok, mask, n_seq: float, n_tok: float, max_tokens: int) -> torch.Tensor:
    """Sum over tokens divided by the constant sequences × max_new_tokens (Dr.GRPO)."""
    return (per_tok * mask).sum() / (n_seq * max_tokens)


LOSS_AGGREGATIONS = {"sequence_mean": _sequence_mean, "token_mean": _token_mean, "dr_grpo": _dr_grpo}


def policy_loss(logp: torch.Tensor, ref_logp: torch.Tensor | None, advantages: torch.Tensor, mask: torch.Tensor, *,
                beta: float, aggregation: str = "sequence_mean", old_logp: torch.Tensor | None = None,
                clip_eps_low: float = 0.2, clip_eps_high: float = 0.2, importance_level: str = "token",
                kl_estimator: str = "k3", kl_clamp: float = 100.0, max_tokens: int = 512,
                num_sequences: float | None = None,
                num_tokens: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of a micro-batch of sequences, normalised so that micro-batch losses SUM to the
    loss of the whole batch (``num_sequences`` / ``num_tokens`` describe that whole batch).

    Without ``old_logp`` the ratio is ``exp(logp − logp.detach())`` (value 1, gradient ∇logp·A), as
    the reference's single update per rollout; with it, the clipped ratio at ``importance_level``.
    The statistics (mean clip fraction and KL per sequence) are 0-d tensors, so reading them can wait."""
    if aggregation not in LOSS_AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {aggregation!r}")
    if importance_level not in LOG_RATIOS:
        raise ValueError(f"unknown importance level {importance_level!r}")
    adv = advantages[:, None]
    if old_logp is None:
        objective = torch.exp(logp - logp.detach()) * adv
        clipped = torch.zeros_like(logp)
    else:
        ratio = torch.exp(LOG_RATIOS[importance_level](logp, old_logp, mask))
        objective, clipped = clipped_objective(ratio, adv, clip_eps_low, clip_eps_high)
    per_tok = -objective
    kl = None
    if ref_logp is not None and beta:
        kl = kl_penalty(logp, ref_logp, kl_estimator, kl_clamp)
        per_tok = per_tok + beta * kl
    n_seq = num_sequences or logp.shape[0]
    n_tok = num_tokens or float(mask.sum())
    loss = LOSS_AGGREGATIONS[aggregation](per_tok, mask, n_seq, n_tok, max_tokens)
    with torch.no_grad():
        tok_per_seq = mask.sum(1).clamp(min=1)
        stats = {"clip_fraction": ((clipped * mask).sum(1) / tok_per_seq).mean()}
        if kl is not None:
            stats["kl"] = ((kl * mask).sum(1) / tok_per_seq).mean()
    return loss, stats
