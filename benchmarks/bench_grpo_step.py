"""One full GRPO step (spec §5.2) of the 3B model on one GPU, timed part by part.

    python benchmarks/bench_grpo_step.py                 # Qwen2.5-3B + SigLIP-so400m shapes, random init
    python benchmarks/bench_grpo_step.py --config tiny --device cpu --steps 1   # smoke run
    torchrun --nproc-per-node 2 benchmarks/bench_grpo_step.py   # data-parallel: the same 8 prompts split over 2 GPUs
    torchrun --nproc-per-node 2 benchmarks/bench_grpo_step.py --strategy fsdp2   # the same, FSDP2-sharded

Runs the real training step (``tlvr_cli.train.grpo_step.GRPOStep``): 8 prompts × G 8 completions of
``--new-tokens`` forced tokens (eos ignored so every step costs the same), 16-frame videos, policy
and reference log-probs, k3 KL, backward with gradient checkpointing, AdamW on fp32 masters.
Prints s/step with its breakdown, peak memory and tokens/s, and an estimate of the same step done
the reference way (sequential sampling without a KV cache), extrapolated from timed forwards.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tlvr_cli.config import load_config
from tlvr_cli.data.records import GRPORow
from tlvr_cli.engine.generate import Engine
from tlvr_cli.jobs import GRPOConfig, TuneConfig
from tlvr_cli.model.config import TinyLlavaConfig
from tlvr_cli.model.tinyllava import TinyLlava
from tlvr_cli.runtime import init_distributed, shutdown_distributed
from tlvr_cli.train.grpo_step import GRPOStep
from tlvr_cli.train.optim import build_optimizer, build_scheduler
from tlvr_cli.train.parallel import Parallel
from tlvr_cli.train.policy import PolicyLogprobs
from tlvr_cli.train.rollout import PromptBatch, prompt_ids
from tlvr_cli.train.setup import apply_tuning

QWEN25_3B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                 num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                 tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, use_cache=False)


def build(config: str, device: torch.device, dtype: torch.dtype):
    from tlvr_cli.model.tiny import build_tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    if config == "tiny":
        return build_tiny_model().to(device=device, dtype=dtype)
    cfg = TinyLlavaConfig(text_config={**QWEN25_3B}, vision_config={}, tokenizer_model_max_length=3072)
    with torch.device(device):
        model = TinyLlava(cfg, tok)
    model.language_model.tie_weights()
    return model.to(dtype)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=["3b", "tiny"], default="3b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=512)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--no-graphs", action="store_true")
    ap.add_argument("--no-compile", action="store_true", help="Decode without torch.compile (CUDA graphs only).")
    ap.add_argument("--reference-tokens", type=int, default=4, help="tokens timed for the no-cache estimate")
    ap.add_argument("--engine-max-batch", type=int, default=0,
                    help="rows the engine decodes at once (default: all of this process's completions); fewer use less memory")
    ap.add_argument("--no-fused-weights", action="store_true", help="engine.fused_weights=false (3.6 GB less at 3B)")
    ap.add_argument("--strategy", choices=["auto", "ddp", "fsdp2"], default="auto", help="dist.strategy (auto: ddp with several processes)")
    args = ap.parse_args(argv)

    ctx = init_distributed(args.device, need_group=args.strategy == "fsdp2")  # no group for one plain process
    device = ctx.device
    dtype = getattr(torch, args.dtype)
    if args.prompts % ctx.world_size:
        raise SystemExit(f"--prompts {args.prompts} must divide over {ctx.world_size} processes")
    n_local = args.prompts // ctx.world_size  # the global batch stays --prompts, as in `tlvr grpo`
    torch.manual_seed(0)
    model = build(args.config, device, dtype)
    ref = build(args.config, device, dtype)
    ref.load_state_dict(model.state_dict())
    ref.requires_grad_(False).eval()
    cfg = load_config(GRPOConfig, None, extra={
        "algo": {"num_generations": args.generations}, "rollout": {"max_new_tokens": args.new_tokens},
        "perf": {"micro_batch_size": args.micro_batch, "force_max_new_tokens": True},
        "engine": {"max_batch": args.engine_max_batch or n_local * args.generations, "fused_weights": not args.no_fused_weights,
                   "cuda_graphs": not args.no_graphs and device.type == "cuda", "compile": not args.no_compile},
        "data": {"prompts_per_step": args.prompts}, "optim": {"lr": 1e-6, "scheduler": "cosine", "warmup_ratio": 0.03}})
    apply_tuning(model, TuneConfig(), gradient_checkpointing=True)
    par = Parallel(PolicyLogprobs(model), model, ctx, args.strategy, prefix="model.")  # before the optimizer: fsdp2 swaps the parameters
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, 687)
    tok = model.tokenizer
    size = model.config.vision_config.image_size
    problem = "What does the man do after picking up the cup?\nA. drink\nB. leave\nC. sit\nD. wave\nE. run"
    rows = [GRPORow(index=i, problem=problem, solution="<answer>A</answer>", video_filename=f"./v{i}.mp4",
                    video_path=Path(f"/synthetic/v{i}.mp4"), extra={}) for i in range(n_local)]
    ids = [prompt_ids(tok, r, cfg.data.question_template) for r in rows]
    pixels = [torch.rand(args.frames, 3, size, size) * 2 - 1 for _ in rows]
    batch = PromptBatch(rows, ids, pixels)
    prompt_len = len(ids[0]) - 1 + model.config.num_queries
    engine = Engine(model.language_model, max_batch=cfg.engine.max_batch, max_seq_len=prompt_len + args.new_tokens,
                    cuda_graphs=cfg.engine.cuda_graphs, compile=cfg.engine.compile, fuse_weights=cfg.engine.fused_weights,
                    copy_weights=par.sharded)
    grpo_step = GRPOStep(cfg, model, ref, par, optimizer, scheduler, engine)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    if ctx.is_main:
        print(f"model {args.config}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params, prompt {prompt_len} "
              f"embeddings, {args.prompts} prompts x G {args.generations} x {args.new_tokens} new tokens, {args.frames} frames, {device} {dtype}, "
              f"{ctx.world_size} process(es), {par.strategy}")
    grpo_step(batch, 0)  # warm-up: compiles and captures the engine
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, parts = [], {}
    for step in range(1, args.steps + 1):
        sync()
        t = time.perf_counter()
        m = grpo_step(batch, step).metrics
        ctx.barrier()
        sync()
        times.append(time.perf_counter() - t)
        for k, v in m.items():
            if k.startswith("time/"):
                parts[k] = parts.get(k, 0.0) + v / args.steps
    step_s = sum(times) / len(times)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    peak = max(ctx.all_gather_objects(peak))  # the fullest GPU
    if not ctx.is_main:
        shutdown_distributed()
        return {}
    n_tok = args.prompts * args.generations * args.new_tokens

    # the reference: each completion sampled alone, every token a full forward of the whole sequence
    lm = ref.language_model  # same shapes as the policy, and never sharded
    with torch.no_grad():
        x = torch.randn(1, prompt_len + args.new_tokens // 2, model.config.hidden_size, device=device, dtype=dtype)
        lm(inputs_embeds=x, use_cache=False)
        sync()
        t = time.perf_counter()
        for _ in range(args.reference_tokens):
            lm(inputs_embeds=x, use_cache=False)
        sync()
        per_token = (time.perf_counter() - t) / args.reference_tokens
    ref_rollout = per_token * n_tok
    ref_step = ref_rollout + step_s - parts.get("time/rollout_s", 0.0)

    print()
    print(f"{'part':<22}{'s/step':>10}")
    for k in ("time/vision_s", "time/rollout_s", "time/score_s", "time/ref_logprob_s", "time/backward_s"):
        print(f"{k[5:-2]:<22}{parts.get(k, 0.0):>10.2f}")
    print(f"{'total':<22}{step_s:>10.2f}")
    print(f"peak memory {peak:.1f} GiB; rollout {n_tok / parts.get('time/rollout_s', float('nan')):.0f} tok/s; "
          f"step {n_tok / step_s:.0f} completion tok/s")
    print(f"reference-style rollout (no KV cache, one sequence at a time; {per_token * 1e3:.1f} ms per token timed at the "
          f"mean length, x {n_tok} tokens, extrapolated): {ref_rollout:.0f} s -> step ~{ref_step:.0f} s, "
          f"ratio {ref_step / step_s:.1f}x")
    shutdown_distributed()
    return {"step_s": step_s, "parts": parts, "peak_gib": peak, "reference_step_s": ref_step}


if __name__ == "__main__":
    main()
