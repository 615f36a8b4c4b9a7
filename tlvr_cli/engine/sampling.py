"""Next-token sampling with HF ``generate`` semantics: temperature, then top-k, then top-p, then a draw.

Each row draws with its own counter-based uniform (``keyed_uniform(seed, position)``), so a
sequence's draws do not depend on which other sequences share its decode step, on the device, or
on how a batch is split across processes; everything runs inside a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .top_k import top_k, top_k_available


@dataclass
class SamplingParams:
    """How the next token is chosen; temperature 0 means greedy (argmax)."""

    temperature: float = 1.0  # logits are divided by this; 0 selects greedy decoding
    top_k: int = 50  # keep the k most likely tokens; 0 disables (HF default 50)
    top_p: float = 1.0  # keep the smallest set whose probability reaches top_p; 1.0 disables

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


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


def sample_keyed(logits: torch.Tensor, params: SamplingParams, seeds: torch.Tensor,
                 positions: torch.Tensor) -> torch.Tensor:
    """Draw one token per row of ``logits`` (B, V) from the temperature/top-k/top-p distribution,
    row ``i`` using the uniform ``keyed_uniform(seeds[i], positions[i])``; returns (B,) long.

    Works on the top-k candidates only (sorted), so a step costs one top-k over the vocabulary
    (``top_k.top_k`` for 16-bit logits on CUDA); everything is tensor maths with no host synchronisation."""
    if params.greedy:
        return logits.argmax(dim=-1)
    # at temperature 1 the top-k runs on the logits as they are: widening 16-bit floats to float32 is
    # exact and keeps their order, so it picks the same candidates in the same order, without writing
    # and re-reading a float32 copy of the whole (B, V) logits (and on 16-bit radix keys); a division
    # can round distinct logits together, so other temperatures divide first as HF does
    x = logits if params.temperature == 1.0 else logits.float() / params.temperature
    v = x.shape[-1]
    if 0 < params.top_k < v:
        k = min(v, params.top_k + TIE_MARGIN)
        # on CUDA a 16-bit top-k in tlvr's kernels (a third of torch.topk's time at 64 rows of Qwen2.5's
        # vocabulary), whose ties come in index order; elsewhere torch.topk
        vals, idx = top_k(x, k) if top_k_available(x, k) else torch.topk(x, k, dim=-1)
        vals = vals.float()
        vals = vals.masked_fill(vals < vals[:, params.top_k - 1:params.top_k], float("-inf"))
    else:
        vals, idx = torch.sort(x.float(), dim=-1, descending=True)
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
