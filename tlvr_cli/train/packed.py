"""The LLM's forward over one flat, unpadded micro-batch: each prompt once, then completions that
attend to their prompt's keys/values and to their own prefix.

The G completions of a GRPO group share a ~614-token prompt (512 visual tokens). Run as G padded
rows, that prompt goes through every layer G times and every row pays for the longest one's
padding. Here the micro-batch is one sequence of tokens::

    [prompt 0][prompt 1] ... [completion 0][completion 1] ...

Norms, projections, rotary and the MLP act per token, so they see each token once and no padding.
Attention is where the rows meet: a prompt attends causally to itself, a completion to all of its
prompt's tokens and causally to its own (the bottom-right-aligned causal mask of a query block that
continues its key block). The prompt's keys and values carry autograd history, so the backward
sums the gradients of all completions into the prompt's activations — the same loss and gradients
as one prompt copy per row, up to floating-point summation order. Positions continue after the
prompt, as in the padded rows.

Attention runs as a varlen flash kernel on CUDA in fp16/bf16 (flash-attn's where it is installed,
else PyTorch's own), otherwise as PyTorch SDPA over the sequences padded to the longest (padding
inside attention only; the layers around it stay unpadded).

The decoder layers' own modules are called (as the engine does, ``engine/layers.py``), so the
checkpoint keys and LoRA wrappers are untouched; gradient checkpointing is applied here per layer
when the layer has it enabled. FSDP2's sharded layers only gather their weights inside their own
``forward``, so a sharded model keeps the padded path (``grpo_step``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers.models.qwen2.modeling_qwen2 import repeat_kv

from ..engine.attention import aligned
from ..engine.generate import COMPILE_DEVICES
from ..engine.layers import attn_in, attn_out, compiled_halves, mark_dynamic, rms_norm
from ..errors import TlvrError
from ..runtime import host_to_device


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[index]`` along dim 0 through ``index_select``: its backward (``index_add_``) sums repeated rows
    in a fixed order on CPU, where advanced indexing's parallel accumulation does not (resumed runs must
    match bit for bit)."""
    return x.index_select(0, index.flatten()).view(*index.shape, *x.shape[1:])


@dataclass
class PackedLayout:
    """Token counts of one flat micro-batch: prompts first, then completions (``completion_prompt``
    names the prompt each completion continues)."""

    prompt_lens: list[int]
    completion_lens: list[int]
    completion_prompt: list[int]

    @property
    def prompt_starts(self) -> list[int]:
        return _starts(self.prompt_lens, 0)

    @property
    def completion_starts(self) -> list[int]:
        return _starts(self.completion_lens, sum(self.prompt_lens))

    @property
    def total(self) -> int:
        return sum(self.prompt_lens) + sum(self.completion_lens)

    def positions(self, device: torch.device) -> torch.Tensor:
        """(1, T) rotary positions: a prompt from 0, a completion from its prompt's length."""
        parts = [torch.arange(n) for n in self.prompt_lens]
        parts += [self.prompt_lens[p] + torch.arange(n) for n, p in zip(self.completion_lens, self.completion_prompt)]
        return host_to_device(torch.cat(parts), device)[None]

    def sequences(self) -> list[tuple[int, int, list[tuple[int, int]]]]:
        """Attention sequences in flat order: (query start, query count, key ranges (start, count))."""
        p_start = self.prompt_starts
        out = [(s, n, [(s, n)]) for s, n in zip(p_start, self.prompt_lens) if n]
        for s, n, p in zip(self.completion_starts, self.completion_lens, self.completion_prompt):
            if n:
                out.append((s, n, [(p_start[p], self.prompt_lens[p]), (s, n)]))
        return out


def _starts(lens: list[int], first: int) -> list[int]:
    out, at = [], first
    for n in lens:
        out.append(at)
        at += n
    return out


