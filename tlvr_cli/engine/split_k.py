"""The decode step's GEMMs in Triton: the narrow projections as split-K partial products
(``linear_partials``), summed where they are consumed, and the MLP's gate|up with its SiLU (``swiglu``).

A decode step multiplies a few rows (at most ``MAX_ROWS``) by each weight, so a GEMM is one pass over
the weight; cuBLAS tiles the output columns, and a weight with few columns (Qwen2.5-3B's q|k|v: 2,560,
o_proj and down_proj: 2,048) gives it too few tiles to keep every SM reading. Here the reduced dim is
cut into ``splits`` ranges as well, one program per (column tile, range), and each range's float32
product is written apart: (splits, rows, columns). The sum over the ranges is left to the caller, in
``torch.compile``'s kernel that reads the projection anyway (the rotary and cache write after q|k|v,
the residual add and norm after o_proj and, through the deferred residual, after down_proj): a
reduction in the GEMM itself (a last-arriving program per tile, or cuBLAS's own split-K) costs a
launch or a synchronisation that these small GEMMs cannot afford. The sum runs in range order and is
rounded once to the weight's dtype (``summed``), as cuBLAS rounds its float32 accumulator.

The MLP's gate|up GEMM has tiles enough for every SM; its SiLU-gated product runs in one kernel with
it (``swiglu``: a program per column tile reads that tile's gate and up rows, the product of the two
rounded as the GEMM and the activation round), one launch and one (rows, intermediate) write fewer
than the GEMM and inductor's activation kernel. The LM head stays on cuBLAS.

The kernels live in ``split_k_kernels.py``, imported on first use (Triton is optional); the ops are
opaque to ``torch.compile`` (``tlvr::linear_partials``, ``tlvr::swiglu``); ``split_k_available`` says
where they run.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .split_kv import _pow2, _sm_count, launch_keywords, triton_16bit

MAX_ROWS = 64  # one row tile: a step over more rows is a GEMM cuBLAS tiles well
MIN_ROWS = 16  # tl.dot's smallest tile: fewer rows are padded to it (masked)
MAX_SPLITS = 8
# the kernel's launch: the fastest of a sweep on an H200 at 64 rows (columns per tile 32/64/128, reduced
# dim per step 128/256, splits 1/2/4/8, warps 4/8) for q|k|v, o_proj and down_proj alike
BLOCK_N, BLOCK_K, WARPS, STAGES = 64, 128, 4, 4
# ``swiglu``'s launch: the fastest of a sweep on an H200 at 64 rows x Qwen2.5-3B's 2,048 -> 2 x 11,008
# (columns per tile 16/32/64, reduced dim per step 64/128/256, warps 4/8, stages 3-6): 25.2 us against
# cuBLAS's gate|up GEMM alone at 25.9, its activation besides
SWIGLU_BLOCK_N, SWIGLU_BLOCK_K, SWIGLU_WARPS, SWIGLU_STAGES = 32, 64, 4, 4


@functools.cache
def _kernels():
    from . import split_k_kernels

    return split_k_kernels


class Splits(NamedTuple):
    """Ranges of the reduced dim per projection of a decoder layer (1: cuBLAS), and whether gate|up and
    its activation run as ``swiglu``."""

    qkv: int
    o: int
    down: int
    swiglu: bool = False

    @property
    def down_partials(self) -> bool:
        """Whether down_proj's output is its float32 partials, which the deferred residual carries."""
        return self.down > 1


