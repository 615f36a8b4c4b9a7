"""One full GRPO step (spec §5.2) of the 3B model on one GPU, timed part by part.

    python benchmarks/bench_grpo_step.py                 # Qwen2.5-3B + SigLIP-so400m shapes, random init
    python benchmarks/bench_grpo_step.py --config tiny --device cpu --steps 1   # smoke run
    torchrun --nproc-per-node 2 benchmarks/bench_grpo_step.py   # data-parallel: the same 8 prompts split over 2 GPUs
    torchrun --nproc-per-node 2 benchmarks/bench_grpo_step.py --strategy fsdp2   # the same, FSDP2-sharded
    python benchmarks/bench_grpo_step.py --lengths uniform:64-512 --compare-training   # realistic lengths; the
                                                         # training log-prob layouts side by side on one step's rollouts

Runs the real training step (``tlvr_cli.train.grpo_step.GRPOStep``): 8 prompts × G 8 completions of
``--new-tokens`` forced tokens (eos ignored so every step costs the same), 16-frame videos, policy
and reference log-probs, k3 KL, backward with gradient checkpointing, AdamW on fp32 masters.
Prints s/step with its breakdown, peak memory and tokens/s, and an estimate of the same step done
the reference way (sequential sampling without a KV cache), extrapolated from timed forwards.

``--lengths uniform:A-B`` ends each completion on eos at a length drawn (seeded, per row) from A..B,
R1's answers being 100-400 tokens rather than 512: the rollouts are still decoded for
``--new-tokens`` steps (about what the longest of 64 drawn rows costs) and cut there, so the
training step sees exactly the drawn lengths. ``--compare-training`` then times, on the last step's
rollouts, the reference log-probs and the policy log-probs + backward under each layout (padded
rows, shared prompt, shared prompt + packing) and prints their times, ratios and peak memory.
"""

from __future__ import annotations

import argparse
import random
import statistics
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
from tlvr_cli.train.grpo_math import completion_mask
from tlvr_cli.train.grpo_step import GRPOStep
from tlvr_cli.train.optim import build_optimizer, build_scheduler
from tlvr_cli.train.packed import varlen_attention_available
from tlvr_cli.train.parallel import Parallel
from tlvr_cli.train.policy import PolicyLogprobs, micro_batch_order, sequence_logprobs
from tlvr_cli.train.rollout import PromptBatch, pad_completions, prompt_ids, tower_features
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


# ----------------------------------------------------------------------------- completion lengths and layouts

LAYOUTS = {"padded": (False, False), "shared": (True, False), "packed": (True, True)}  # (shared_prompt, packing)


def parse_lengths(spec: str, new_tokens: int) -> tuple[int, int] | None:
    """``forced`` → None; ``uniform:A-B`` → (A, B) with 1 <= A <= B <= new_tokens."""
    if spec == "forced":
        return None
    try:
        kind, span = spec.split(":")
        lo, hi = (int(x) for x in span.split("-"))
    except ValueError:
        kind, lo, hi = "", 0, 0
    if kind != "uniform" or not 1 <= lo <= hi <= new_tokens:
        raise SystemExit(f"--lengths {spec!r}: expected 'forced' or 'uniform:A-B' with "
                         f"1 <= A <= B <= --new-tokens ({new_tokens})")
    return lo, hi


class DrawnLengths:
    """The rollout engine with eos forced at drawn lengths: row ``key`` keeps the first L - 1 of its sampled
    tokens and then eos, L drawn from ``span`` by a generator seeded with (rollout seed, key), so every
    layout and rerun sees the same lengths. Keeps the last rollout for ``compare_training``."""

    def __init__(self, engine: Engine, span: tuple[int, int] | None) -> None:
        self.engine, self.span, self.last = engine, span, []

    def generate(self, prompts, params, max_new_tokens, eos_token_id, *, seed: int = 0, row_keys=None, **kwargs):
        outs = self.engine.generate(prompts, params, max_new_tokens, eos_token_id, seed=seed, row_keys=row_keys,
                                    **kwargs)
        if self.span is not None:
            eos = eos_token_id if isinstance(eos_token_id, int) else eos_token_id[0]
            for o, key in zip(outs, row_keys if row_keys is not None else range(len(outs))):
                n = random.Random(f"{seed}:{key}").randint(*self.span)
                o.tokens, o.finished = o.tokens[:n - 1] + [eos], True
        self.last = outs
        return outs


