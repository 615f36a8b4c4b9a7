"""How many rows an engine can hold: its KV cache per row against the free device memory."""

from __future__ import annotations

import torch

# max_batch=0 sizes the engine from memory: the rows whose KV cache fits in this share of the free
# device memory after a reserve for prefill and vision-tower activations, at most AUTO_ROWS_CAP rows
# (past that a decode step reads more cache than weights and longer steps stretch the tail of a run);
# on CPU, where decoding is compute-bound and more rows only add latency, AUTO_ROWS_CPU
AUTO_MEMORY_FRACTION = 0.9
AUTO_RESERVE_BYTES = 4 << 30
AUTO_ROWS_CAP = 256
AUTO_ROWS_CPU = 8


def kv_cache_bytes_per_row(lm: torch.nn.Module, max_seq_len: int) -> int:
    """Bytes of one engine slot: its keys and values at every layer for ``max_seq_len`` positions,
    plus the per-row decode buffers (logits in the model's dtype and float32, sampling candidates)."""
    cfg = lm.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    size = lm.model.embed_tokens.weight.element_size()
    cache = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * max_seq_len * size
    return cache + cfg.vocab_size * (size + 8)


def free_device_bytes(device: torch.device) -> int:
    """Memory a new allocation on CUDA ``device`` can take: free on the device plus what torch caches unused."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def auto_max_batch(lm: torch.nn.Module, max_seq_len: int, *, extra_bytes: int = 0, cap: int = AUTO_ROWS_CAP,
                   free_bytes: int | None = None) -> int:
    """Rows an engine over ``lm`` can hold in ``free_bytes`` (default: the device memory free now, or
    ``AUTO_ROWS_CPU`` off CUDA) when ``extra_bytes`` more are needed besides the cache (e.g. weight
    copies). At least 1, at most ``cap``."""
    if free_bytes is None:
        device = lm.model.embed_tokens.weight.device
        if device.type != "cuda":
            return max(1, min(cap, AUTO_ROWS_CPU))
        free_bytes = free_device_bytes(device)
    budget = free_bytes * AUTO_MEMORY_FRACTION - AUTO_RESERVE_BYTES - extra_bytes
    return max(1, min(cap, int(budget // kv_cache_bytes_per_row(lm, max_seq_len))))
