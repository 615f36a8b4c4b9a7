"""Batched KV-cache generation over a Hugging Face ``Qwen2ForCausalLM``'s own modules.

The engine owns a static cache, per layer ``(max_batch, kv_heads, max_seq_len, head_dim)`` in the
model's dtype. Slot ``s`` holds one sequence left-aligned: token ``j`` sits at cache index ``j``
and has RoPE position ``j``, so a decode step writes each row's new key at its own position and
attends over ``[0, kv_len)`` (a ``KV_LEN_BUCKET`` multiple or the whole cache, ``_kv_len``) under an additive mask
``key_index <= position``. Sequences are admitted whenever a slot is free (continuous batching):
the prompts of the admitted rows are prefilled together (right-padded, causal), each once, and a
prompt's keys/values are copied into each of its ``num_samples`` rows. Row ``r`` draws its token
at position ``p`` with the uniform ``keyed_uniform(row_seed(seed, key_r), p)`` (``key_r = r``
unless the caller gives keys), so samples do not depend on ``max_batch``, on which rows share a
step, or on how a batch is split across processes. ``generate_stream`` pulls requests lazily, only
when a slot frees, and yields each row as it finishes, so a caller can keep the engine full over a
whole benchmark while producing prompts on the way; ``generate`` is that stream over a list.

A decode step (forward, sampling, writing the sampled token and the next position back into the
step's own input buffers, and into a token history) is one CUDA graph on GPU; the host replays it
``sync_every`` times, then reads the history once to handle eos, finished rows and refills. With
``compile=True`` (GPU) the decoder layer is one ``torch.compile``d function shared by all layers
(norms, rotary, cache writes and residuals fused), reading concatenated q|k|v and gate|up weight
copies that are refreshed from the model at every ``generate`` call. With ``copy_weights=True`` the
engine decodes from its own copy of the whole model (refreshed likewise; the fused buffers are that
copy's weights), so captured graphs stay valid when the model's parameters move between calls, as
FSDP2's gathered parameters do. A ``WeightSource`` (``weights.py``, ``weights=``) decides what that copy
holds: the parameters it calls static are read in place, the others are written by the source at
every call (LoRA training merges its adapters there, ``train/lora.py``, leaving the model untouched).

With ``tp_group`` the engine decodes tensor-parallel (``tensor_parallel.py``): each rank of the group
keeps its own shard of the model (1/N of the heads and MLP columns, refreshed from the full model at
every call) and a KV cache of its KV heads, and every rank decodes all rows: two all-reduces per
layer, the same full logits and the same keyed draws on every rank, so the host loop (eos, refills,
step counts) runs identically everywhere. Every rank must call ``generate`` with the same arguments.

Norms, MLPs, projections and the rotary table are the HF modules' own (the layer maths are in
``layers.py``); only attention and the cache are ours, so numerics follow HF's eager/SDPA path in
the model's dtype. Sliding-window
attention is not implemented (Qwen2.5-3B does not use it).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .layers import attn_in, attn_out, compiled_decode, decode_layer, mark_dynamic
from .sampling import SamplingParams, sample_keyed
from .sizing import auto_max_batch
from .tensor_parallel import TensorParallel, assert_same, fingerprint
from .weights import ModelWeights, WeightCopy, WeightSource, fused_parts

KV_LEN_BUCKET = 64  # attention reads the cache in chunks of this many keys: fewer CUDA graphs, aligned masks
# a step reads its rows' whole cache when that costs at most this share of the weight reads: one CUDA
# graph per row count (one question: one capture instead of one per bucket the answer passes through)
FULL_CACHE_SHARE = 1 / 32
SYNC_EVERY = 16  # decode steps between host reads of the sampled tokens
COMPILE_DEVICES = ("cuda",)  # where ``compile=True`` takes effect (elsewhere the engine runs eager)
PREFILL_TOKENS = 16384  # padded prompt tokens per batched prefill forward


@dataclass
class Completion:
    """New tokens of one output row; eos is not included, ``finished`` says generation stopped on it."""

    tokens: list[int]
    finished: bool


@dataclass
class Request:
    """One prompt for ``Engine.generate_stream``: its embeddings (L, D) and one sampling key per
    output row (``len(keys)`` completions share one prefill)."""

    prompt: torch.Tensor
    keys: Sequence[int]  # row j samples with row_seed(seed, keys[j]): e.g. a stable hash of the item
    tag: Any = None  # returned with the completions (e.g. the question it answers)


@dataclass
class Finished:
    """One output row of ``Engine.generate_stream``, yielded when it finishes."""

    request: Request
    sample: int  # which of the request's keys
    row: int  # output row number, in pull order (request-major)
    completion: Completion


@dataclass
class _Row:
    row: int
    request_no: int  # position of its request in the stream
    request: Request
    sample: int
    seed: int
    completion: Completion = field(default_factory=lambda: Completion([], False))


@dataclass
class _Prefill:
    keys: torch.Tensor  # (layers, kv_heads, L, head_dim)
    values: torch.Tensor
    logits: torch.Tensor  # (1, vocab) float32, for the first new token
    rows_left: int  # rows of this prompt still waiting for a slot


def _weight_copy_bytes(lm: torch.nn.Module, compile: bool, fuse_weights: bool, copy_weights: bool) -> int:
    """Bytes of the weights the engine copies on the GPU: the whole model, or the fused q|k|v and gate|up buffers."""
    if copy_weights:
        return sum(p.numel() * p.element_size() for p in lm.parameters())
    if not (compile and fuse_weights and lm.model.embed_tokens.weight.device.type in COMPILE_DEVICES):
        return 0
    parts = [getattr(mod, attr) for layer in lm.model.layers for mods, attr in fused_parts(layer) for mod in mods]
    return sum(t.numel() * t.element_size() for t in parts if t is not None)


def row_seed(seed: int, row: int) -> int:
    """Seed of output row ``row``'s generator: a fixed mix of the call's seed and the row index."""
    return (seed * 0x9E3779B97F4A7C15 + (row + 1) * 0xBF58476D1CE4E5B9) % (2**63)


class Engine:
    """Generate from prompt embeddings with a static KV cache, shared prefills and continuous batching.
    ``max_batch=0`` sizes the cache from free device memory (``auto_max_batch``).

    With ``tp_group`` (one rank per device; ``lm`` holds the full current weights on every rank) the
    engine decodes tensor-parallel over the group; see the module docstring."""

    def __init__(self, lm: torch.nn.Module, *, max_batch: int = 8, max_seq_len: int = 4096, cuda_graphs: bool = False,
                 compile: bool = False, fuse_weights: bool = True, copy_weights: bool = False,
                 weights: WeightSource | None = None,
                 tp_group: dist.ProcessGroup | None = None, check_agreement: bool = True):
        cfg = lm.config
        layer_types = getattr(cfg, "layer_types", None) or []
        if getattr(cfg, "use_sliding_window", False) or any(t != "full_attention" for t in layer_types):
            raise ValueError("Engine supports full attention only; this config uses sliding-window layers")
        if max_batch < 0 or max_seq_len < 2:
            raise ValueError(f"Engine needs max_batch >= 0 (0: auto) and max_seq_len >= 2, got {max_batch} and "
                             f"{max_seq_len}")
        self.lm = lm
        if max_batch == 0:
            copies = _weight_copy_bytes(lm, compile, fuse_weights, copy_weights)
            max_batch = auto_max_batch(lm, max_seq_len, extra_bytes=copies)
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len
        self.cuda_graphs = cuda_graphs
        # torch.compile fuses each layer's norms, rotary and residual adds into a few kernels: one
        # compiled function serves all layers (parameters are inputs, not constants)
        self.compile = compile
        self._layer = decode_layer
        self._sample = sample_keyed
        # with compile: concatenated q|k|v and gate|up weights (copies, refreshed from the model at
        # every generate call, so optimizer steps are seen) make each decode step 3 GEMMs shorter
        self.fuse_weights = fuse_weights
        self._fused: list[tuple] | None = None
        # copy_weights: decode from the engine's own copy of the model, refreshed from ``lm`` at every
        # generate call, so captured graphs survive parameters that move between calls (FSDP2 gathers
        # them into fresh memory every step); the fused q|k|v and gate|up buffers are that copy's weights
        # tp_group: decode from this rank's shard of the model (always a copy); check_agreement: all-gather
        # each call's inputs and, at every host sync, the sampled tokens (a few KB), so that ranks which
        # diverge fail at once instead of hanging in mismatched collectives
        self.tp = TensorParallel.over(tp_group, lm) if tp_group is not None else None
        self.check_agreement = check_agreement
        # weights: what the copy holds (``weights.py``; LoRA training writes its merged projections there)
        self.copy_weights = copy_weights or self.tp is not None or weights is not None
        self.weights: WeightSource = weights if weights is not None else ModelWeights(lm)
        self._weight_copy: WeightCopy | None = None
        self._copy: torch.nn.Module | None = None  # the copy's model
        world = self.tp.world if self.tp else 1
        self.n_layers = cfg.num_hidden_layers
        self.n_heads = cfg.num_attention_heads // world  # this rank's heads
        self.n_kv_heads = cfg.num_key_value_heads // world
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        # rows x positions of cache (keys and values of every layer) that weigh FULL_CACHE_SHARE of the weights
        per_position = self.n_layers * 2 * self.n_kv_heads * self.head_dim
        self._full_cache_rows = int(sum(p.numel() for p in lm.parameters()) / world * FULL_CACHE_SHARE) // per_position
        self._k: list[torch.Tensor] = []  # per layer, allocated on first use on the model's device and dtype
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
        if self._k and self._k[0].device == device and self._k[0].dtype == dtype:
            return
        # one tensor per layer (not views of one), so the compiled layer sees the same static cache
        # shape in every layer; zeros, not empty: masked keys get weight 0, but 0 * NaN is still NaN
        shape = (self.max_batch, self.n_kv_heads, self.max_seq_len, self.head_dim)
        self._k = [mark_dynamic(torch.zeros(shape, device=device, dtype=dtype), 0, 2) for _ in range(self.n_layers)]
        self._v = [mark_dynamic(torch.zeros(shape, device=device, dtype=dtype), 0, 2) for _ in range(self.n_layers)]
        self._state = torch.zeros(3, self.max_batch, dtype=torch.long, device=device)
        self._hist = torch.zeros(self.max_batch, SYNC_EVERY, dtype=torch.long, device=device)
        self._col = torch.zeros((), dtype=torch.long, device=device)
        self._fused = self._copy = self._weight_copy = None
        self._graphs.clear()

    def _use_graphs(self, device: torch.device) -> bool:
        if not (self.cuda_graphs and device.type == "cuda"):
            return False
        # graphs hold raw pointers: if a parameter tensor was replaced (not updated in place), recapture
        params = tuple(p.data_ptr() for p in self._lm.parameters())
        if params != self._graph_params:
            self._graphs.clear()
            self._graph_pool = None  # a pool whose graphs are all gone cannot take new captures
            self._graph_params = params
        return True

    @property
    def _lm(self) -> torch.nn.Module:
        """The model the decode reads: ``lm`` itself, or the engine's copy of it."""
        return self._copy if self._copy is not None else self.lm

    def _sync_copy(self, device: torch.device, dtype: torch.dtype, fused: bool) -> None:
        """Refresh the engine's copy (or shard) from its weight source; built on first use, with ``fused``
        each layer's q/k/v and gate/up weights are views into one concatenated buffer (no second copy)."""
        if self._weight_copy is None:
            self._weight_copy = WeightCopy(self.lm, self.weights, device, dtype, self.tp, fused)
            self._copy, self._fused = self._weight_copy.model, self._weight_copy.fused
        else:
            self._weight_copy.refresh()

    @torch.no_grad()
    def _sync_fused(self) -> None:
        """Copy the current q/k/v and gate/up weights into the fused buffers (allocated on first use)."""
        fresh = self._fused is None
        if fresh:
            self._fused = [(None, None, None)] * self.n_layers
        for i, layer in enumerate(self.lm.model.layers):
            parts = [None if getattr(mods[0], attr) is None else [getattr(m, attr) for m in mods]
                     for mods, attr in fused_parts(layer)]
            if fresh:
                self._fused[i] = tuple(None if p is None else torch.cat(p) for p in parts)
            else:
                for p, buf in zip(parts, self._fused[i]):
                    if p is not None:
                        torch.cat(p, out=buf)

    def _agree(self, t: torch.Tensor, what: str) -> None:
        if self.tp is not None and self.check_agreement:
            assert_same(self.tp, t, what)

    @property
    def _group(self) -> dist.ProcessGroup | None:
        return self.tp.group if self.tp is not None else None

    def release(self) -> None:
        """Free the KV cache, weight copies and captured graphs (they are rebuilt on the next call)."""
        self._k, self._v = [], []
        self._state = self._hist = self._col = self._fused = self._copy = self._weight_copy = None
        self._graphs.clear()

    # ---------------------------------------------------------------- model maths

    def _prefill(self, embs: list[torch.Tensor]) -> list[_Prefill]:
        """Causal forward over prompts (L_i, D), batched (right-padded) up to ``PREFILL_TOKENS`` padded
        tokens at a time; keeps each prompt's keys/values and its last position's logits. Padding
        sits after every real token, so under the causal mask it changes nothing the prompt sees."""
        out: list[_Prefill] = []
        start = 0
        while start < len(embs):
            stop = start + 1
            while stop < len(embs) and (stop + 1 - start) * max(e.shape[0] for e in embs[start:stop + 1]) <= PREFILL_TOKENS:
                stop += 1
            out += self._prefill_batch(embs[start:stop])
            start = stop
        return out

    def _prefill_batch(self, embs: list[torch.Tensor]) -> list[_Prefill]:
        model = self._lm.model
        lens = [e.shape[0] for e in embs]
        n = max(lens)
        x = embs[0].new_zeros(len(embs), n, embs[0].shape[1])
        for i, e in enumerate(embs):
            x[i, :lens[i]] = e
        cos, sin = model.rotary_emb(x, torch.arange(n, device=x.device)[None])
        rep = self.n_heads // self.n_kv_heads
        keys, values = [], []
        for layer in model.layers:
            q, k, v = attn_in(layer, x, cos, sin, self.n_heads, self.n_kv_heads, self.head_dim)
            keys.append(k)
            values.append(v)
            o = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), is_causal=True)
            x = attn_out(layer, x, o.transpose(1, 2).reshape(len(embs), n, -1), group=self._group)
        last = x[torch.arange(len(embs), device=x.device), torch.tensor(lens, device=x.device) - 1]
        logits = self._lm.lm_head(model.norm(last)).float()
        keys, values = torch.stack(keys), torch.stack(values)  # (layers, B, kv_heads, n, head_dim)
        return [_Prefill(keys[:, i, :, :m], values[:, i, :, :m], logits[i:i + 1], 0) for i, m in enumerate(lens)]

    def _decode_step(self, tok: torch.Tensor, pos: torch.Tensor, kv_len: int) -> torch.Tensor:
        """One token for slots ``0..B-1``: input ids ``tok`` (B,) at positions ``pos`` (B,); returns logits (B, V)."""
        model = self._lm.model
        b = tok.shape[0]
        x = model.embed_tokens(tok)[:, None]
        cos, sin = model.rotary_emb(x, pos[:, None])
        rows = torch.arange(b, device=tok.device)
        valid = torch.arange(kv_len, device=tok.device)[None] <= pos[:, None]
        mask = torch.zeros(valid.shape, dtype=x.dtype, device=x.device).masked_fill_(~valid, float("-inf"))[:, None, None]
        for t in (x, cos, sin, rows, pos):
            mark_dynamic(t, 0)
        mark_dynamic(mask, 0, 3)
        for i, layer in enumerate(model.layers):
            x = self._layer(layer, x, cos, sin, self._k[i], self._v[i], rows, pos, mask,
                            self.n_heads, self.n_kv_heads, self.head_dim, self._fused[i] if self._fused else None,
                            self._group)
        return self._lm.lm_head(model.norm(x))[:, 0]

    def _decode_sample(self, b: int, kv_len: int, params: SamplingParams) -> None:
        """One step for slots ``0..b-1`` from the state buffers: sample, record, advance (no host sync)."""
        tok, pos, seeds = self._state[0, :b], self._state[1, :b], self._state[2, :b]
        logits = self._decode_step(tok, pos, kv_len)
        new = self._sample(mark_dynamic(logits, 0), params, mark_dynamic(seeds, 0), pos)
        self._hist[:b].index_copy_(1, self._col.view(1), new[:, None])
        self._col.add_(1)
        tok.copy_(new)
        # a finished row may run a few steps past its end before the host notices: stay inside the cache
        pos.copy_((pos + 1).clamp(max=self.max_seq_len - 1))

    def _kv_len(self, b: int, reach: int) -> int:
        """Cache positions a step over ``b`` rows attends to when its rows reach position ``reach``:
        all of them while that is cheap (see ``FULL_CACHE_SHARE``), else ``reach`` rounded up to a bucket."""
        if b * self.max_seq_len <= self._full_cache_rows:
            return self.max_seq_len  # masked keys weigh exactly 0: the same attention, one graph
        return min(self.max_seq_len, -(-reach // KV_LEN_BUCKET) * KV_LEN_BUCKET)

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
        row_keys: Sequence[int] | None = None,
        sync_every: int = SYNC_EVERY,
    ) -> list[Completion]:
        """Complete each prompt embedding (L_i, D) ``num_samples`` times; results are prompt-major.

        ``on_token(row, token)`` sees every sampled token, eos included. Output row ``r`` samples
        with ``row_seed(seed, row_keys[r])`` (default ``r``): give rows keys that do not depend on
        how work is split (e.g. dataset index) and they draw the same tokens in any split.
        ``sync_every`` (at most ``SYNC_EVERY``) decode steps run between host reads of the tokens:
        fewer reads are faster, streaming (``on_token``) wants smaller chunks.
        """
        _check_sync_every(sync_every)
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        for i, p in enumerate(prompts):  # all checked before any work, not when the stream reaches them
            self._check_prompt(i, p, max_new_tokens)
        n_rows = len(prompts) * num_samples
        if row_keys is not None and len(row_keys) != n_rows:
            raise ValueError(f"row_keys has {len(row_keys)} keys for {n_rows} output rows")
        if n_rows == 0 or max_new_tokens <= 0:
            return [Completion([], False) for _ in range(n_rows)]
        keys = list(range(n_rows)) if row_keys is None else list(row_keys)
        requests = [Request(p, keys[i * num_samples:(i + 1) * num_samples]) for i, p in enumerate(prompts)]
        out = [Completion([], False) for _ in range(n_rows)]
        for done in self.generate_stream(requests, params, max_new_tokens, eos_token_id, seed=seed, on_token=on_token,
                                         ignore_eos=ignore_eos, sync_every=sync_every):
            out[done.row] = done.completion
        return out

    def generate_stream(
        self,
        requests: Iterable[Request],
        params: SamplingParams,
        max_new_tokens: int,
        eos_token_id: int | list[int] | None,
        *,
        seed: int = 0,
        on_token: Callable[[int, int], None] | None = None,
        ignore_eos: bool = False,
        sync_every: int = SYNC_EVERY,
    ) -> Iterator[Finished]:
        """Complete a stream of requests, pulling the next one only when a slot frees (so prompts can
        be produced lazily, e.g. while videos decode) and yielding each output row as it finishes.

        Output rows are numbered in pull order (request-major), as ``on_token(row, token)`` and
        ``Finished.row`` see them; row ``j`` of a request samples with ``row_seed(seed, keys[j])``,
        so its tokens do not depend on what else is in flight. ``generate`` is this stream over a list.
        """
        _check_sync_every(sync_every)
        return self._stream(iter(requests), params, max_new_tokens, eos_token_id, seed, on_token, ignore_eos,
                            sync_every)

    def _check_prompt(self, i: int, p: torch.Tensor, max_new_tokens: int) -> None:
        if p.dim() != 2 or p.shape[0] == 0:
            raise ValueError(f"prompt {i}: expected embeddings of shape (L, D) with L >= 1, got {tuple(p.shape)}")
        if p.shape[0] + max_new_tokens > self.max_seq_len:
            raise ValueError(
                f"prompt {i} has {p.shape[0]} tokens; with max_new_tokens={max_new_tokens} it needs "
                f"{p.shape[0] + max_new_tokens} cache positions but the engine's max_seq_len is {self.max_seq_len} "
                f"(prompts may be at most {self.max_seq_len - max_new_tokens} tokens)")

    def _stream(self, source: Iterator[Request], params: SamplingParams, max_new_tokens: int,
                eos_token_id: int | list[int] | None, seed: int, on_token: Callable[[int, int], None] | None,
                ignore_eos: bool, sync_every: int) -> Iterator[Finished]:
        eos = set() if eos_token_id is None else {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
        pulled = next_row = 0  # requests taken from ``source``; output rows they make
        waiting: deque[_Row] = deque()  # rows pulled and not yet placed in a slot, in row order

        def pull(want: int) -> None:
            """Take requests from the source until ``want`` rows wait for a slot or the source ends."""
            nonlocal pulled, next_row
            while len(waiting) < want:
                req = next(source, None)
                if req is None:
                    return
                self._check_prompt(pulled, req.prompt, max_new_tokens)
                if not req.keys:
                    raise ValueError(f"request {pulled}: no keys, so no output rows")
                for j, key in enumerate(req.keys):
                    waiting.append(_Row(next_row, pulled, req, j, row_seed(seed, key)))
                    next_row += 1
                pulled += 1

        if max_new_tokens <= 0:  # nothing to generate: every row is empty, the model is not touched
            pull(1)
            while waiting:
                row = waiting.popleft()
                yield Finished(row.request, row.sample, row.row, row.completion)
                pull(1)
            return
        weight = self.lm.model.embed_tokens.weight
        device, dtype = weight.device, weight.dtype
        self._ensure_cache(device, dtype)
        compiled = self.compile and device.type in COMPILE_DEVICES
        if compiled:
            self._layer, self._sample = compiled_decode()
        if self.copy_weights:
            # a shard is always a copy, so its fused buffers cost nothing: fuse in eager too
            self._sync_copy(device, dtype, fused=self.fuse_weights and (compiled or self.tp is not None))
        elif compiled and self.fuse_weights:
            self._sync_fused()
        graphs = self._use_graphs(device)

        def emit(row: _Row, token: int) -> bool:
            """Record one token; True when the row is done."""
            if on_token is not None:
                on_token(row.row, token)
            if token in eos and not ignore_eos:
                row.completion.finished = True
                return True
            row.completion.tokens.append(token)
            return len(row.completion.tokens) >= max_new_tokens

        slot_row: list[_Row | None] = [None] * self.max_batch  # row decoded in each slot, None when free
        slot_pos = [0] * self.max_batch  # position of the slot's next input token (= its cache index)
        prefills: dict[int, _Prefill] = {}  # by request number, until all the request's rows are placed
        state = self._state
        with torch.no_grad():
            while True:
                # admission: fill every free slot with the next rows (continuous batching), prefilling
                # each of their prompts once; a prompt's prefill waits here until all its rows are placed
                free = [s for s in range(self.max_batch) if slot_row[s] is None]
                while free:
                    pull(len(free))
                    if not waiting:
                        break
                    window = [waiting.popleft() for _ in range(min(len(free), len(waiting)))]
                    todo = list(dict.fromkeys(r.request_no for r in window if r.request_no not in prefills))
                    firsts = {r.request_no: r.request for r in window}
                    embs = [firsts[n].prompt.to(device=device, dtype=dtype) for n in todo]
                    for n, pre in zip(todo, self._prefill(embs)):
                        pre.rows_left = len(firsts[n].keys)
                        prefills[n] = pre
                    # first tokens of the whole window in one draw; each prompt's keys/values copied
                    # into all its new slots at once; the slots' decode state set in one write
                    pres = [prefills[r.request_no] for r in window]
                    lens = [pre.keys.shape[2] for pre in pres]
                    seeds = torch.tensor([r.seed for r in window], dtype=torch.long, device=device)
                    if self.tp is not None and self.check_agreement:  # what the host loop's decisions depend on
                        settings = (max_new_tokens, params.temperature, params.top_k, params.top_p, ignore_eos,
                                    sync_every, self.max_batch, len(eos), sum(eos))
                        assert_same(self.tp, fingerprint([r.request.prompt for r in window], seeds, settings),
                                    "the prompts, seeds or settings")
                    first = sample_keyed(torch.cat([pre.logits for pre in pres]), params, seeds,
                                         torch.tensor(lens, device=device) - 1)
                    self._agree(first, "the first sampled tokens")
                    first = first.tolist()
                    placed: dict[int, list[int]] = {}
                    admitted, finished = [], []
                    for row, token, n in zip(window, first, lens):
                        if emit(row, token):
                            finished.append(row)  # done after one token: the slot stays free for the next row
                            continue
                        s = free.pop(0)
                        placed.setdefault(row.request_no, []).append(s)
                        admitted.append((s, token, n, row.seed))
                        slot_row[s], slot_pos[s] = row, n
                    for n, slots in placed.items():
                        pre, idx = prefills[n], torch.tensor(slots, device=device)
                        for i in range(self.n_layers):
                            self._k[i][idx, :, :pre.keys.shape[2]] = pre.keys[i]
                            self._v[i][idx, :, :pre.keys.shape[2]] = pre.values[i]
                    if admitted:
                        s_idx, *columns = zip(*admitted)
                        state[:, torch.tensor(s_idx, device=device)] = torch.tensor(columns, device=device)
                    for pre, row in zip(pres, window):
                        pre.rows_left -= 1
                        if pre.rows_left == 0:
                            del prefills[row.request_no]
                    for row in finished:
                        yield Finished(row.request, row.sample, row.row, row.completion)
                active = [s for s in range(self.max_batch) if slot_row[s] is not None]
                if not active:
                    break
                # decode the smallest power-of-two prefix of slots that covers every active one; free
                # slots inside it decode garbage that is never read (their state is reset on refill)
                b = min(self.max_batch, 1 << (active[-1]).bit_length())
                # several steps per host read (the device writes each step's tokens into the history);
                # attention reads only the keys any row can reach in them, rounded up to a bucket so
                # few distinct shapes (CUDA graphs) exist
                left = max(max_new_tokens - len(slot_row[s].completion.tokens) for s in active)
                steps = max(1, min(sync_every, left))
                reach = max(slot_pos[s] for s in active) + steps
                kv_len = self._kv_len(b, reach)
                self._run_steps(b, kv_len, params, steps, graphs)
                self._agree(self._hist[:b, :steps], "the sampled tokens")
                # a row that hit eos or its budget mid-chunk frees its slot; tokens after it are dropped
                hist = self._hist[:b, :steps].tolist()
                finished = []
                for s in active:
                    for token in hist[s]:
                        if emit(slot_row[s], token):
                            finished.append(slot_row[s])
                            slot_row[s] = None
                            break
                    slot_pos[s] += steps
                for row in finished:
                    yield Finished(row.request, row.sample, row.row, row.completion)


def _check_sync_every(sync_every: int) -> None:
    if not 1 <= sync_every <= SYNC_EVERY:
        raise ValueError(f"sync_every must be in 1..{SYNC_EVERY}, got {sync_every}")
