"""The sampler's top-k over the vocabulary in Triton, for 16-bit logits on CUDA (``top_k``).

``torch.topk`` of 66 of Qwen2.5's 151,936 logits per row (top-k 50 and the sampler's tie margin) takes
112 us at 64 rows on an H200, nearly as long as the LM head that wrote them, and the sampler runs it
every decode step. Here it is two reads of the logits by (chunk, row) programs and two small per-row
kernels, 37 us at 64 rows, 12 at 8 and 9.5 at 1 (torch.topk: 49 and 40; ``bench_generate.py --top-k``):

1. the largest logit of every span of ``SPAN`` in a row;
2. the k-th largest of those maxima: a threshold at or below the row's k-th largest logit (the k spans'
   maxima are k logits at or above it), and close to it, since few spans hold more than one of the top k;
3. the logits at or above the threshold gathered into the row's ``capacity(k)`` candidate slots;
4. the candidates sorted and the first k written. Where more were gathered than the slots hold (the
   spans' maxima a loose threshold, or thousands of equal logits) the row is selected exactly by
   bisecting its k-th largest logit in scans of the row, slower but rare.

The result is exact, and its order is defined where ``torch.topk``'s is not: values descending, equal
values by index ascending (as a stable descending sort orders them), of the ties at the k-th value the
lowest-indexed. The kernels live in ``top_k_kernels.py``, imported on first use (Triton is optional);
the op (``tlvr::top_k``) is opaque to ``torch.compile`` and its launches record in a CUDA graph.
"""

from __future__ import annotations

import functools

import torch

from .split_kv import _pow2, launch_keywords, triton_16bit

# the fastest of a sweep on an H200 (spans of 256/512/1,024 logits, 4-16 per program, warps 4/8, 1-64 rows)
SPAN = 512  # logits per span maximum
SPANS = 8  # spans per program of the maxima pass
CHUNK = SPAN * SPANS  # logits per program of a pass over the row
MAX_K = 256  # above this the sampler keeps torch.topk
WARPS = 4  # the passes over the logits
SORT_WARPS = 8  # the per-row kernels, which sort


@functools.cache
def _kernels():
    from . import top_k_kernels

    return top_k_kernels


def capacity(k: int) -> int:
    """Candidate slots per row: a power of two, three times ``k`` at least (random logits gather about
    1.2 k of Qwen2.5's vocabulary)."""
    return _pow2(3 * k)


def top_k_available(x: torch.Tensor, k: int) -> bool:
    """Whether ``top_k`` runs the kernels for ``x`` (rows, vocab): CUDA, 16-bit, ``k`` at most ``MAX_K``, Triton."""
    return triton_16bit(x.device, x.dtype) and x.dim() == 2 and 0 < k <= min(MAX_K, x.shape[-1])


def launch(x: torch.Tensor, k: int, values: torch.Tensor, indices: torch.Tensor) -> None:
    """The four kernels over x (rows, V), 16-bit with a contiguous last dim, into ``values`` (rows, k) in
    x's dtype and ``indices`` (rows, k) int64, both contiguous."""
    rows, vocab = x.shape
    cap, chunks = capacity(k), -(-vocab // CHUNK)
    bits = x.view(torch.int16)
    maxima = torch.empty(rows, chunks * SPANS, device=x.device, dtype=torch.int32)
    scratch = torch.empty(rows, 2, device=x.device, dtype=torch.int32)
    cands = torch.empty(rows, cap, device=x.device, dtype=torch.int64)
    kernels, keywords = _kernels(), launch_keywords(x.device)
    kernels.maxima_kernel[(chunks, rows)](bits, maxima, vocab, bits.stride(0), maxima.stride(0), SPANS=SPANS,
                                          SPAN=SPAN, num_warps=WARPS, **keywords)
    kernels.threshold_kernel[(rows,)](maxima, scratch, maxima.shape[1], maxima.stride(0), k,
                                      M_POW2=_pow2(maxima.shape[1]), num_warps=SORT_WARPS, **keywords)
    kernels.collect_kernel[(chunks, rows)](bits, scratch, cands, vocab, bits.stride(0), CAP=cap, CHUNK=CHUNK,
                                           num_warps=WARPS, **keywords)
    kernels.finish_kernel[(rows,)](bits, scratch, cands, values.view(torch.int16), indices, vocab, bits.stride(0),
                                   k, CAP=cap, CHUNK=CHUNK, num_warps=SORT_WARPS, **keywords)


@torch.library.custom_op("tlvr::top_k", mutates_args=())
def top_k(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest of each row of x (rows, V) and their indices, values descending and equal values
    by index ascending (the lowest-indexed of those tied at the k-th): on CUDA in the kernels (16-bit x,
    ``top_k_available``), elsewhere a stable descending sort."""
    if not top_k_available(x, k):
        values, indices = torch.sort(x, dim=-1, descending=True, stable=True)
        return values[:, :k].contiguous(), indices[:, :k].contiguous()
    x = x.contiguous()
    values = torch.empty(x.shape[0], k, device=x.device, dtype=x.dtype)
    indices = torch.empty(x.shape[0], k, device=x.device, dtype=torch.long)
    launch(x, k, values, indices)
    return values, indices


@top_k.register_fake
def _(x, k):
    return x.new_empty(x.shape[0], k), x.new_empty(x.shape[0], k, dtype=torch.long)
