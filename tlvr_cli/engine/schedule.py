"""The engine's host loop: which rows decode in which slots, when prompts are prefilled, when the
device's tokens are read, and when a row is done.

Slots come in blocks of ``width`` consecutive slots; a block takes up to ``width`` rows of one
request and holds its prompt's keys/values once (``steps.py``: plain layout at width 1, one block per
slot; cascade layout above). Whenever blocks are free the next rows are pulled, their prompts prefilled
together (each once) and their first tokens drawn in one go; a block is free again when all its rows
are done. At width 1 that is plain continuous batching: a slot refills as soon as its row finishes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .sampling import SamplingParams, sample_keyed
from .steps import DecodeSteps
from .tensor_parallel import assert_same, fingerprint


@dataclass
class Completion:
    """New tokens of one output row; eos is not included, ``finished`` says generation stopped on it."""

    tokens: list[int]
    finished: bool


@dataclass(eq=False)
class SharedPrefix:
    """The first ``length`` positions of several requests' prompts, equal in all of them (e.g. the
    system prompt and a video's visual tokens, for each question about the video). The requests that
    carry the same ``SharedPrefix`` object have it prefilled once, then each only its own rest,
    attending to the prefix's keys/values: the same maths as prefilling each whole. The prefix's
    prefill is kept while its requests may still come (they should follow one another in the stream);
    the engine trusts that the positions are equal, it does not compare them."""

    length: int


@dataclass
class Request:
    """One prompt for ``Engine.generate_stream``: its embeddings (L, D) and one sampling key per
    output row (``len(keys)`` completions share one prefill); ``prefix``: a leading part of the prompt
    that other requests share (``SharedPrefix``), shorter than the prompt."""

    prompt: torch.Tensor
    keys: Sequence[int]  # row j samples with row_seed(seed, keys[j]): e.g. a stable hash of the item
    tag: Any = None  # returned with the completions (e.g. the question it answers)
    prefix: SharedPrefix | None = None
    # at most this many new tokens for each of the request's rows, or one budget per key (None: the call's
    # max_new_tokens, which also caps them, and with which the prompt must fit the cache); a row that
    # reaches its budget stops as at the call's (``Completion.finished`` False)
    max_new_tokens: int | Sequence[int] | None = None


@dataclass
class Finished:
    """One output row of ``Engine.generate_stream``, yielded when it finishes."""

    request: Request
    sample: int  # which of the request's keys
    row: int  # output row number, in pull order (request-major)
    completion: Completion


@dataclass
class Prefill:
    """A prompt's prefill, kept until all its rows have a slot."""

    keys: torch.Tensor  # (layers, kv_heads, L, head_dim)
    values: torch.Tensor
    logits: torch.Tensor  # (1, vocab) float32, for the first new token
    rows_left: int  # rows of this prompt still waiting for a slot


@dataclass
class _Row:
    row: int
    request_no: int  # position of its request in the stream
    request: Request
    sample: int
    seed: int
    budget: int  # new tokens it may take
    completion: Completion = field(default_factory=lambda: Completion([], False))


def row_seed(seed: int, row: int) -> int:
    """Seed of output row ``row``'s generator: a fixed mix of the call's seed and the row index."""
    return (seed * 0x9E3779B97F4A7C15 + (row + 1) * 0xBF58476D1CE4E5B9) % (2**63)


def check_prompt(i: int, p: torch.Tensor, max_new_tokens: int, max_seq_len: int) -> None:
    """Raise ValueError unless prompt ``i`` is (L, D) embeddings that fit the cache with its new tokens."""
    if p.dim() != 2 or p.shape[0] == 0:
        raise ValueError(f"prompt {i}: expected embeddings of shape (L, D) with L >= 1, got {tuple(p.shape)}")
    if p.shape[0] + max_new_tokens > max_seq_len:
        raise ValueError(
            f"prompt {i} has {p.shape[0]} tokens; with max_new_tokens={max_new_tokens} it needs "
            f"{p.shape[0] + max_new_tokens} cache positions but the engine's max_seq_len is {max_seq_len} "
            f"(prompts may be at most {max_seq_len - max_new_tokens} tokens)")


