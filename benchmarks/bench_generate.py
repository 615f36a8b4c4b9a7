"""Decode speed of the KV-cache engine against HF ``generate`` and the reference's no-cache loop.

    python benchmarks/bench_generate.py                      # Qwen2.5-3B shapes, random init, bf16, CUDA
    python benchmarks/bench_generate.py --batch 8 --samples 8 --new-tokens 512 --prompt-len 650 --temperature 1.0 \
        --skip-static                                        # a GRPO rollout: plain vs cascade engine
    python benchmarks/bench_generate.py --config tiny --device cpu --dtype fp32 --prompt-len 16 --new-tokens 8
    torchrun --nproc-per-node 2 benchmarks/bench_generate.py --tensor-parallel   # TP vs one GPU vs data parallel

Every method decodes ``--batch`` prompts of ``--prompt-len`` embeddings, ``--samples`` completions
each, exactly ``--new-tokens`` tokens per completion (eos is ignored so every run costs the same).
The no-cache loop (one full forward per token, one sequence at a time, as the reference samples)
is too slow to run in full: a few tokens are timed at the start and one forward at the final
length, and the whole run is extrapolated linearly in sequence length. The floor is the time to
read every weight (and the average KV cache) once per decode step at ``--bandwidth`` bytes/s.

With ``--samples`` > 1 the engine also runs as ``Engine(cascade=True)`` decodes a GRPO rollout: each
prompt's keys/values once per block of its ``--samples`` rows (cascade attention) instead of a copy
per row; the plain engine rows are ``cascade=False`` (the default). Each engine row has its own floor: the cascade
reads every prompt once per group plus each row's own new tokens, the plain engine every row's
prompt and new tokens. The ``SDPA`` and ``cuBLAS`` rows are the compiled engine with PyTorch's
attention instead of the split-KV kernels and with cuBLAS's GEMMs instead of tlvr's Triton ones.

With ``--tensor-parallel`` (under torchrun, N processes) the same rows are decoded three ways: on one
GPU, data-parallel (each GPU decodes 1/N of the rows with all the weights) and tensor-parallel (every
GPU decodes all rows with 1/N of the layer weights and 1/N of the KV cache, two all-reduces per layer).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tlvr_cli.engine.generate import Engine
from tlvr_cli.engine.sampling import SamplingParams, sample_keyed

CONFIGS = {
    "qwen2.5-3b": dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                       num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
                       rms_norm_eps=1e-6, tie_word_embeddings=True),
    "tiny": dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="qwen2.5-3b", help="Model shapes (random init).")
    ap.add_argument("--prompt-len", type=int, default=620, help="Prompt length in embeddings (visual + text tokens).")
    ap.add_argument("--new-tokens", type=int, default=256, help="Tokens generated per completion.")
    ap.add_argument("--batch", type=int, default=8, help="Prompts per run.")
    ap.add_argument("--samples", type=int, default=8, help="Completions per prompt (GRPO's G).")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="Model dtype.")
    ap.add_argument("--device", default="cuda", help="Device to run on.")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 decodes greedily; otherwise sample (top-k 50).")
    ap.add_argument("--bandwidth", type=float, default=3.35e12,
                    help="Peak memory bandwidth in B/s (H100 SXM: 3.35e12; measured on CUDA).")
    ap.add_argument("--reference-tokens", type=int, default=4, help="Tokens timed for the no-cache estimate.")
    ap.add_argument("--skip-hf", action="store_true", help="Skip HF generate (it is the slowest measured run).")
    ap.add_argument("--skip-static", action="store_true", help="Skip HF generate with a static cache + compile.")
    ap.add_argument("--agreement", type=int, default=0,
                    help="Also decode this many tokens greedily with the engine and HF generate and report agreement.")
    ap.add_argument("--rows-sweep", default="", help="Also time the engine at these row counts, e.g. '1,8,128'.")
    ap.add_argument("--attention", action="store_true",
                    help="Also time one layer's decode attention, plain split-KV against cascade, at a few lengths.")
    ap.add_argument("--top-k", action="store_true",
                    help="Also time the sampler's top-k over the vocabulary, tlvr's kernels against torch.topk.")
    ap.add_argument("--tensor-parallel", action="store_true",
                    help="Under torchrun: tensor-parallel decoding vs one GPU vs data parallel at the same total rows.")
    ap.add_argument("--no-compile", action="store_true",
                    help="With --tensor-parallel: CUDA graphs without torch.compile.")
    ap.add_argument("--cascade", action="store_true",
                    help="With --tensor-parallel: decode with cascade attention (the prompt's keys once per group).")
    return ap.parse_args(argv)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def time_engine(lm, prompts, params, args, device, cuda_graphs: bool, compile: bool = False, tp_group=None,
                out: list | None = None, cascade: bool = False, split_kv: bool = True,
                triton_gemm: bool = True) -> float:
    """Seconds of the second of two identical engine calls (the first allocates, compiles, captures);
    ``out`` receives the tokens of the timed call."""
    rows = len(prompts) * args.samples
    engine = Engine(lm, max_batch=rows, max_seq_len=args.prompt_len + args.new_tokens, cuda_graphs=cuda_graphs,
                    compile=compile, tp_group=tp_group, cascade=cascade, split_kv=split_kv, triton_gemm=triton_gemm)

    def run() -> None:
        outs = engine.generate(prompts, params, args.new_tokens, 0, num_samples=args.samples, ignore_eos=True)
        assert all(len(o.tokens) == args.new_tokens for o in outs)
        if out is not None:
            out[:] = [o.tokens for o in outs]

    warm = timed(run, device)  # warm-up: allocates the cache, compiles, captures the graphs
    t = timed(run, device)
    if compile and (tp_group is None or tp_group.rank() == 0):
        print(f"compiled engine: first call {warm:.1f} s (compilation and graph capture), then {t:.2f} s")
    return t


def kv_bytes_per_step(cfg, dtype: torch.dtype, args, cascade: bool) -> float:
    """Keys and values one decode step reads, averaged over the run: every row's prompt and its new
    tokens so far, or (cascade) each prompt once per group and every row's own new tokens."""
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_position = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * dtype.itemsize
    rows = args.batch * args.samples
    prompts = args.batch if cascade else rows
    return per_position * (prompts * args.prompt_len + rows * args.new_tokens / 2)


