"""Attention over a split set of keys: each part attended on its own, returning its output and
log-sum-exp, and the parts merged exactly (the online-softmax identity flash attention uses between
key blocks). Cascade decoding (``layers.cascade_layer``) attends a group's shared prompt once for all
of the group's rows and each row's own generated tokens separately, then merges the two.

Softmax and outputs are float32 until the merge is done; probabilities are rounded to the value dtype
for the second product, as flash attention rounds them. On CUDA both products accumulate and write
float32 (``fp32_products``), so 16-bit scores are never rounded either; elsewhere (CPU, whose tests run
float32) the products are computed in the inputs' dtype.

Also the one rule for padded attention lengths that vary between calls (``SHAPE_ALIGN``, ``aligned``).
"""

from __future__ import annotations

import functools

import torch
from torch.torch_version import TorchVersion

HALF = (torch.float16, torch.bfloat16)

# padded attention lengths (prefill prompts, the training forward's query and key blocks) are rounded
# up to a multiple of this: cuDNN's attention builds an execution plan for every new shape, so lengths
# that vary step to step must fall on a few shapes (and SDPA's memory-efficient kernel wants a mask's
# last dimension aligned to 16). Measured on an H200, completions of 64-512 tokens: 6.2 -> 5.0 s per
# GRPO step
SHAPE_ALIGN = 64


def aligned(n: int) -> int:
    """``n`` rounded up to a multiple of ``SHAPE_ALIGN``."""
    return -(-n // SHAPE_ALIGN) * SHAPE_ALIGN


# torch.compile lowers bmm(..., out_dtype=float32) only from 2.10 (pytorch/pytorch#165892); before
# that a compiled caller keeps its products in the inputs' dtype
COMPILED_FP32_PRODUCTS = (2, 10)


@functools.cache
def fp32_products(device: torch.device, compiled: bool) -> bool:
    """Whether ``torch.bmm(..., out_dtype=torch.float32)`` runs on half inputs on ``device`` (CUDA only),
    inside ``torch.compile`` too when ``compiled``: then scores are never rounded to 16 bits. Decided
    eagerly, once, so a compiled caller sees a constant; elsewhere products are in the inputs' dtype."""
    if device.type != "cuda" or (compiled and TorchVersion(torch.__version__) < COMPILED_FP32_PRODUCTS):
        return False
    try:
        a = torch.ones(1, 2, 8, device=device, dtype=torch.bfloat16)
        return torch.bmm(a, a.transpose(1, 2), out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError):
        return False


def _product(a: torch.Tensor, b: torch.Tensor, fp32: bool) -> torch.Tensor:
    """``a @ b`` over (B, H, M, K) x (B, H, K, N) in float32; ``fp32``: accumulated and written in float32
    by one batched GEMM (no 16-bit rounding of the result), else computed in the inputs' dtype."""
    if not fp32 or a.dtype not in HALF:
        return torch.matmul(a, b).float()
    batch = a.shape[:2]
    out = torch.bmm(a.flatten(0, 1), b.flatten(0, 1), out_dtype=torch.float32)
    return out.unflatten(0, batch)


def partial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
                      fp32: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of queries (B, H, M, D) over keys/values (B, H, N, D) under the additive float32
    ``mask`` (broadcast to (B, H, M, N)); returns the float32 output (B, H, M, D) and the log-sum-exp
    of the scaled, masked scores (B, H, M, 1). Every query must see at least one key."""
    s = _product(q, k.transpose(-1, -2), fp32) * scale + mask
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    p = torch.exp(s - lse).to(v.dtype)
    return _product(p, v, fp32), lse


def merge_partials(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The attention over the union of two disjoint key sets from each set's (output, log-sum-exp):
    each output weighs by its share of the total softmax mass."""
    (oa, la), (ob, lb) = a, b
    total = torch.logaddexp(la, lb)
    return oa * torch.exp(la - total) + ob * torch.exp(lb - total)