def compare_training(cfg: GRPOConfig, model, ref, par: Parallel, batch: PromptBatch, rollouts: list, repeats: int,
                     sync) -> dict:
    """Reference log-probs and policy log-probs + backward of one step's rollouts under each layout, timed
    side by side after one warm-up each: median seconds, peak memory, and the log-prob / gradient agreement
    with the padded rows. The loss is a fixed per-token weighting of the log-probs: the backward through
    the network, which is what the layouts change, is the GRPO loss's."""
    device, tok, G = par.ctx.device, model.tokenizer, cfg.algo.num_generations
    feats = tower_features(model, batch, device, None)
    completions = pad_completions([o.tokens for o in rollouts], tok.pad_token_id, device)
    mask = completion_mask(completions, tok.eos_token_id)
    lengths = mask.sum(1)
    seq_prompt = [i // G for i in range(len(rollouts))]
    weight = torch.randn(mask.shape, generator=torch.Generator().manual_seed(0)).to(device) * mask / mask.sum()
    args = (feats, batch.input_ids, seq_prompt, completions, lengths)
    ref_feats = feats.to(next(ref.connector.parameters()).dtype)
    chunk = cfg.perf.logprob_chunk_size
    cuda = device.type == "cuda"
    out = {"tokens": int(lengths.sum()), "rows": len(rollouts), "mean_length": float(lengths.float().mean())}
    base_logp = base_grad = None
    model.zero_grad(set_to_none=True)
    out["base_gib"] = torch.cuda.memory_allocated() / 2**30 if cuda else float("nan")  # weights, optimizer, engine
    for name, (shared, packing) in LAYOUTS.items():
        layout = {"shared_prompt": shared, "packing": packing}
        groups = micro_batch_order(lengths.tolist(), cfg.perf.micro_batch_size, group_size=G if shared else 1)
        ref_s, pol_s = [], []
        for rep in range(1 + repeats):  # the first run warms kernels and the allocator up
            model.zero_grad(set_to_none=True)
            sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            ref_logp = torch.zeros(mask.shape, device=device)
            with torch.no_grad():
                for rows in groups:
                    ref_logp[rows] = sequence_logprobs(ref, ref_feats, *args[1:], rows, chunk_size=chunk,
                                                       **layout).float()
            sync()
            t_ref = time.perf_counter()
            model.train()
            model.vision_tower.eval()
            for j, rows in enumerate(groups):
                with par.no_sync(j < len(groups) - 1):
                    logp = par.module(*args, rows, chunk_size=chunk, **layout).float()
                    (logp * weight[rows]).sum().backward()
            sync()
            if rep:
                ref_s.append(t_ref - t)
                pol_s.append(time.perf_counter() - t_ref)
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if base_logp is None:
            # the padded gradient waits in host memory, so it adds nothing to the other layouts' peaks
            base_logp, base_grad = ref_logp, [g.to("cpu", copy=True) for g in grads]
        diff = sum(float((g.float() - b.to(g.device).float()).square().sum()) for g, b in zip(grads, base_grad))
        norm = sum(float(b.float().square().sum()) for b in base_grad)
        out[name] = {"ref_s": statistics.median(ref_s), "policy_s": statistics.median(pol_s),
                     "micro_batches": len(groups), "peak_gib": peak,
                     "max_logp_diff": float((ref_logp - base_logp).abs().max()), "grad_rel_diff": (diff / norm) ** 0.5}
        del grads
    model.zero_grad(set_to_none=True)
    return out


def print_comparison(res: dict, lengths: str, micro: int, checkpointing: bool, attention: str) -> None:
    print()
    print(f"training log-probs of one step's rollouts on this process: {res['rows']} completions, lengths {lengths} "
          f"(mean {res['mean_length']:.0f}, {res['tokens']} tokens), micro-batch {micro}, gradient checkpointing "
          f"{'on' if checkpointing else 'off'}, flat-layout attention: {attention}")
    print(f"{'layout':<10}{'ref s':>9}{'policy s':>10}{'total s':>9}{'speed-up':>10}{'policy x':>10}{'peak GiB':>10}"
          f"{'+GiB':>8}{'micro':>7}{'max|dlogp|':>12}{'grad rel':>10}")
    base = res["padded"]
    for name in LAYOUTS:
        r = res[name]
        total, base_total = r["ref_s"] + r["policy_s"], base["ref_s"] + base["policy_s"]
        print(f"{name:<10}{r['ref_s']:>9.3f}{r['policy_s']:>10.3f}{total:>9.3f}{base_total / total:>9.2f}x"
              f"{base['policy_s'] / r['policy_s']:>9.2f}x{r['peak_gib']:>10.1f}{r['peak_gib'] - res['base_gib']:>8.1f}"
              f"{r['micro_batches']:>7}"
              f"{r['max_logp_diff']:>12.2e}{r['grad_rel_diff']:>10.2e}")
    print("padded = one row per completion with its prompt copy (perf.shared_prompt=false perf.packing=false); "
          "shared = prompt once per group; packed = shared + no padding (the defaults);\n"
          "speed-up = padded total / total, policy x = the same for policy log-probs + backward alone; "
          "+GiB = peak above the weights, optimizer and engine buffers held before; "
          "max|dlogp| (reference log-probs) and grad rel (policy gradient) against padded")


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
    # completion lengths and the training log-prob layout
    ap.add_argument("--lengths", default="forced",
                    help="forced: every completion --new-tokens long; "
                         "uniform:A-B: eos forced at a length drawn per completion from A..B")
    ap.add_argument("--logprob-path", choices=list(LAYOUTS), default="packed",
                    help="layout of the timed steps: padded (perf.shared_prompt=false perf.packing=false), "
                         "shared, packed (the defaults)")
    ap.add_argument("--compare-training", action="store_true",
                    help="then time reference log-probs and policy log-probs + backward of one step "
                         "under every layout, side by side")
    ap.add_argument("--compare-repeats", type=int, default=3,
                    help="timed runs per layout in --compare-training (after one warm-up); the median is printed")
    ap.add_argument("--no-grad-checkpointing", action="store_true", help="keep activations instead of recomputing them")
    args = ap.parse_args(argv)
    span = parse_lengths(args.lengths, args.new_tokens)
    if args.compare_training and args.strategy == "fsdp2":
        raise SystemExit("--compare-training: fsdp2 keeps the padded layout "
                         "(perf.shared_prompt / perf.packing are ignored there)")

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
        "perf": {"micro_batch_size": args.micro_batch, "force_max_new_tokens": True,
                 "shared_prompt": LAYOUTS[args.logprob_path][0], "packing": LAYOUTS[args.logprob_path][1]},
        "engine": {"max_batch": args.engine_max_batch or n_local * args.generations, "fused_weights": not args.no_fused_weights,
                   "cuda_graphs": not args.no_graphs and device.type == "cuda", "compile": not args.no_compile},
        "data": {"prompts_per_step": args.prompts}, "optim": {"lr": 1e-6, "scheduler": "cosine", "warmup_ratio": 0.03}})
    apply_tuning(model, TuneConfig(), gradient_checkpointing=not args.no_grad_checkpointing)
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
    rollouts = DrawnLengths(engine, span)
    grpo_step = GRPOStep(cfg, model, ref, par, optimizer, scheduler, rollouts)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    if ctx.is_main:
        print(f"model {args.config}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params, prompt {prompt_len} "
              f"embeddings, {args.prompts} prompts x G {args.generations} x {args.new_tokens} new tokens "
              f"(lengths {args.lengths}), {args.frames} frames, {device} {dtype}, {ctx.world_size} process(es), "
              f"{par.strategy}, log-probs {args.logprob_path}")
    grpo_step(batch, 0)  # warm-up: compiles and captures the engine
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, parts, kept = [], {}, 0
    for step in range(1, args.steps + 1):
        sync()
        t = time.perf_counter()
        out = grpo_step(batch, step)
        m = out.metrics
        kept += out.tokens
        ctx.barrier()
        sync()
        times.append(time.perf_counter() - t)
        for k, v in m.items():
            if k.startswith("time/"):
                parts[k] = parts.get(k, 0.0) + v / args.steps
    step_s = sum(times) / len(times)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    peak = max(ctx.all_gather_objects(peak))  # the fullest GPU
    compared = None
    if args.compare_training:
        compared = compare_training(cfg, model, ref, par, batch, rollouts.last, args.compare_repeats, sync)
    if not ctx.is_main:
        shutdown_distributed()
        return {}
    n_tok = kept * ctx.world_size // args.steps  # completion tokens per step, eos included (the drawn lengths)

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
    if compared is not None:
        varlen = varlen_attention_available(device, dtype)
        attention = "flash-attn varlen" if varlen else "SDPA, padded inside attention only"
        print_comparison(compared, args.lengths, args.micro_batch, not args.no_grad_checkpointing, attention)
    shutdown_distributed()
    return {"step_s": step_s, "parts": parts, "peak_gib": peak, "reference_step_s": ref_step,
            "compare_training": compared}


if __name__ == "__main__":
    main()
