"""The Triton kernels of ``split_k.py`` (imported only where Triton is installed): ``partials_kernel``,
the float32 products of a few rows of x with one column tile of a weight over one range of the
reduced dim, each range's written apart for the consumer to sum; ``swiglu_kernel``, the MLP's gate and
up products of one column tile and their SiLU-gated product, in one program."""

import triton
import triton.language as tl

from .split_kv_kernels import after_predecessor


@triton.jit
def partials_kernel(x_ptr, w_ptr, p_ptr, M, N, K, sxm, swn, spp, spm,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLITS: tl.constexpr,
                    PDL: tl.constexpr):
    # program (column tile, range): rows [0, M) x columns [tile * BN, +BN) over range ``part`` of K
    after_predecessor(PDL)
    tile, part = tl.program_id(0), tl.program_id(1)
    rows = tl.arange(0, BM)
    cols = tile * BN + tl.arange(0, BN)
    span = tl.cdiv(tl.cdiv(K, SPLITS), BK) * BK
    acc = tl.zeros([BM, BN], tl.float32)
    for k0 in range(part * span, part * span + span, BK):
        k = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + rows[:, None] * sxm + k[None, :], mask=(rows[:, None] < M) & (k[None, :] < K), other=0.0)
        w = tl.load(w_ptr + cols[:, None] * swn + k[None, :], mask=(cols[:, None] < N) & (k[None, :] < K), other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
    tl.store(p_ptr + part * spp + rows[:, None] * spm + cols[None, :], acc,
             mask=(rows[:, None] < M) & (cols[None, :] < N))


@triton.jit
def swiglu_kernel(x_ptr, w_ptr, y_ptr, M, N, K, sxm, swn, sym, BM: tl.constexpr, BN: tl.constexpr,
                  BK: tl.constexpr, EVEN: tl.constexpr, PDL: tl.constexpr):
    # program ``tile``: rows [0, M) x columns [tile * BN, +BN) of silu(x @ gate.T) * (x @ up.T), gate the
    # first N rows of w and up the next N; each product rounded to y's dtype first, as the GEMM rounds
    after_predecessor(PDL)
    tile = tl.program_id(0)
    rows = tl.arange(0, BM)
    cols = tile * BN + tl.arange(0, BN)
    gate = tl.zeros([BM, BN], tl.float32)
    up = tl.zeros([BM, BN], tl.float32)
    for k0 in range(0, K, BK):
        k = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + rows[:, None] * sxm + k[None, :], mask=(rows[:, None] < M) & (k[None, :] < K), other=0.0)
        if EVEN:
            wg = tl.load(w_ptr + cols[:, None] * swn + k[None, :])
            wu = tl.load(w_ptr + (cols[:, None] + N) * swn + k[None, :])
        else:
            inside = (cols[:, None] < N) & (k[None, :] < K)
            wg = tl.load(w_ptr + cols[:, None] * swn + k[None, :], mask=inside, other=0.0)
            wu = tl.load(w_ptr + (cols[:, None] + N) * swn + k[None, :], mask=inside, other=0.0)
        gate = tl.dot(x, tl.trans(wg), gate)
        up = tl.dot(x, tl.trans(wu), up)
    dtype = y_ptr.dtype.element_ty
    g = gate.to(dtype).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32) * up.to(dtype).to(tl.float32)
    tl.store(y_ptr + rows[:, None] * sym + cols[None, :], act.to(dtype), mask=(rows[:, None] < M) & (cols[None, :] < N))
