"""The engine's device side: the static KV cache, the decode-state buffers a step reads and writes, one
decode step (forward, sampling, bookkeeping) and its CUDA graphs.

Cache row ``s`` of every layer (``(max_batch, kv_heads, max_seq_len, head_dim)``) serves two layouts.
Plain: slot ``s`` holds one sequence left-aligned, token ``j`` at index ``j``, and a step attends over
``[0, kv_len)`` under ``key_index <= position``. Cascade (``CascadeShape``; the rows of a prompt in
blocks of ``width`` consecutive slots): block ``g``'s prompt sits once at ``[0, L_g)`` of cache row
``g`` and slot ``s``'s new tokens grow down from the end of cache row ``s`` (its ``j``-th at
``max_seq_len - 1 - j``), so that the two never overlap while ``L_g + max_new_tokens <= max_seq_len``
and a step attends ``[0, prefix)`` of its block and the last ``suffix`` indices of its own slot.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from .layers import mark_dynamic, resume, rms_norm
from .sampling import SamplingParams
from .split_k import MAX_ROWS, Splits
from .split_kv import split_kv_available
from .tensor_parallel import TensorParallel, assert_same

KV_LEN_BUCKET = 64  # attention reads the cache in chunks of this many keys: fewer CUDA graphs, aligned masks
# a step reads its rows' whole cache when that costs at most this share of the weight reads: one CUDA
# graph per row count (one question: one capture instead of one per bucket the answer passes through)
FULL_CACHE_SHARE = 1 / 32
# a cascade step's own keys (read once per row; its prompt keys once per block) in finer chunks: their
# rounding costs rows, not blocks, times the over-read
NEW_KEYS_BUCKET = 32
SYNC_EVERY = 16  # decode steps between host reads of the sampled tokens


class CascadeShape(NamedTuple):
    """The key lengths of a cascade step (``kv_len`` of a plain step): rows per block, prompt keys read
    per block, own keys read per row."""

    width: int
    prefix: int
    suffix: int


def _bucket(n: int, size: int = KV_LEN_BUCKET) -> int:
    return -(-n // size) * size


def _additive(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An additive attention mask (0 where ``valid``, -inf elsewhere) shaped (B, 1, 1, N) from (B, N)."""
    return torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill_(~valid, float("-inf"))[:, None, None]


