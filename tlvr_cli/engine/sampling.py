"""Next-token sampling with HF ``generate`` semantics: temperature, then top-k, then top-p, then a draw.

The filters are batched; the draw can use one generator for the whole batch (``sample``) or one
generator per row (``sample_rows``), so that a sequence's draws do not depend on which other
sequences happen to share its decode step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    """How the next token is chosen; temperature 0 means greedy (argmax)."""

    temperature: float = 1.0  # logits are divided by this; 0 selects greedy decoding
    top_k: int = 50  # keep the k most likely tokens; 0 disables (HF default 50)
    top_p: float = 1.0  # keep the smallest set whose probability reaches top_p; 1.0 disables

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """HF ``TopKLogitsWarper``: every logit below the k-th largest becomes -inf (ties survive)."""
    if top_k <= 0:
        return logits
    k = min(top_k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1, None]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """HF ``TopPLogitsWarper`` (min_tokens_to_keep=1): drop the low tail whose mass is at most 1 - top_p."""
    if top_p >= 1.0:
        return logits
    sorted_logits, sorted_idx = torch.sort(logits, descending=False, dim=-1)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cum <= (1 - top_p)
    remove_sorted[..., -1:] = False  # the most likely token always stays
    remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Apply temperature, top-k and top-p in HF's order to float32 logits (B, V)."""
    logits = logits.float()
    if params.temperature != 1.0:
        logits = logits / params.temperature
    logits = top_k_filter(logits, params.top_k)
    return top_p_filter(logits, params.top_p)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row of ``logits`` (B, V) with a single generator; returns (B,) long."""
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, params).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sample_rows(logits: torch.Tensor, params: SamplingParams, generators: list[torch.Generator]) -> torch.Tensor:
    """Pick one token per row, row i drawing from ``generators[i]`` only; returns (B,) long.

    Each row takes one uniform number from its own generator (CPU ones are cheapest) and inverts
    its filtered CDF, so the whole batch is sampled in a few kernels rather than one per row.
    """
    if params.greedy:
        return logits.argmax(dim=-1)
    if len(generators) != logits.shape[0]:
        raise ValueError(f"sample_rows: {logits.shape[0]} rows of logits but {len(generators)} generators")
    probs = filter_logits(logits, params).softmax(dim=-1)
    u = torch.cat([torch.rand(1, generator=g, device=g.device, dtype=torch.float64).cpu() for g in generators])
    cdf = probs.double().cumsum(dim=-1)
    # right=True: a draw of exactly 0 cannot land on a leading zero-probability token
    idx = torch.searchsorted(cdf, (u.to(cdf.device) * cdf[:, -1])[:, None], right=True).squeeze(-1)
    # rounding can push the target onto the flat top of the CDF: fall back to the last allowed token
    vocab = torch.arange(probs.shape[-1], device=probs.device)
    last_allowed = torch.where(probs > 0, vocab, 0).amax(dim=-1)
    return torch.minimum(idx, last_allowed)