def split_count(columns: int, reduced: int, sms: int) -> int:
    """Ranges of the ``reduced`` dim per column tile: the most (a power of two, at most ``MAX_SPLITS``,
    each range at least ``BLOCK_K`` long) that keep tiles x ranges within one wave of ``sms`` programs;
    1 where the tiles alone fill half the SMs."""
    tiles = -(-columns // BLOCK_N)
    splits = 1
    while splits < MAX_SPLITS and tiles * splits * 2 <= sms and splits * 2 * BLOCK_K <= reduced:
        splits *= 2
    return splits


def layer_splits(cfg, heads: int, kv_heads: int, head_dim: int, device: torch.device) -> Splits:
    """``split_count`` of a Qwen2 decoder layer's q|k|v, o_proj and down_proj on ``device``; ``swiglu``
    where its activation is SiLU."""
    sms = _sm_count(device.index or 0)
    hidden = cfg.hidden_size
    return Splits(split_count((heads + 2 * kv_heads) * head_dim, hidden, sms),
                  split_count(hidden, heads * head_dim, sms), split_count(hidden, cfg.intermediate_size, sms),
                  getattr(cfg, "hidden_act", None) == "silu")


@torch.library.custom_op("tlvr::linear_partials", mutates_args=())
def linear_partials(x: torch.Tensor, weight: torch.Tensor, splits: int) -> torch.Tensor:
    """x (M, K) at most ``MAX_ROWS`` rows, weight (N, K), both 16-bit with a contiguous last dim: the
    float32 products over ``splits`` consecutive ranges of K, (splits, M, N), which sum to x @ weight.T.
    Off CUDA, the same ranges in torch (``range_products``)."""
    m, n = x.shape[0], weight.shape[0]
    if x.device.type != "cuda":
        return range_products(x, weight, splits)
    out = torch.empty(splits, m, n, device=x.device, dtype=torch.float32)
    launch_partials(x, weight, out)
    return out


def _row_tile(rows: int) -> int:
    return max(MIN_ROWS, _pow2(rows))


def launch_partials(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> None:
    """``partials_kernel`` over x (M, K) and weight (N, K) into ``out`` (splits, M, N), contiguous float32."""
    (m, k), n, splits = x.shape, weight.shape[0], out.shape[0]
    _kernels().partials_kernel[(-(-n // BLOCK_N), splits)](
        x, weight, out, m, n, k, x.stride(0), weight.stride(0), out.stride(0), out.stride(1),
        BM=_row_tile(m), BN=BLOCK_N, BK=BLOCK_K, SPLITS=splits, num_warps=WARPS, num_stages=STAGES,
        **launch_keywords(x.device))


def range_span(reduced: int, splits: int) -> int:
    """The length of each of the kernel's ``splits`` ranges of the reduced dim: a whole number of
    ``BLOCK_K``, so that the last range is short or empty."""
    return -(-(-(-reduced // splits)) // BLOCK_K) * BLOCK_K


def range_products(x: torch.Tensor, weight: torch.Tensor, splits: int) -> torch.Tensor:
    """The kernel's ranges of K (``range_span``) as float32 matmuls: (splits, M, N)."""
    span = range_span(x.shape[1], splits)
    return torch.stack([x[:, i * span:(i + 1) * span].float() @ weight[:, i * span:(i + 1) * span].float().T
                        for i in range(splits)])


@linear_partials.register_fake
def _(x, weight, splits):
    return x.new_empty(splits, x.shape[0], weight.shape[0], dtype=torch.float32)


def partials(x: torch.Tensor, weight: torch.Tensor, splits: int) -> torch.Tensor:
    """``linear_partials`` of x (..., K), its leading dims flattened: (splits, ..., N)."""
    lead = x.shape[:-1]
    p = linear_partials(x.reshape(-1, x.shape[-1]), weight, splits)
    return p.view(splits, *lead, weight.shape[0])


def summed(p: torch.Tensor, dtype: torch.dtype, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The product from its partials (splits, ..., N) in ``dtype``: summed in range order in float32,
    the bias added, rounded once."""
    out = p[0]
    for i in range(1, p.shape[0]):
        out = out + p[i]
    if bias is not None:
        out = out + bias.float()
    return out.to(dtype)


@torch.library.custom_op("tlvr::swiglu", mutates_args=())
def _swiglu(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if x.device.type != "cuda":
        gate, up = F.linear(x, weight).chunk(2, dim=-1)
        return F.silu(gate) * up
    out = torch.empty(x.shape[0], weight.shape[0] // 2, device=x.device, dtype=x.dtype)
    launch_swiglu(x, weight, out)
    return out


def launch_swiglu(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> None:
    """``swiglu_kernel`` over x (M, K) and gate|up weight (2I, K) into ``out`` (M, I)."""
    (m, k), inter = x.shape, out.shape[1]
    _kernels().swiglu_kernel[(-(-inter // SWIGLU_BLOCK_N),)](
        x, weight, out, m, inter, k, x.stride(0), weight.stride(0), out.stride(0),
        BM=_row_tile(m), BN=SWIGLU_BLOCK_N, BK=SWIGLU_BLOCK_K,
        EVEN=inter % SWIGLU_BLOCK_N == 0 and k % SWIGLU_BLOCK_K == 0, num_warps=SWIGLU_WARPS,
        num_stages=SWIGLU_STAGES, **launch_keywords(x.device))


@_swiglu.register_fake
def _(x, weight):
    return x.new_empty(x.shape[0], weight.shape[0] // 2)


def swiglu(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate, up = F.linear(x, weight).chunk(2, -1)``, x (..., K) with at most
    ``MAX_ROWS`` rows, in one kernel on CUDA (off CUDA in those torch ops, as the kernel rounds)."""
    lead = x.shape[:-1]
    return _swiglu(x.reshape(-1, x.shape[-1]), weight).view(*lead, weight.shape[0] // 2)


def split_k_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the kernels run here: CUDA, 16-bit weights, Triton."""
    return triton_16bit(device, dtype)
