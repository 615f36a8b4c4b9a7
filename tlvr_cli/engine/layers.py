"""The maths of one Qwen2 decoder layer over a Hugging Face layer's own modules, as the engine runs
it: prefill halves (``attn_in`` / ``attn_out``, attention in between) and the one-token decode step
(``decode_layer``: cache write, GQA attention under an additive mask) and its cascade variant for
rows that share a prompt (``cascade_layer``), optionally on concatenated q|k|v and gate|up weights,
optionally on one rank's tensor-parallel shard of the layer (``group``: the partial sums of the
row-parallel o_proj and down_proj are all-reduced); plus the shared ``torch.compile``s of the decode step
and of the training forward's halves."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

from ..runtime import use_compile_cache
from .attention import merge_partials, partial_attention
from .sampling import sample_keyed
from .split_k import Splits, partials, summed, swiglu
from .split_kv import cascade_attention, split_kv_attention


def rms_norm(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` for a Qwen2 RMSNorm, normalised in one kernel (torch's ``rms_norm``; the module runs
    six, each a pass over x in fp32) and rounded to x's dtype before its weight multiplies it, as the
    module rounds. Any other norm module (or a sharded weight) runs as itself."""
    weight, eps = getattr(norm, "weight", None), getattr(norm, "variance_epsilon", None)
    if type(weight) is not torch.nn.Parameter or not isinstance(eps, float):
        return norm(x)
    return weight * F.rms_norm(x, weight.shape, eps=eps)


