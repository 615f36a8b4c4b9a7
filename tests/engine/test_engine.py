"""The generation engine against HF ``generate`` on a tiny random Qwen2, and the sampler against HF's warpers."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen2ForCausalLM
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from tlvr_cli.engine.generate import Engine
from tlvr_cli.engine.sampling import SamplingParams, keyed_uniform, sample_keyed

GREEDY = SamplingParams(temperature=0.0)
LENGTHS = (5, 11, 3, 17, 8)


def hf_greedy(lm, prompt: torch.Tensor, n: int, eos: int) -> list[int]:
    out = lm.generate(inputs_embeds=prompt[None], attention_mask=torch.ones(1, prompt.shape[0], dtype=torch.long),
                      do_sample=False, max_new_tokens=n, eos_token_id=eos, pad_token_id=eos)
    return out[0].tolist()


@pytest.fixture(scope="module")
def reference(lm, prompts) -> list[list[int]]:
    """HF greedy tokens, 12 per prompt, with an eos id (299) the model does not produce here."""
    refs = [hf_greedy(lm, p, 12, 299) for p in prompts]
    assert all(len(r) == 12 and 299 not in r for r in refs)
    return refs


def test_greedy_matches_hf_with_continuous_batching(lm, prompts, reference):
    outs = Engine(lm, max_batch=2, max_seq_len=64).generate(prompts, GREEDY, 12, 299)
    assert [o.tokens for o in outs] == reference
    assert not any(o.finished for o in outs)
    assert len({tuple(r) for r in reference}) == len(reference)  # the check is not vacuous


def test_batched_prefill_in_chunks_matches_hf(lm, prompts, reference, monkeypatch):
    # a budget of two padded prompts (each padded to SHAPE_ALIGN) splits the 5 into several right-padded forwards
    from tlvr_cli.engine import generate
    from tlvr_cli.engine.attention import SHAPE_ALIGN

    monkeypatch.setattr(generate, "PREFILL_TOKENS", 2 * SHAPE_ALIGN)
    engine = Engine(lm, max_batch=8, max_seq_len=64)
    calls = []
    batch = engine._prefill_batch
    monkeypatch.setattr(engine, "_prefill_batch", lambda embs: calls.append(len(embs)) or batch(embs))
    outs = engine.generate(prompts, GREEDY, 12, 299)
    assert [o.tokens for o in outs] == reference
    assert sum(calls) == len(prompts) and max(calls) > 1 and len(calls) > 1


def test_prefill_attends_over_a_few_aligned_lengths(lm, prompts, reference, monkeypatch):
    # cuDNN's attention builds a plan per new shape: prompts of 3 to 17 tokens must all be prefilled at one
    # padded length, and the padding after them must change nothing they see
    from tlvr_cli.engine.attention import SHAPE_ALIGN

    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, *args, **kwargs):
        seen.append(q.shape[2])
        return sdpa(q, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    engine = Engine(lm, max_batch=8, max_seq_len=64)
    prefills = [engine._prefill_batch([p]) for p in prompts]
    assert set(seen) == {SHAPE_ALIGN}
    outs = engine.generate(prompts, GREEDY, 12, 299)
    assert [o.tokens for o in outs] == reference
    for p, (one,) in zip(prompts, prefills):
        assert one.keys.shape[-2] == p.shape[0]  # the keys kept are the prompt's own


CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                      reason="needs CUDA")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rms_norm_rounds_as_the_module(device, dtype):
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    from tlvr_cli.engine.layers import rms_norm

    gen = torch.Generator().manual_seed(0)
    norm = Qwen2RMSNorm(256, eps=1e-6).to(device, dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(256, generator=gen) * 2)
    x = (torch.randn(4, 7, 256, generator=gen) * 3).to(device, dtype).requires_grad_()
    want, got = norm(x), rms_norm(norm, x)
    grads = [torch.autograd.grad(y.float().square().sum(), [x, norm.weight]) for y in (want, got)]
    # the normalised value is rounded to x's dtype before the weight multiplies it, as the module does:
    # the same values on CPU; on CUDA the fused kernel sums in another order, so a row's scale may differ
    # in its last fp32 bit (which in 16 bits flips a rounding now and then)
    assert got.dtype == dtype
    if device == "cpu":
        assert torch.equal(got, want)
    elif dtype == torch.float32:
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)
    else:
        assert (got != want).float().mean() <= 0.01 and (got - want).abs().max() <= 1e-2 * want.abs().max()
    for a, b in zip(*grads):
        assert (a.float() - b.float()).norm() <= (1e-6 if device == "cpu" else 1e-2) * a.float().norm()
    if dtype == torch.bfloat16:  # and the test tells: rounding once, after the weight, changes many values
        once = F.rms_norm(x, (256,), norm.weight, eps=1e-6)
        assert (once != want).float().mean() > 0.05


def test_fused_weights_give_the_same_layer(lm):
    from tlvr_cli.engine.layers import decode_layer

    engine = Engine(lm, max_batch=4, max_seq_len=32)
    engine._sync_fused()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 1, 64, generator=gen)
    pos = torch.tensor([4, 9, 2])
    cos, sin = lm.model.rotary_emb(x, pos[:, None])
    mask = torch.zeros(3, 16).masked_fill_(torch.arange(16)[None] > pos[:, None], float("-inf"))[:, None, None]
    outs, caches = [], []
    for fused in (None, engine._fused[1]):
        k, v = torch.randn(2, 3, 2, 16, 16, generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            outs.append(decode_layer(lm.model.layers[1], x, cos, sin, k, v, torch.arange(3), pos, mask, 4, 2, 16,
                                     fused))
        caches.append((k, v))
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*caches))
    # the fused buffers are the model's own storage: the same Parameter objects, re-pointed, not copied
    layer = lm.model.layers[0]
    qkv, _, gate_up = engine._fused[0]
    up = layer.mlp.up_proj.weight
    assert up.data_ptr() == gate_up[128:].data_ptr() and up.requires_grad and not gate_up.requires_grad
    assert layer.self_attn.k_proj.weight.data_ptr() == qkv[64:80].data_ptr()
    before = up.detach().clone()
    with torch.no_grad():  # an optimizer step in place is in the buffers at once, before any sync
        up.add_(1.0)
    assert torch.equal(gate_up[128:], before + 1.0)
    # a parameter replaced by a new tensor is copied into its slot at the next sync and moved there
    layer.mlp.up_proj.weight = torch.nn.Parameter(before.clone())
    engine._sync_fused()
    assert engine._fused[0][2] is gate_up and torch.equal(gate_up[128:], before)
    assert layer.mlp.up_proj.weight.data_ptr() == gate_up[128:].data_ptr()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotating_q_and_k_together_is_hf_rotary_bit_for_bit(lm, dtype):
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    from tlvr_cli.engine.layers import rotate_heads

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 5, 6, 16, generator=gen).to(dtype)  # (B, N, heads, head_dim): 4 query + 2 key heads
    pos = torch.randint(0, 900, (3, 5), generator=gen)
    cos, sin = lm.model.rotary_emb(x, pos)
    q, k = apply_rotary_pos_emb(x[:, :, :4].transpose(1, 2), x[:, :, 4:].transpose(1, 2), cos, sin)
    both = rotate_heads(x, cos, sin)
    assert both.dtype == dtype
    assert torch.equal(both[:, :, :4].transpose(1, 2), q) and torch.equal(both[:, :, 4:].transpose(1, 2), k)


def test_training_a_model_whose_weights_the_engine_fused_is_unchanged(lm, prompts):
    # as in GRPO: the optimizer exists before the first rollout moves the q/k/v and gate/up
    # parameters into the engine's buffers; its steps then give the weights a plain copy gets, and
    # the engine decodes them with no refresh
    import copy

    models = [copy.deepcopy(lm).train() for _ in range(2)]
    opts = [torch.optim.AdamW(model.parameters(), lr=1e-2) for model in models]
    engine = Engine(models[1], max_batch=4, max_seq_len=64)
    engine.generate(prompts[:1], GREEDY, 1, 299)  # the cache exists: the fused buffers stay (eager on CPU)
    engine._sync_fused()
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(7))
    for model, opt in zip(models, opts):
        for _ in range(2):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.equal(a, b), name
    plain = Engine(models[0].eval(), max_batch=4, max_seq_len=64).generate(prompts, GREEDY, 8, 299)
    before = Engine(lm, max_batch=4, max_seq_len=64).generate(prompts, GREEDY, 8, 299)
    assert [o.tokens for o in before] != [o.tokens for o in plain]  # the steps changed what is decoded
    assert engine._fused is not None  # no sync since the steps: the buffers are the trained weights
    assert [o.tokens for o in engine.generate(prompts, GREEDY, 8, 299)] == [o.tokens for o in plain]


def test_deferred_residual_is_the_same_layer(lm):
    # a layer may hand its MLP output unsummed to the next one, which adds it before its input norm
    from tlvr_cli.engine.layers import decode_layer, resume

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 1, 64, generator=gen)
    pos = torch.tensor([4, 9, 2])
    cos, sin = lm.model.rotary_emb(x, pos[:, None])
    mask = torch.zeros(3, 16).masked_fill_(torch.arange(16)[None] > pos[:, None], float("-inf"))[:, None, None]
    args = (torch.arange(3), pos, mask, 4, 2, 16)
    outs = []
    for defer in (False, True):
        k, v = torch.randn(2, 3, 2, 16, 16, generator=torch.Generator().manual_seed(6))
        h = x
        with torch.no_grad():
            for layer in lm.model.layers[:2]:
                h = decode_layer(layer, h, cos, sin, k, v, *args, defer=defer)
        assert isinstance(h, tuple) == defer
        outs.append(resume(h))
    assert torch.equal(outs[0], outs[1])


def test_weight_copy_decodes_the_same_and_follows_the_model(lm, prompts, reference):
    # copy_weights: the engine decodes from its own copy, refreshed from the model at each call
    engine = Engine(lm, max_batch=4, max_seq_len=64, copy_weights=True)
    assert [o.tokens for o in engine.generate(prompts, GREEDY, 12, 299)] == reference
    assert engine._copy is not None and engine._copy is not lm
    copy_params = [p.data_ptr() for p in engine._copy.parameters()]
    # the model's parameters change in place, and are then replaced by new tensors (as FSDP2's
    # gathers do): the next call decodes the new weights from the same copy
    layer = lm.model.layers[1]
    saved = {n: p.detach().clone() for n, p in lm.named_parameters()}
    try:
        with torch.no_grad():
            layer.mlp.up_proj.weight.mul_(-1.0)
            layer.self_attn.q_proj.weight = torch.nn.Parameter(layer.self_attn.q_proj.weight * 0.5)
        want = [o.tokens for o in Engine(lm, max_batch=4, max_seq_len=64).generate(prompts, GREEDY, 12, 299)]
        assert want != reference
        assert [o.tokens for o in engine.generate(prompts, GREEDY, 12, 299)] == want
        assert [p.data_ptr() for p in engine._copy.parameters()] == copy_params
    finally:
        q_weight = saved["model.layers.1.self_attn.q_proj.weight"]
        layer.self_attn.q_proj.weight = torch.nn.Parameter(q_weight, requires_grad=False)
        with torch.no_grad():
            layer.mlp.up_proj.weight.copy_(saved["model.layers.1.mlp.up_proj.weight"])
    assert [o.tokens for o in engine.generate(prompts, GREEDY, 12, 299)] == reference
    # a bf16 model gets a bf16 copy with the model's own buffers, and the same tokens
    half = Qwen2ForCausalLM(lm.config).eval()
    half.load_state_dict(lm.state_dict())
    half = half.to(torch.bfloat16)
    half_prompts = [p.to(torch.bfloat16) for p in prompts]
    plain = Engine(half, max_batch=4, max_seq_len=64).generate(half_prompts, GREEDY, 6, 299)
    copied = Engine(half, max_batch=4, max_seq_len=64, copy_weights=True)
    assert [o.tokens for o in copied.generate(half_prompts, GREEDY, 6, 299)] == [o.tokens for o in plain]
    assert {p.dtype for p in copied._copy.parameters()} == {torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32


def test_greedy_num_samples_share_prefill(lm, prompts, reference):
    outs = Engine(lm, max_batch=4, max_seq_len=64).generate(prompts, GREEDY, 12, 299, num_samples=3)
    assert len(outs) == 3 * len(prompts)
    assert [o.tokens for o in outs] == [r for r in reference for _ in range(3)]  # prompt-major


def test_eos_stops_early_and_is_excluded(lm, prompts, reference):
    eos = reference[1][4]
    cut = reference[1].index(eos)
    outs = Engine(lm, max_batch=3, max_seq_len=64).generate(prompts, GREEDY, 12, [eos, 298])
    assert outs[1].tokens == reference[1][:cut] and outs[1].finished
    assert hf_greedy(lm, prompts[1], 12, eos) == reference[1][:cut] + [eos]
    for o, ref in zip(outs, reference):  # every row stops at its own first eos, or runs to the limit
        expect = ref[:ref.index(eos)] if eos in ref else ref
        assert o.tokens == expect and o.finished == (eos in ref)


def test_single_new_token(lm, prompts, reference):
    outs = Engine(lm, max_batch=2, max_seq_len=64).generate(prompts, GREEDY, 1, 299, num_samples=2)
    assert [o.tokens for o in outs] == [r[:1] for r in reference for _ in range(2)]


def test_ignore_eos_runs_to_max_new_tokens(lm, prompts, reference):
    eos = reference[0][0]
    outs = Engine(lm, max_batch=2, max_seq_len=64).generate(prompts, GREEDY, 12, eos, ignore_eos=True)
    assert [o.tokens for o in outs] == reference
    assert all(len(o.tokens) == 12 and not o.finished for o in outs)


def test_on_token_sees_every_token(lm, prompts, reference):
    seen: dict[int, list[int]] = {}
    eos = 7  # rows of prompts 0 and 3 produce it early, freeing their slots
    outs = Engine(lm, max_batch=3, max_seq_len=64).generate(prompts, GREEDY, 12, eos, num_samples=2,
                                                            on_token=lambda r, t: seen.setdefault(r, []).append(t))
    assert sorted(seen) == list(range(len(outs)))
    for r, o in enumerate(outs):
        assert seen[r] == o.tokens + ([eos] if o.finished else [])
    assert [o.finished for o in outs] == [eos in reference[r // 2] for r in range(len(outs))]
    assert sum(o.finished for o in outs) == 4


def test_hf_left_padded_batch_agrees(lm, prompts, reference):
    """The per-prompt HF reference is also what HF produces for the whole batch, left-padded."""
    n, dim = max(LENGTHS), prompts[0].shape[1]
    emb = torch.zeros(len(prompts), n, dim)
    mask = torch.zeros(len(prompts), n, dtype=torch.long)
    for i, p in enumerate(prompts):
        emb[i, n - len(p):], mask[i, n - len(p):] = p, 1
    out = lm.generate(inputs_embeds=emb, attention_mask=mask, do_sample=False, max_new_tokens=12, eos_token_id=299,
                      pad_token_id=299)
    assert out.tolist() == reference


def test_sampling_is_deterministic_and_independent_of_max_batch(lm, prompts):
    params = SamplingParams(temperature=0.9, top_k=40, top_p=0.95)

    def run(max_batch: int, seed: int = 5) -> list[list[int]]:
        engine = Engine(lm, max_batch=max_batch, max_seq_len=64)
        outs = engine.generate(prompts, params, 10, 299, num_samples=3, seed=seed)
        return [o.tokens for o in outs]

    first = run(4)
    assert run(4) == first
    assert run(1) == first
    assert run(15) == first
    assert run(4, seed=6) != first
    assert len({tuple(t) for t in first[:3]}) > 1  # samples of one prompt differ


def test_prompt_too_long_raises(lm, prompts):
    engine = Engine(lm, max_batch=2, max_seq_len=20)
    with pytest.raises(ValueError, match=r"prompt 3 has 17 tokens.*max_seq_len is 20.*at most 12"):
        engine.generate(prompts, GREEDY, 8, 299)
    assert len(engine.generate(prompts[:1], GREEDY, 15, 299)[0].tokens) == 15  # 5 + 15 fits exactly


def hf_filter(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """HF generate's warpers in its order (temperature, top-k, top-p): the distribution to sample from."""
    ids = torch.zeros(logits.shape[0], 1, dtype=torch.long)
    out = logits.float()
    if params.temperature != 1.0:
        out = TemperatureLogitsWarper(params.temperature)(ids, out)
    if params.top_k:
        out = TopKLogitsWarper(params.top_k)(ids, out)
    if params.top_p < 1.0:
        out = TopPLogitsWarper(params.top_p)(ids, out)
    return out


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 50, 1.0), (0.7, 10, 1.0), (1.3, 0, 0.8), (0.5, 20, 0.9),
                                                     (1.0, 1, 0.5), (2.0, 300, 0.3)])
