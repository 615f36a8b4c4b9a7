"""Which key lengths a decode step attends over (and so how many CUDA graphs a run captures): the
whole cache while it is cheap against the weights or the split-KV kernels attend, ``KV_LEN_BUCKET``
steps otherwise; both decode the same tokens."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from tlvr_cli.engine.generate import KV_LEN_BUCKET, Engine
from tlvr_cli.engine.sampling import SamplingParams

# the released LLM (Qwen2.5-3B), built without memory: only its shapes matter here
QWEN25_3B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                 num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True)


def decode_lengths(engine: Engine, monkeypatch) -> list[int]:
    seen: list[int] = []
    run = engine._run_steps
    monkeypatch.setattr(engine, "_run_steps", lambda b, kv_len, *a: (seen.append(kv_len), run(b, kv_len, *a))[1])
    return seen


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_k=20)])
def test_reading_the_whole_cache_decodes_the_same_tokens(lm, monkeypatch, params):
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        prompts = [lm.get_input_embeddings()(torch.randint(0, 300, (n,), generator=gen)) for n in (70, 9)]
    bucketed, whole = Engine(lm, max_batch=2, max_seq_len=200), Engine(lm, max_batch=2, max_seq_len=200)
    whole._full_cache_rows = 10**9  # as if the cache were cheap against the weights
    seen_b, seen_w = decode_lengths(bucketed, monkeypatch), decode_lengths(whole, monkeypatch)
    a = bucketed.generate(prompts, params, 100, 299, seed=3, ignore_eos=True)
    b = whole.generate(prompts, params, 100, 299, seed=3, ignore_eos=True)
    assert [c.tokens for c in a] == [c.tokens for c in b] and all(len(c.tokens) == 100 for c in a)
    assert set(seen_w) == {200}  # one key length for the whole answer: one graph per row count
    assert len(set(seen_b)) > 1 and all(n % KV_LEN_BUCKET == 0 or n == 200 for n in seen_b)


def test_released_shapes_one_question_reads_the_whole_cache_rollouts_use_buckets():
    with torch.device("meta"):
        lm = Qwen2ForCausalLM(Qwen2Config(**QWEN25_3B))
    infer = Engine(lm, max_batch=1, max_seq_len=650 + 1024)
    assert infer._kv_len(1, 700) == 650 + 1024  # one capture for a whole answer of up to 1024 tokens
    rollout = Engine(lm, max_batch=64, max_seq_len=614 + 512)
    assert rollout._kv_len(64, 700) == 704  # 64 rows of full-length keys would weigh 43 % of the weights: buckets
    evaluate = Engine(lm, max_batch=8, max_seq_len=650 + 1024)
    assert evaluate._kv_len(8, 700) == 704 and evaluate._kv_len(1, 700) == 650 + 1024


def test_split_kv_kernels_read_the_whole_cache_bound():
    # the kernels read each row's own keys whatever the bound: one graph per row count, plain or cascade
    with torch.device("meta"):
        lm = Qwen2ForCausalLM(Qwen2Config(**QWEN25_3B))
    rollout = Engine(lm, max_batch=64, max_seq_len=614 + 512)
    rollout._split_kv = True
    assert rollout._kv_len(64, 700) == 614 + 512 and rollout._kv_len(64, 100) == 614 + 512
    assert rollout._cascade_shape(8, 64, 614, 40, 512) == (8, 614, 512)


def test_graphs_are_captured_once_per_key_and_survive_optimizer_steps(lm, monkeypatch):
    # the CUDA-graph bookkeeping on CPU: a "graph" that replays the eager step, captures counted
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        prompts = [lm.get_input_embeddings()(torch.randint(0, 300, (n,), generator=gen)) for n in (30, 12)]
    params = SamplingParams(temperature=1.0, top_k=20)
    engine = Engine(lm, max_batch=4, max_seq_len=128, cuda_graphs=True)
    captured: list[tuple[int, int]] = []

    class ReplayEager:
        def __init__(self, b, kv_len, p):
            captured.append((b, kv_len))
            self.replay = lambda: engine._decode_sample(b, kv_len, p)

    monkeypatch.setattr(engine, "_capture", ReplayEager)
    monkeypatch.setattr(engine, "_use_graphs", lambda device: Engine._use_graphs(engine, torch.device("cuda")))

    def rollout() -> list[list[int]]:
        return [c.tokens for c in engine.generate(prompts, params, 60, 299, num_samples=2, seed=7, ignore_eos=True)]

    eager = [c.tokens for c in Engine(lm, max_batch=4, max_seq_len=128).generate(
        prompts, params, 60, 299, num_samples=2, seed=7, ignore_eos=True)]
    assert rollout() == eager
    first = list(captured)
    assert len(first) == len(set(first)) > 1  # one capture per (rows, key length) key
    weights = {n: p.detach().clone() for n, p in lm.named_parameters()}
    try:
        with torch.no_grad():
            for p in lm.parameters():
                p.mul_(1.01)  # an optimizer step updates in place: the captured pointers stay valid
        rollout()
        assert captured == first  # the next rollout replays what the first captured
        old = lm.model.norm.weight
        lm.model.norm.weight = torch.nn.Parameter(old.detach().clone())  # a replaced tensor: recapture
        rollout()
        assert len(captured) == 2 * len(first)
    finally:
        lm.model.norm.weight = old
        with torch.no_grad():
            for n, p in lm.named_parameters():
                p.copy_(weights[n])
