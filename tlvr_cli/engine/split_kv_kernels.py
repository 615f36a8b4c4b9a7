"""The Triton kernels of ``split_kv.py`` (imported only where Triton is installed): ``attend_range`` (one
range of one key block for a tile of queries, writing its softmax-weighted values and log-sum-exp in
float32), the plain step's ``partial_kernel``, the cascade step's ``cascade_kernel`` (the prompt ranges and
the rows' own ranges in one launch) and ``merge_kernel``."""

import triton
import triton.language as tl

try:  # programmatic dependent launch (``split_kv.launch_keywords``), in the Triton releases that have it
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    HAS_PDL = True
except ImportError:  # the kernels compile their ``PDL`` branch only when it is set
    gdc_launch_dependents = gdc_wait = None
    HAS_PDL = False


@triton.jit
def after_predecessor(PDL: tl.constexpr):
    # under a programmatic dependent launch: wait for the kernel before to finish (nothing is read
    # before), then let the next one launch
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def attend_range(q_ptr, k_ptr, v_ptr, bound_ptr, o_ptr, lse_ptr, blk, tile, kvh, part, window, window_len,
                 offset, scale, sqb, sqh, skb, skh, sks, svb, svh, svs, sob, soh, sos, slb, slh,
                 ROWS: tl.constexpr, REP: tl.constexpr, TILE: tl.constexpr, D: tl.constexpr,
                 SPLITS: tl.constexpr, BLOCK: tl.constexpr, LOWER: tl.constexpr):
    # range ``part`` of key block ``blk`` (cache row ``blk``), whose keys the ROWS rows blk * ROWS ...
    # attend with their REP query heads of kv head ``kvh``, query tile ``tile`` of them; the block's keys
    # are [max(bound, window), window + window_len) with LOWER, else [window, min(bound, window + window_len))
    lo = window
    hi = window + window_len
    if LOWER:
        lo = tl.maximum(tl.load(bound_ptr + blk), window)
    else:
        hi = tl.minimum(tl.load(bound_ptr + blk), hi)
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
def partial_kernel(q_ptr, k_ptr, v_ptr, hi_ptr, o_ptr, lse_ptr, kv_len, scale,
                   sqb, sqh, skb, skh, sks, svb, svh, svs, sob, soh, sos, slb, slh,
                   REP: tl.constexpr, TILE: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr,
                   BLOCK: tl.constexpr, PDL: tl.constexpr):
    # program (row, kv head, range): the row's keys [0, min(hi[row], kv_len)) in SPLITS ranges
    after_predecessor(PDL)
    attend_range(q_ptr, k_ptr, v_ptr, hi_ptr, o_ptr, lse_ptr, tl.program_id(0), 0, tl.program_id(1),
                 tl.program_id(2), 0, kv_len, 0, scale, sqb, sqh, skb, skh, sks, svb, svh, svs, sob, soh, sos,
                 slb, slh, ROWS=1, REP=REP, TILE=TILE, D=D, SPLITS=SPLITS, BLOCK=BLOCK, LOWER=False)


@triton.jit
def cascade_kernel(q_ptr, k_ptr, v_ptr, prompt_ptr, own_ptr, o_ptr, lse_ptr, prefix_programs, prefix_len,
                   suffix_start, suffix_len, scale, sqb, sqh, skb, skh, sks, svb, svh, svs, sob, soh, sos, slb, slh,
                   WIDTH: tl.constexpr, REP: tl.constexpr, TILE: tl.constexpr, TILES: tl.constexpr,
                   OWN_TILE: tl.constexpr, D: tl.constexpr, PREFIX_SPLITS: tl.constexpr,
                   OWN_SPLITS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    # programs [0, prefix_programs): (block x query tile, range) over the block's prompt keys, all its
    # WIDTH rows x query heads in tiles of TILE; then (row, range) over each row's own keys
    after_predecessor(PDL)
    pid, kvh = tl.program_id(0), tl.program_id(1)
    if pid < prefix_programs:
        blk_tile, part = pid // PREFIX_SPLITS, pid % PREFIX_SPLITS
        attend_range(q_ptr, k_ptr, v_ptr, prompt_ptr, o_ptr, lse_ptr, blk_tile // TILES, blk_tile % TILES,
                     kvh, part, 0, prefix_len, 0, scale, sqb, sqh, skb, skh, sks, svb, svh, svs, sob, soh,
                     sos, slb, slh, ROWS=WIDTH, REP=REP, TILE=TILE, D=D, SPLITS=PREFIX_SPLITS, BLOCK=BLOCK,
                     LOWER=False)
    else:
        own = pid - prefix_programs
        attend_range(q_ptr, k_ptr, v_ptr, own_ptr, o_ptr, lse_ptr, own // OWN_SPLITS, 0, kvh,
                     own % OWN_SPLITS, suffix_start, suffix_len, PREFIX_SPLITS, scale, sqb, sqh, skb, skh, sks,
                     svb, svh, svs, sob, soh, sos, slb, slh, ROWS=1, REP=REP, TILE=OWN_TILE, D=D,
                     SPLITS=OWN_SPLITS, BLOCK=BLOCK, LOWER=True)


@triton.jit
def merge_kernel(o_ptr, lse_ptr, out_ptr, sob, soh, sos, slb, slh, sxb, sxh,
                 D: tl.constexpr, PARTS: tl.constexpr, PARTS_POW2: tl.constexpr, PDL: tl.constexpr):
    after_predecessor(PDL)
    b, h = tl.program_id(0), tl.program_id(1)
    parts = tl.arange(0, PARTS_POW2)
    used = parts < PARTS
    d = tl.arange(0, D)
    lse = tl.load(lse_ptr + b * slb + h * slh + parts, mask=used, other=float("-inf"))
    w = tl.exp(lse - tl.max(lse, 0))  # the first range always holds a key: the max is finite
    o = tl.load(o_ptr + b * sob + h * soh + parts[:, None] * sos + d[None, :], mask=used[:, None], other=0.0)
    out = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
    tl.store(out_ptr + b * sxb + h * sxh + d, out.to(out_ptr.dtype.element_ty))
