"""Batched KV-cache generation over a Hugging Face ``Qwen2ForCausalLM``'s own modules: the public API.

The engine owns a static cache, per layer ``(max_batch, kv_heads, max_seq_len, head_dim)`` in the
model's dtype (``steps.py`` describes its two layouts). Sequences are admitted whenever a slot is
free (continuous batching, ``schedule.py``): the prompts of the admitted rows are prefilled together
(right-padded, causal), each once. Row ``r`` draws its token at position ``p`` with the uniform
``keyed_uniform(row_seed(seed, key_r), p)`` (``key_r = r`` unless the caller gives keys), so samples
do not depend on ``max_batch``, on which rows share a step, on the cache layout, or on how a batch is
split across processes. ``generate_stream`` pulls requests lazily, only when a slot frees, and yields
each row as it finishes, so a caller can keep the engine full over a whole benchmark while producing
prompts on the way; ``generate`` is that stream over a list. A request may cap its rows' new tokens
below the call's (``Request.max_new_tokens``, per request or per key). A slot whose row finished decodes
on from position 0 until it is refilled (``HostLoop.idle``): where attention reads each row's own keys
(the split-KV kernels) it reads one key for it, not the finished row's whole cache.

Shared prefixes: requests that carry one ``SharedPrefix`` (their first positions equal, e.g. a video's
questions after its visual tokens) have those positions prefilled once and then only their own rests,
which attend to the prefix's keys/values; the prefix's prefill is kept while more of its requests may
follow in the stream. Each row's slot still receives its whole prompt's keys/values.

Shared prompts (cascade attention): with ``num_samples`` G > 1 (GRPO's completions per prompt) and
``cascade=True``, a prompt's G rows decode in a block of G consecutive slots (``max_batch // G`` blocks;
with ``max_batch < G`` one block of all slots that the prompt's rows fill in turns) that holds its
keys/values once; a step attends to the block's prompt with all G rows as queries of one attention, to each row's
own new tokens separately, and merges the two exactly by their log-sum-exps (``attention.py``; under
CUDA graphs the split-KV kernels of ``split_kv.py``). The keys a step reads drop from rows x (prompt +
new) to prompts + rows x new, and the prompt is copied into the cache once instead of G times. A block
frees when all its rows finish, so when rows outnumber ``max_batch`` a finished row's slot waits for its
block; ``generate_stream`` (one row per request, as evaluation uses it) and ``cascade=False`` keep
per-slot continuous batching with the prompt copied into each row's slot.

A decode step (forward, sampling, writing the sampled token and the next position back into the
step's own input buffers, and into a token history) is one CUDA graph on GPU; the host replays it
``sync_every`` times, then reads the history once to handle eos, finished rows and refills. With
``compile=True`` (GPU) the decoder layer is one ``torch.compile``d function shared by all layers
(norms, rotary, cache writes and residuals fused); under CUDA graphs its steps of at most 64 rows run
q|k|v, o_proj and down_proj as split-K partial products that those fused kernels sum, and gate|up with
its SiLU in one kernel (``split_k.py``; ``triton_gemm=False``: cuBLAS). On GPU, compiled or not, the layers read
concatenated q|k|v and gate|up weights: the model's own parameters, re-pointed into one buffer per
part on first use (``weights.fuse_layer``: no second copy, and optimizer steps in place are seen as
they happen). With ``copy_weights=True`` the engine decodes from its own copy of the whole model
(refreshed likewise; the fused buffers are that copy's weights), so captured graphs stay valid when
the model's parameters move between calls, as FSDP2's gathered parameters do. A ``WeightSource``
(``weights.py``, ``weights=``) decides what that copy holds: the parameters it calls static are read
in place, the others are written by the source at every call (LoRA training merges its adapters
there, ``train/lora.py``, leaving the model untouched).

With ``tp_group`` the engine decodes tensor-parallel (``tensor_parallel.py``): each rank of the group
keeps its own shard of the model (1/N of the heads and MLP columns, refreshed from the full model at
every call) and a KV cache of its KV heads, and every rank decodes all rows: two all-reduces per
layer, the same full logits and the same keyed draws on every rank, so the host loop (eos, refills,
step counts) runs identically everywhere. Every rank must call ``generate`` with the same arguments.

Norms, MLPs, projections and the rotary table are the HF modules' own (the layer maths are in
``layers.py``); only attention, the cache and the Triton GEMMs are ours, so numerics follow HF's
eager/SDPA path in the model's dtype. Sliding-window attention is not implemented (Qwen2.5-3B does not use it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .attention import aligned, fp32_products
from .layers import attn_in, attn_out, cascade_layer, compiled_cascade, compiled_decode, decode_layer, rms_norm
from .sampling import SamplingParams, sample_keyed
from .schedule import Completion, Finished, HostLoop, Prefill, Request, SharedPrefix, check_prompt, row_seed
from .sizing import auto_max_batch
from .split_k import layer_splits, split_k_available
from .steps import FULL_CACHE_SHARE, KV_LEN_BUCKET, SYNC_EVERY, CascadeShape, DecodeSteps
from .tensor_parallel import TensorParallel
from .weights import ModelWeights, WeightCopy, WeightSource, fuse_layer

__all__ = ["COMPILE_DEVICES", "KV_LEN_BUCKET", "PREFILL_TOKENS", "SYNC_EVERY", "CascadeShape", "Completion", "Engine",
           "Finished", "Request", "SharedPrefix", "row_seed"]

COMPILE_DEVICES = ("cuda",)  # where ``compile=True`` takes effect (elsewhere the engine runs eager)
PREFILL_TOKENS = 16384  # padded prompt tokens per batched prefill forward
# prefill attention runs in SDPA's flash kernel (causal prompts) or its memory-efficient kernel (the
# rests of prompts with a shared prefix, under a boolean mask), not in cuDNN's: cuDNN builds an
# execution plan for every new shape, and the rows admitted together vary in number and length. On an
# H200, causal, 25 prompts of 704: cuDNN 928 ms the first time then 0.18 ms a layer, flash 15 ms then
# 0.34 ms (7 of 640: 783 ms against 0.5 ms); 128 rests of 128 over 576 prefix keys: cuDNN 1.2 s then
# 0.45 ms, memory-efficient 9 ms then 0.9 ms
PREFILL_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
MASKED_PREFILL_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class Engine(DecodeSteps):
    """Generate from prompt embeddings with a static KV cache, shared prefills and continuous batching.
    ``max_batch=0`` sizes the cache from free device memory (``auto_max_batch``); ``cascade`` reads a
    shared prompt's keys once per ``num_samples`` rows (see the module docstring).

    With ``tp_group`` (one rank per device; ``lm`` holds the full current weights on every rank) the
    engine decodes tensor-parallel over the group; see the module docstring."""

    def __init__(self, lm: torch.nn.Module, *, max_batch: int = 8, max_seq_len: int = 4096, cuda_graphs: bool = False,
                 compile: bool = False, fuse_weights: bool = True, copy_weights: bool = False,
                 weights: WeightSource | None = None, cascade: bool = False, split_kv: bool = True,
                 triton_gemm: bool = True, tp_group: dist.ProcessGroup | None = None, check_agreement: bool = True):
        cfg = lm.config
        layer_types = getattr(cfg, "layer_types", None) or []
        if getattr(cfg, "use_sliding_window", False) or any(t != "full_attention" for t in layer_types):
            raise ValueError("Engine supports full attention only; this config uses sliding-window layers")
        if max_batch < 0 or max_seq_len < 2:
            raise ValueError(f"Engine needs max_batch >= 0 (0: auto) and max_seq_len >= 2, got {max_batch} and "
                             f"{max_seq_len}")
        self.lm = lm
        if max_batch == 0:
            # a copy of the whole model needs room besides the cache; fused buffers take over the
            # model's own storage (``weights.fuse_layer``)
            copies = sum(p.numel() * p.element_size() for p in lm.parameters()) if copy_weights else 0
            max_batch = auto_max_batch(lm, max_seq_len, extra_bytes=copies)
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len
        self.cuda_graphs = cuda_graphs
        self.cascade = cascade
        # torch.compile fuses each layer's norms, rotary and residual adds into a few kernels: one
        # compiled function serves all layers (parameters are inputs, not constants)
        self.compile = compile
        self._layer, self._cascade, self._sample = decode_layer, cascade_layer, sample_keyed
        self._fp32 = False  # cascade scores by float32 GEMMs (``attention.fp32_products``), set per call
        # split_kv: decode attention (plain and cascade steps) split along the keys in Triton kernels
        # (``split_kv.py``) on CUDA under CUDA graphs, SDPA elsewhere; decided when the cache is allocated
        self.split_kv = split_kv
        self._split_kv = False
        # triton_gemm: compiled, under CUDA graphs, without tensor parallelism, steps of at most
        # ``split_k.MAX_ROWS`` rows run q|k|v, o_proj and down_proj as Triton split-K partials summed
        # in the kernels that consume them, and gate|up with its SiLU in one kernel (``split_k.py``);
        # decided per call
        self.triton_gemm = triton_gemm
        self._splits = None
        # on GPU: concatenated q|k|v and gate|up weights (the model's parameters moved into one buffer
        # per part, so updates in place are seen) make each decode step 3 GEMMs shorter
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
        weights_per_rank = sum(p.numel() for p in lm.parameters()) / world
        self._full_cache_rows = int(weights_per_rank * FULL_CACHE_SHARE) // per_position
        self._k: list[torch.Tensor] = []  # per layer, allocated on first use on the model's device and dtype
        self._v: list[torch.Tensor] = []
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self._graph_params: tuple[int, ...] = ()
        self._graph_pool = None
        # static decode state the graphs replay (``steps.py``): rows, prompt lengths, token history and its column
        self._state: torch.Tensor | None = None
        self._prompt_len: torch.Tensor | None = None
        self._new_max: torch.Tensor | None = None
        self._hist: torch.Tensor | None = None
        self._col: torch.Tensor | None = None
        # prompt positions admitted, and those the prefill computed (fewer where prefixes are shared),
        # over the engine's life
        self.prompt_positions = self.prefilled_positions = 0

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
        row_max_new_tokens: Sequence[int] | None = None,
        sync_every: int = SYNC_EVERY,
    ) -> list[Completion]:
        """Complete each prompt embedding (L_i, D) ``num_samples`` times; results are prompt-major.

        ``on_token(row, token)`` sees every sampled token, eos included. Output row ``r`` samples
        with ``row_seed(seed, row_keys[r])`` (default ``r``): give rows keys that do not depend on
        how work is split (e.g. dataset index) and they draw the same tokens in any split.
        ``row_max_new_tokens``: a budget per output row (capped by ``max_new_tokens``), each row stopping
        at its own as at an eos (``Completion.finished`` False), its tokens the first of those it draws
        without one; a GRPO group's rows keep their shared-prompt block.
        ``sync_every`` (at most ``SYNC_EVERY``) decode steps run between host reads of the tokens:
        fewer reads are faster, streaming (``on_token``) wants smaller chunks.
        """
        _check_sync_every(sync_every)
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        for i, p in enumerate(prompts):  # all checked before any work, not when the stream reaches them
            check_prompt(i, p, max_new_tokens, self.max_seq_len)
        n_rows = len(prompts) * num_samples
        if row_keys is not None and len(row_keys) != n_rows:
            raise ValueError(f"row_keys has {len(row_keys)} keys for {n_rows} output rows")
        if row_max_new_tokens is not None and len(row_max_new_tokens) != n_rows:
            raise ValueError(f"row_max_new_tokens has {len(row_max_new_tokens)} budgets for {n_rows} output rows")
        if n_rows == 0 or max_new_tokens <= 0:
            return [Completion([], False) for _ in range(n_rows)]
        keys = list(range(n_rows)) if row_keys is None else list(row_keys)
        budgets = None if row_max_new_tokens is None else list(row_max_new_tokens)
        rows = [slice(i * num_samples, (i + 1) * num_samples) for i in range(len(prompts))]  # each prompt's
        requests = [Request(p, keys[r], max_new_tokens=None if budgets is None else budgets[r])
                    for p, r in zip(prompts, rows)]
        # a block of slots per prompt (at most the whole engine) when its rows share its keys/values
        width = min(num_samples, self.max_batch) if self.cascade else 1
        out = [Completion([], False) for _ in range(n_rows)]
        for done in self._stream(iter(requests), params, max_new_tokens, eos_token_id, seed, on_token, ignore_eos,
                                 sync_every, width):
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
                            sync_every, 1)

    def _stream(self, source: Iterator[Request], params: SamplingParams, max_new_tokens: int,
                eos_token_id: int | list[int] | None, seed: int, on_token: Callable[[int, int], None] | None,
                ignore_eos: bool, sync_every: int, width: int) -> Iterator[Finished]:
        loop = HostLoop(self, self._prefill, source, params, max_new_tokens, eos_token_id, seed, on_token, ignore_eos,
                        sync_every, width)
        if max_new_tokens <= 0:
            yield from loop.empty()
            return
        device = self.prepare()
        yield from loop.run(device, self._use_graphs(device))

    def release(self) -> None:
        """Free the KV cache, weight copies and captured graphs (they are rebuilt on the next call)."""
        self._k, self._v = [], []
        self._state = self._prompt_len = self._new_max = self._hist = self._col = None
        self._fused = self._copy = self._weight_copy = None
        self._graphs.clear()

    # ---------------------------------------------------------------- set-up for a call

    def prepare(self) -> torch.device:
        """Ready the cache, the compiled layers and the weights the decode reads for a call; returns the device."""
        weight = self.lm.model.embed_tokens.weight
        device, dtype = weight.device, weight.dtype
        self._ensure_cache(device, dtype)
        compiled = self.compile and device.type in COMPILE_DEVICES
        if compiled:
            self._layer, self._sample = compiled_decode()
            self._cascade = compiled_cascade()
        self._fp32 = fp32_products(device, compiled)
        # fused buffers cost no memory (the parameters move into them, or they are the copy's own), and
        # on a GPU three GEMMs fewer per layer shorten an eager step too; on CPU an eager engine reads
        # the model's parameters as they are (its GEMMs round as the model's own forward does)
        fuse = self.fuse_weights and (compiled or device.type == "cuda" or self.tp is not None)
        if self.copy_weights:
            self._sync_copy(device, dtype, fused=fuse)
        elif fuse:
            self._sync_fused()
        use_split_k = (self.triton_gemm and compiled and fuse and self.cuda_graphs and self.tp is None
                       and split_k_available(device, dtype))
        self._splits = (layer_splits(self.lm.config, self.n_heads, self.n_kv_heads, self.head_dim, device)
                        if use_split_k else None)
        return device

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

    def _sync_fused(self) -> None:
        """Point the model's q/k/v and gate/up parameters into the fused buffers (``weights.fuse_layer``:
        the model's own storage, no copy); parameters replaced since the last call are copied in."""
        into = self._fused or [None] * self.n_layers
        self._fused = [fuse_layer(layer, buffers) for layer, buffers in zip(self.lm.model.layers, into)]

    @property
    def _group(self) -> dist.ProcessGroup | None:
        return self.tp.group if self.tp is not None else None

    # ---------------------------------------------------------------- prefill

    def _prefill(self, embs: list[torch.Tensor], prefixes: Sequence[SharedPrefix | None] | None = None,
                 heads: dict[SharedPrefix, Prefill] | None = None) -> list[Prefill]:
        """Causal forward over prompts (L_i, D), batched (right-padded) up to ``PREFILL_TOKENS`` padded
        tokens at a time; keeps each prompt's keys/values and its last position's logits. Padding
        sits after every real token, so under the causal mask it changes nothing the prompt sees.

        ``prefixes`` (one per prompt, or None): each ``SharedPrefix`` is prefilled once, from the first
        prompt that carries it, unless ``heads`` already holds its prefill (new ones are added there,
        so later calls reuse them); its prompts then prefill only their own rests, each attending to
        the prefix's keys/values and to itself causally."""
        self.prompt_positions += sum(e.shape[0] for e in embs)
        prefixes = prefixes or [None] * len(embs)
        heads = {} if heads is None else heads
        shared: dict[SharedPrefix, list[int]] = {}
        for i, prefix in enumerate(prefixes):
            if prefix is not None:
                shared.setdefault(prefix, []).append(i)
        alone = [i for i in range(len(embs)) if prefixes[i] is None]
        new = [prefix for prefix in shared if prefix not in heads]
        # the prompts prefilled whole and the new prefixes in one pass, then the rests after them
        whole = self._batched(self._prefill_batch, [embs[i] for i in alone]
                              + [embs[shared[prefix][0]][:prefix.length] for prefix in new])
        # a prefix's keys/values copied out of its batch's: a kept prefix holds only its own memory
        heads.update((prefix, Prefill(pre.keys.clone(), pre.values.clone(), pre.logits, 0))
                     for prefix, pre in zip(new, whole[len(alone):]))
        out: list[Prefill | None] = [None] * len(embs)
        for i, pre in zip(alone, whole):
            out[i] = pre
        rows = [i for members in shared.values() for i in members]
        rests = [(embs[i][prefixes[i].length:], heads[prefixes[i]]) for i in rows]
        for i, pre in zip(rows, self._batched(self._prefill_rests, rests)):
            out[i] = pre
        return out

    @staticmethod
    def _batched(run: Callable[[list], list[Prefill]], items: list) -> list[Prefill]:
        """``run`` over consecutive batches of ``items`` (embeddings, or (embeddings, head) pairs) of at
        most ``PREFILL_TOKENS`` padded positions each (a single longer item runs alone)."""
        def length(item) -> int:
            return (item[0] if isinstance(item, tuple) else item).shape[0]

        out: list[Prefill] = []
        start = 0
        while start < len(items):
            stop = start + 1
            while stop < len(items) and (stop + 1 - start) * aligned(max(map(length, items[start:stop + 1]))) \
                    <= PREFILL_TOKENS:
                stop += 1
            out += run(items[start:stop])
            start = stop
        return out

    def _prefill_batch(self, embs: list[torch.Tensor]) -> list[Prefill]:
        x, lens = _right_padded(embs)
        positions = torch.arange(x.shape[1], device=x.device)[None]

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            with sdpa_kernel(PREFILL_BACKENDS):
                return _gqa_attention(q, k, v, is_causal=True)

        return self._prefill_forward(x, lens, positions, attend, [None] * len(embs))

    def _prefill_rests(self, items: list[tuple[torch.Tensor, Prefill]]) -> list[Prefill]:
        """The rests (L_i, D) of prompts whose prefixes are already prefilled (``items``: (rest, the
        prefix's prefill)), right-padded into one forward: rest position j sits at position P_i + j and
        attends the P_i prefix keys and its own rest's keys up to j."""
        x, lens = _right_padded([e for e, _ in items])
        b, n, device = x.shape[0], x.shape[1], x.device
        # the distinct prefixes' keys/values, padded to the longest, and which one each row attends
        distinct = {id(h): h for _, h in items}  # a prefix's prefill by identity, in first-seen order
        place = {key: g for g, key in enumerate(distinct)}
        which = torch.tensor([place[id(h)] for _, h in items], device=device)
        heads = list(distinct.values())
        starts = torch.tensor([h.keys.shape[2] for _, h in items], device=device)
        p = max(h.keys.shape[2] for h in heads)
        head_k = heads[0].keys.new_zeros(self.n_layers, len(heads), self.n_kv_heads, p, self.head_dim)
        head_v = torch.zeros_like(head_k)
        for g, h in enumerate(heads):
            head_k[:, g, :, :h.keys.shape[2]] = h.keys
            head_v[:, g, :, :h.values.shape[2]] = h.values
        # (B, 1, n, p + n): a row's own prefix's keys, then its rest's keys causally (padded queries see
        # the prefix, so no row of the mask is empty)
        sees_prefix = (torch.arange(p, device=device)[None] < starts[:, None])[:, None, :].expand(-1, n, -1)
        causal = torch.ones(n, n, dtype=torch.bool, device=device).tril().expand(b, -1, -1)
        mask = torch.cat([sees_prefix, causal], dim=-1)[:, None]

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            k = torch.cat([head_k[layer].index_select(0, which), k], dim=2)
            v = torch.cat([head_v[layer].index_select(0, which), v], dim=2)
            with sdpa_kernel(MASKED_PREFILL_BACKENDS):
                return _gqa_attention(q, k, v, attn_mask=mask)

        return self._prefill_forward(x, lens, starts[:, None] + torch.arange(n, device=device)[None], attend,
                                     [h for _, h in items])

    def _prefill_forward(self, x: torch.Tensor, lens: list[int], positions: torch.Tensor,
                         attend: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                         heads: list[Prefill | None]) -> list[Prefill]:
        """The layers over right-padded prompts ``x`` (B, n, D) at ``positions`` ((1 or B, n)), attention
        by ``attend(layer, q, k, v)`` (queries (B, heads, n, head_dim), keys/values of the kv heads);
        keeps each prompt's keys/values (after ``heads[i]``'s, when given) and its last position's
        logits."""
        self.prefilled_positions += sum(lens)
        model = self._lm.model
        cos, sin = model.rotary_emb(x, positions)
        keys, values = [], []
        for i, layer in enumerate(model.layers):
            q, k, v = attn_in(layer, x, cos, sin, self.n_heads, self.n_kv_heads, self.head_dim)
            keys.append(k)
            values.append(v)
            o = attend(i, q, k, v)
            x = attn_out(layer, x, o.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1), group=self._group)
        last = x[torch.arange(x.shape[0], device=x.device), torch.tensor(lens, device=x.device) - 1]
        logits = self._lm.lm_head(rms_norm(model.norm, last)).float()
        keys, values = torch.stack(keys), torch.stack(values)  # (layers, B, kv_heads, n, head_dim)
        out = []
        for i, (m, head) in enumerate(zip(lens, heads)):
            k, v = keys[:, i, :, :m], values[:, i, :, :m]
            if head is not None:
                k, v = torch.cat([head.keys, k], dim=2), torch.cat([head.values, v], dim=2)
            out.append(Prefill(k, v, logits[i:i + 1], 0))
        return out


def _right_padded(embs: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """Embeddings (L_i, D) in one zero-padded (B, n, D) batch, n the longest rounded up to ``aligned``
    (few distinct shapes, SHAPE_ALIGN; padding after every real position sees nothing a real one
    attends); and the lengths."""
    lens = [e.shape[0] for e in embs]
    x = embs[0].new_zeros(len(embs), aligned(max(lens)), embs[0].shape[1])
    for i, e in enumerate(embs):
        x[i, :lens[i]] = e
    return x, lens


def _gqa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw) -> torch.Tensor:
    """SDPA of queries (B, heads, n, D) over keys/values (B, kv_heads, m, D), repeated to the query heads."""
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    return F.scaled_dot_product_attention(q, k, v, **kw)


def _check_sync_every(sync_every: int) -> None:
    if not 1 <= sync_every <= SYNC_EVERY:
        raise ValueError(f"sync_every must be in 1..{SYNC_EVERY}, got {sync_every}")
