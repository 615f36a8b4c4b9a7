"""Decode attention split along the keys (flash decoding) in two Triton kernels, for the engine's
one-token steps on CUDA.

A decode step has one query per row, so SDPA's kernels give each (row, kv head) pair one thread block
that walks all its keys: 128 blocks for 64 rows of Qwen2.5's 2 kv heads, too few to keep an H200's
memory busy. Here each pair's keys are cut into ``splits`` ranges, one block each (a kv head's query
group is one tile of the block: GQA without repeating keys); the first kernel writes every range's
softmax-weighted values and log-sum-exp in float32, the second merges the ranges exactly (the identity
``attention.merge_partials`` uses). Row ``b`` attends keys ``[0, lengths[b])`` of its cache row: the
positions ``<= pos`` that the plain step's additive mask keeps.

The pair is one opaque custom op (``tlvr::split_kv_attention``): ``torch.compile`` calls it as it is
and a CUDA graph records its two launches; ``split_kv_available`` says where it runs.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

BLOCK_N = 64  # keys per inner step
MIN_QUERY_TILE = 16  # tl.dot's smallest M: a query group of fewer heads is padded to it
# blocks per SM the split count aims at, and the partial kernel's launch: the fastest of a sweep on an
# H200 (BLOCK_N 32/64/128 x warps 2/4/8 x stages 2/3/4 x waves 2/4/8; 8, 64 and 256 rows, 704 and
# 1,152 keys), within 3 % of each shape's best
WAVES = 2
WARPS, STAGES = 4, 3


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def partial_kernel(q_ptr, k_ptr, v_ptr, len_ptr, o_ptr, lse_ptr, kv_len, scale,
                       sqb, sqh, skb, skh, sks, svb, svh, svs, sob, soh, sos, slb, slh,
                       GROUP: tl.constexpr, TILE: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr,
                       BLOCK: tl.constexpr):
        b, kvh, part = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        length = tl.minimum(tl.load(len_ptr + b), kv_len)
        per = tl.cdiv(tl.cdiv(kv_len, SPLITS), BLOCK) * BLOCK
        start = part * per
        end = tl.minimum(start + per, length)
        g = tl.arange(0, TILE)
        d = tl.arange(0, D)
        heads = kvh * GROUP + g
        q = tl.load(q_ptr + b * sqb + heads[:, None] * sqh + d[None, :], mask=(g < GROUP)[:, None], other=0.0)
        m = tl.full([TILE], float("-inf"), tl.float32)
        total = tl.zeros([TILE], tl.float32)
        acc = tl.zeros([TILE, D], tl.float32)
        k_base = k_ptr + b * skb + kvh * skh
        v_base = v_ptr + b * svb + kvh * svh
        for n0 in range(start, end, BLOCK):
            n = n0 + tl.arange(0, BLOCK)
            keep = n < end
            k = tl.load(k_base + n[:, None] * sks + d[None, :], mask=keep[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale
            s = tl.where(keep[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            total = total * alpha + tl.sum(p, 1)
            v = tl.load(v_base + n[:, None] * svs + d[None, :], mask=keep[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        # a range past the row's length attends nothing: weight 0 in the merge (log-sum-exp -inf)
        some = total > 0
        out = acc / tl.where(some, total, 1.0)[:, None]
        lse = tl.where(some, m + tl.log(tl.where(some, total, 1.0)), float("-inf"))
        rows = g < GROUP
        tl.store(o_ptr + b * sob + heads[:, None] * soh + part * sos + d[None, :], out, mask=rows[:, None])
        tl.store(lse_ptr + b * slb + heads * slh + part, lse, mask=rows)

    @triton.jit
    def merge_kernel(o_ptr, lse_ptr, out_ptr, sob, soh, sos, slb, slh, sxb, sxh,
                     D: tl.constexpr, SPLITS: tl.constexpr):
        b, h = tl.program_id(0), tl.program_id(1)
        parts = tl.arange(0, SPLITS)
        d = tl.arange(0, D)
        lse = tl.load(lse_ptr + b * slb + h * slh + parts)
        w = tl.exp(lse - tl.max(lse, 0))  # the first range always holds a key: the max is finite
        o = tl.load(o_ptr + b * sob + h * soh + parts[:, None] * sos + d[None, :])
        out = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
        tl.store(out_ptr + b * sxb + h * sxh + d, out.to(out_ptr.dtype.element_ty))

    return partial_kernel, merge_kernel


def split_count(rows: int, kv_heads: int, kv_len: int, sms: int) -> int:
    """Key ranges per (row, kv head): the most blocks up to ``WAVES`` per SM, a power of two (the merge's
    tile), each range at least ``BLOCK_N`` keys long."""
    splits = 1
    while rows * kv_heads * splits * 2 <= WAVES * sms and splits * 2 * BLOCK_N <= kv_len:
        splits *= 2
    return splits


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@torch.library.custom_op("tlvr::split_kv_attention", mutates_args=())
def split_kv_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                       kv_len: int, scale: float) -> torch.Tensor:
    """Attention of one query per row over its cache row's first ``lengths[b]`` keys (at most
    ``kv_len``). q (B, kv_heads, group, D); caches (>= B, kv_heads, >= kv_len, D), last dim contiguous;
    lengths (B,) integers; returns (B, kv_heads, group, D) in q's dtype."""
    b, kv_heads, group, d = q.shape
    q = q.contiguous()
    splits = split_count(b, kv_heads, kv_len, _sm_count(q.device.index or 0))
    heads = kv_heads * group
    part = torch.empty(b, heads, splits, d, device=q.device, dtype=torch.float32)
    lse = torch.empty(b, heads, splits, device=q.device, dtype=torch.float32)
    out = torch.empty(b, heads, d, device=q.device, dtype=q.dtype)
    partial_kernel, merge_kernel = _kernels()
    tile = max(MIN_QUERY_TILE, 1 << (group - 1).bit_length())
    qf = q.view(b, heads, d)
    partial_kernel[(b, kv_heads, splits)](
        qf, k_cache, v_cache, lengths, part, lse, kv_len, scale,
        qf.stride(0), qf.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3], *part.stride()[:3],
        *lse.stride()[:2], GROUP=group, TILE=tile, D=d, SPLITS=splits, BLOCK=BLOCK_N, num_warps=WARPS,
        num_stages=STAGES)
    merge_kernel[(b, heads)](part, lse, out, *part.stride()[:3], *lse.stride()[:2], *out.stride()[:2], D=d,
                             SPLITS=splits, num_warps=4)
    return out.view(b, kv_heads, group, d)


@split_kv_attention.register_fake
def _(q, k_cache, v_cache, lengths, kv_len, scale):
    return torch.empty_like(q)


def split_kv_available(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether ``split_kv_attention`` runs here: CUDA, 16-bit caches, a power-of-two head size, Triton."""
    return (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
            and head_dim >= 16 and head_dim & (head_dim - 1) == 0 and importlib.util.find_spec("triton") is not None)
