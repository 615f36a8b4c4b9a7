"""The engine's streaming admission (``generate_stream``) and its memory-based sizing."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2ForCausalLM

from tlvr_cli.engine import sizing
from tlvr_cli.engine.generate import Engine, Request, SharedPrefix
from tlvr_cli.engine.sampling import SamplingParams
from tlvr_cli.engine.schedule import HostLoop

GREEDY = SamplingParams(temperature=0.0)
SAMPLED = SamplingParams(temperature=1.0, top_k=40)
LENGTHS = (5, 11, 3, 17, 8, 6, 9)


@pytest.mark.parametrize("params,max_batch,samples", [(GREEDY, 3, 1), (SAMPLED, 2, 2), (SAMPLED, 16, 3)])
def test_stream_gives_generates_completions_for_the_same_keys(lm, prompts, params, max_batch, samples):
    keys = [1000 + 7 * r for r in range(len(prompts) * samples)]
    want = Engine(lm, max_batch=4, max_seq_len=64).generate(prompts, params, 10, 299, num_samples=samples, seed=3,
                                                            row_keys=keys)
    requests = [Request(p, keys[i * samples:(i + 1) * samples], tag=i) for i, p in enumerate(prompts)]
    got = {}
    for fin in Engine(lm, max_batch=max_batch, max_seq_len=64).generate_stream(requests, params, 10, 299, seed=3):
        assert fin.row == fin.request.tag * samples + fin.sample
        got[fin.row] = fin.completion.tokens
    assert [got[r] for r in range(len(want))] == [o.tokens for o in want]
    if params is SAMPLED:
        assert len({tuple(t) for t in got.values()}) == len(got)  # the comparison is not vacuous


def test_a_request_samples_by_its_key_not_its_place(lm, prompts):
    # the same (prompt, key) pairs in reverse order, or behind other requests, draw the same tokens
    engine = Engine(lm, max_batch=2, max_seq_len=64)

    def by_key(requests) -> dict[int, list[int]]:
        return {fin.request.keys[fin.sample]: fin.completion.tokens
                for fin in engine.generate_stream(requests, SAMPLED, 8, 299, seed=9)}

    pairs = [(p, 50 + i) for i, p in enumerate(prompts)]
    forward = by_key(Request(p, [k]) for p, k in pairs)
    assert by_key(Request(p, [k]) for p, k in reversed(pairs)) == forward
    extra = [Request(prompts[0], [999]), *(Request(p, [k]) for p, k in pairs[3:])]
    assert {k: v for k, v in by_key(extra).items() if k != 999} == {k: forward[k] for _, k in pairs[3:]}


def test_requests_are_pulled_only_when_a_slot_frees(lm, prompts):
    pulled = []

    def source():
        for i in range(40):
            pulled.append(i)
            yield Request(prompts[i % len(prompts)], [i], tag=i)

    stream = Engine(lm, max_batch=3, max_seq_len=64).generate_stream(source(), GREEDY, 6, 299)
    first = next(stream)
    assert len(pulled) == 3 and first.request.tag in (0, 1, 2)  # one request per slot, nothing read ahead
    rest = list(stream)
    assert len(pulled) == 40 and sorted(f.request.tag for f in [first, *rest]) == list(range(40))


def test_rows_are_yielded_as_they_finish(lm, prompts):
    ref = Engine(lm, max_batch=8, max_seq_len=64).generate(prompts, GREEDY, 12, 299)
    eos = ref[2].tokens[1]  # prompt 2's row stops after 2 tokens; rows without it run all 12
    ends = [o.tokens.index(eos) if eos in o.tokens else 12 for o in ref]
    assert len(set(ends)) > 1
    order = [fin.row for fin in Engine(lm, max_batch=8, max_seq_len=64).generate_stream(
        (Request(p, [r]) for r, p in enumerate(prompts)), GREEDY, 12, eos, sync_every=1)]
    assert sorted(order) == list(range(len(prompts)))
    assert [ends[r] for r in order] == sorted(ends)  # earliest finish first (ties in row order)


def test_stream_errors_and_empty_budget(lm, prompts):
    engine = Engine(lm, max_batch=2, max_seq_len=20)
    with pytest.raises(ValueError, match=r"prompt 1 has 17 tokens"):
        list(engine.generate_stream([Request(prompts[0], [0]), Request(prompts[3], [1])], GREEDY, 8, 299))
    with pytest.raises(ValueError, match="request 0: no keys"):
        list(engine.generate_stream([Request(prompts[0], [])], GREEDY, 8, 299))
    with pytest.raises(ValueError, match="sync_every"):
        engine.generate_stream([], GREEDY, 8, 299, sync_every=0)  # checked at the call, not at the first row
    fresh = Engine(lm, max_batch=2, max_seq_len=64)
    out = list(fresh.generate_stream([Request(p, [0, 1]) for p in prompts[:2]], GREEDY, 0, 299))
    assert [(f.row, f.completion.tokens, f.completion.finished) for f in out] == [(r, [], False) for r in range(4)]
    assert fresh._k == []  # nothing to generate: no cache allocated


@pytest.mark.parametrize("params,max_batch", [(GREEDY, 8), (SAMPLED, 3)])
def test_a_request_budget_stops_its_rows_early(lm, prompts, params, max_batch, monkeypatch):
    # each row's tokens are the first of what it draws under the call's budget, cut at its own (max_batch 3:
    # slots freed early are refilled, so a reset slot's next row must start clean)
    budgets = [None, 3, 1, 12, 7, 5, 2]  # None: the call's 9; 12 is capped at it
    full = {f.request.tag: f.completion.tokens for f in Engine(lm, max_batch=8, max_seq_len=64).generate_stream(
        [Request(p, [60 + i], tag=i) for i, p in enumerate(prompts)], params, 9, None, seed=2)}
    engine = Engine(lm, max_batch=max_batch, max_seq_len=64)
    idle_slots = []
    idle = HostLoop.idle

    def idle_and_look(self, slots):
        idle(self, slots)
        idle_slots.append((slots, self.engine._state[1, slots].tolist(), self.engine._state[3, slots].tolist()))

    monkeypatch.setattr(HostLoop, "idle", idle_and_look)
    got = {f.request.tag: f.completion for f in engine.generate_stream(
        [Request(p, [60 + i], tag=i, max_new_tokens=b) for i, (p, b) in enumerate(zip(prompts, budgets))],
        params, 9, None, seed=2)}
    for i, b in enumerate(budgets):
        n = min(b or 9, 9)
        assert got[i].tokens == full[i][:n] and not got[i].finished
    # slots left free by a finished row decode on from position 0 (one key read) until refilled
    assert any(slots for slots, _, _ in idle_slots)
    assert all(set(pos) <= {0} and set(new) <= {0} for _, pos, new in idle_slots)


def test_budgets_per_key_match_budgets_per_request(lm, prompts):
    budgets = [[4, 1, 6], [2, 9, 3]]
    engine = Engine(lm, max_batch=4, max_seq_len=64)

    def tokens(requests) -> dict[int, list[int]]:
        return {f.request.keys[f.sample]: f.completion.tokens
                for f in engine.generate_stream(requests, SAMPLED, 8, None, seed=1)}

    per_key = tokens(Request(prompts[i], [10 * i + j for j in range(3)], max_new_tokens=b)
                     for i, b in enumerate(budgets))
    per_row = tokens(Request(prompts[i], [10 * i + j], max_new_tokens=n)
                     for i, b in enumerate(budgets) for j, n in enumerate(b))
    assert per_key == per_row and [len(per_key[10 * i + j]) for i in range(2) for j in range(3)] == [4, 1, 6, 2, 8, 3]


@pytest.mark.parametrize("cascade", [False, True])
def test_row_budgets_in_generate_cut_each_row_and_keep_its_group_s_block(lm, prompts, cascade, monkeypatch):
    # generate's budget per row: each row's tokens are the first of its unbudgeted draw, and a cascade
    # engine still decodes a prompt's rows in one block (a GRPO rollout whose rows stop on eos early)
    widths = []
    init = HostLoop.__init__

    def spy(self, *args):
        init(self, *args)
        widths.append(self.width)

    monkeypatch.setattr(HostLoop, "__init__", spy)
    engine = Engine(lm, max_batch=6, max_seq_len=64, cascade=cascade)
    kw = dict(num_samples=3, seed=4, row_keys=[200 + r for r in range(9)])
    full = engine.generate(prompts[:3], SAMPLED, 10, None, **kw)
    budgets = [1, 10, 4, 7, 2, 12, 5, 9, 3]  # 12 is capped at the call's 10
    cut = engine.generate(prompts[:3], SAMPLED, 10, None, row_max_new_tokens=budgets, **kw)
    assert [o.tokens for o in cut] == [f.tokens[:min(b, 10)] for f, b in zip(full, budgets)]
    assert not any(o.finished for o in cut) and len({tuple(f.tokens) for f in full}) == 9
    assert widths == [3 if cascade else 1] * 2
    with pytest.raises(ValueError, match="row_max_new_tokens has 2 budgets for 9 output rows"):
        engine.generate(prompts[:3], SAMPLED, 10, None, row_max_new_tokens=[1, 2], **kw)


@pytest.mark.parametrize("bad", [0, [3, 0], [3]])
def test_a_request_budget_must_be_positive_and_one_per_key(lm, prompts, bad):
    engine = Engine(lm, max_batch=2, max_seq_len=64)
    with pytest.raises(ValueError, match=r"request 1: max_new_tokens=.* for 2 key\(s\) \(one budget >= 1"):
        list(engine.generate_stream([Request(prompts[0], [0]), Request(prompts[1], [1, 2], max_new_tokens=bad)],
                                    GREEDY, 4, 299))


def test_auto_max_batch_from_free_memory(lm):
    per_row = sizing.kv_cache_bytes_per_row(lm, 100)
    # 2 layers x 2 kv heads x 16 head dims x 100 positions, keys and values, fp32; plus the logits row
    assert per_row == 2 * 2 * 2 * 16 * 100 * 4 + 300 * 12
    fixed = sizing.AUTO_RESERVE_BYTES + 10_000

    def rows(n: float) -> int:
        free = int((fixed + n * per_row) / sizing.AUTO_MEMORY_FRACTION) + 1
        return sizing.auto_max_batch(lm, 100, extra_bytes=10_000, free_bytes=free)

    assert rows(37) == 37 and rows(37.5) == 37
    assert rows(10_000) == sizing.AUTO_ROWS_CAP and rows(-5) == 1
    assert sizing.auto_max_batch(lm, 100) == sizing.AUTO_ROWS_CPU  # the model is on the CPU
    assert Engine(lm, max_batch=0, max_seq_len=64).max_batch == sizing.AUTO_ROWS_CPU
    with pytest.raises(ValueError, match="max_batch >= 0"):
        Engine(lm, max_batch=-1)


def _prefixed_prompts(lm, rests=(3, 5, 1, 4, 2), heads=(9, 4)):
    """Prompts made of a shared head and a rest of their own: rests[0..2] after head 0, the others
    after head 1; their ``SharedPrefix`` handles; and one prompt with no shared part."""
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        def embed(n):
            return lm.get_input_embeddings()(torch.randint(0, 300, (n,), generator=gen))

        shared = [embed(n) for n in heads]
        handles = [SharedPrefix(n) for n in heads]
        prompts, prefixes = [], []
        for j, n in enumerate(rests):
            g = 0 if j < 3 else 1
            prompts.append(torch.cat([shared[g], embed(n)]))
            prefixes.append(handles[g])
        prompts.append(embed(7))
        prefixes.append(None)
    return prompts, prefixes


def test_a_shared_prefix_is_prefilled_once_with_the_same_keys_and_logits(lm):
    prompts, prefixes = _prefixed_prompts(lm)
    engine = Engine(lm, max_batch=8, max_seq_len=64)
    engine.prepare()
    calls = []
    forward = engine._prefill_forward
    engine._prefill_forward = lambda x, lens, *a: calls.append(sorted(lens)) or forward(x, lens, *a)
    with torch.no_grad():
        whole = engine._prefill(prompts)
        calls.clear()
        shared = engine._prefill(prompts, prefixes)
    # the heads once (both in one forward, with the unshared prompt), then only the rests
    assert sorted(calls) == [[1, 2, 3, 4, 5], [4, 7, 9]]
    for a, b in zip(whole, shared):
        assert a.keys.shape == b.keys.shape
        torch.testing.assert_close(b.keys, a.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.values, a.values, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.logits, a.logits, rtol=1e-5, atol=1e-5)
    # a prefix's prefill handed back in ``heads`` serves a later call: only the rest is prefilled
    heads = {}
    with torch.no_grad():
        calls.clear()
        engine._prefill(prompts[3:], prefixes[3:], heads)  # prefix 1's two prompts, then the unshared one
        assert list(heads) == [prefixes[3]] and sorted(calls) == [[2, 4], [4, 7]]
        calls.clear()
        (later,) = engine._prefill(prompts[3:4], prefixes[3:4], heads)
    assert calls == [[4]]
    torch.testing.assert_close(later.keys, whole[3].keys, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(later.logits, whole[3].logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("params,max_batch", [(GREEDY, 8), (SAMPLED, 8), (GREEDY, 2)])
def test_requests_sharing_a_prefix_draw_what_they_draw_alone(lm, params, max_batch):
    # max_batch 2: a prefix's requests are admitted in different windows (its kept prefill reused)
    prompts, prefixes = _prefixed_prompts(lm)

    def tokens(with_prefixes: bool) -> dict[int, list[int]]:
        requests = [Request(p, [40 + i], tag=i, prefix=pre if with_prefixes else None)
                    for i, (p, pre) in enumerate(zip(prompts, prefixes))]
        return {fin.request.tag: fin.completion.tokens for fin in Engine(lm, max_batch=max_batch, max_seq_len=64)
                .generate_stream(requests, params, 10, 299, seed=4)}

    alone = tokens(False)
    assert tokens(True) == alone and len({tuple(t) for t in alone.values()}) == len(alone)


def test_a_shared_prefix_must_leave_the_prompt_a_position(lm, prompts):
    engine = Engine(lm, max_batch=2, max_seq_len=64)
    for bad in (0, prompts[0].shape[0]):
        with pytest.raises(ValueError, match=rf"request 1: a shared prefix of {bad} positions in a prompt of 5 "):
            list(engine.generate_stream([Request(prompts[1], [0]), Request(prompts[0], [1], prefix=SharedPrefix(bad))],
                                        GREEDY, 4, 299))


def test_a_shared_prefix_is_kept_for_its_requests_admitted_later(lm, monkeypatch):
    # one slot: each request is admitted alone, yet each prefix is prefilled only once
    prompts, prefixes = _prefixed_prompts(lm)
    positions = []
    forward = Engine._prefill_forward
    monkeypatch.setattr(Engine, "_prefill_forward",
                        lambda self, x, lens, *a: positions.append(sum(lens)) or forward(self, x, lens, *a))
    kept = []
    admit = HostLoop.admit

    def admit_and_look(self, device):
        yield from admit(self, device)
        kept.append([prefixes.index(p) for p in self.heads])

    monkeypatch.setattr(HostLoop, "admit", admit_and_look)
    requests = [Request(p, [i], tag=i, prefix=pre) for i, (p, pre) in enumerate(zip(prompts, prefixes))]
    got = {f.request.tag: f.completion.tokens
           for f in Engine(lm, max_batch=1, max_seq_len=64).generate_stream(requests, GREEDY, 6, 299)}
    assert sum(positions) == 9 + 4 + sum(p.shape[0] for p in prompts) - 3 * 9 - 2 * 4
    # a prefix is let go once the stream has moved past its requests
    assert [k for i, k in enumerate(kept) if i == 0 or k != kept[i - 1]] == [[0], [3], []]
    plain = Engine(lm, max_batch=1, max_seq_len=64).generate(prompts, GREEDY, 6, 299)
    assert [got[i] for i in range(len(prompts))] == [o.tokens for o in plain]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_shared_prefix_prefill_on_cuda(lm):
    # the rests' masked attention in the memory-efficient kernel, the whole prompts' in flash (bf16)
    prompts, prefixes = _prefixed_prompts(lm)
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2)):
        gpu = Qwen2ForCausalLM(lm.config).to("cuda", dtype).eval()
        gpu.load_state_dict(lm.state_dict())
        engine = Engine(gpu, max_batch=8, max_seq_len=64)
        engine.prepare()
        embeds = [p.to("cuda", dtype) for p in prompts]
        with torch.no_grad():
            whole, shared = engine._prefill(embeds), engine._prefill(embeds, prefixes)
        for a, b in zip(whole, shared):
            torch.testing.assert_close(b.keys.float(), a.keys.float(), rtol=tol, atol=tol)
            torch.testing.assert_close(b.logits, a.logits, rtol=tol, atol=tol * 10)
