"""Decode attention split along the keys (flash decoding) in Triton kernels, for the engine's one-token
steps on CUDA: the plain step (``split_kv_attention``) and the cascade step (``cascade_attention``).

A decode step has one query per row, so SDPA's kernels give each (row, kv head) pair one thread block
that walks all its keys: 128 blocks for 64 rows of Qwen2.5's 2 kv heads, too few to keep an H200's
memory busy. Here each pair's keys are cut into ``splits`` ranges, one block each (a kv head's query
group is one tile of the block: GQA without repeating keys); the partial kernel writes every range's
softmax-weighted values and log-sum-exp in float32, the merge kernel merges the ranges exactly (the
identity ``attention.merge_partials`` uses). Row ``b`` attends keys ``[0, lengths[b])`` of its cache
row: the positions ``<= pos`` that the plain step's additive mask keeps. A row's ranges split its own
keys, not the step's key bucket, so a short row does not leave most of its blocks idle.

The cascade step (the rows of a prompt in blocks of ``width`` consecutive slots, ``steps.py``) runs the
partial kernel twice into one set of ranges: once per block over its prompt's keys with all the block's
rows x query heads as one query tile (the prompt's keys are read once per block, not once per row),
once per row over its own new tokens; one merge then combines both.

Each is one opaque custom op (``tlvr::split_kv_attention``, ``tlvr::cascade_attention``):
``torch.compile`` calls it as it is and a CUDA graph records its launches; ``split_kv_available`` says
where they run.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

BLOCK_N = 64  # keys per inner step
MIN_QUERY_TILE = 16  # tl.dot's smallest M: a query tile of fewer queries is padded to it
MAX_QUERY_TILE = 64  # a cascade block's rows x heads above this run as several tiles
# blocks per SM the split count aims at, and the partial kernel's launch: the fastest of a sweep on an
# H200 (BLOCK_N 32/64/128 x warps 2/4/8 x stages 2/3/4 x waves 2/4/8; 8, 64 and 256 rows, 704 and
# 1,152 keys), within 3 % of each shape's best
WAVES = 2
WARPS, STAGES = 4, 3
# the merge kernel's warps: one warp per (row, head) program (64 rows x 512 tokens on an H200, cascade:
# 16,788-16,825 -> 17,149-17,192 tok/s against 4 warps; the plain step alike within noise)
MERGE_WARPS = 1


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def partial_kernel(q_ptr, k_ptr, v_ptr, lo_ptr, hi_ptr, o_ptr, lse_ptr, window, window_len, offset, scale,
                       sqb, sqh, skb, skh, sks, svb, svh, svs, sob, soh, sos, slb, slh,
                       ROWS: tl.constexpr, REP: tl.constexpr, TILE: tl.constexpr, TILES: tl.constexpr,
                       D: tl.constexpr, SPLITS: tl.constexpr, BLOCK: tl.constexpr,
                       HAS_LO: tl.constexpr, HAS_HI: tl.constexpr):
        # program (key block x query tile, kv head, range): key block ``blk`` is cache row ``blk``, whose
        # keys the ROWS rows blk * ROWS ... attend with their REP query heads of kv head ``kvh``
        pid, kvh, part = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        blk, tile = pid // TILES, pid % TILES
        lo = window
        if HAS_LO:
            lo = tl.maximum(tl.load(lo_ptr + blk), window)
        hi = window + window_len
        if HAS_HI:
            hi = tl.minimum(tl.load(hi_ptr + blk), hi)
        per = tl.cdiv(tl.cdiv(tl.maximum(hi - lo, 0), SPLITS), BLOCK) * BLOCK
        start = lo + part * per
        end = tl.minimum(start + per, hi)
        i = tile * TILE + tl.arange(0, TILE)
        valid = i < ROWS * REP
        row = blk * ROWS + i // REP
        head = kvh * REP + i % REP
        d = tl.arange(0, D)
        q = tl.load(q_ptr + row[:, None] * sqb + head[:, None] * sqh + d[None, :], mask=valid[:, None], other=0.0)
        m = tl.full([TILE], float("-inf"), tl.float32)
        total = tl.zeros([TILE], tl.float32)
        acc = tl.zeros([TILE, D], tl.float32)
        k_base = k_ptr + blk * skb + kvh * skh
        v_base = v_ptr + blk * svb + kvh * svh
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
        # an empty range attends nothing: weight 0 in the merge (log-sum-exp -inf)
        some = total > 0
        out = acc / tl.where(some, total, 1.0)[:, None]
        lse = tl.where(some, m + tl.log(tl.where(some, total, 1.0)), float("-inf"))
        at = offset + part
        tl.store(o_ptr + row[:, None] * sob + head[:, None] * soh + at * sos + d[None, :], out, mask=valid[:, None])
        tl.store(lse_ptr + row * slb + head * slh + at, lse, mask=valid)

    @triton.jit
    def merge_kernel(o_ptr, lse_ptr, out_ptr, sob, soh, sos, slb, slh, sxb, sxh,
                     D: tl.constexpr, PARTS: tl.constexpr, PARTS_POW2: tl.constexpr):
        b, h = tl.program_id(0), tl.program_id(1)
        parts = tl.arange(0, PARTS_POW2)
        used = parts < PARTS
        d = tl.arange(0, D)
        lse = tl.load(lse_ptr + b * slb + h * slh + parts, mask=used, other=float("-inf"))
        w = tl.exp(lse - tl.max(lse, 0))  # the first range always holds a key: the max is finite
        o = tl.load(o_ptr + b * sob + h * soh + parts[:, None] * sos + d[None, :], mask=used[:, None], other=0.0)
        out = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
        tl.store(out_ptr + b * sxb + h * sxh + d, out.to(out_ptr.dtype.element_ty))

    return partial_kernel, merge_kernel


def split_count(rows: int, kv_heads: int, kv_len: int, sms: int) -> int:
    """Key ranges per (row, kv head): the most blocks up to ``WAVES`` per SM, a power of two, each range
    at least ``BLOCK_N`` keys long."""
    splits = 1
    while rows * kv_heads * splits * 2 <= WAVES * sms and splits * 2 * BLOCK_N <= kv_len:
        splits *= 2
    return splits


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def query_tiles(queries: int) -> tuple[int, int]:
    """(tile size, tiles) for a key block's ``queries`` query rows (rows x heads of its kv head)."""
    tile = min(MAX_QUERY_TILE, max(MIN_QUERY_TILE, _pow2(queries)))
    return tile, -(-queries // tile)


class _Ranges:
    """The float32 partial outputs and log-sum-exps of ``parts`` key ranges per (row, head)."""

    def __init__(self, q: torch.Tensor, parts: int) -> None:
        b, kv_heads, rep, d = q.shape
        self.q = q.contiguous().view(b, kv_heads * rep, d)
        self.rep, self.parts = rep, parts
        self.o = torch.empty(b, kv_heads * rep, parts, d, device=q.device, dtype=torch.float32)
        self.lse = torch.empty(b, kv_heads * rep, parts, device=q.device, dtype=torch.float32)

    def fill(self, k_cache: torch.Tensor, v_cache: torch.Tensor, rows_per_block: int, window: int, window_len: int,
             offset: int, splits: int, scale: float, lo: torch.Tensor | None = None,
             hi: torch.Tensor | None = None) -> None:
        """Ranges ``offset .. offset + splits - 1``: key block j (cache row j) of ``(hi if given else lo).shape[0]``
        blocks, keys ``[max(lo[j], window), min(hi[j], window + window_len))``, attended by rows
        ``j * rows_per_block ...`` of ``rows_per_block``."""
        index = hi if hi is not None else lo  # one bound per key block (the other a placeholder pointer)
        tile, tiles = query_tiles(rows_per_block * self.rep)
        partial_kernel, _ = _kernels()
        partial_kernel[(index.shape[0] * tiles, k_cache.shape[1], splits)](
            self.q, k_cache, v_cache, lo if lo is not None else index, hi if hi is not None else index, self.o,
            self.lse, window, window_len, offset, scale, self.q.stride(0), self.q.stride(1), *k_cache.stride()[:3],
            *v_cache.stride()[:3], *self.o.stride()[:3], *self.lse.stride()[:2], ROWS=rows_per_block, REP=self.rep,
            TILE=tile, TILES=tiles, D=self.q.shape[-1], SPLITS=splits, BLOCK=BLOCK_N, HAS_LO=lo is not None,
            HAS_HI=hi is not None, num_warps=WARPS, num_stages=STAGES)

    def merge(self, dtype: torch.dtype) -> torch.Tensor:
        b, heads, _, d = self.o.shape
        out = torch.empty(b, heads, d, device=self.o.device, dtype=dtype)
        _, merge_kernel = _kernels()
        merge_kernel[(b, heads)](self.o, self.lse, out, *self.o.stride()[:3], *self.lse.stride()[:2],
                                 *out.stride()[:2], D=d, PARTS=self.parts, PARTS_POW2=_pow2(self.parts),
                                 num_warps=MERGE_WARPS)
        return out.view(b, heads // self.rep, self.rep, d)


@torch.library.custom_op("tlvr::split_kv_attention", mutates_args=())
def split_kv_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                       kv_len: int, scale: float) -> torch.Tensor:
    """Attention of one query per row over its cache row's first ``lengths[b]`` keys (at most
    ``kv_len``). q (B, kv_heads, group, D); caches (>= B, kv_heads, >= kv_len, D), last dim contiguous;
    lengths (B,) integers, each at least 1; returns (B, kv_heads, group, D) in q's dtype."""
    b, kv_heads = q.shape[:2]
    splits = split_count(b, kv_heads, kv_len, _sm_count(q.device.index or 0))
    ranges = _Ranges(q, splits)
    ranges.fill(k_cache, v_cache, 1, 0, kv_len, 0, splits, scale, hi=lengths)
    return ranges.merge(q.dtype)


@split_kv_attention.register_fake
def _(q, k_cache, v_cache, lengths, kv_len, scale):
    return torch.empty_like(q)


@torch.library.custom_op("tlvr::cascade_attention", mutates_args=())
def cascade_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, prompt_lens: torch.Tensor,
                      prefix_len: int, own_start: torch.Tensor, suffix_len: int, scale: float) -> torch.Tensor:
    """Attention of one query per row, the rows in ``prompt_lens.shape[0]`` blocks of equal width: block
    g's rows attend its prompt, keys ``[0, prompt_lens[g])`` of cache row g (at most ``prefix_len``), and
    row b its own tokens, keys ``[own_start[b], S)`` of cache row b (S the caches' length; at most the last
    ``suffix_len``). q (B, kv_heads, group, D); returns (B, kv_heads, group, D) in q's dtype."""
    b, kv_heads = q.shape[:2]
    blocks = prompt_lens.shape[0]
    sms = _sm_count(q.device.index or 0)
    _, tiles = query_tiles(b // blocks * q.shape[2])
    prefix_splits = split_count(blocks * tiles, kv_heads, prefix_len, sms)
    own_splits = split_count(b, kv_heads, suffix_len, sms)
    ranges = _Ranges(q, prefix_splits + own_splits)
    ranges.fill(k_cache, v_cache, b // blocks, 0, prefix_len, 0, prefix_splits, scale, hi=prompt_lens)
    seq = k_cache.shape[2]
    ranges.fill(k_cache, v_cache, 1, seq - suffix_len, suffix_len, prefix_splits, own_splits, scale, lo=own_start)
    return ranges.merge(q.dtype)


@cascade_attention.register_fake
def _(q, k_cache, v_cache, prompt_lens, prefix_len, own_start, suffix_len, scale):
    return torch.empty_like(q)


def split_kv_available(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether the kernels run here: CUDA, 16-bit caches, a power-of-two head size, Triton."""
    return (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
            and head_dim >= 16 and head_dim & (head_dim - 1) == 0 and importlib.util.find_spec("triton") is not None)
