"""The split-KV decode attention (Triton): its key ranges, the kernels against masked SDPA (on CUDA, and
on CPU through Triton's interpreter where Triton is installed), and the engine decoding with it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_qwen import agree, in_interpreter, needs_triton

from tlvr_cli.engine.generate import Engine
from tlvr_cli.engine.layers import decode_options
from tlvr_cli.engine.sampling import SamplingParams
from tlvr_cli.engine.split_kv import (
    BLOCK_N,
    WAVES,
    cascade_attention,
    launch_keywords,
    query_tiles,
    split_count,
    split_kv_attention,
    split_kv_available,
)

HAS_CUDA = torch.cuda.is_available()


def test_split_count_fills_the_sms_in_powers_of_two():
    sms = 132
    for rows in (1, 3, 8, 64, 100, 256, 512):
        for kv_len in (64, 100, 704, 1152, 4096):
            s = split_count(rows, 2, kv_len, sms)
            assert s & (s - 1) == 0 and (s == 1 or kv_len / s >= BLOCK_N)  # a power of two; ranges of a block+
            assert s == 1 or rows * 2 * s <= WAVES * sms  # at most the target's blocks ...
            # ... and as many as it allows: doubling would pass the target or cut ranges below a block
            assert rows * 2 * s * 2 > WAVES * sms or 2 * s * BLOCK_N > kv_len
    assert split_count(1, 2, 4096, sms) == 64  # one stream: a range per block of keys


def test_available_only_on_cuda_in_16_bits():
    assert not split_kv_available(torch.device("cpu"), torch.bfloat16, 128)
    assert not split_kv_available(torch.device("cuda"), torch.float32, 128)
    assert not split_kv_available(torch.device("cuda"), torch.bfloat16, 96)  # not a power of two


def test_dependent_launches_only_on_cuda():
    # the interpreter and older GPUs launch plainly (the kernels compile their PDL branch out)
    assert launch_keywords(torch.device("cpu")) == {"PDL": False}


def test_decode_options_are_inductor_options():
    import torch._inductor.config as inductor

    with inductor.patch(decode_options()):  # an unknown option would raise here
        pass


def test_query_tiles_cover_a_block_in_tiles_of_16_to_64():
    assert query_tiles(8) == (16, 1) and query_tiles(24) == (32, 1) and query_tiles(64) == (64, 1)
    assert query_tiles(128) == (64, 2) and query_tiles(72) == (64, 2)


def check_cascade(device: str, width: int, group: int) -> None:
    """The cascade kernels against SDPA over each row's prompt keys followed by its own new tokens."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    gen = torch.Generator().manual_seed(1)
    blocks, kv_heads, d, seq, suffix = 3, 2, 32, 256, 64
    rows = blocks * width
    q = torch.randn(rows, kv_heads, group, d, generator=gen)
    k, v = (torch.randn(rows + 1, kv_heads, seq, d, generator=gen) for _ in range(2))
    prompt_lens = torch.tensor([1, 70, 130])
    new_pos = torch.randint(0, suffix, (rows,), generator=gen)
    new_pos[0], new_pos[-1] = 0, suffix - 1
    own_start = seq - 1 - new_pos
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for prefix in (192, 64):  # a bound below a prompt's length cuts it there, as that step's mask would
        want = torch.empty_like(q)
        for r in range(rows):
            g, n = r // width, min(int(prompt_lens[r // width]), prefix)
            keys = [torch.cat([c[g, :, :n], c[r, :, int(own_start[r]):]], 1) for c in (k, v)]
            want[r] = F.scaled_dot_product_attention(q[r, :, :, None], keys[0][:, None], keys[1][:, None])[:, :, 0]
        got = cascade_attention(*(t.to(device, dtype) for t in (q, k, v)), prompt_lens.to(device), prefix,
                                own_start.to(device), suffix, d ** -0.5)
        assert got.shape == q.shape and got.dtype == dtype
        err = (got.float().cpu() - want).abs().max()
        assert err < tol, (width, group, prefix, err)


def check_kernels(device: str, group: int) -> None:
    """The kernels against masked SDPA (float32 on CPU, bf16 on CUDA) for a kv head's query ``group``."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    rows, kv_heads, d, kv_len = 5, 2, 32, 320
    q = torch.randn(rows, kv_heads, group, d, generator=gen)
    # a cache with more rows and positions than the step reads, and O(1) scores: a key read that should
    # not be (or a missed one) shows
    k, v = (torch.randn(rows + 2, kv_heads, kv_len + 64, d, generator=gen) for _ in range(2))
    lengths = torch.tensor([1, 64, 65, 200, kv_len])
    valid = torch.arange(kv_len)[None] < lengths[:, None]
    mask = torch.zeros(rows, kv_len).masked_fill(~valid, float("-inf"))[:, None, None]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for bound in (kv_len, 64):  # a bound below some rows' lengths cuts them there, as that step's mask would
        want = F.scaled_dot_product_attention(q, k[:rows, :, :bound], v[:rows, :, :bound], attn_mask=mask[..., :bound])
        got = split_kv_attention(*(t.to(device, dtype) for t in (q, k, v)), lengths.to(device), bound, d ** -0.5)
        assert got.shape == q.shape and got.dtype == dtype
        assert (got.float().cpu() - want).abs().max() < tol, (bound, (got.float().cpu() - want).abs().max())


@needs_triton
def test_kernels_match_masked_attention_in_the_interpreter():
    # 8 SMs pretended; width 12 x group 8: a block's 96 queries in two tiles, the second half full
    in_interpreter("import test_split_kv as t; from tlvr_cli.engine import split_kv; "
                   "split_kv._sm_count = lambda index: 8; t.check_kernels('cpu', 8); t.check_kernels('cpu', 3); "
                   "t.check_cascade('cpu', 4, 8); t.check_cascade('cpu', 4, 3); t.check_cascade('cpu', 12, 8)")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("group", [8, 3])
def test_kernels_match_masked_attention(group):
    check_kernels("cuda", group)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize(("width", "group"), [(4, 8), (4, 3), (16, 8), (12, 8), (8, 8)])
def test_cascade_kernels_match_attention(width, group):
    check_cascade("cuda", width, group)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("compile", [False, True])
def test_engine_decodes_with_split_kv_as_with_sdpa(gpu_greedy, prompts, compile):
    outs = {}
    for split in (False, True):
        engine, outs[split] = gpu_greedy(compile=compile, split_kv=split)
        assert engine._split_kv == split
    agree(outs[False], outs[True])
    eager = Engine(engine.lm, max_batch=8, max_seq_len=96, cuda_graphs=False)  # two launches per layer: SDPA
    eager.generate([prompts[0].to("cuda", torch.bfloat16)], SamplingParams(temperature=0.0), 2, 299)
    assert not eager._split_kv