@functools.cache
def _flash_attn_package():
    """flash-attn's varlen kernel, or None where the package is not installed."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def _torch_flash_varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout: float, scale: float) -> torch.Tensor:
    """PyTorch's own flash-attention kernel over packed sequences (the one nested-tensor SDPA runs, with its
    backward): fewer key/value heads than query heads as they are, causal aligned to the bottom right."""
    return torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, dropout, True, False,
                                                   scale=scale)[0]


def _flash_varlen(device: torch.device):
    """Causal varlen attention ``(q, k, v, cu_q, cu_k, max_q, max_k, dropout, scale) -> out`` on ``device``:
    flash-attn's kernel where the package is installed, else PyTorch's (CUDA, compute capability 8.0 or
    newer, its flash backend enabled), else None."""
    if device.type != "cuda":
        return None
    package = _flash_attn_package()
    if package is not None:
        return lambda q, k, v, cu_q, cu_k, max_q, max_k, dropout, scale: package(
            q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=dropout, softmax_scale=scale, causal=True)
    if torch.backends.cuda.flash_sdp_enabled() and torch.cuda.get_device_capability(device) >= (8, 0):
        return _torch_flash_varlen
    return None


def varlen_attention_kernel(device: torch.device, dtype: torch.dtype) -> str | None:
    """The varlen flash kernel the flat forward runs for tensors on ``device`` in ``dtype`` ("flash-attn" or
    "PyTorch flash"), or None where SDPA runs."""
    if dtype not in (torch.float16, torch.bfloat16) or _flash_varlen(device) is None:
        return None
    return "flash-attn" if _flash_attn_package() is not None else "PyTorch flash"


class PackedAttention:
    """Attention over a layout's sequences; the index tensors are built once, on the host (copied without
    a host-device synchronization), and used by every layer."""

    def __init__(self, layout: PackedLayout, device: torch.device, varlen: bool) -> None:
        seqs = layout.sequences()
        keys = [torch.cat([torch.arange(s, s + n) for s, n in ranges]) for _, _, ranges in seqs]
        self.varlen = varlen
        if varlen:
            self.kernel = _flash_varlen(device)
            if self.kernel is None:
                raise ValueError(f"no varlen flash kernel on {device}")
            q_lens = torch.tensor([n for _, n, _ in seqs])
            k_lens = torch.tensor([len(k) for k in keys])
            self.cu_q = host_to_device(F.pad(q_lens.cumsum(0), (1, 0)).to(torch.int32), device)
            self.cu_k = host_to_device(F.pad(k_lens.cumsum(0), (1, 0)).to(torch.int32), device)
            self.max_q, self.max_k = int(q_lens.max()), int(k_lens.max())
            self.k_index = host_to_device(torch.cat(keys), device)
            return
        # prompts and completions padded separately: they differ in length, one padded batch would waste more
        first = sum(1 for _, _, ranges in seqs if len(ranges) == 1)
        buckets = (_SdpaBucket(seqs[:first], keys[:first], device), _SdpaBucket(seqs[first:], keys[first:], device))
        self.buckets = [b for b in buckets if b.size]

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, dropout: float) -> torch.Tensor:
        """q (T, heads, hd), k/v (T, kv_heads, hd) of the flat tokens → (T, heads·hd)."""
        t = q.shape[0]
        if self.varlen:
            k, v = gather_rows(k, self.k_index), gather_rows(v, self.k_index)
            o = self.kernel(q.contiguous(), k, v, self.cu_q, self.cu_k, self.max_q, self.max_k, dropout, scale)
            return o.reshape(t, -1)
        rep = q.shape[1] // k.shape[1]
        outs = []
        for b in self.buckets:
            qb = gather_rows(q, b.q_index).transpose(1, 2)  # (J, heads, Q, hd)
            kb = repeat_kv(gather_rows(k, b.k_index).transpose(1, 2), rep)
            vb = repeat_kv(gather_rows(v, b.k_index).transpose(1, 2), rep)
            o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=b.mask, dropout_p=dropout, scale=scale)
            outs.append(gather_rows(o.transpose(1, 2).flatten(0, 1), b.keep).flatten(1))
        return torch.cat(outs)


class _SdpaBucket:
    """Sequences padded to (J, Q) queries and (J, K) keys with a boolean mask; ``keep`` picks the real
    queries back out in flat order."""

    def __init__(self, seqs: list, keys: list[torch.Tensor], device: torch.device) -> None:
        self.size = len(seqs)
        if not seqs:
            return
        q_start = torch.tensor([s for s, _, _ in seqs])
        q_len = torch.tensor([n for _, n, _ in seqs])
        k_len = torch.tensor([len(k) for k in keys])
        qmax, kmax = aligned(int(q_len.max())), aligned(int(k_len.max()))  # a few shapes: see SHAPE_ALIGN
        qpos, kpos = torch.arange(qmax), torch.arange(kmax)
        # padded query slots repeat the sequence's last query; their outputs are dropped by ``keep``
        self.q_index = host_to_device(q_start[:, None] + torch.minimum(qpos[None], q_len[:, None] - 1), device)
        k_index = torch.zeros(len(seqs), kmax, dtype=torch.long)
        for j, k in enumerate(keys):
            k_index[j, : len(k)] = k
        self.k_index = host_to_device(k_index, device)
        # query t of a sequence sees its first (k_len - q_len + t + 1) keys: the prompt, then its own causal prefix
        causal = kpos[None, None] <= (k_len - q_len)[:, None, None] + qpos[None, :, None]
        visible = causal & (kpos[None, None] < k_len[:, None, None])
        self.mask = host_to_device(visible[:, None], device)
        self.keep = host_to_device((qpos[None] < q_len[:, None]).flatten().nonzero().squeeze(1), device)


def _decoder_layer(layer: torch.nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   attend: PackedAttention, halves: tuple) -> torch.Tensor:
    """One Qwen2 decoder layer (the maths of ``Qwen2DecoderLayer.forward``) over the flat tokens (1, T, D),
    its two halves around attention ``halves`` (``attn_in``, ``attn_out`` or their compiled twins)."""
    attn = layer.self_attn
    cfg = attn.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    q, k, v = halves[0](layer, x, cos, sin, heads, kv_heads, attn.head_dim)
    dropout = cfg.attention_dropout if layer.training else 0.0
    o = attend(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), attn.scaling, dropout)
    return halves[1](layer, x, mark_dynamic(o[None], 1))


def packed_hidden(decoder: torch.nn.Module, embeds: torch.Tensor, layout: PackedLayout, *,
                  varlen: bool | None = None, compile: bool = False) -> torch.Tensor:
    """Final-norm hidden states (T, D) of the flat token embeddings ``embeds`` (T, D) laid out as
    ``layout``, through ``decoder`` (a Qwen2Model). ``varlen`` None: a flash kernel where one can run.
    ``compile`` (on ``COMPILE_DEVICES``): the layers' halves around attention through ``layers.compiled_halves``."""
    cfg = decoder.config
    sliding = any(t != "full_attention" for t in getattr(cfg, "layer_types", None) or [])
    if sliding or getattr(cfg, "use_sliding_window", False):
        raise TlvrError("perf.shared_prompt / perf.packing need full attention in every layer; "
                        "set perf.shared_prompt=false perf.packing=false for this model")
    if embeds.shape[0] != layout.total:
        raise ValueError(f"{embeds.shape[0]} token embeddings for a layout of {layout.total} tokens")
    if varlen is None:
        varlen = varlen_attention_kernel(embeds.device, embeds.dtype) is not None
    attend = PackedAttention(layout, embeds.device, varlen)
    halves = (attn_in, attn_out)
    if compile and embeds.device.type in COMPILE_DEVICES:
        halves = compiled_halves()
    x = embeds[None]
    cos, sin = decoder.rotary_emb(x, layout.positions(embeds.device))
    for t in (x, cos, sin):  # the token count changes every micro-batch: one dynamic graph for all
        mark_dynamic(t, 1)
    for layer, again in zip(decoder.layers[: cfg.num_hidden_layers], checkpointed_layers(decoder, layout.total)):
        if again:
            # non-reentrant, as apply_tuning asks of Hugging Face's own checkpointing
            x = checkpoint(_decoder_layer, layer, x, cos, sin, attend, halves, use_reentrant=False)
        else:
            x = _decoder_layer(layer, x, cos, sin, attend, halves)
    return rms_norm(decoder.norm, x)[0]


def checkpointed_layers(decoder: torch.nn.Module, tokens: int) -> list[bool]:
    """Which decoder layers a forward over ``tokens`` flat tokens recomputes in backward: with gradients
    enabled, the training layers with gradient checkpointing on (``setup.apply_tuning``), less the last
    ``uncheckpointed_tokens // tokens`` (the decoder's attribute, 0 when unset), so that the activations
    kept stay within that many layer-tokens."""
    layers = decoder.layers[: decoder.config.num_hidden_layers]
    grad = torch.is_grad_enabled()
    flags = [grad and bool(getattr(layer, "gradient_checkpointing", False)) and layer.training for layer in layers]
    keep = getattr(decoder, "uncheckpointed_tokens", 0) // max(tokens, 1)
    return [f and i < len(flags) - keep for i, f in enumerate(flags)]