def attn_in(layer: torch.nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int,
            head_dim: int, fused: tuple | None = None,
            splits: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A decoder layer up to attention: input norm, q/k/v projections (one GEMM with ``fused`` =
    (q|k|v weight, q|k|v bias or None, ...); ``splits`` > 1 runs it as ``split_k`` partials, which a
    compiled layer sums in the rotary's kernel), rotary; returns (B, heads, N, head_dim) tensors."""
    attn = layer.self_attn
    h = rms_norm(layer.input_layernorm, x)
    b, n, _ = h.shape
    if fused is not None and not torch.compiler.is_compiling():
        # eager, where a step's kernel count bounds one row: q and k rotated as one tensor (half the
        # rotary kernels); compiled, the rotary is fused into a kernel either way
        qkv = linear(h, fused[0], fused[1], splits).view(b, n, heads + 2 * kv_heads, head_dim)
        q, k = rotate_heads(qkv[:, :, :heads + kv_heads], cos, sin).split([heads, kv_heads], dim=2)
        return q.transpose(1, 2), k.transpose(1, 2), qkv[:, :, heads + kv_heads:].transpose(1, 2)
    if fused is None:
        q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
    else:
        sizes = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
        q, k, v = linear(h, fused[0], fused[1], splits).split(sizes, dim=-1)
    q = q.view(b, n, heads, head_dim).transpose(1, 2)
    k = k.view(b, n, kv_heads, head_dim).transpose(1, 2)
    v = v.view(b, n, kv_heads, head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return q, k, v


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, splits: int) -> torch.Tensor:
    """``F.linear``, or with ``splits`` > 1 its ``split_k`` partials summed."""
    return F.linear(x, weight, bias) if splits == 1 else summed(partials(x, weight, splits), x.dtype, bias)


def rotate_heads(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Hugging Face's rotary embedding (``x * cos + rotate_half(x) * sin``) of ``x`` (B, N, heads,
    head_dim) at ``cos`` / ``sin`` (B, N, head_dim), bit for bit: ``rotate_half(x) * sin`` is
    ``cat(x2, x1) * cat(-sin1, sin2)`` (a negation is exact), so the sign moves onto the small sin."""
    half = x.shape[-1] // 2
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    return x * cos + torch.cat((x[..., half:], x[..., :half]), dim=-1) * sin


def sum_over_ranks(t: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """``t`` summed over the tensor-parallel ranks (in place), or ``t`` itself without a group."""
    if group is not None:
        # in-place c10d all-reduce: cheapest in eager, capturable in a CUDA graph on NCCL, and
        # dynamo rewrites it into a traceable functional collective under torch.compile
        dist.all_reduce(t, group=group)
    return t


Residual = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def attn_out(layer: torch.nn.Module, x: torch.Tensor, o: torch.Tensor, fused: tuple | None = None,
             group: dist.ProcessGroup | None = None, defer: bool = False, splits: Splits | None = None) -> Residual:
    """The rest of a decoder layer from the attention output ``o`` (B, N, heads * head_dim); with
    ``fused`` = (..., gate|up weight) the MLP's gate and up projections are one GEMM. With a
    tensor-parallel ``group`` o_proj and down_proj hold a slice of their input columns, so their
    outputs are partial sums: one all-reduce after attention and one after the MLP. ``defer``: return
    the residual stream and the MLP's output unsummed, (x, mlp), for the next layer to add (``resume``).
    ``splits`` (with ``fused``, no ``group``): o_proj and down_proj as ``split_k`` partials, o_proj's
    summed in the residual add (a compiled layer's norm kernel), down_proj's in ``resume`` (a deferred
    mlp of float32 partials, (splits, B, N, D)); gate|up and its SiLU in ``split_k.swiglu``."""
    if splits is None:
        x = x + sum_over_ranks(layer.self_attn.o_proj(o), group)
    else:
        x = x + linear(o, layer.self_attn.o_proj.weight, None, splits.o)
    h = rms_norm(layer.post_attention_layernorm, x)
    if fused is None:
        mlp = sum_over_ranks(layer.mlp(h), group)
    else:
        if splits is not None and splits.swiglu:
            act = swiglu(h, fused[2])
        else:
            gate, up = F.linear(h, fused[2]).chunk(2, dim=-1)
            act = layer.mlp.act_fn(gate) * up
        if splits is not None and splits.down_partials:
            mlp = partials(act, layer.mlp.down_proj.weight, splits.down)
        else:
            mlp = sum_over_ranks(layer.mlp.down_proj(act), group)
    return (x, mlp) if defer else resume((x, mlp))


def resume(x: Residual) -> torch.Tensor:
    """The residual stream from a layer's output: a deferred (x, mlp) pair is summed here, where a
    compiled decode layer fuses the add into its input norm (one kernel per layer fewer than adding
    at the end of the previous layer); an mlp of ``split_k`` partials is summed first."""
    if not isinstance(x, tuple):
        return x
    x, mlp = x
    return x + (summed(mlp, x.dtype) if mlp.dim() > x.dim() else mlp)


def decode_layer(layer: torch.nn.Module, x: Residual, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor,
                 heads: int, kv_heads: int, head_dim: int, fused: tuple | None = None,
                 group: dist.ProcessGroup | None = None, split_kv: bool = False,
                 defer: bool = False, splits: Splits | None = None) -> Residual:
    """One decoder layer for one new token per row ``x`` (B, 1, D), or a previous layer's deferred
    output (``attn_out``'s ``defer``; this layer's output is deferred too with ``defer``): writes row
    ``rows[j]``'s key/value at ``pos[j]`` into the layer's caches (max_batch, kv_heads, max_seq_len,
    head_dim) and attends over their first B rows and kv_len = ``mask.shape[-1]`` positions under the
    additive ``mask``.
    ``fused`` = (q|k|v weight, q|k|v bias or None, gate|up weight): the same maths in two GEMMs fewer.
    With a tensor-parallel ``group``, ``heads`` and ``kv_heads`` are this rank's (see ``attn_out``).
    ``split_kv``: attention in ``split_kv.split_kv_attention`` over each row's keys ``<= pos`` (the
    mask's keys, without reading the masked ones), where ``split_kv_available``.
    ``splits``: the GEMMs in ``split_k``'s Triton kernels (``attn_in``, ``attn_out``; with ``fused``)."""
    x = resume(x)
    b = x.shape[0]
    q, k, v = attn_in(layer, x, cos, sin, heads, kv_heads, head_dim, fused, splits.qkv if splits else 1)
    k_cache[rows, :, pos] = k[:, :, 0]
    v_cache[rows, :, pos] = v[:, :, 0]
    # one query per row, so a kv head's query group fits in the "sequence" dim: GQA without copying keys
    q = q.reshape(b, kv_heads, heads // kv_heads, head_dim)
    kv_len = mask.shape[-1]
    if split_kv:
        o = split_kv_attention(q, k_cache, v_cache, pos + 1, kv_len, head_dim ** -0.5)
    else:
        o = F.scaled_dot_product_attention(q, k_cache[:b, :, :kv_len], v_cache[:b, :, :kv_len], attn_mask=mask)
    return attn_out(layer, x, o.reshape(b, 1, heads * head_dim), fused, group, defer, splits)


def cascade_layer(layer: torch.nn.Module, x: Residual, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, rows: torch.Tensor, new_pos: torch.Tensor, prefix_mask: torch.Tensor,
                  suffix_mask: torch.Tensor, heads: int, kv_heads: int, head_dim: int, width: int, fp32: bool,
                  fused: tuple | None = None, group: dist.ProcessGroup | None = None,
                  prompt_lens: torch.Tensor | None = None, defer: bool = False,
                  splits: Splits | None = None) -> Residual:
    """``decode_layer`` for rows in groups of ``width`` consecutive rows that share a prompt. Group g's
    prompt keys/values sit once at [0, L_g) of cache row g; row r's own tokens grow down from the end of
    cache row r (its j-th new token at index max_seq_len - 1 - j, so the window of the last N indices
    holds the first N new tokens whatever the prompt lengths). Writes each row's key/value at its
    ``new_pos``, attends the group's prompt (the first ``prefix_mask.shape[-1]`` indices of the first
    ``prefix_mask.shape[0]`` cache rows, masked by ``prefix_mask``) and the row's own tokens (the last
    ``suffix_mask.shape[-1]`` indices, masked by ``suffix_mask``) separately and merges them exactly.
    With ``prompt_lens`` (the blocks' prompt lengths, which ``prefix_mask`` encodes) both are attended in
    ``split_kv.cascade_attention`` instead, without reading the masked keys, where ``split_kv_available``.
    ``x``, ``defer`` and ``splits`` as in ``decode_layer``."""
    x = resume(x)
    b = x.shape[0]
    q, k, v = attn_in(layer, x, cos, sin, heads, kv_heads, head_dim, fused, splits.qkv if splits else 1)
    at = k_cache.shape[2] - 1 - new_pos
    k_cache[rows, :, at] = k[:, :, 0]
    v_cache[rows, :, at] = v[:, :, 0]
    groups, rep, scale = prefix_mask.shape[0], heads // kv_heads, head_dim ** -0.5
    if prompt_lens is not None:
        o = cascade_attention(q.reshape(b, kv_heads, rep, head_dim), k_cache, v_cache, prompt_lens,
                              prefix_mask.shape[-1], at, suffix_mask.shape[-1], scale)
        return attn_out(layer, x, o.reshape(b, 1, heads * head_dim), fused, group, defer, splits)
    # a group's rows are extra queries against the one copy of its prompt: (groups, kv_heads, width * rep)
    qp = q.reshape(groups, width, kv_heads, rep, head_dim).transpose(1, 2).reshape(groups, kv_heads, -1, head_dim)
    n = prefix_mask.shape[-1]
    prefix = partial_attention(qp, k_cache[:groups, :, :n], v_cache[:groups, :, :n], prefix_mask, scale, fp32)
    prefix = tuple(t.reshape(groups, kv_heads, width, rep, -1).transpose(1, 2).reshape(b, kv_heads, rep, -1)
                   for t in prefix)
    start = k_cache.shape[2] - suffix_mask.shape[-1]
    own = partial_attention(q.reshape(b, kv_heads, rep, head_dim), k_cache[:b, :, start:], v_cache[:b, :, start:],
                            suffix_mask, scale, fp32)
    o = merge_partials(prefix, own).to(x.dtype)
    return attn_out(layer, x, o.reshape(b, 1, heads * head_dim), fused, group, defer, splits)


def decode_options() -> dict:
    """Inductor's options for the decode step: its kernels as programmatic dependent launches where the
    GPU has them (inductor checks: Hopper and later), as tlvr's own kernels launch
    (``split_kv.launch_keywords``); none with a torch whose inductor lacks the option."""
    import torch._inductor.config as inductor

    return {"triton.enable_pdl": True} if hasattr(inductor.triton, "enable_pdl") else {}


@functools.cache
def compiled_decode() -> tuple[Callable, Callable]:
    """The compiled decoder layer and sampler, shared by every engine (compiled code is cached per
    wrapper: a new wrapper per engine would recompile and soon hit dynamo's recompile limit)."""
    # the persistent cache directory must be in place before the first compile reads or writes it
    use_compile_cache()
    # not fullgraph: should a long-lived process exhaust dynamo's recompile limit, the layer runs eager
    # instead of failing
    options = decode_options()
    return torch.compile(decode_layer, options=options), torch.compile(sample_keyed, options=options)


@functools.cache
def compiled_cascade() -> Callable:
    """The compiled ``cascade_layer``, shared by every engine like ``compiled_decode``."""
    use_compile_cache()
    return torch.compile(cascade_layer, options=decode_options())


@functools.cache
def compiled_halves() -> tuple[Callable, Callable]:
    """``attn_in`` and ``attn_out`` compiled for the training forward (``train/packed.py``), forward and
    backward (the norms, rotary, SwiGLU, biases and residual adds around the GEMMs fused), shared like
    ``compiled_decode``."""
    use_compile_cache()
    return torch.compile(attn_in), torch.compile(attn_out)


def mark_dynamic(t: torch.Tensor, *dims: int) -> torch.Tensor:
    """Tell the compiler up front that these dims (rows, key length, cache sizes) vary: one dynamic
    graph then serves every engine size and step instead of a recompile per new size (dynamo stops
    compiling a function after ``recompile_limit`` variants and runs it eager)."""
    for d in dims:
        torch._dynamo.maybe_mark_dynamic(t, d)
    return t