def test_keyed_draws_stay_inside_hf_filters(temperature, top_k, top_p):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 300, generator=gen) * 3
    logits[0, :5] = 4.0  # ties at the top-k boundary
    params = SamplingParams(temperature, top_k, top_p)
    kept = torch.isfinite(hf_filter(logits, params))
    n = 400
    draws = sample_keyed(logits.repeat_interleave(n, 0), params, torch.arange(6 * n), torch.full((6 * n,), 2))
    rows = torch.arange(6).repeat_interleave(n)
    assert kept[rows, draws].all()
    # every token the filters keep can be drawn: the support is HF's, not a subset of it
    for r in range(6):
        support = set(draws[rows == r].tolist())
        if int(kept[r].sum()) <= 5:
            assert support == set(kept[r].nonzero().flatten().tolist())


def test_sample_greedy_and_keyed_rows_are_independent():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    greedy = sample_keyed(logits, GREEDY, torch.arange(4), torch.zeros(4, dtype=torch.long))
    assert torch.equal(greedy, logits.argmax(-1))
    params = SamplingParams(temperature=1.0, top_k=10, top_p=0.9)
    seeds, pos = torch.tensor([3, 1, 4, 1]), torch.tensor([5, 9, 2, 6])
    batched = sample_keyed(logits, params, seeds, pos)
    alone = [sample_keyed(logits[i:i + 1], params, seeds[i:i + 1], pos[i:i + 1]).item() for i in range(4)]
    assert batched.tolist() == alone
    kept = torch.isfinite(hf_filter(logits, params))
    assert kept[torch.arange(4), batched].all()


