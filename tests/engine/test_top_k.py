"""The sampler's top-k kernels: exact against a stable descending sort (values, then indices of equal
values ascending, the lowest-indexed of the ties at the k-th), with many ties, more ties than the
gathering pass holds, k equal to the vocabulary and rows not a chunk's multiple; on CUDA and on CPU
through Triton's interpreter; and the sampler drawing through them."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
import torch
from tiny_qwen import in_interpreter, needs_triton

from tlvr_cli.engine import sampling, top_k
from tlvr_cli.engine.sampling import SamplingParams, sample_keyed

HAS_CUDA = torch.cuda.is_available()


def stable_top_k(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    values, indices = torch.sort(x.float(), dim=-1, descending=True, stable=True)
    return values[:, :k].to(x.dtype), indices[:, :k]


def cases() -> list[tuple[torch.Tensor, int]]:
    gen = torch.Generator().manual_seed(0)
    everything_tied = torch.zeros(2, 10_000)
    everything_tied[1, 7] = 1.0  # one above, then 65 of 9,999 ties (more than the candidates hold)
    return [
        (torch.randn(3, 9_000, generator=gen).bfloat16(), 66),  # fewer spans than k: every logit gathered
        (torch.randn(2, 60_000, generator=gen).bfloat16(), 66),
        ((torch.randn(2, 60_000, generator=gen) * 8).round().bfloat16(), 66),  # ties at the k-th
        ((torch.randn(2, 5_000, generator=gen) * 3).round().bfloat16(), 66),  # a few distinct values
        (everything_tied.bfloat16(), 66),
        (torch.randn(2, 100, generator=gen).half(), 100),  # k is the whole row
        (-torch.rand(2, top_k.CHUNK + 1, generator=gen).bfloat16(), 5),  # negatives; a 1-logit chunk
        (torch.tensor([[float("-inf"), 2.0, float("inf"), -0.0, 0.0, 2.0]]).half(), 4),
    ]


def check_top_k(device: str) -> None:
    """The kernels (the op on CUDA, its launch in the interpreter) against ``stable_top_k``."""
    for x, k in cases():
        if device == "cpu":
            values = torch.empty(x.shape[0], k, dtype=x.dtype)
            indices = torch.empty(x.shape[0], k, dtype=torch.long)
            top_k.launch(x, k, values, indices)
        else:
            values, indices = (t.cpu() for t in top_k.top_k(x.to(device), k))
        want_values, want_indices = stable_top_k(x, k)
        assert torch.equal(values, want_values), (x.shape, k)
        assert torch.equal(indices, want_indices), (x.shape, k)


def gathered(x: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, how many logits the gathering pass takes: those at or above the k-th largest span maximum."""
    spans = torch.nn.functional.pad(x.float(), (0, -x.shape[1] % top_k.SPAN), value=float("-inf"))
    maxima = spans.view(x.shape[0], -1, top_k.SPAN).amax(-1)
    if maxima.shape[1] < k:
        return torch.full((x.shape[0],), x.shape[1])
    return (x.float() >= maxima.topk(k).values[:, -1:]).sum(-1)


def test_cases_take_both_paths():
    # the one gathering pass, and the exact selection where the candidates overflow
    counts = [(n <= top_k.capacity(k), k <= n) for x, k in cases() for n in gathered(x, k).tolist()]
    assert all(at_least_k for _, at_least_k in counts)
    assert {fits for fits, _ in counts} == {True, False}


def test_capacity_holds_three_times_k_in_a_power_of_two():
    assert [top_k.capacity(k) for k in (1, 5, 64, 66, 256)] == [4, 16, 256, 256, 1024]


def test_available_for_16_bit_cuda_logits_only():
    def cuda_logits(dtype):  # what the check reads of a (4, 1000) CUDA tensor
        return SimpleNamespace(device=torch.device("cuda"), dtype=dtype, shape=(4, 1000), dim=lambda: 2)

    assert not top_k.top_k_available(torch.zeros(4, 1000, dtype=torch.bfloat16), 66)  # CPU
    if importlib.util.find_spec("triton") is not None:
        assert top_k.top_k_available(cuda_logits(torch.bfloat16), 66)
        assert top_k.top_k_available(cuda_logits(torch.float16), top_k.MAX_K)
    assert not top_k.top_k_available(cuda_logits(torch.float32), 66)  # logits divided by a temperature
    assert not top_k.top_k_available(cuda_logits(torch.bfloat16), top_k.MAX_K + 1)


def test_op_off_cuda_is_a_stable_descending_sort():
    for x, k in cases():
        values, indices = top_k.top_k(x, k)
        want_values, want_indices = stable_top_k(x, k)
        assert torch.equal(values, want_values) and torch.equal(indices, want_indices)
        assert torch.equal(values, torch.topk(x, k).values)  # the same values as torch.topk


def test_sampler_draws_through_the_op_where_available(monkeypatch):
    # forced on for CPU logits (the op's stable sort stands in for the kernels): the sampler takes its
    # candidates from the op, and draws only among the top k
    calls = []
    real = top_k.top_k
    monkeypatch.setattr(sampling, "top_k_available", lambda x, k: True)
    monkeypatch.setattr(sampling, "top_k", lambda x, k: calls.append(k) or real(x, k))
    logits = (torch.randn(64, 500, generator=torch.Generator().manual_seed(1)) * 3).bfloat16()
    draws = sample_keyed(logits, SamplingParams(temperature=1.0, top_k=50), torch.arange(64),
                         torch.zeros(64, dtype=torch.long))
    assert calls == [50 + sampling.TIE_MARGIN]
    kth = torch.topk(logits.float(), 50).values[:, -1]
    assert (logits.float().gather(1, draws[:, None])[:, 0] >= kth).all()


@needs_triton
def test_kernels_match_a_stable_sort_in_the_interpreter():
    in_interpreter("import test_top_k as t; t.check_top_k('cpu')")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_kernels_match_a_stable_sort():
    check_top_k("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_compiled_sampler_in_a_graph_draws_as_eager():
    # the compiled sampler replayed in a CUDA graph (as the engine runs it) against the eager one, both
    # on the kernels: the same candidates in the same order, the same draws
    logits = (torch.randn(64, 151_936, device="cuda") * 3).bfloat16()
    seeds, pos = torch.arange(64, device="cuda"), torch.full((64,), 700, device="cuda")
    params = SamplingParams(temperature=1.0, top_k=50)
    want = sample_keyed(logits, params, seeds, pos)
    compiled = torch.compile(sample_keyed)
    compiled(logits, params, seeds, pos)
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        compiled(logits, params, seeds, pos)
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        out = compiled(logits, params, seeds, pos)
    graph.replay()
    assert torch.equal(out, want)
