"""Cascade decoding (a shared prompt's keys/values once per block of rows): the partial-attention merge
against one attention, the cascade layer against the plain layer, and the engine's tokens against
the plain path (fp32 on CPU: the same greedy tokens, and the same sampled tokens under the same keys)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen2ForCausalLM

from tlvr_cli.engine.attention import merge_partials, partial_attention
from tlvr_cli.engine.generate import CascadeShape, Engine
from tlvr_cli.engine.layers import cascade_layer, decode_layer
from tlvr_cli.engine.sampling import SamplingParams, sample_keyed

GREEDY = SamplingParams(temperature=0.0)
SAMPLED = SamplingParams(temperature=1.0, top_k=40, top_p=0.95)
LENGTHS = (5, 11, 3, 17, 8)


def test_partial_attentions_merge_to_one_attention():
    gen = torch.Generator().manual_seed(0)
    q, ka, va = (torch.randn(3, 2, 4, 8, generator=gen) * 2 for _ in range(3))
    kb, vb = (torch.randn(3, 2, 6, 8, generator=gen) * 2 for _ in range(2))
    # ragged: each batch row sees a different prefix of each part (at least one key of each)
    valid_a = torch.arange(4)[None] < torch.tensor([1, 4, 2])[:, None]
    valid_b = torch.arange(6)[None] < torch.tensor([6, 3, 1])[:, None]
    mask_a, mask_b = (torch.zeros(v.shape).masked_fill(~v, float("-inf"))[:, None, None] for v in (valid_a, valid_b))
    a, b = partial_attention(q, ka, va, mask_a, 8 ** -0.5), partial_attention(q, kb, vb, mask_b, 8 ** -0.5)
    whole = F.scaled_dot_product_attention(q, torch.cat([ka, kb], 2), torch.cat([va, vb], 2),
                                           attn_mask=torch.cat([valid_a, valid_b], 1)[:, None, None])
    assert torch.allclose(merge_partials(a, b), whole, atol=1e-6)
    scores = q @ ka.transpose(-1, -2) * 8 ** -0.5 + mask_a
    assert torch.allclose(a[1], scores.logsumexp(-1, keepdim=True), atol=1e-6)
    assert not torch.allclose(a[0], whole, atol=1e-2)  # one part alone is not the answer


def test_cascade_layer_matches_decode_layer(lm):
    # 2 blocks of 3 rows; prompts of 5 and 9 tokens; the rows are 0..4 new tokens into their answers
    width, cap, heads, kv, hd = 3, 32, 4, 2, 16
    plens, new_pos = [5, 9], torch.tensor([0, 3, 1, 4, 2, 0])
    gen = torch.Generator().manual_seed(2)
    prompt_kv = [torch.randn(2, kv, n, hd, generator=gen) for n in plens]
    own_kv = torch.randn(2, 6, kv, 8, hd, generator=gen)  # each row's new tokens so far
    plain = torch.zeros(2, 6, kv, cap, hd)
    cascade = torch.zeros(2, 6, kv, cap, hd)
    pos = torch.tensor([plens[r // width] for r in range(6)]) + new_pos
    for r in range(6):
        n, j = plens[r // width], int(new_pos[r])
        plain[:, r, :, :n] = prompt_kv[r // width]
        plain[:, r, :, n:n + j] = own_kv[:, r, :, :j]
        cascade[:, r, :, cap - j:] = own_kv[:, r, :, :j].flip(2)  # the j-th new token at cap - 1 - j
    for g, n in enumerate(plens):
        cascade[:, g, :, :n] = prompt_kv[g]
    x = torch.randn(6, 1, 64, generator=gen)
    cos, sin = lm.model.rotary_emb(x, pos[:, None])
    layer, rows = lm.model.layers[0], torch.arange(6)
    mask = torch.zeros(6, cap).masked_fill_(torch.arange(cap)[None] > pos[:, None], float("-inf"))[:, None, None]
    prefix_mask = torch.zeros(2, 16).masked_fill_(torch.arange(16)[None] >= torch.tensor(plens)[:, None],
                                                  float("-inf"))[:, None, None]
    suffix_mask = torch.zeros(6, 8).masked_fill_(torch.arange(8)[None] < 7 - new_pos[:, None],
                                                 float("-inf"))[:, None, None]
    with torch.no_grad():
        want = decode_layer(layer, x, cos, sin, plain[0], plain[1], rows, pos, mask, heads, kv, hd)
        got = cascade_layer(layer, x, cos, sin, cascade[0], cascade[1], rows, new_pos, prefix_mask, suffix_mask,
                            heads, kv, hd, width, False)
    assert torch.allclose(got, want, atol=1e-5)
    # the new key went below the row's earlier new tokens, nowhere else
    for r in range(6):
        assert torch.equal(cascade[0, r, :, cap - 1 - new_pos[r]], plain[0, r, :, pos[r]])
    for g, n in enumerate(plens):
        assert torch.equal(cascade[0, g, :, :n], prompt_kv[g][0])


def run(lm, prompts, params, n, eos, **kw) -> list[tuple[list[int], bool]]:
    engine_kw = {"cascade": True} | {k: kw.pop(k) for k in ("max_batch", "cascade") if k in kw}
    outs = Engine(lm, max_seq_len=64, **engine_kw).generate(prompts, params, n, eos, **kw)
    return [(o.tokens, o.finished) for o in outs]


@pytest.mark.parametrize("max_batch", [16, 6, 4, 2])  # all rows at once; blocks refilled; a prompt split over blocks
def test_cascade_greedy_matches_plain(lm, prompts, max_batch):
    plain = run(lm, prompts, GREEDY, 12, 7, num_samples=3, max_batch=15, cascade=False)
    assert 0 < sum(done for _, done in plain) < len(plain)  # eos: rows of a block finish at different steps
    assert run(lm, prompts, GREEDY, 12, 7, num_samples=3, max_batch=max_batch) == plain


@pytest.mark.parametrize("max_batch", [16, 5, 3])
def test_cascade_samples_match_plain_under_the_same_keys(lm, prompts, max_batch):
    keys = [100 + 3 * r for r in range(4 * len(prompts))]
    kw = dict(num_samples=4, seed=2, row_keys=keys)
    eos = run(lm, prompts, SAMPLED, 10, 299, max_batch=4, cascade=False, **kw)[0][0][3]  # a token row 0 draws
    plain = run(lm, prompts, SAMPLED, 10, eos, max_batch=4, cascade=False, **kw)
    assert len({tuple(t) for t, _ in plain[:4]}) > 1 and 0 < sum(done for _, done in plain) < len(plain)
    assert run(lm, prompts, SAMPLED, 10, eos, max_batch=max_batch, **kw) == plain


def test_idle_rows_never_write_over_a_prompt(lm, prompts):
    # a tight cache (longest prompt + max_new_tokens, as GRPO sizes it) and frequent host reads: a block
    # whose rows are done decodes idle while a later block runs on, its own keys must stay in its region
    order = [prompts[i] for i in (0, 2, 4, 3)]  # the longest prompt admitted last
    kw = dict(num_samples=2, sync_every=2)
    plain = [(o.tokens, o.finished) for o in Engine(lm, max_batch=4, max_seq_len=17 + 12, cascade=False).generate(
        order, GREEDY, 12, 1, **kw)]
    assert [len(t) for t, _ in plain] == [5, 5] + [12] * 6
    cascade = Engine(lm, max_batch=4, max_seq_len=17 + 12, cascade=True).generate(order, GREEDY, 12, 1, **kw)
    assert [(o.tokens, o.finished) for o in cascade] == plain


def test_cascade_reads_each_prompt_once_per_block(lm, prompts, monkeypatch):
    engine = Engine(lm, max_batch=8, max_seq_len=64, cascade=True)
    shapes, steps = [], engine._run_steps
    monkeypatch.setattr(engine, "_run_steps", lambda b, kv_len, *a: (shapes.append((b, kv_len)), steps(b, kv_len, *a)))
    outs = engine.generate(prompts[:3], GREEDY, 12, 299, num_samples=2, ignore_eos=True)
    # 3 prompts x 2 rows in blocks of 2: 4 blocks (a power of two) x 2 rows decoded; the longest prompt
    # (11) rounds up to one bucket of prompt keys, the new tokens to buckets of their own
    assert {b for b, _ in shapes} == {8} and all(isinstance(s, CascadeShape) for _, s in shapes)
    assert {(s.width, s.prefix) for _, s in shapes} == {(2, 52)}  # capped at the prompt region, 64 - 12
    assert {s.suffix for _, s in shapes} == {12}
    assert [o.tokens for o in outs] == [t for t, _ in run(lm, prompts[:3], GREEDY, 12, 299, num_samples=2,
                                                          ignore_eos=True, max_batch=8, cascade=False)]
    # the prompt's keys sit once, in the cache row of its block; the rows' own keys grow down from the end
    prefill = engine._prefill([prompts[1]])[0]
    assert torch.allclose(engine._k[0][1, :, :11], prefill.keys[0], atol=1e-6)
    assert not engine._k[0][3, :, :11].abs().sum() > 0  # the second row of block 1 holds no copy of it


def test_plain_and_cascade_calls_share_one_engine(lm, prompts):
    # layouts share the cache; a long call leaves state behind that a shorter cascade call must not read
    engine = Engine(lm, max_batch=6, max_seq_len=64, cascade=True)
    fresh = [run(lm, prompts, GREEDY, n, 299, num_samples=s, max_batch=6, ignore_eos=True)
             for n, s in ((40, 1), (12, 3), (30, 2))]
    for (n, s), want in zip(((40, 1), (12, 3), (30, 2)), fresh):
        outs = engine.generate(prompts, GREEDY, n, 299, num_samples=s, ignore_eos=True)
        assert [(o.tokens, o.finished) for o in outs] == want
    outs = engine.generate(prompts, GREEDY, 12, 299, num_samples=3, ignore_eos=True)
    assert [(o.tokens, o.finished) for o in outs] == fresh[1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cascade_in_graphs_and_compiled_matches_plain_on_cuda(lm, prompts):
    gpu = Qwen2ForCausalLM(lm.config).cuda().eval()
    gpu.load_state_dict(lm.state_dict())
    cuda_prompts = [p.cuda() for p in prompts]
    for params in (GREEDY, SAMPLED):
        want = [o.tokens for o in Engine(gpu, max_batch=16, max_seq_len=64, cascade=False).generate(
            cuda_prompts, params, 12, 7, num_samples=3, seed=4)]
        for compile in (False, True):
            engine = Engine(gpu, max_batch=16, max_seq_len=64, cuda_graphs=True, compile=compile, cascade=True)
            for _ in range(2):  # the second call replays the graphs the first captured
                outs = engine.generate(cuda_prompts, params, 12, 7, num_samples=3, seed=4)
                assert [o.tokens for o in outs] == want, (params, compile)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_partials_on_cuda_follow_float32():
    from tlvr_cli.engine.attention import fp32_products

    device = torch.device("cuda")
    assert fp32_products(device, False)  # scores by float32 GEMMs: nothing rounds to 16 bits before the softmax
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(8, 2, 64, 128, generator=gen, device=device) for _ in range(3))
    mask = torch.zeros(8, 1, 1, 64, device=device)
    want = F.scaled_dot_product_attention(q, k, v)
    for fn, fp32 in ((partial_attention, True), (torch.compile(partial_attention), fp32_products(device, True))):
        o, _ = fn(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask, 128 ** -0.5, fp32)
        assert o.dtype == torch.float32 and (o - want).abs().max() < 2e-2


CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                      reason="needs CUDA")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_top_k_in_16_bits_draws_what_float32_draws(device):
    # temperature 1 takes the top-k of the 16-bit logits themselves: the same candidates, ties and draws
    gen = torch.Generator().manual_seed(0)
    tied = (torch.randint(-40, 40, (64, 151936), generator=gen).float() / 8).bfloat16()  # many exact ties
    for logits in (tied.to(device), (torch.randn(64, 151936, generator=gen) * 3).half().to(device)):
        for params in (SamplingParams(1.0, 50), SamplingParams(1.0, 20, 0.9)):
            for pos in range(3):
                seeds, at = torch.arange(64, device=device) * 7 + pos, torch.full((64,), pos, device=device)
                half = sample_keyed(logits, params, seeds, at)
                assert torch.equal(half, sample_keyed(logits.float(), params, seeds, at))
