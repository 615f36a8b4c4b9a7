"""The Triton kernels of ``top_k.py`` (imported only where Triton is installed): the maxima of each row's
spans (``maxima_kernel``), their k-th largest as the row's threshold (``threshold_kernel``), the keys at
or above it gathered (``collect_kernel``) and sorted (``finish_kernel``), which selects exactly, by
bisection, where more than the candidates' capacity were gathered.

Logits are compared as order-preserving 16-bit keys (``load_keys``). A row's scratch (``s_ptr``, two
int32): the number of candidates gathered, the threshold. A candidate is packed in an int64 as
(key << 32) | (0x7FFFFFFF - index): a larger packed value is a larger key, or an equal key at a lower
index."""

import triton
import triton.language as tl

from .split_kv_kernels import after_predecessor


@triton.jit
def load_keys(x_ptr, row, sxr, offs, V):
    # the 16-bit floats at ``offs`` of ``row`` as keys 0..65535, a larger float a larger key (the sign
    # bit flipped for positives, every bit for negatives; -0 is +0); -1 past the row's end
    bits = tl.load(x_ptr + row * sxr + offs, mask=offs < V, other=0).to(tl.int32) & 0xFFFF
    bits = tl.where(bits == 0x8000, 0, bits)
    key = tl.where(bits >= 0x8000, bits ^ 0xFFFF, bits ^ 0x8000)
    return tl.where(offs < V, key, -1)


@triton.jit
def pack(key, offs):
    return (key.to(tl.int64) << 32) | (0x7FFFFFFF - offs).to(tl.int64)


@triton.jit
def maxima_kernel(x_ptr, m_ptr, V, sxr, smr, SPANS: tl.constexpr, SPAN: tl.constexpr, PDL: tl.constexpr):
    # program (chunk, row): the largest key of each of the chunk's SPANS spans of SPAN logits
    after_predecessor(PDL)
    chunk, row = tl.program_id(0), tl.program_id(1)
    span = chunk * SPANS + tl.arange(0, SPANS)
    key = load_keys(x_ptr, row, sxr, span[:, None] * SPAN + tl.arange(0, SPAN)[None, :], V)
    tl.store(m_ptr + row * smr + span, tl.max(key, 1))


@triton.jit
def threshold_kernel(m_ptr, s_ptr, M, smr, K, M_POW2: tl.constexpr, PDL: tl.constexpr):
    # program ``row``: the K-th largest of the row's M span maxima (-1 with fewer spans), a key at or
    # below the K-th largest key (the K spans' maxima are K keys at or above it); no candidates yet
    after_predecessor(PDL)
    row = tl.program_id(0)
    i = tl.arange(0, M_POW2)
    maxima = tl.sort(tl.load(m_ptr + row * smr + i, mask=i < M, other=-1), descending=True)
    tl.store(s_ptr + row * 2, 0)
    kth = tl.sum(tl.where(i == K - 1, maxima, 0), 0)
    tl.store(s_ptr + row * 2 + 1, tl.where(K <= M, kth, -1))


@triton.jit
def collect_kernel(x_ptr, s_ptr, c_ptr, V, sxr, CAP: tl.constexpr, CHUNK: tl.constexpr, PDL: tl.constexpr):
    # program (chunk, row): the chunk's keys at or above the row's threshold, packed with their index into
    # the row's first CAP candidate slots (in no particular order: a slot per key from an atomic count,
    # which goes on past CAP; relaxed: the slots need only be distinct)
    after_predecessor(PDL)
    chunk, row = tl.program_id(0), tl.program_id(1)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    key = load_keys(x_ptr, row, sxr, offs, V)
    keep = key >= tl.load(s_ptr + row * 2 + 1)
    slot = tl.atomic_add(s_ptr + row * 2 + tl.zeros_like(offs), 1, mask=keep, sem="relaxed")
    tl.store(c_ptr + row * CAP + slot, pack(key, offs), mask=keep & (slot < CAP))


@triton.jit
def count_at_or_above(x_ptr, row, sxr, V, key_min, CHUNK: tl.constexpr):
    n = 0
    for start in range(0, V, CHUNK):
        n += tl.sum((load_keys(x_ptr, row, sxr, start + tl.arange(0, CHUNK), V) >= key_min).to(tl.int32), 0)
    return n


@triton.jit
def finish_kernel(x_ptr, s_ptr, c_ptr, val_ptr, idx_ptr, V, sxr, K, CAP: tl.constexpr, CHUNK: tl.constexpr,
                  PDL: tl.constexpr):
    # program ``row``: the candidates sorted by key, then index, and the first K written as 16-bit floats
    # and indices. Where more than CAP were gathered (the spans' maxima were a loose threshold, or
    # thousands of logits are equal), the K-th largest key is bisected in scans of the row instead and the
    # keys above it, then the lowest-indexed of those equal to it, gathered in one more scan
    after_predecessor(PDL)
    row = tl.program_id(0)
    cands = c_ptr + row * CAP
    n = tl.load(s_ptr + row * 2)
    if n > CAP:
        lo, hi = 0, 65536  # at least K keys at or above lo (every key is), fewer than K at or above hi
        for _ in range(16):
            mid = (lo + hi) // 2
            enough = count_at_or_above(x_ptr, row, sxr, V, mid, CHUNK) >= K
            lo = tl.where(enough, mid, lo)
            hi = tl.where(enough, hi, mid)
        need = K - count_at_or_above(x_ptr, row, sxr, V, lo + 1, CHUNK)  # of the keys equal to lo
        taken = 0
        ties = 0
        for start in range(0, V, CHUNK):
            offs = start + tl.arange(0, CHUNK)
            key = load_keys(x_ptr, row, sxr, offs, V)
            tie = (key == lo).to(tl.int32)
            take = (key > lo) | ((tie > 0) & (ties + tl.cumsum(tie, 0) <= need))
            take_i = take.to(tl.int32)
            tl.store(cands + taken + tl.cumsum(take_i, 0) - 1, pack(key, offs), mask=take)
            taken += tl.sum(take_i, 0)
            ties += tl.sum(tie, 0)
        tl.debug_barrier()
        n = K
    slots = tl.arange(0, CAP)
    packed = tl.sort(tl.load(cands + slots, mask=slots < n, other=-1), descending=True)
    key = (packed >> 32).to(tl.int32)
    bits = tl.where(key >= 0x8000, key ^ 0x8000, key ^ 0xFFFF)
    index = 0x7FFFFFFF - (packed & 0x7FFFFFFF).to(tl.int32)
    tl.store(val_ptr + row * K + slots, bits.to(tl.int16), mask=slots < K)
    tl.store(idx_ptr + row * K + slots, index.to(tl.int64), mask=slots < K)
