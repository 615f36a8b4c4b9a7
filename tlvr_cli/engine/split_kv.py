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

The cascade step (the rows of a prompt in blocks of ``width`` consecutive slots, ``steps.py``) fills one
set of ranges in one launch (``cascade_kernel``): its first programs range over each block's prompt keys
with all the block's rows x query heads as one query tile (the prompt's keys are read once per block, not
once per row), the others over each row's own new tokens; one merge then combines both. At these sizes
attention is bound by kernel latency rather than bytes, so the launch saved is most of the gain: one
layer at 64 rows, prompt 650, 64 / 256 / 480 new tokens on an H200, 10.2 / 12.6 / 16.6 us against the
plain step's 14.9 / 20.7 / 24.1 us (two launches for the cascade: 16.5 / 20.3 / 24.3).

The kernels live in ``split_kv_kernels.py``, imported on first use (Triton is optional).

On Hopper and later every launch is a programmatic dependent launch (``launch_keywords``).

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
# (the one-launch cascade re-swept at 64 rows x 512 tokens, whole rollouts: waves 1/2/4, BLOCK_N 32/64,
# stages 2/3/4 span 3.59-3.72 ms per step, these 3.60-3.62)
WAVES = 2
WARPS, STAGES = 4, 3
# the merge kernel's warps: one warp per (row, head) program (64 rows x 512 tokens on an H200, cascade:
# 16,788-16,825 -> 17,149-17,192 tok/s against 4 warps; the plain step alike within noise)
MERGE_WARPS = 1


@functools.cache
def _kernels():
    """``split_kv_kernels``, imported on first use (it imports Triton)."""
    from . import split_kv_kernels

    return split_kv_kernels


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


@functools.cache
def _cuda_pdl(index: int) -> bool:
    return _kernels().HAS_PDL and torch.cuda.get_device_capability(index)[0] >= 9


def launch_keywords(device: torch.device) -> dict:
    """The launch keywords of a kernel here: programmatic dependent launch on Hopper and later (with a
    Triton that has it), where a kernel may start while its predecessor drains and waits for it
    (``gdc_wait``) before reading anything. In a decode step's chain of small kernels that hides part
    of every launch gap: with the compiled layer's kernels launched alike (``layers.decode_options``),
    3.63 -> 3.58 ms per step at 64 rows x 512 tokens on an H200, the same tokens bit for bit."""
    on = device.type == "cuda" and _cuda_pdl(device.index or 0)
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def query_tiles(queries: int) -> tuple[int, int]:
    """(tile size, tiles) for a key block's ``queries`` query rows (rows x heads of its kv head)."""
    tile = min(MAX_QUERY_TILE, max(MIN_QUERY_TILE, _pow2(queries)))
    return tile, -(-queries // tile)


class _Ranges:
    """The float32 partial outputs and log-sum-exps of ``parts`` key ranges per (row, head), and their merge."""

    def __init__(self, q: torch.Tensor, parts: int) -> None:
        b, kv_heads, rep, d = q.shape
        self.q = q.contiguous().view(b, kv_heads * rep, d)
        self.rep, self.parts = rep, parts
        self.launch = launch_keywords(q.device)
        self.o = torch.empty(b, kv_heads * rep, parts, d, device=q.device, dtype=torch.float32)
        self.lse = torch.empty(b, kv_heads * rep, parts, device=q.device, dtype=torch.float32)

    def strides(self, k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, ...]:
        """The kernels' stride arguments: q's, the caches' and the ranges'."""
        return (self.q.stride(0), self.q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3],
                *self.o.stride()[:3], *self.lse.stride()[:2])

    def merge(self, dtype: torch.dtype) -> torch.Tensor:
        b, heads, _, d = self.o.shape
        out = torch.empty(b, heads, d, device=self.o.device, dtype=dtype)
        _kernels().merge_kernel[(b, heads)](self.o, self.lse, out, *self.o.stride()[:3], *self.lse.stride()[:2],
                                 *out.stride()[:2], D=d, PARTS=self.parts, PARTS_POW2=_pow2(self.parts),
                                 num_warps=MERGE_WARPS, **self.launch)
        return out.view(b, heads // self.rep, self.rep, d)


@torch.library.custom_op("tlvr::split_kv_attention", mutates_args=())
def split_kv_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                       kv_len: int, scale: float) -> torch.Tensor:
    """Attention of one query per row over its cache row's first ``lengths[b]`` keys (at most
    ``kv_len``). q (B, kv_heads, group, D); caches (>= B, kv_heads, >= kv_len, D), last dim contiguous;
    lengths (B,) integers, each at least 1; returns (B, kv_heads, group, D) in q's dtype."""
    b, kv_heads, rep, d = q.shape
    splits = split_count(b, kv_heads, kv_len, _sm_count(q.device.index or 0))
    ranges = _Ranges(q, splits)
    tile, _ = query_tiles(rep)
    _kernels().partial_kernel[(b, kv_heads, splits)](
        ranges.q, k_cache, v_cache, lengths, ranges.o, ranges.lse, kv_len, scale, *ranges.strides(k_cache, v_cache),
        REP=rep, TILE=tile, D=d, SPLITS=splits, BLOCK=BLOCK_N, num_warps=WARPS, num_stages=STAGES,
        **ranges.launch)
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
    b, kv_heads, rep, d = q.shape
    blocks = prompt_lens.shape[0]
    width = b // blocks
    sms = _sm_count(q.device.index or 0)
    tile, tiles = query_tiles(width * rep)
    prefix_splits = split_count(blocks * tiles, kv_heads, prefix_len, sms)
    own_splits = split_count(b, kv_heads, suffix_len, sms)
    ranges = _Ranges(q, prefix_splits + own_splits)
    prefix_programs = blocks * tiles * prefix_splits
    # one launch: the prompt ranges' programs, then the own tokens' (``cascade_kernel``)
    _kernels().cascade_kernel[(prefix_programs + b * own_splits, kv_heads)](
        ranges.q, k_cache, v_cache, prompt_lens, own_start, ranges.o, ranges.lse, prefix_programs, prefix_len,
        k_cache.shape[2] - suffix_len, suffix_len, scale, *ranges.strides(k_cache, v_cache), WIDTH=width, REP=rep,
        TILE=tile, TILES=tiles, OWN_TILE=query_tiles(rep)[0], D=d, PREFIX_SPLITS=prefix_splits,
        OWN_SPLITS=own_splits, BLOCK=BLOCK_N, num_warps=WARPS, num_stages=STAGES,
        **ranges.launch)
    return ranges.merge(q.dtype)


@cascade_attention.register_fake
def _(q, k_cache, v_cache, prompt_lens, prefix_len, own_start, suffix_len, scale):
    return torch.empty_like(q)


def triton_16bit(device: torch.device, dtype: torch.dtype) -> bool:
    """Where tlvr's Triton kernels (these, ``split_k``'s and ``top_k``'s) run: CUDA, 16-bit tensors, Triton."""
    return (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
            and importlib.util.find_spec("triton") is not None)


def split_kv_available(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether the kernels run here: CUDA, 16-bit caches, a power-of-two head size, Triton."""
    return triton_16bit(device, dtype) and head_dim >= 16 and head_dim & (head_dim - 1) == 0
