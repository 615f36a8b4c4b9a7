"""Log-probability of target tokens under ``softmax(h Wᵀ)`` without materialising full logits.

The vocabulary is processed in chunks of ``chunk_size`` rows: the forward keeps a running
log-sum-exp in fp32, the backward recomputes each chunk's logits and accumulates ∂h and ∂W. Peak
memory is (tokens × chunk) instead of (tokens × vocabulary); with Qwen2.5's 151,936-token vocabulary
that is the difference between ~600 MB and ~20 GB for a 64 × 512-token GRPO batch.

Logits are produced by the same matmul as the LM head (in the model's dtype) and then upcast, so the
values match ``log_softmax(lm_head(h).float())`` up to summation order; the backward's GEMMs also run
in the model's dtype (∂h accumulated in fp32 across chunks), as autograd through the LM head would.
"""

from __future__ import annotations

import torch

from ..engine.attention import HALF, fp32_products


class _ChunkedTokenLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        n = hidden.shape[0]
        lse = torch.full((n,), float("-inf"), device=hidden.device, dtype=torch.float32)
        picked = torch.zeros(n, device=hidden.device, dtype=torch.float32)
        for start in range(0, weight.shape[0], chunk):
            logits = (hidden @ weight[start:start + chunk].T).float()
            lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=-1))
            inside = (targets >= start) & (targets < start + logits.shape[1])
            idx = (targets - start).clamp(0, logits.shape[1] - 1)
            picked = torch.where(inside, logits.gather(1, idx[:, None]).squeeze(1), picked)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk = chunk
        return picked - lse

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        hidden, weight, targets, lse = ctx.saved_tensors
        chunk = ctx.chunk
        g = grad.float()
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        grad_w = torch.empty_like(weight) if need_w else None
        for start in range(0, weight.shape[0], chunk):
            w = weight[start:start + chunk]
            # d logp / d logits = onehot(target) - softmax, times the incoming gradient
            d = (hidden @ w.T).float().sub_(lse[:, None]).exp_().mul_(-g[:, None])
            # the one-hot term, added where the target falls in this chunk (0 added elsewhere: no host read)
            inside = (targets >= start) & (targets < start + w.shape[0])
            col = (targets - start).clamp(0, w.shape[0] - 1)
            d.scatter_add_(1, col[:, None], torch.where(inside, g, 0.0)[:, None])
            # the two GEMMs in the logits' dtype, as the LM head's own backward runs them (bf16 on the GPU
            # is ~10x fp32's speed); ∂h sums over vocabulary chunks, so its partial products stay fp32
            d = d.to(hidden.dtype)
            if need_h:
                grad_h = _add_product_fp32(grad_h, d, w)
            if need_w:
                grad_w[start:start + w.shape[0]] = d.T @ hidden  # each chunk's rows once: one rounding
        return (grad_h.to(hidden.dtype) if need_h else None, grad_w, None, None)


def _add_product_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``acc + a @ b`` in fp32 (``acc`` fp32): half-precision inputs go through the GEMM as they are,
    with an fp32 output, where torch supports it (CUDA; the release that gave bmm its ``out_dtype``
    gave it to addmm too); otherwise in fp32."""
    if a.dtype in HALF and fp32_products(a.device, compiled=False):
        return torch.addmm(acc, a, b, out_dtype=torch.float32)
    return acc.addmm_(a.float(), b.float())


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                   chunk_size: int = 4096) -> torch.Tensor:
    """``log softmax(hidden @ weightᵀ)[targets]`` in fp32; hidden (..., D), targets (...) → (...)."""
    shape = targets.shape
    out = _ChunkedTokenLogprob.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1), int(chunk_size))
    return out.view(shape)