def agreement(a: list[list[int]], b: list[list[int]]) -> dict[str, float]:
    """Rows with identical tokens, and the mean share of tokens before the first difference."""
    prefixes = []
    for x, y in zip(a, b):
        k = next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), min(len(x), len(y)))
        prefixes.append(k / max(1, len(x)))
    return {"rows_identical": sum(x == y for x, y in zip(a, b)) / len(a), "prefix": sum(prefixes) / len(prefixes)}


def measure_copy_bandwidth(device: torch.device, nbytes: int = 2 << 30) -> float:
    """Device-to-device copy speed in B/s, counting the bytes read and written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    reps = 10

    def copies() -> None:
        for _ in range(reps):
            dst.copy_(src)

    t = timed(copies, device)
    return 2 * nbytes * reps / t


def time_hf(lm, prompts, params, args, device, static: bool = False) -> float:
    # one row per completion (num_return_sequences would do the same expansion, but not for greedy)
    emb = torch.stack(prompts).repeat_interleave(args.samples, dim=0)
    mask = torch.ones(emb.shape[:2], dtype=torch.long, device=device)
    sampling = {} if params.greedy else dict(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p)

    if static:  # a static cache makes generate compile the decode step (transformers' own fast path)
        sampling["cache_implementation"] = "static"

    def run(n: int) -> None:
        # min_new_tokens masks eos, so HF also decodes exactly n tokens
        lm.generate(inputs_embeds=emb, attention_mask=mask, do_sample=not params.greedy, max_new_tokens=n,
                    min_new_tokens=n, eos_token_id=0, pad_token_id=0, **sampling)

    run(args.new_tokens if static else 2)  # static: the first call compiles for this cache length
    return timed(lambda: run(args.new_tokens), device)


def estimate_no_cache(lm, prompts, params, args, device) -> tuple[float, int]:
    """Seconds the reference loop would take for all rows, from a few timed full forwards."""
    embed = lm.get_input_embeddings()
    x = prompts[0][None]
    seed = torch.zeros(1, dtype=torch.long, device=device)
    lm(inputs_embeds=x, use_cache=False)  # warm-up
    n = max(1, min(args.reference_tokens, args.new_tokens))

    def loop() -> None:
        nonlocal x
        for _ in range(n):
            logits = lm(inputs_embeds=x, use_cache=False).logits[:, -1].float()
            tok = sample_keyed(logits, params, seed, torch.full_like(seed, x.shape[1]))
            x = torch.cat([x, embed(tok)[:, None]], dim=1)

    t_start = timed(loop, device) / n
    extra = embed(torch.zeros(args.new_tokens - 1, dtype=torch.long, device=device))
    last = torch.cat([prompts[0], extra])[None]  # the length of the last step's input
    t_end = timed(lambda: lm(inputs_embeds=last, use_cache=False), device)
    rows = len(prompts) * args.samples
    return rows * args.new_tokens * (t_start + t_end) / 2, n


def greedy_agreement(lm, prompts, args, device) -> tuple[float, float]:
    """Engine vs HF ``generate`` greedy tokens on the same prompts: (rows identical, mean agreeing prefix)."""
    n = args.agreement
    engine = Engine(lm, max_batch=len(prompts), max_seq_len=args.prompt_len + n, cuda_graphs=device.type == "cuda")
    ours = [o.tokens for o in engine.generate(prompts, SamplingParams(temperature=0.0), n, 0, ignore_eos=True)]
    emb = torch.stack(prompts)
    mask = torch.ones(emb.shape[:2], dtype=torch.long, device=device)
    hf = lm.generate(inputs_embeds=emb, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                     eos_token_id=0, pad_token_id=0).tolist()
    prefixes = []
    for a, b in zip(ours, hf):
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), n)
        prefixes.append(k / n)
    return sum(p == 1.0 for p in prefixes) / len(prefixes), sum(prefixes) / len(prefixes)


def attention_sweep(cfg, args, device: torch.device, dtype: torch.dtype) -> None:
    """One layer's decode attention for ``--batch`` x ``--samples`` rows under a CUDA graph: the plain step's
    split-KV kernels (every row's prompt and new tokens) against the cascade's (each prompt once per block),
    a quarter, half and all of ``--new-tokens`` into the completions. Each is replayed on the same cache, so
    keys that fit the L2 cache (the cascade's, at these sizes) are read from it: latency, not bytes, is
    what this compares."""
    from triton.testing import do_bench_cudagraph

    from tlvr_cli.engine.split_kv import cascade_attention, split_kv_attention
    from tlvr_cli.engine.steps import KV_LEN_BUCKET, NEW_KEYS_BUCKET, _bucket

    rows, kv_heads = args.batch * args.samples, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    seq = args.prompt_len + args.new_tokens
    q = torch.randn(rows, kv_heads, cfg.num_attention_heads // kv_heads, head_dim, device=device, dtype=dtype)
    k, v = (torch.randn(rows, kv_heads, seq, head_dim, device=device, dtype=dtype) for _ in range(2))
    prompt_lens = torch.full((args.batch,), args.prompt_len, device=device)
    prefix = _bucket(args.prompt_len, KV_LEN_BUCKET)  # the prompt keys a cascade step reads (``steps.py``)
    print(f"{'new tokens':>10}{'plain us':>10}{'cascade us':>12}  (one layer, {rows} rows, prompt {args.prompt_len})")
    for new in (args.new_tokens // 4, args.new_tokens // 2, args.new_tokens):
        lengths = torch.full((rows,), args.prompt_len + new, device=device)
        own_start = torch.full((rows,), seq - new, device=device)
        plain = do_bench_cudagraph(lambda: split_kv_attention(q, k, v, lengths, seq, head_dim ** -0.5)) * 1e3
        cascade = do_bench_cudagraph(lambda: cascade_attention(q, k, v, prompt_lens, prefix, own_start,
                                                               _bucket(new, NEW_KEYS_BUCKET), head_dim ** -0.5)) * 1e3
        print(f"{new:>10}{plain:>10.1f}{cascade:>12.1f}")


def top_k_sweep(cfg, args, device: torch.device, dtype: torch.dtype) -> None:
    """The sampler's top-k (top-k 50 and its tie margin) over the vocabulary under a CUDA graph at a few
    row counts: tlvr's kernels against ``torch.topk``, beside one read of the logits at ``--bandwidth``.
    The logits are random normals times 3 in ``--dtype`` (ties included, as 16-bit logits have)."""
    from triton.testing import do_bench_cudagraph

    from tlvr_cli.engine.sampling import TIE_MARGIN
    from tlvr_cli.engine.top_k import top_k

    k = 50 + TIE_MARGIN
    print(f"{'rows':>6}{'tlvr us':>10}{'torch us':>10}{'ratio':>8}{'read us':>9}  (top-{k} of {cfg.vocab_size} logits)")
    for rows in (1, 8, args.batch * args.samples):
        x = (torch.randn(rows, cfg.vocab_size, device=device) * 3).to(dtype)
        ours, want = top_k(x, k), torch.topk(x, k)
        if not torch.equal(ours[0], want[0]):
            raise SystemExit("tlvr's top-k values differ from torch.topk's")
        t_ours = do_bench_cudagraph(lambda: top_k(x, k)) * 1e3
        t_torch = do_bench_cudagraph(lambda: torch.topk(x, k)) * 1e3
        read = x.numel() * x.element_size() / args.bandwidth * 1e6
        print(f"{rows:>6}{t_ours:>10.1f}{t_torch:>10.1f}{t_torch / t_ours:>7.1f}x{read:>9.1f}")


def main_tensor_parallel(args: argparse.Namespace) -> dict:
    """One GPU, data-parallel and tensor-parallel decoding of the same rows (run under torchrun)."""
    cuda = args.device == "cuda"
    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank))) if cuda else torch.device(args.device)
    if cuda:
        torch.cuda.set_device(device)
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} must divide by the {world} processes (data-parallel split)")
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    with torch.device(device):
        lm = Qwen2ForCausalLM(Qwen2Config(**CONFIGS[args.config])).to(dtype).eval()
    params = SamplingParams(temperature=args.temperature) if args.temperature > 0 else SamplingParams(temperature=0.0)
    with torch.no_grad():
        for t in (*lm.parameters(), *lm.buffers()):  # every rank decodes the same model and prompts
            dist.broadcast(t, 0)
        ids = torch.randint(0, lm.config.vocab_size, (args.batch, args.prompt_len), device=device)
        dist.broadcast(ids, 0)
        prompts = list(lm.get_input_embeddings()(ids))
    rows, tokens = args.batch * args.samples, args.batch * args.samples * args.new_tokens
    fast = dict(cuda_graphs=cuda, compile=cuda and not args.no_compile, cascade=args.cascade)
    seconds: dict[str, float] = {}
    one, tp = [], []
    with torch.no_grad():
        seconds[f"one GPU, {rows} rows"] = time_engine(lm, prompts, params, args, device, out=one, **fast)
        seconds[f"data parallel, {rows // world} rows per GPU"] = time_engine(lm, prompts[rank::world], params, args,
                                                                              device, **fast)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        seconds[f"tensor parallel, {rows} rows"] = time_engine(lm, prompts, params, args, device,
                                                               tp_group=dist.group.WORLD, out=tp, **fast)
        engine_mem = torch.cuda.max_memory_allocated(device) - base if cuda else 0
    slowest = torch.tensor(list(seconds.values()), dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)  # a parallel run lasts as long as its slowest rank
    seconds = dict(zip(seconds, slowest.tolist()))
    if rank == 0:
        weight_bytes = sum(p.numel() * p.element_size() for p in lm.parameters())
        layer_bytes = sum(p.numel() * p.element_size() for p in lm.model.layers.parameters())
        kv_bytes = kv_bytes_per_step(lm.config, dtype, args, args.cascade and args.samples > 1)
        bandwidth = measure_copy_bandwidth(device) if cuda else args.bandwidth
        floors = {f"one GPU, {rows} rows": weight_bytes + kv_bytes,
                  f"data parallel, {rows // world} rows per GPU": weight_bytes + kv_bytes / world,
                  f"tensor parallel, {rows} rows": weight_bytes - layer_bytes * (1 - 1 / world) + kv_bytes / world}
        mode = "greedy" if params.greedy else f"sampling T={params.temperature}"
        print(f"{args.config} {args.dtype}, {world} x {device.type}: {args.batch} prompts x {args.samples} samples, "
              f"prompt {args.prompt_len}, {args.new_tokens} new tokens, {mode}; engine {fast}")
        print(f"{'method':<36}{'seconds':>10}{'ms/step':>10}{'tokens/s':>12}{'vs one':>9}{'floor ms':>10}"
              f"{'of floor':>10}")
        base_s = seconds[f"one GPU, {rows} rows"]
        for name, s in seconds.items():
            floor = floors[name] / bandwidth * 1e3
            print(f"{name:<36}{s:>10.3f}{s / args.new_tokens * 1e3:>10.2f}{tokens / s:>12.0f}{base_s / s:>8.2f}x"
                  f"{floor:>10.2f}{floor * args.new_tokens / 1e3 / s:>10.1%}")
        same = sum(a == b for a, b in zip(one, tp)) / rows
        print(f"tensor-parallel rows identical to one GPU's: {same:.0%} (fp32: all; in bf16 the all-reduced sums round "
              "differently and near-ties can flip)")
        if cuda:
            print(f"tensor-parallel engine memory per rank (shard, cache, graphs; the full model not counted): "
                  f"{engine_mem / 2**30:.2f} GiB")
    if own_group:
        dist.barrier()  # rank 0 may still be measuring bandwidth
        dist.destroy_process_group()
    return {"tokens_per_s": {name: tokens / s for name, s in seconds.items()},
            "rows_identical": sum(a == b for a, b in zip(one, tp)) / rows}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.tensor_parallel:
        return main_tensor_parallel(args)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: a 3B fp32 init on CPU takes a minute
        lm = Qwen2ForCausalLM(Qwen2Config(**CONFIGS[args.config])).to(dtype).eval()
    params = SamplingParams(temperature=args.temperature) if args.temperature > 0 else SamplingParams(temperature=0.0)
    with torch.no_grad():
        embed = lm.get_input_embeddings()
        ids = torch.randint(0, lm.config.vocab_size, (args.batch, args.prompt_len), device=device)
        prompts = list(embed(ids))
    rows = args.batch * args.samples
    tokens = rows * args.new_tokens

    seconds: dict[str, float] = {}
    plain_tokens, cascade_tokens = [], []
    cuda = device.type == "cuda"
    fast = dict(cuda_graphs=True, compile=True)
    with torch.no_grad():
        seconds["engine"] = time_engine(lm, prompts, params, args, device, cuda_graphs=False, out=plain_tokens)
        if cuda:
            seconds["engine + cuda graphs"] = time_engine(lm, prompts, params, args, device, cuda_graphs=True)
            seconds["engine + graphs + compile"] = time_engine(lm, prompts, params, args, device, out=plain_tokens,
                                                               **fast)
            # the same engine with SDPA's attention instead of the split-KV kernels
            seconds["engine + graphs + compile, SDPA"] = time_engine(lm, prompts, params, args, device,
                                                                     split_kv=False, **fast)
            # ... and with cuBLAS's GEMMs instead of tlvr's Triton ones (``engine.triton_gemm``)
            seconds["engine + graphs + compile, cuBLAS"] = time_engine(lm, prompts, params, args, device,
                                                                       triton_gemm=False, **fast)
        if args.samples > 1:  # the same rows, each prompt's keys/values once per group
            if cuda:
                seconds["cascade + cuda graphs"] = time_engine(lm, prompts, params, args, device, cuda_graphs=True,
                                                               cascade=True)
                seconds["cascade + graphs + compile"] = time_engine(lm, prompts, params, args, device, cascade=True,
                                                                    out=cascade_tokens, **fast)
                seconds["cascade + graphs + compile, cuBLAS"] = time_engine(lm, prompts, params, args, device,
                                                                            cascade=True, triton_gemm=False, **fast)
            else:
                seconds["cascade"] = time_engine(lm, prompts, params, args, device, cuda_graphs=False, cascade=True,
                                                 out=cascade_tokens)
        if not args.skip_hf:
            seconds["hf generate (kv cache)"] = time_hf(lm, prompts, params, args, device)
            if cuda and not args.skip_static:
                try:
                    seconds["hf static cache + compile"] = time_hf(lm, prompts, params, args, device, static=True)
                except Exception as e:  # compile support varies across torch/transformers versions
                    print(f"hf static cache + compile failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        seconds["no-cache loop (estimated)"], timed_tokens = estimate_no_cache(lm, prompts, params, args, device)

    if cuda:
        args.bandwidth = measure_copy_bandwidth(device)
    # floor: each decode step reads every weight once, plus the KV cache at its average length
    weight_bytes = sum(p.numel() * p.element_size() for p in lm.parameters())
    cfg = lm.config
    kv_bytes = kv_bytes_per_step(cfg, dtype, args, cascade=False)
    kv_cascade = kv_bytes_per_step(cfg, dtype, args, cascade=True)
    floor_step = (weight_bytes + kv_bytes) / args.bandwidth
    floors = {name: (weight_bytes + (kv_cascade if name.startswith("cascade") else kv_bytes)) / args.bandwidth
              for name in seconds}
    seconds["bandwidth floor"] = floor_step * args.new_tokens
    floors["bandwidth floor"] = floor_step
    if args.samples > 1:
        seconds["cascade floor"] = floors["cascade floor"] = (weight_bytes + kv_cascade) / args.bandwidth
        seconds["cascade floor"] *= args.new_tokens

    mode = "greedy" if params.greedy else f"sampling T={params.temperature}"
    print(f"{args.config} {args.dtype} on {device}: {args.batch} prompts x {args.samples} samples, "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens, {mode}")
    print(f"weights {weight_bytes / 1e9:.2f} GB, KV read/step {kv_bytes / 1e9:.3f} GB, "
          f"floor {floor_step * 1e3:.2f} ms/step at {args.bandwidth / 1e12:.2f} TB/s")
    if args.samples > 1:
        print(f"cascade: KV read/step {kv_cascade / 1e9:.3f} GB (prompts once per group), "
              f"floor {floors['cascade floor'] * 1e3:.2f} ms/step")
    base_hf = seconds.get("hf generate (kv cache)")
    base_ref = seconds["no-cache loop (estimated)"]
    print(f"{'method':<36}{'seconds':>10}{'ms/step':>10}{'tokens/s':>14}{'vs HF':>10}{'vs no-cache':>13}"
          f"{'floor ms':>10}{'of floor':>10}")
    for name, s in seconds.items():
        vs_hf = f"{base_hf / s:9.2f}x" if base_hf else f"{'-':>10}"
        print(f"{name:<36}{s:>10.4f}{s / args.new_tokens * 1e3:>10.2f}{tokens / s:>14.1f}{vs_hf}{base_ref / s:>12.1f}x"
              f"{floors[name] * 1e3:>10.2f}{floors[name] * args.new_tokens / s:>10.1%}")
    plain_best = min(v for k, v in seconds.items() if k.startswith("engine"))
    print(f"engine reaches {seconds['bandwidth floor'] / plain_best:.1%} of the bandwidth floor")
    result = {"tokens_per_s": {name: tokens / s for name, s in seconds.items()}}
    if cascade_tokens:
        cascade_best = min(v for k, v in seconds.items() if k.startswith("cascade") and k != "cascade floor")
        same = agreement(plain_tokens, cascade_tokens)
        result["cascade_agreement"] = same
        print(f"cascade reaches {seconds['cascade floor'] / cascade_best:.1%} of its floor "
              f"({seconds['bandwidth floor'] / cascade_best:.1%} of the plain floor), {plain_best / cascade_best:.2f}x "
              f"the plain engine; {same['rows_identical']:.0%} of rows identical to the plain engine's, "
              f"{same['prefix']:.1%} of tokens before the first difference (fp32: all; in 16 bits the merged "
              "attention rounds differently and near-ties flip)")
    print(f"(no-cache loop: {timed_tokens} tokens timed from the prompt plus one forward at the final length, "
          f"extrapolated linearly to {rows} rows x {args.new_tokens} tokens)")
    if cuda:
        print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    if args.agreement:
        with torch.no_grad():
            same, prefix = greedy_agreement(lm, prompts, args, device)
        result["agreement"] = {"rows_identical": same, "prefix": prefix}
        print(f"greedy agreement with HF generate over {args.agreement} tokens, {len(prompts)} prompts: "
              f"{same:.0%} of rows identical, {prefix:.1%} of tokens before the first difference")
    if args.attention and cuda:
        attention_sweep(cfg, args, device, dtype)
    if args.top_k and cuda:
        top_k_sweep(cfg, args, device, dtype)
    if args.rows_sweep:
        print(f"{'rows':>6}{'tokens/s':>12}{'ms/step':>10}{'floor ms':>10}{'of floor':>10}")
        for rows_n in (int(r) for r in args.rows_sweep.split(",")):
            sweep = argparse.Namespace(**{**vars(args), "samples": 1})
            sweep_prompts = (prompts * (rows_n // len(prompts) + 1))[:rows_n]
            with torch.no_grad():
                t = time_engine(lm, sweep_prompts, params, sweep, device, device.type == "cuda", device.type == "cuda")
            kv = kv_bytes_per_step(cfg, dtype, argparse.Namespace(**{**vars(sweep), "batch": rows_n}), cascade=False)
            fl = (weight_bytes + kv) / args.bandwidth
            print(f"{rows_n:>6}{rows_n * args.new_tokens / t:>12.0f}{t / args.new_tokens * 1e3:>10.2f}{fl * 1e3:>10.2f}"
                  f"{fl * args.new_tokens / t:>10.1%}")
    return result


if __name__ == "__main__":
    main()