class HostLoop:
    """One ``generate_stream`` call on ``engine`` in blocks of ``width`` slots (``prefill``: the engine's
    batched prefill of prompt embeddings, given their shared prefixes): ``run`` yields the rows as they
    finish, ``empty`` when there is nothing to generate."""

    def __init__(self, engine: DecodeSteps,
                 prefill: Callable[[list[torch.Tensor], list[SharedPrefix | None], dict[SharedPrefix, Prefill]],
                                   list[Prefill]],
                 source: Iterator[Request], params: SamplingParams, max_new_tokens: int,
                 eos_token_id: int | list[int] | None, seed: int, on_token: Callable[[int, int], None] | None,
                 ignore_eos: bool, sync_every: int, width: int) -> None:
        self.engine, self.prefill, self.source = engine, prefill, source
        self.params, self.max_new, self.seed, self.on_token = params, max_new_tokens, seed, on_token
        self.ignore_eos, self.sync_every, self.width = ignore_eos, sync_every, width
        eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id
        self.eos = set(eos)
        self.pulled = self.next_row = 0  # requests taken from ``source``; output rows they make
        self.waiting: deque[_Row] = deque()  # rows pulled and not yet placed in a slot, in row order
        self.blocks = engine.max_batch // width
        self.slot_row: list[_Row | None] = [None] * (self.blocks * width)  # row decoded in each slot, None when free
        self.slot_pos = [0] * len(self.slot_row)  # position of the slot's next input token
        self.block_len = [0] * self.blocks  # prompt length of the rows in each block
        self.prefills: dict[int, Prefill] = {}  # by request number, until all the request's rows are placed
        # shared prefixes' prefills, kept while a request that may still come can use them: the last
        # pulled request's prefix (its video's next question may follow) and those of waiting rows
        self.heads: dict[SharedPrefix, Prefill] = {}
        self.last_prefix: SharedPrefix | None = None

    def pull(self, want: int) -> None:
        """Take requests from the source until ``want`` rows wait for a slot or the source ends."""
        while len(self.waiting) < want:
            req = next(self.source, None)
            if req is None:
                return
            check_prompt(self.pulled, req.prompt, self.max_new, self.engine.max_seq_len)
            if not req.keys:
                raise ValueError(f"request {self.pulled}: no keys, so no output rows")
            if req.prefix is not None and not 0 < req.prefix.length < req.prompt.shape[0]:
                raise ValueError(f"request {self.pulled}: a shared prefix of {req.prefix.length} positions in a "
                                 f"prompt of {req.prompt.shape[0]} (it must be 1 .. {req.prompt.shape[0] - 1})")
            for j, (key, budget) in enumerate(zip(req.keys, self.budgets(req))):
                self.waiting.append(_Row(self.next_row, self.pulled, req, j, row_seed(self.seed, key), budget))
                self.next_row += 1
            self.pulled += 1
            self.last_prefix = req.prefix

    def budgets(self, req: Request) -> list[int]:
        """New tokens each of ``req``'s rows may take (its ``max_new_tokens``, capped by the call's)."""
        given = req.max_new_tokens
        if given is None:
            return [self.max_new] * len(req.keys)
        given = [given] * len(req.keys) if isinstance(given, int) else list(given)
        if len(given) != len(req.keys) or min(given) < 1:
            raise ValueError(f"request {self.pulled}: max_new_tokens={req.max_new_tokens} for {len(req.keys)} "
                             "key(s) (one budget >= 1, or one per key, or None for the call's)")
        return [min(b, self.max_new) for b in given]

    def emit(self, row: _Row, token: int) -> bool:
        """Record one token; True when the row is done."""
        if self.on_token is not None:
            self.on_token(row.row, token)
        if token in self.eos and not self.ignore_eos:
            row.completion.finished = True
            return True
        row.completion.tokens.append(token)
        return len(row.completion.tokens) >= row.budget

    def empty(self) -> Iterator[Finished]:
        """Every row with no tokens (``max_new_tokens <= 0``): the model is not touched."""
        self.pull(1)
        while self.waiting:
            row = self.waiting.popleft()
            yield Finished(row.request, row.sample, row.row, row.completion)
            self.pull(1)

    def run(self, device: torch.device, graphs: bool) -> Iterator[Finished]:
        """Decode every row on the engine's ``device`` (readied for this call), in CUDA graphs if ``graphs``."""
        engine = self.engine
        cascade = self.width > 1
        if cascade:
            # rows of an earlier call (or idle slots) must not write own keys below this call's region
            engine._state[3].zero_()
            engine._new_max.fill_(self.max_new - 1)
        with torch.no_grad():
            while True:
                yield from self.admit(device)
                active = [g for g in range(self.blocks) if self.live(g)]
                if not active:
                    break
                # decode the smallest power-of-two number of blocks that covers every active one; free
                # slots inside it decode garbage that is never read (their state is reset on refill)
                b = min(self.blocks, 1 << active[-1].bit_length()) * self.width
                live = [s for s in range(b) if self.slot_row[s] is not None]
                # several steps per host read (the device writes each step's tokens into the history);
                # attention reads only the keys any row can reach in them, rounded up to a bucket so
                # few distinct shapes (CUDA graphs) exist
                left = max(self.slot_row[s].budget - len(self.slot_row[s].completion.tokens) for s in live)
                steps = max(1, min(self.sync_every, left))
                if cascade:
                    new = max(self.slot_pos[s] - self.block_len[s // self.width] for s in live)
                    shape = engine._cascade_shape(self.width, b, max(self.block_len[g] for g in active),
                                                  new + steps, self.max_new)
                else:
                    shape = engine._kv_len(b, max(self.slot_pos[s] for s in live) + steps)
                engine._run_steps(b, shape, self.params, steps, graphs)
                engine._agree(engine._hist[:b, :steps], "the sampled tokens")
                # a row that hit eos or its budget mid-chunk frees its slot; tokens after it are dropped
                hist = engine._hist[:b, :steps].tolist()
                finished = []
                for s in live:
                    for token in hist[s]:
                        if self.emit(self.slot_row[s], token):
                            finished.append(self.slot_row[s])
                            self.slot_row[s] = None
                            break
                    self.slot_pos[s] += steps
                self.idle([s for s in live if self.slot_row[s] is None])
                for row in finished:
                    yield Finished(row.request, row.sample, row.row, row.completion)

    def idle(self, slots: list[int]) -> None:
        """Slots whose rows just finished decode on from position 0 (and, cascade, their first own key)
        until they are refilled: steps whose attention reads each row's own keys only (the split-KV
        kernels) then read one key for each of them instead of their finished row's whole cache. Their
        writes land in their own slot (plain: index 0; cascade: its own tokens' last index), where no
        live row reads."""
        if slots:
            idx = torch.tensor(slots, device=self.engine._state.device)
            self.engine._state[1, idx] = 0
            self.engine._state[3, idx] = 0

    def live(self, block: int) -> bool:
        return any(r is not None for r in self.slot_row[block * self.width:(block + 1) * self.width])

    def chunks(self, n: int) -> list[list[_Row]]:
        """Up to ``n`` runs of at most ``width`` consecutive waiting rows of one request each."""
        out: list[list[_Row]] = []
        while self.waiting and len(out) < n:
            chunk = [self.waiting.popleft()]
            while self.waiting and len(chunk) < self.width and self.waiting[0].request_no == chunk[0].request_no:
                chunk.append(self.waiting.popleft())
            out.append(chunk)
        return out

    def admit(self, device: torch.device) -> Iterator[Finished]:
        """Fill every free block with the next rows, prefilling each of their prompts once; a prompt's
        prefill waits here until all its rows are placed."""
        engine, width = self.engine, self.width
        free = [g for g in range(self.blocks) if not self.live(g)]
        while free:
            self.pull(len(free) * width)
            chunks = self.chunks(len(free))
            if not chunks:
                break
            window = [r for chunk in chunks for r in chunk]
            todo = list(dict.fromkeys(r.request_no for r in window if r.request_no not in self.prefills))
            firsts = {r.request_no: r.request for r in window}
            embs = [firsts[n].prompt.to(device=device, dtype=engine._k[0].dtype) for n in todo]
            for n, pre in zip(todo, self.prefill(embs, [firsts[n].prefix for n in todo], self.heads)):
                pre.rows_left = len(firsts[n].keys)
                self.prefills[n] = pre
            # first tokens of the whole window in one draw; each prompt's keys/values copied into all
            # its new blocks at once; the slots' decode state set in one write
            lens = [self.prefills[r.request_no].keys.shape[2] for r in window]
            seeds = torch.tensor([r.seed for r in window], dtype=torch.long, device=device)
            if engine.tp is not None and engine.check_agreement:  # what the host loop's decisions depend on
                settings = (self.max_new, self.params.temperature, self.params.top_k, self.params.top_p,
                            self.ignore_eos, self.sync_every, engine.max_batch, len(self.eos), sum(self.eos),
                            *(r.budget for r in window))
                assert_same(engine.tp, fingerprint([r.request.prompt for r in window], seeds, settings),
                            "the prompts, seeds or settings")
            logits = torch.cat([self.prefills[r.request_no].logits for r in window])
            first = sample_keyed(logits, self.params, seeds, torch.tensor(lens, device=device) - 1)
            engine._agree(first, "the first sampled tokens")
            tokens = iter(first.tolist())
            placed: dict[int, list[int]] = {}  # blocks each prompt's keys/values go to
            columns: list[tuple[int, int, int, int, int]] = []  # (slot, token, position, seed, new position)
            finished = []
            for chunk in chunks:
                rows = []
                for row in chunk:
                    token = next(tokens)
                    if self.emit(row, token):
                        finished.append(row)  # done after one token: it takes no slot
                    else:
                        rows.append((row, token))
                if rows:
                    g, n = free.pop(0), rows[0][0].request_no
                    length = self.prefills[n].keys.shape[2]
                    placed.setdefault(n, []).append(g)
                    self.block_len[g] = length
                    for i in range(width):  # a block's unused slots decode idle from a clean state
                        s = g * width + i
                        row, token = rows[i] if i < len(rows) else (None, 0)
                        self.slot_row[s], self.slot_pos[s] = row, length
                        columns.append((s, token, length, row.seed if row else 0, 0))
            for n, blocks in placed.items():
                pre, idx = self.prefills[n], torch.tensor(blocks, device=device)
                length = pre.keys.shape[2]
                for i in range(engine.n_layers):
                    engine._k[i][idx, :, :length] = pre.keys[i]
                    engine._v[i][idx, :, :length] = pre.values[i]
                engine._prompt_len[idx] = length
            if columns:
                slots, *state = zip(*columns)
                engine._state[:, torch.tensor(slots, device=device)] = torch.tensor(state, device=device)
            for row in window:
                pre = self.prefills[row.request_no]
                pre.rows_left -= 1
                if pre.rows_left == 0:
                    del self.prefills[row.request_no]
            keep = {self.last_prefix, *(r.request.prefix for r in self.waiting)}
            self.heads = {prefix: pre for prefix, pre in self.heads.items() if prefix in keep}
            yield from (Finished(r.request, r.sample, r.row, r.completion) for r in finished)