class DecodeSteps:
    """The cache, state buffers, steps and graphs of ``Engine`` (mixed into it): the engine's constructor
    sets what is declared here, and provides ``_lm`` (the model decoded), ``_fused`` and ``_group``."""

    max_batch: int
    max_seq_len: int
    n_layers: int
    n_heads: int  # this rank's heads under tensor parallelism
    n_kv_heads: int
    head_dim: int
    cuda_graphs: bool
    tp: TensorParallel | None
    check_agreement: bool
    _full_cache_rows: int  # rows x positions of cache that a step reads whole (``FULL_CACHE_SHARE``)
    _layer: Callable  # layers.decode_layer, or its compiled twin
    _cascade: Callable  # layers.cascade_layer, likewise
    _sample: Callable  # sampling.sample_keyed, likewise
    _fp32: bool  # cascade products in float32 (``attention.fp32_products``)
    split_kv: bool  # decode attention in the ``split_kv`` kernels where they run ...
    _split_kv: bool  # ... which the cache's device and dtype and CUDA graphs decide
    _splits: Splits | None  # the compiled layer's GEMMs in ``split_k``'s Triton kernels, at most MAX_ROWS rows
    _k: list[torch.Tensor]  # per layer (max_batch, kv_heads, max_seq_len, head_dim)
    _v: list[torch.Tensor]
    _state: torch.Tensor | None
    _prompt_len: torch.Tensor | None
    _new_max: torch.Tensor | None
    _hist: torch.Tensor | None
    _col: torch.Tensor | None
    _graphs: dict[tuple, torch.cuda.CUDAGraph]

    def _ensure_cache(self, device: torch.device, dtype: torch.dtype) -> None:
        if self._k and self._k[0].device == device and self._k[0].dtype == dtype:
            return
        # one tensor per layer (not views of one), so the compiled layer sees the same static cache
        # shape in every layer; zeros, not empty: masked keys get weight 0, but 0 * NaN is still NaN
        shape = (self.max_batch, self.n_kv_heads, self.max_seq_len, self.head_dim)
        # under CUDA graphs only: eager, each step's two Triton launches per layer cost more host time than
        # the kernels save (64 rows x 512 tokens on an H200: 1,809-2,056 tok/s with them, 2,375 with SDPA)
        self._split_kv = self.split_kv and self.cuda_graphs and split_kv_available(device, dtype, self.head_dim)
        self._k = [mark_dynamic(torch.zeros(shape, device=device, dtype=dtype), 0, 2) for _ in range(self.n_layers)]
        self._v = [mark_dynamic(torch.zeros(shape, device=device, dtype=dtype), 0, 2) for _ in range(self.n_layers)]
        # rows (token, position, seed, position among the new tokens); per block its prompt length (at
        # least 1: a block a step decodes idle still attends to a key) and the cap on new positions
        self._state = torch.zeros(4, self.max_batch, dtype=torch.long, device=device)
        self._prompt_len = torch.ones(self.max_batch, dtype=torch.long, device=device)
        self._new_max = torch.zeros((), dtype=torch.long, device=device)
        self._hist = torch.zeros(self.max_batch, SYNC_EVERY, dtype=torch.long, device=device)
        self._col = torch.zeros((), dtype=torch.long, device=device)
        self._fused = self._copy = self._weight_copy = None
        self._graphs.clear()

    def _agree(self, t: torch.Tensor, what: str) -> None:
        """Under tensor parallelism (and ``check_agreement``), raise unless every rank holds the same ``t``."""
        if self.tp is not None and self.check_agreement:
            assert_same(self.tp, t, what)

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

    def _embed(self, tok: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        model = self._lm.model
        x = model.embed_tokens(tok)[:, None]
        cos, sin = model.rotary_emb(x, pos[:, None])
        return x, cos, sin

    def _step_splits(self, b: int) -> Splits | None:
        """The ``split_k`` GEMMs of a step over ``b`` rows, or None (cuBLAS)."""
        return self._splits if b <= MAX_ROWS else None

    @staticmethod
    def _deferred(x: torch.Tensor, splits: Splits | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The embeddings as a deferred residual (x, 0): each layer adds the previous one's MLP output in
        its own input norm (``layers.resume``), and every layer, the first included, takes the same
        input types (a zero of down_proj's float32 partials under ``splits``), so one compiled variant
        serves them all."""
        if splits is not None and splits.down_partials:
            return x, mark_dynamic(x.new_zeros(splits.down, *x.shape, dtype=torch.float32), 1)
        return x, mark_dynamic(torch.zeros_like(x), 0)

    def _decode_step(self, tok: torch.Tensor, pos: torch.Tensor, kv_len: int) -> torch.Tensor:
        """One token for slots ``0..B-1``: input ids ``tok`` (B,) at positions ``pos`` (B,); returns logits (B, V)."""
        x, cos, sin = self._embed(tok, pos)
        rows = torch.arange(tok.shape[0], device=tok.device)
        mask = _additive(torch.arange(kv_len, device=tok.device)[None] <= pos[:, None], x.dtype)
        for t in (x, cos, sin, rows, pos):
            mark_dynamic(t, 0)
        mark_dynamic(mask, 0, 3)
        splits = self._step_splits(tok.shape[0])
        x = self._deferred(x, splits)
        for i, layer in enumerate(self._lm.model.layers):
            x = self._layer(layer, x, cos, sin, self._k[i], self._v[i], rows, pos, mask,
                            self.n_heads, self.n_kv_heads, self.head_dim, self._fused[i] if self._fused else None,
                            self._group, self._split_kv, True, splits)
        return self._lm.lm_head(rms_norm(self._lm.model.norm, resume(x)))[:, 0]

    def _cascade_step(self, tok: torch.Tensor, pos: torch.Tensor, new_pos: torch.Tensor,
                      shape: CascadeShape) -> torch.Tensor:
        """``_decode_step`` for blocks of ``shape.width`` slots that share a prompt (see the module docstring);
        ``new_pos`` (B,) is each row's position among its new tokens."""
        x, cos, sin = self._embed(tok, pos)
        device = tok.device
        rows = torch.arange(tok.shape[0], device=device)
        blocks = tok.shape[0] // shape.width
        # float32 masks: cascade scores are float32; a row's j-th new token sits at window index suffix - 1 - j
        prefix_mask = _additive(torch.arange(shape.prefix, device=device)[None] < self._prompt_len[:blocks, None],
                                torch.float32)
        window = torch.arange(shape.suffix, device=device)[None]
        suffix_mask = _additive(window >= shape.suffix - 1 - new_pos[:, None], torch.float32)
        prompt_lens = mark_dynamic(self._prompt_len[:blocks], 0) if self._split_kv else None
        for t in (x, cos, sin, rows, pos, new_pos):
            mark_dynamic(t, 0)
        mark_dynamic(prefix_mask, 0, 3)
        mark_dynamic(suffix_mask, 0, 3)
        splits = self._step_splits(tok.shape[0])
        x = self._deferred(x, splits)
        for i, layer in enumerate(self._lm.model.layers):
            x = self._cascade(layer, x, cos, sin, self._k[i], self._v[i], rows, new_pos, prefix_mask, suffix_mask,
                              self.n_heads, self.n_kv_heads, self.head_dim, shape.width, self._fp32,
                              self._fused[i] if self._fused else None, self._group, prompt_lens, True, splits)
        return self._lm.lm_head(rms_norm(self._lm.model.norm, resume(x)))[:, 0]

    def _decode_sample(self, b: int, kv_len: int | CascadeShape, params: SamplingParams) -> None:
        """One step for slots ``0..b-1`` from the state buffers: sample, record, advance (no host sync)."""
        tok, pos, seeds, new_pos = self._state[:, :b]
        if isinstance(kv_len, CascadeShape):
            logits = self._cascade_step(tok, pos, new_pos, kv_len)
            # rows a step decodes idle run on past their end: keep their writes in their own slot's new tokens
            new_pos.copy_(torch.minimum(new_pos + 1, self._new_max))
        else:
            logits = self._decode_step(tok, pos, kv_len)
        new = self._sample(mark_dynamic(logits, 0), params, mark_dynamic(seeds, 0), pos)
        self._hist[:b].index_copy_(1, self._col.view(1), new[:, None])
        self._col.add_(1)
        tok.copy_(new)
        # a finished row may run a few steps past its end before the host notices: stay inside the cache
        pos.copy_((pos + 1).clamp(max=self.max_seq_len - 1))

    def _kv_len(self, b: int, reach: int) -> int:
        """Cache positions a step over ``b`` rows attends to when its rows reach position ``reach``:
        all of them while that is cheap (see ``FULL_CACHE_SHARE``) or when the split-KV kernels attend
        (they read each row's own keys whatever the bound: one graph per row count), else ``reach``
        rounded up to a bucket."""
        if self._split_kv or b * self.max_seq_len <= self._full_cache_rows:
            return self.max_seq_len  # masked keys weigh exactly 0: the same attention, one graph
        return min(self.max_seq_len, _bucket(reach))

    def _cascade_shape(self, width: int, b: int, prompt_reach: int, new_reach: int, new_cap: int) -> CascadeShape:
        """``_kv_len`` for a cascade step over ``b`` rows in blocks of ``width``: the prompt keys cover the
        longest prompt (``prompt_reach``), the own keys ``new_reach`` new tokens, of at most ``new_cap``."""
        prompt_cap = self.max_seq_len - new_cap
        if self._split_kv or b // width * prompt_cap + b * new_cap <= self._full_cache_rows:
            return CascadeShape(width, prompt_cap, new_cap)
        return CascadeShape(width, min(prompt_cap, _bucket(prompt_reach)),
                            min(new_cap, _bucket(new_reach, NEW_KEYS_BUCKET)))

    def _run_steps(self, b: int, kv_len: int | CascadeShape, params: SamplingParams, n: int, graphs: bool) -> None:
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

    def _capture(self, b: int, kv_len: int | CascadeShape, params: SamplingParams) -> torch.cuda.CUDAGraph:
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
        # captured directly rather than under ``torch.cuda.graph``, whose entry synchronizes and empties the
        # device and pinned-host allocator caches before every capture: ~90 ms each on an H200 host, and
        # without the split-KV kernels an evaluation of 1,024-token answers captures a graph per key bucket
        # it passes (17 in bench_eval)
        with torch.cuda.stream(side):
            graph.capture_begin(self._graph_pool, capture_error_mode="thread_local")
            try:
                self._decode_sample(b, kv_len, params)
            finally:
                graph.capture_end()
        torch.cuda.current_stream().wait_stream(side)
        for buf, old in zip((self._state, self._hist, self._col), saved):
            buf.copy_(old)
        return graph
