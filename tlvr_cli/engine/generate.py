"""Batched KV-cache generation over a Hugging Face ``Qwen2ForCausalLM``'s own modules.

The engine owns a static cache ``(layers, max_batch, kv_heads, max_seq_len, head_dim)`` in the
model's dtype. Slot ``s`` holds one sequence left-aligned: token ``j`` sits at cache index ``j``
and has RoPE position ``j``, so a decode step writes each row's new key at its own position and
attends over ``[0, kv_len)`` with a boolean mask ``key_index <= position``. Sequences are admitted
whenever a slot is free (continuous batching): a prompt is prefilled once, and its keys/values are
copied into each of its ``num_samples`` rows. Row ``r`` draws its token at position ``p`` with the
uniform ``keyed_uniform(row_seed(seed, r), p)``, so samples do not depend on ``max_batch`` or on
which rows share a step.

A decode step (forward, sampling, writing the sampled token and the next position back into the
step's own input buffers, and into a token history) is one CUDA graph on GPU; the host replays it
``sync_every`` times, then reads the history once to handle eos, finished rows and refills.

Norms, MLPs, projections and the rotary table are the HF modules' own; only attention and the
cache are ours, so numerics follow HF's eager/SDPA path in the model's dtype. Sliding-window
attention is not implemented (Qwen2.5-3B does not use it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

from .sampling import SamplingParams, sample_keyed

KV_LEN_BUCKET = 256  # attention reads the cache in chunks of this many keys: fewer CUDA graphs, aligned masks
SYNC_EVERY = 16  # decode steps between host reads of the sampled tokens


@dataclass
class Completion:
    """New tokens of one output row; eos is not included, ``finished`` says generation stopped on it."""

    tokens: list[int]
    finished: bool


@dataclass
class _Prefill:
    keys: torch.Tensor  # (layers, kv_heads, L, head_dim)
    values: torch.Tensor
    logits: torch.Tensor  # (1, vocab) float32, for the first new token
    rows_left: int  # rows of this prompt still waiting for a slot


def row_seed(seed: int, row: int) -> int:
    """Seed of output row ``row``'s generator: a fixed mix of the call's seed and the row index."""
    return (seed * 0x9E3779B97F4A7C15 + (row + 1) * 0xBF58476D1CE4E5B9) % (2**63)


class Engine:
    """Generate from prompt embeddings with a static KV cache, shared prefills and continuous batching."""

    def __init__(self, lm: torch.nn.Module, *, max_batch: int = 8, max_seq_len: int = 4096, cuda_graphs: bool = False):
        cfg = lm.config
        layer_types = getattr(cfg, "layer_types", None) or []
        if getattr(cfg, "use_sliding_window", False) or any(t != "full_attention" for t in layer_types):
            raise ValueError("Engine supports full attention only; this config uses sliding-window layers")
        if max_batch < 1 or max_seq_len < 2:
            raise ValueError(f"Engine needs max_batch >= 1 and max_seq_len >= 2, got {max_batch} and {max_seq_len}")
        self.lm = lm
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len
        self.cuda_graphs = cuda_graphs
        self.n_layers = cfg.num_hidden_layers
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self._k: torch.Tensor | None = None  # allocated on first use, on the model's device and dtype
        self._v: torch.Tensor | None = None
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self._graph_params: tuple[int, ...] = ()
        self._graph_pool = None
        # static decode state the graphs replay: rows (token, position, seed), the token history and its column
        self._state: torch.Tensor | None = None
        self._hist: torch.Tensor | None = None
        self._col: torch.Tensor | None = None

    # ---------------------------------------------------------------- cache and graphs

    def _ensure_cache(self, device: torch.device, dtype: torch.dtype) -> None:
        if self._k is not None and self._k.device == device and self._k.dtype == dtype:
            return
        shape = (self.n_layers, self.max_batch, self.n_kv_heads, self.max_seq_len, self.head_dim)
        # zeros, not empty: masked keys get weight 0, and 0 * NaN from stale garbage would still be NaN
        self._k = torch.zeros(shape, device=device, dtype=dtype)
        self._v = torch.zeros(shape, device=device, dtype=dtype)
        self._state = torch.zeros(3, self.max_batch, dtype=torch.long, device=device)
        self._hist = torch.zeros(self.max_batch, SYNC_EVERY, dtype=torch.long, device=device)
        self._col = torch.zeros((), dtype=torch.long, device=device)
        self._graphs.clear()

    def _use_graphs(self, device: torch.device) -> bool:
        if not (self.cuda_graphs and device.type == "cuda"):
            return False
        # graphs hold raw pointers: if a parameter tensor was replaced (not updated in place), recapture
        params = tuple(p.data_ptr() for p in self.lm.parameters())
        if params != self._graph_params:
            self._graphs.clear()
            self._graph_params = params
        return True

    def release(self) -> None:
        """Free the KV cache and captured graphs (they are rebuilt on the next call)."""
        self._k = self._v = self._state = self._hist = self._col = None
        self._graphs.clear()

    # ---------------------------------------------------------------- model maths

    def _qkv(self, attn: torch.nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, _ = h.shape
        q = attn.q_proj(h).view(b, n, self.n_heads, self.head_dim).transpose(1, 2)
        k = attn.k_proj(h).view(b, n, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = attn.v_proj(h).view(b, n, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return q, k, v

    def _prefill(self, emb: torch.Tensor) -> _Prefill:
        """Causal forward over one prompt (L, D); keeps its keys/values and the last position's logits."""
        model = self.lm.model
        x = emb[None]
        n = x.shape[1]
        cos, sin = model.rotary_emb(x, torch.arange(n, device=x.device)[None])
        rep = self.n_heads // self.n_kv_heads
        keys, values = [], []
        for layer in model.layers:
            attn = layer.self_attn
            q, k, v = self._qkv(attn, layer.input_layernorm(x))
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            keys.append(k[0])
            values.append(v[0])
            o = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), is_causal=True)
            x = x + attn.o_proj(o.transpose(1, 2).reshape(1, n, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        logits = self.lm.lm_head(model.norm(x[:, -1:]))[:, -1].float()
        return _Prefill(torch.stack(keys), torch.stack(values), logits, 0)

    def _decode_step(self, tok: torch.Tensor, pos: torch.Tensor, kv_len: int) -> torch.Tensor:
        """One token for slots ``0..B-1``: input ids ``tok`` (B,) at positions ``pos`` (B,); returns logits (B, V)."""
        model = self.lm.model
        b = tok.shape[0]
        x = model.embed_tokens(tok)[:, None]
        cos, sin = model.rotary_emb(x, pos[:, None])
        rows = torch.arange(b, device=tok.device)
        mask = (torch.arange(kv_len, device=tok.device)[None] <= pos[:, None])[:, None, None, :]
        groups = self.n_heads // self.n_kv_heads
        for i, layer in enumerate(model.layers):
            attn = layer.self_attn
            q, k, v = self._qkv(attn, layer.input_layernorm(x))
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            self._k[i][rows, :, pos] = k[:, :, 0]
            self._v[i][rows, :, pos] = v[:, :, 0]
            # one query per row, so a kv head's query group fits in the "sequence" dim: GQA without copying keys
            q = q.reshape(b, self.n_kv_heads, groups, self.head_dim)
            o = F.scaled_dot_product_attention(q, self._k[i, :b, :, :kv_len], self._v[i, :b, :, :kv_len], attn_mask=mask)
            x = x + attn.o_proj(o.reshape(b, 1, self.n_heads * self.head_dim))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.lm.lm_head(model.norm(x))[:, 0]

    def _decode_sample(self, b: int, kv_len: int, params: SamplingParams) -> None:
        """One step for slots ``0..b-1`` from the state buffers: sample, record, advance (no host sync)."""
        tok, pos, seeds = self._state[0, :b], self._state[1, :b], self._state[2, :b]
        logits = self._decode_step(tok, pos, kv_len)
        new = sample_keyed(logits, params, seeds, pos)
        self._hist[:b].index_copy_(1, self._col.view(1), new[:, None])
        self._col.add_(1)
        tok.copy_(new)
        # a finished row may run a few steps past its end before the host notices: stay inside the cache
        pos.copy_((pos + 1).clamp(max=self.max_seq_len - 1))

    def _run_steps(self, b: int, kv_len: int, params: SamplingParams, n: int, graphs: bool) -> None:
        self._col.zero_()
        if not graphs:
            for _ in range(n):
                self._decode_sample(b, kv_len, params)
            return
        key = (b, kv_len, params.temperature, params.top_k, params.top_p)
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._capture(b, kv_len, params)
            self._graphs[key] = graph
        for _ in range(n):
            graph.replay()

    def _capture(self, b: int, kv_len: int, params: SamplingParams) -> torch.cuda.CUDAGraph:
        # warm up on a side stream (as torch.cuda.graph requires) on a copy of the state, so the
        # replays start from the state the host set
        saved = (self._state.clone(), self._hist.clone(), self._col.clone())
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._decode_sample(b, kv_len, params)
        torch.cuda.current_stream().wait_stream(side)
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool, capture_error_mode="thread_local"):
            self._decode_sample(b, kv_len, params)
        for buf, old in zip((self._state, self._hist, self._col), saved):
            buf.copy_(old)
        return graph

    # ---------------------------------------------------------------- public API

    def generate(
        self,
        prompts: list[torch.Tensor],
        params: SamplingParams,
        max_new_tokens: int,
        eos_token_id: int | list[int],
        *,
        num_samples: int = 1,
        seed: int = 0,
        on_token: Callable[[int, int], None] | None = None,
        ignore_eos: bool = False,
    ) -> list[Completion]:
        """Complete each prompt embedding (L_i, D) ``num_samples`` times; results are prompt-major.

        ``on_token(row, token)`` sees every sampled token, eos included.
        """
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        for i, p in enumerate(prompts):
            if p.dim() != 2 or p.shape[0] == 0:
                raise ValueError(f"prompt {i}: expected embeddings of shape (L, D) with L >= 1, got {tuple(p.shape)}")
            if p.shape[0] + max_new_tokens > self.max_seq_len:
                raise ValueError(
                    f"prompt {i} has {p.shape[0]} tokens; with max_new_tokens={max_new_tokens} it needs "
                    f"{p.shape[0] + max_new_tokens} cache positions but the engine's max_seq_len is {self.max_seq_len} "
                    f"(prompts may be at most {self.max_seq_len - max_new_tokens} tokens)")
        n_rows = len(prompts) * num_samples
        out = [Completion([], False) for _ in range(n_rows)]
        if n_rows == 0 or max_new_tokens <= 0:
            return out
        eos = set() if eos_token_id is None else {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
        weight = self.lm.model.embed_tokens.weight
        device, dtype = weight.device, weight.dtype
        self._ensure_cache(device, dtype)
        graphs = self._use_graphs(device)
        seeds = torch.tensor([row_seed(seed, r) for r in range(n_rows)], dtype=torch.long, device=device)
        sync_every = 4 if on_token is not None else SYNC_EVERY  # streaming wants small chunks

        def emit(row: int, token: int) -> bool:
            """Record one token; True when the row is done."""
            if on_token is not None:
                on_token(row, token)
            if token in eos and not ignore_eos:
                out[row].finished = True
                return True
            out[row].tokens.append(token)
            return len(out[row].tokens) >= max_new_tokens

        slot_row = [-1] * self.max_batch  # output row decoded in each slot, -1 when free
        slot_pos = [0] * self.max_batch  # position of the slot's next input token (= its cache index)
        prefills: dict[int, _Prefill] = {}
        next_row = 0
        state = self._state
        with torch.no_grad():
            while True:
                for s in range(self.max_batch):
                    while slot_row[s] < 0 and next_row < n_rows:
                        row, next_row = next_row, next_row + 1
                        p = row // num_samples
                        if p not in prefills:
                            prefills[p] = self._prefill(prompts[p].to(device=device, dtype=dtype))
                            prefills[p].rows_left = num_samples
                        pre = prefills[p]
                        n = pre.keys.shape[2]
                        token = int(sample_keyed(pre.logits, params, seeds[row:row + 1],
                                                 torch.tensor([n - 1], device=device))[0])
                        pre.rows_left -= 1
                        if pre.rows_left == 0:
                            del prefills[p]
                        if emit(row, token):
                            continue  # done after one token: the slot stays free for the next row
                        self._k[:, s, :, :n] = pre.keys
                        self._v[:, s, :, :n] = pre.values
                        state[:, s] = torch.tensor([token, n, int(seeds[row])], device=device)
                        slot_row[s], slot_pos[s] = row, n
                active = [s for s in range(self.max_batch) if slot_row[s] >= 0]
                if not active:
                    break
                # decode the smallest power-of-two prefix of slots that covers every active one; free
                # slots inside it decode garbage that is never read (their state is reset on refill)
                b = min(self.max_batch, 1 << (active[-1]).bit_length())
                left = max(max_new_tokens - len(out[slot_row[s]].tokens) for s in active)
                steps = max(1, min(sync_every, left))
                kv_len = min(self.max_seq_len, -(-(max(slot_pos[s] for s in active) + steps) // KV_LEN_BUCKET) * KV_LEN_BUCKET)
                self._run_steps(b, kv_len, params, steps, graphs)
                hist = self._hist[:b, :steps].tolist()
                for s in active:
                    for token in hist[s]:
                        if emit(slot_row[s], token):
                            slot_row[s] = -1
                            break
                    slot_pos[s] += steps
        return out
