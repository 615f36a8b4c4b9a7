"""GRPO tensor math (spec §5.2 steps 4, 6, 8, 9): completion mask, group advantages, KL, loss."""

from __future__ import annotations

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


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3", clamp: float = 100.0) -> torch.Tensor:
    """Per-token KL(π‖π_ref) estimate; k3 = exp(δ) − δ − 1 with δ = ref − logp (TRL 0.14), clamped."""
    delta = ref_logp - logp
    if estimator == "k3":
        kl = torch.exp(delta) - delta - 1
    elif estimator == "k1":
        kl = -delta
    elif estimator == "k2":
        kl = 0.5 * delta**2
    else:
        raise ValueError(f"unknown KL estimator {estimator!r}")
    return kl.clamp(-clamp, clamp) if clamp else kl


def policy_loss(logp: torch.Tensor, ref_logp: torch.Tensor | None, advantages: torch.Tensor, mask: torch.Tensor, *,
                beta: float, aggregation: str = "sequence_mean", old_logp: torch.Tensor | None = None,
                clip_eps: float = 0.2, kl_estimator: str = "k3", kl_clamp: float = 100.0, max_tokens: int = 512,
                num_sequences: int | None = None, num_tokens: int | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of a micro-batch of sequences, normalised so that micro-batch losses SUM to the
    loss of the whole batch (``num_sequences`` / ``num_tokens`` describe that whole batch).

    Without ``old_logp`` the ratio is ``exp(logp − logp.detach())`` (value 1, gradient ∇logp·A), as
    the reference's single update per rollout; with it, the PPO clipped ratio."""
    adv = advantages[:, None]
    if old_logp is None:
        ratio = torch.exp(logp - logp.detach())
        objective = ratio * adv
        clipped = torch.zeros_like(logp)
    else:
        ratio = torch.exp(logp - old_logp)
        objective = torch.min(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
        clipped = ((ratio * adv) > objective).float()
    per_tok = -objective
    kl = None
    if ref_logp is not None and beta:
        kl = kl_penalty(logp, ref_logp, kl_estimator, kl_clamp)
        per_tok = per_tok + beta * kl
    n_seq = num_sequences or logp.shape[0]
    tok_per_seq = mask.sum(1).clamp(min=1)
    if aggregation == "sequence_mean":
        loss = ((per_tok * mask).sum(1) / tok_per_seq).sum() / n_seq
    elif aggregation == "token_mean":
        loss = (per_tok * mask).sum() / (num_tokens or mask.sum().clamp(min=1))
    elif aggregation == "dr_grpo":
        loss = (per_tok * mask).sum() / (n_seq * max_tokens)
    else:
        raise ValueError(f"unknown loss aggregation {aggregation!r}")
    with torch.no_grad():
        stats = {"clip_fraction": float(((clipped * mask).sum(1) / tok_per_seq).mean())}
        if kl is not None:
            stats["kl"] = float(((kl * mask).sum(1) / tok_per_seq).mean())
    return loss, stats