def test_keyed_uniforms_are_uniform_and_distinct():
    u = keyed_uniform(torch.arange(50000), torch.full((50000,), 3))
    assert 0 <= float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.std()) - 12 ** -0.5) < 0.01
    first, second = (keyed_uniform(torch.tensor([7]), torch.tensor([step])) for step in (1, 2))
    assert not torch.equal(first, second)


def test_sample_keyed_follows_the_filtered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0, float("-inf"), 1.5]])
    params = SamplingParams(temperature=0.8, top_k=6, top_p=0.9)
    probs = hf_filter(logits, params).softmax(-1)[0]
    n = 20000
    draws = sample_keyed(logits.expand(n, -1), params, torch.arange(n), torch.full((n,), 11))
    freq = torch.bincount(draws, minlength=8).double() / n
    assert (freq[probs == 0] == 0).all()
    assert torch.allclose(freq, probs.double(), atol=0.015)


def test_top_k_keeps_ties_at_the_boundary():
    logits = torch.tensor([[5.0, 4.0, 4.0, 4.0, 1.0, 0.0]])
    params = SamplingParams(temperature=1.0, top_k=2)
    draws = sample_keyed(logits.expand(3000, -1), params, torch.arange(3000), torch.zeros(3000, dtype=torch.long))
    assert set(draws.tolist()) == {0, 1, 2, 3}  # HF keeps every logit equal to the k-th


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor on CPU needs a C++ compiler")
def test_compiled_layer_matches_eager_across_engines(lm, prompts, monkeypatch):
    # the GPU path compiled on CPU: one shared compiled layer serves engines of several sizes
    from torch._dynamo.utils import counters

    from tlvr_cli.engine import generate

    monkeypatch.setattr(generate, "COMPILE_DEVICES", ("cuda", "cpu"))
    torch._dynamo.reset()
    counters.clear()
    params = SamplingParams(temperature=1.0, top_k=20)
    engine = Engine(lm, max_batch=4, max_seq_len=64)
    want = [o.tokens for o in engine.generate(prompts, params, 12, 299, num_samples=2, seed=5)]
    for max_batch, max_seq_len in ((4, 64), (1, 64), (8, 96), (16, 64), (2, 128), (32, 80)):
        engine = Engine(lm, max_batch=max_batch, max_seq_len=max_seq_len, compile=True)
        outs = engine.generate(prompts, params, 12, 299, num_samples=2, seed=5)
        assert engine._fused is not None and engine._layer is not generate.decode_layer
        assert [o.tokens for o in outs] == want
    # rows, key length and cache sizes are dynamic from the first compile: a handful of variants
    # (one row, key length = cache length) instead of one per size, far below dynamo's recompile limit
    assert counters["frames"]["ok"] <= 6, dict(counters["frames"])
    # decoding from the engine's own copy: its q/k/v and gate/up weights are views into the fused buffers
    engine = Engine(lm, max_batch=8, max_seq_len=64, compile=True, copy_weights=True)
    assert [o.tokens for o in engine.generate(prompts, params, 12, 299, num_samples=2, seed=5)] == want
    q = engine._copy.model.layers[0].self_attn.q_proj.weight
    assert q.untyped_storage().data_ptr() == engine._fused[0][0].untyped_storage().data_ptr()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_match_eager(lm, prompts, reference):
    gpu_lm = Qwen2ForCausalLM(lm.config).cuda().eval()
    gpu_lm.load_state_dict(lm.state_dict())
    cuda_prompts = [p.cuda() for p in prompts]
    eager = Engine(gpu_lm, max_batch=4, max_seq_len=64).generate(cuda_prompts, GREEDY, 12, 299, num_samples=2)
    params = SamplingParams(temperature=1.0, top_k=20)
    sampled = Engine(gpu_lm, max_batch=4, max_seq_len=64).generate(cuda_prompts, params, 12, 299, num_samples=2, seed=1)
    for compile, copy in ((False, False), (True, False), (True, True)):
        graphed = Engine(gpu_lm, max_batch=4, max_seq_len=64, cuda_graphs=True, compile=compile, copy_weights=copy)
        for _ in range(2):  # the second call replays graphs captured by the first
            outs = graphed.generate(cuda_prompts, GREEDY, 12, 299, num_samples=2)
            assert [o.tokens for o in outs] == [o.tokens for o in eager]
        b = graphed.generate(cuda_prompts, params, 12, 299, num_samples=2, seed=1)
        assert [o.tokens for o in sampled] == [o.tokens for o in b]


def test_bench_generate_smoke():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_generate.py"
    spec = importlib.util.spec_from_file_location("bench_generate", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--config", "tiny", "--device", "cpu", "--dtype", "fp32", "--prompt-len", "12",
                         "--new-tokens", "6", "--batch", "2", "--samples", "2", "--reference-tokens", "2",
                         "--agreement", "4"])
    rates = result["tokens_per_s"]
    assert {"engine", "hf generate (kv cache)", "no-cache loop (estimated)", "bandwidth floor"} <= set(rates)
    assert all(r > 0 for r in rates.values())
    # fp32 on CPU: the engine's greedy tokens are HF's
    assert result["agreement"] == {"rows_identical": 1.0, "prefix": 1.0}
    assert rates["engine"] > 0 and rates["hf generate (kv cache)"] > 0
