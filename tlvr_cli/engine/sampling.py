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


TIE_MARGIN = 16  # extra candidates taken by top-k so that logits tied with the k-th one survive, as in HF


def keyed_uniform(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One uniform in [0, 1) per row from a counter-based hash of (row seed, position): the same
    number on any device, for any batch composition, and computable inside a CUDA graph."""
    x = seeds * -7046029254386353131 + (positions + 1) * -4658895280553007687  # wraps modulo 2^64
    x = x ^ ((x >> 30) & 0x3FFFFFFFF)
    x = x * -4658895280553007687
    x = x ^ ((x >> 27) & 0x1FFFFFFFFF)
    x = x * -7723592293110705685
    x = x ^ ((x >> 31) & 0x1FFFFFFFF)
    return ((x >> 11) & ((1 << 53) - 1)).double() / float(1 << 53)


def sample_keyed(logits: torch.Tensor, params: SamplingParams, seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Draw one token per row of ``logits`` (B, V) from the temperature/top-k/top-p distribution,
    row ``i`` using the uniform ``keyed_uniform(seeds[i], positions[i])``; returns (B,) long.

    Works on the top-k candidates only (sorted), so a step costs one top-k over the vocabulary;
    everything is tensor maths with no host synchronisation."""
    if params.greedy:
        return logits.argmax(dim=-1)
    x = logits.float()
    if params.temperature != 1.0:
        x = x / params.temperature
    v = x.shape[-1]
    if 0 < params.top_k < v:
        vals, idx = torch.topk(x, min(v, params.top_k + TIE_MARGIN), dim=-1)
        vals = vals.masked_fill(vals < vals[:, params.top_k - 1:params.top_k], float("-inf"))
    else:
        vals, idx = torch.sort(x, dim=-1, descending=True)
    probs = vals.softmax(dim=-1)
    if params.top_p < 1.0:
        # HF removes the low tail whose cumulative mass (from the least likely up) is <= 1 - top_p
        tail = probs.flip(-1).cumsum(-1).flip(-1)
        remove = tail <= 1 - params.top_p
        remove[:, 0] = False
        probs = probs.masked_fill(remove, 0.0)
    cdf = probs.double().cumsum(dim=-1)
    u = keyed_uniform(seeds, positions).to(cdf.device)
    j = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)
    last = (probs > 0).long().cumsum(-1).argmax(-1, keepdim=True)  # the last candidate with mass
    return idx.gather(1, torch.minimum(j, last)).squeeze(1)
