"""The decode step's Triton GEMMs: the split-K partial products of the narrow projections (their
ranges) and the gate|up product with its SiLU; the kernels against torch's ops (on CUDA, and on CPU
through Triton's interpreter where Triton is installed), and the engine decoding with them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_qwen import agree, in_interpreter, needs_triton
from transformers import Qwen2ForCausalLM

from tlvr_cli.engine import split_k
from tlvr_cli.engine.generate import Engine
from tlvr_cli.engine.layers import resume
from tlvr_cli.engine.sampling import SamplingParams
from tlvr_cli.engine.split_k import (
    BLOCK_K,
    MAX_ROWS,
    Splits,
    layer_splits,
    linear_partials,
    range_products,
    range_span,
    split_count,
    split_k_available,
    summed,
    swiglu,
)

HAS_CUDA = torch.cuda.is_available()


def test_split_count_fills_one_wave_in_powers_of_two():
    sms = 132
    for columns in (64, 2048, 2560, 4096):
        for reduced in (128, 300, 2048, 11008):
            s = split_count(columns, reduced, sms)
            tiles = -(-columns // 64)
            assert s & (s - 1) == 0 and (s == 1 or reduced / s >= BLOCK_K)
            assert s == 1 or tiles * s <= sms  # within one wave (a program per SM) ...
            # ... and as many as that allows, up to the cap
            assert s == split_k.MAX_SPLITS or tiles * s * 2 > sms or 2 * s * BLOCK_K > reduced
    assert split_count(22016, 2048, sms) == 1  # gate|up fills the SMs: cuBLAS
    assert split_count(151936, 2048, sms) == 1  # the LM head too


def test_qwen_3b_layer_splits(monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setattr(split_k, "_sm_count", lambda index: 132)  # an H200
    cfg = SimpleNamespace(hidden_size=2048, intermediate_size=11008, hidden_act="silu")
    assert layer_splits(cfg, 16, 2, 128, torch.device("cuda")) == Splits(qkv=2, o=4, down=4, swiglu=True)
    cfg.hidden_act = "gelu"  # the fused kernel is SiLU's only
    assert not layer_splits(cfg, 16, 2, 128, torch.device("cuda")).swiglu


def test_available_only_on_cuda_in_16_bits():
    assert not split_k_available(torch.device("cpu"), torch.bfloat16)
    assert not split_k_available(torch.device("cuda"), torch.float32)


def check_partials(device: str) -> None:
    """The op (the kernel on CUDA or in the interpreter) against per-range float32 matmuls: ranges of
    whole ``BLOCK_K`` blocks, the last short, and empty ones zero; rows and columns not a tile's multiple."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    for m, n, k, splits in ((5, 100, 300, 2), (5, 100, 300, 8), (1, 64, 128, 1), (MAX_ROWS, 130, 520, 4)):
        x = torch.randn(m, k, generator=gen).to(dtype)
        w = torch.randn(n, k, generator=gen).to(dtype)
        want = range_products(x.float(), w.float(), splits)
        if device == "cpu":  # the interpreter: the kernel itself, on CPU tensors
            got = torch.empty(splits, m, n)
            split_k.launch_partials(x, w, got)
        else:
            got = linear_partials(x.to(device), w.to(device), splits).cpu()
        assert got.shape == (splits, m, n) and got.dtype == torch.float32
        assert (got - want).abs().max() < 1e-3, (m, n, k, splits)
        span = range_span(k, splits)
        assert span % BLOCK_K == 0 and span * splits >= k
        assert all(not got[i].any() for i in range(splits) if i * span >= k)  # empty ranges add nothing
    # the gated MLP product, masked (columns and reduced dim not a tile's multiple) and not
    for m, inter, k in ((5, 40, 100), (MAX_ROWS, 64, 128)):
        x = torch.randn(m, k, generator=gen).to(dtype)
        w = (torch.randn(2 * inter, k, generator=gen) / k ** 0.5).to(dtype)
        gate, up = F.linear(x.float(), w.float()).to(dtype).chunk(2, dim=-1)
        want = (F.silu(gate) * up).float()
        if device == "cpu":
            got = torch.empty(m, inter, dtype=dtype)
            split_k.launch_swiglu(x, w, got)
        else:
            got = swiglu(x.to(device), w.to(device)).cpu()
        assert got.shape == (m, inter) and got.dtype == dtype
        assert (got.float() - want).abs().max() < (1e-5 if dtype == torch.float32 else 2e-2), (m, inter, k)


def test_range_products_sum_to_the_product():
    gen = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(3, 300, generator=gen), torch.randn(7, 300, generator=gen), torch.randn(7, generator=gen)
    for splits in (1, 2, 3, 8):
        p = linear_partials(x, w, splits)  # off CUDA the op is range_products
        assert p.shape == (splits, 3, 7)
        torch.testing.assert_close(summed(p, torch.float32, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    # rounded once, as cuBLAS rounds its float32 accumulator with the bias added
    p = linear_partials(x, w, 2)
    assert torch.equal(summed(p, torch.bfloat16, b.bfloat16()), (p[0] + p[1] + b.bfloat16().float()).bfloat16())


def test_resume_sums_deferred_partials():
    x, p = torch.randn(2, 1, 4), torch.randn(3, 2, 1, 4)
    assert torch.equal(resume((x, p)), x + (p[0] + p[1] + p[2]))
    assert torch.equal(resume((x, p[0])), x + p[0])


def test_engine_decodes_with_splits_as_without(lm, prompts, monkeypatch):
    # the CPU engine with the splits forced on (the op runs range_products here): the same logits up to
    # float32 rounding, the same greedy tokens
    cpu = Qwen2ForCausalLM(lm.config).eval()
    cpu.load_state_dict(lm.state_dict())
    plain = Engine(cpu, max_batch=4, max_seq_len=64)
    want = [o.tokens for o in plain.generate(prompts[:3], SamplingParams(temperature=0.0), 8, 299, num_samples=2)]
    prepare = Engine.prepare

    def with_splits(self):  # the fused weights too, as on a GPU (the splits need them)
        device = prepare(self)
        self._sync_fused()
        self._splits = Splits(2, 3, 4, swiglu=True)
        return device

    monkeypatch.setattr(Engine, "prepare", with_splits)
    monkeypatch.setattr(split_k, "BLOCK_K", 16)  # ranges of the tiny model's dims: every one holds some of them
    calls = []
    real = split_k.linear_partials
    monkeypatch.setattr(split_k, "linear_partials", lambda *a: calls.append(a[2]) or real(*a))
    gated = split_k._swiglu
    monkeypatch.setattr(split_k, "_swiglu", lambda *a: calls.append("swiglu") or gated(*a))
    engine = Engine(cpu, max_batch=4, max_seq_len=64, fuse_weights=True)
    got = [o.tokens for o in engine.generate(prompts[:3], SamplingParams(temperature=0.0), 8, 299, num_samples=2)]
    assert got == want
    assert {2, 3, 4, "swiglu"} <= set(calls)  # every projection ran as partials, gate|up in swiglu


@needs_triton
def test_kernel_matches_range_products_in_the_interpreter():
    in_interpreter("import test_split_k as t; t.check_partials('cpu')")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_kernel_matches_range_products():
    check_partials("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_engine_decodes_with_triton_gemms_as_with_cublas(gpu_greedy):
    outs = {}
    for triton in (False, True):
        engine, outs[triton] = gpu_greedy(compile=True, triton_gemm=triton)
        assert (engine._splits is not None) == triton
    agree(outs[False], outs[True])
