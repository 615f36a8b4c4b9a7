"""One full GRPO step (spec §5.2) of the 3.6B model on one GPU, timed part by part, with its peak memory.

    python benchmarks/bench_grpo_step.py --preset nextqa                          # today's full fine-tuning
    python benchmarks/bench_grpo_step.py --preset nextqa-lora --memory-cap-gib 22 # LoRA: must fit a 24 GB card
    python benchmarks/bench_grpo_step.py --preset nextqa-48gb --memory-cap-gib 44 # 8-bit AdamW, no masters: 48 GB
    python benchmarks/bench_grpo_step.py --preset nextqa-lora --set perf.micro_batch_size=4   # any preset key
    python benchmarks/bench_grpo_step.py --config tiny --device cpu --dtype float32 --steps 1 # smoke run
    torchrun --nproc-per-node 2 benchmarks/bench_grpo_step.py   # data-parallel: the same 8 prompts split over 2 GPUs
    torchrun --nproc-per-node 2 benchmarks/bench_grpo_step.py --rollout-parallel tensor   # each GPU decodes all 64
                                                         # rows with half the weights; training stays data-parallel
    python benchmarks/bench_grpo_step.py --lengths uniform:64-512 --compare-training   # realistic lengths; the
                                                         # training log-prob layouts side by side on one step's rollouts

Builds the Qwen2.5-3B + SigLIP-so400m shapes with random weights, applies the preset's ``tune`` (LoRA
adapters included), ``optim`` (kind, master weights), ``perf``, ``engine``, ``algo`` and ``rollout`` settings,
and runs the real training step (``tlvr_cli.train.grpo_step.GRPOStep``): the preset's prompts × G completions
of ``max_new_tokens`` forced tokens (eos ignored so every step costs the same), 16-frame videos, reference
log-probs (for LoRA the base with adapters off), backward, clip, optimizer. ``--memory-cap-gib`` caps the
process with ``torch.cuda.set_per_process_memory_fraction`` (the CUDA context, ~0.5 GiB, lies outside
it); running out of memory under the cap is caught and reported. The last line is machine-readable:
``RESULT {json}`` with ``completed``, s/step, the parts and the peaks; the exit status is 3 after an OOM.

``--lengths uniform:A-B`` ends each completion on eos at a length drawn (seeded, per row) from A..B,
R1's answers being 100-400 tokens rather than 512: each row stops at its length as on a real eos (the
rollout lasts as long as its longest row, and the rows that finished early cost the steps after it
less), so the training step sees exactly the drawn lengths; after the timed steps the last rollout is
timed again beside the same rows decoded for ``max_new_tokens`` steps and cut afterwards, which costs
the rollout of forced lengths. ``--compare-training`` then times, on the last step's
rollouts, the reference log-probs and the policy log-probs + backward under each layout (padded
rows, shared prompt, shared prompt + packing) and prints their times, ratios and peak memory.
"""

from __future__ import annotations

import argparse
import json
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
from tlvr_cli.errors import TlvrError
from tlvr_cli.jobs import GRPOConfig
from tlvr_cli.model.config import TinyLlavaConfig
from tlvr_cli.model.tinyllava import TinyLlava
from tlvr_cli.runtime import init_distributed, resolve_dtype, row_index, shutdown_distributed
from tlvr_cli.train.grpo_math import completion_mask
from tlvr_cli.train.grpo_step import GRPOStep
from tlvr_cli.train.lora import BaseReference, reference_mode
from tlvr_cli.train.optim import build_optimizer, build_scheduler
from tlvr_cli.train.packed import varlen_attention_kernel
from tlvr_cli.train.parallel import Parallel
from tlvr_cli.train.policy import PolicyLogprobs, micro_batch_order, sequence_logprobs
from tlvr_cli.train.rollout import PromptBatch, pad_completions, prompt_ids, tower_features
from tlvr_cli.train.rollout_parallel import check_rollout_processes, rollout_engine, rollout_group
from tlvr_cli.train.setup import apply_job_tuning

QWEN25_3B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                 num_attention_heads=16,
                 num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                 tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, use_cache=False)
PARTS = ("time/vision_s", "time/rollout_s", "time/score_s", "time/ref_logprob_s", "time/backward_s",
         "time/optimizer_s")  # optimizer: clip + AdamW, a part of backward
GIB = 2**30


def build(config: str, device: torch.device, dtype: torch.dtype):
    """The random-init model, built directly in ``dtype`` (no transient fp32 copy of the 3.6B weights)."""
    from tlvr_cli.model.tiny import build_tiny_model, tiny_tokenizer

    if config == "tiny":
        return build_tiny_model().to(device=device, dtype=dtype)
    cfg = TinyLlavaConfig(text_config={**QWEN25_3B}, vision_config={}, tokenizer_model_max_length=3072)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = TinyLlava(cfg, tiny_tokenizer())
    finally:
        torch.set_default_dtype(default)
    model.language_model.tie_weights()
    return model


def bench_config(args: argparse.Namespace, world_size: int) -> GRPOConfig:
    """The preset with ``--set`` overrides, then the benchmark's own settings: forced completion lengths, the
    flags given, and an engine that decodes all of this process's completions at once (at most the preset's;
    tensor-parallel rollouts: all of the step's, at most N times the preset's)."""
    extra: dict = {"perf": {"force_max_new_tokens": True}, "engine": {}, "algo": {}, "rollout": {}, "data": {},
                   "dist": {"rollout_parallel": args.rollout_parallel}}
    flags = {"prompts": ("data", "prompts_per_step"), "generations": ("algo", "num_generations"),
             "new_tokens": ("rollout", "max_new_tokens"), "micro_batch": ("perf", "micro_batch_size"),
             "engine_max_batch": ("engine", "max_batch")}
    for flag, (section, key) in flags.items():
        if getattr(args, flag):
            extra[section][key] = getattr(args, flag)
    if args.no_fused_weights:
        extra["engine"]["fused_weights"] = False
    if args.no_compile:
        extra["engine"]["compile"] = False
    if args.no_graphs or not args.device.startswith("cuda"):
        extra["engine"]["cuda_graphs"] = False
    if args.logprob_path:
        extra["perf"].update(LAYOUTS[args.logprob_path])
    if args.no_grad_checkpointing:
        extra["optim"] = {"gradient_checkpointing": False}
    cfg = load_config(GRPOConfig, args.preset, overrides=args.set, extra=extra)
    if not args.engine_max_batch and args.rollout_parallel == "data":
        rows = cfg.data.prompts_per_step // world_size * cfg.algo.num_generations
        extra["engine"]["max_batch"] = max(1, min(cfg.engine.max_batch, rows))
        cfg = load_config(GRPOConfig, args.preset, overrides=args.set, extra=extra)
    return cfg


# ----------------------------------------------------------------------------- completion lengths and layouts

# sequence_logprobs' layout keywords; packed-sdpa: the default layout with SDPA where a flash kernel could run
LAYOUTS = {"padded": {"shared_prompt": False, "packing": False}, "shared": {"shared_prompt": True, "packing": False},
           "packed": {"shared_prompt": True, "packing": True},
           "packed-sdpa": {"shared_prompt": True, "packing": True, "varlen_attention": False}}


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
    """The rollout engine with eos forced at drawn lengths: row ``key`` ends on eos at length L, L drawn from
    ``span`` by a generator seeded with (rollout seed, key), so every layout and rerun sees the same lengths.
    Each row stops at its L as it would on a real eos (a budget per row, ``Engine.generate``'s
    ``row_max_new_tokens``: each prompt prefilled once for its G rows, a cascade engine's group in one block, as
    the step's rollouts decode), and its last token becomes eos.
    ``stop=False``: every row decodes ``max_new_tokens`` and is cut afterwards, to the same tokens
    (``compare_stops`` times the two). Keeps the last rollout for ``compare_training``."""

    def __init__(self, engine: Engine, span: tuple[int, int] | None) -> None:
        self.engine, self.span, self.last, self.last_call = engine, span, [], None

    def generate(self, prompts, params, max_new_tokens, eos_token_id, *, seed: int = 0, row_keys=None,
                 num_samples: int = 1, stop: bool = True, **kwargs):
        self.last_call = (prompts, params, max_new_tokens, eos_token_id, seed, row_keys, num_samples, kwargs)
        if self.span is None:
            self.last = self.engine.generate(prompts, params, max_new_tokens, eos_token_id, seed=seed,
                                             row_keys=row_keys, num_samples=num_samples, **kwargs)
            return self.last
        keys = list(row_keys) if row_keys is not None else list(range(len(prompts) * num_samples))
        lengths = [random.Random(f"{seed}:{key}").randint(*self.span) for key in keys]
        outs = self.engine.generate(prompts, params, max_new_tokens, eos_token_id, seed=seed, row_keys=keys,
                                    num_samples=num_samples, row_max_new_tokens=lengths if stop else None, **kwargs)
        eos = eos_token_id if isinstance(eos_token_id, int) else eos_token_id[0]
        for o, n in zip(outs, lengths):
            o.tokens, o.finished = o.tokens[:n - 1] + [eos], True
        self.last = outs
        return outs

    def compare_stops(self, sync, repeats: int = 2) -> dict[str, float]:
        """The last rollout again both ways, in turns: rows stopped at their drawn lengths, and every row
        decoded to ``max_new_tokens`` and cut; the fastest seconds of each."""
        prompts, params, max_new, eos, seed, keys, samples, kwargs = self.last_call
        best = {True: float("inf"), False: float("inf")}
        with torch.no_grad():
            for _ in range(repeats):
                for stop in best:
                    sync()
                    t = time.perf_counter()
                    self.generate(prompts, params, max_new, eos, seed=seed, row_keys=keys, num_samples=samples,
                                  stop=stop, **kwargs)
                    sync()
                    best[stop] = min(best[stop], time.perf_counter() - t)
        return {"stopped_s": best[True], "cut_s": best[False]}


def compare_training(cfg: GRPOConfig, model, ref, par: Parallel, batch: PromptBatch, rollouts: list, repeats: int,
                     sync) -> dict:
    """Reference log-probs and policy log-probs + backward of one step's rollouts under each layout, timed
    side by side after one warm-up each: median seconds, peak memory, and the log-prob / gradient agreement
    with the padded rows. The loss is a fixed per-token weighting of the log-probs: the backward through
    the network, which is what the layouts change, is the GRPO loss's."""
    device, tok, G = par.ctx.device, model.tokenizer, cfg.algo.num_generations
    # packed-sdpa differs from packed only where a flash kernel runs
    dtype = next(model.language_model.parameters()).dtype
    layouts = {k: v for k, v in LAYOUTS.items() if k != "packed-sdpa" or varlen_attention_kernel(device, dtype)}
    feats = tower_features(model, batch, device, None)
    completions = pad_completions([o.tokens for o in rollouts], tok.pad_token_id, device)
    mask = completion_mask(completions, tok.eos_token_id)
    lengths = mask.sum(1)
    seq_prompt = [i // G for i in range(len(rollouts))]
    weight = torch.randn(mask.shape, generator=torch.Generator().manual_seed(0)).to(device) * mask / mask.sum()
    args = (feats, batch.input_ids, seq_prompt, completions.cpu(), lengths.cpu())  # host copies, as the step
    dtype_ref = next(ref.connector.parameters()).dtype
    ref_feats = [f.to(dtype_ref) for f in feats] if isinstance(feats, list) else feats.to(dtype_ref)
    chunk = cfg.perf.logprob_chunk_size
    cuda = device.type == "cuda"
    out = {"tokens": int(lengths.sum()), "rows": len(rollouts), "mean_length": float(lengths.float().mean())}
    base_logp = base_grad = None
    model.zero_grad(set_to_none=True)
    out["base_gib"] = torch.cuda.memory_allocated() / 2**30 if cuda else float("nan")  # weights, optimizer, engine
    for name, layout in layouts.items():
        shared = layout["shared_prompt"]
        groups = micro_batch_order(lengths.tolist(), cfg.perf.micro_batch_size, group_size=G if shared else 1)
        ref_s, pol_s = [], []
        for rep in range(1 + repeats):  # the first run warms kernels and the allocator up
            model.zero_grad(set_to_none=True)
            sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            ref_logp = torch.zeros(mask.shape, device=device)
            with torch.no_grad(), reference_mode(ref):
                for rows in groups:
                    ref_logp.index_copy_(0, row_index(rows, device), sequence_logprobs(
                        ref, ref_feats, *args[1:], rows, chunk_size=chunk, **layout).float())
            sync()
            t_ref = time.perf_counter()
            model.train()
            model.vision_tower.eval()
            for j, rows in enumerate(groups):
                with par.no_sync(j < len(groups) - 1):
                    logp = par.module(*args, rows, chunk_size=chunk, **layout).float()
                    (logp * weight[row_index(rows, device)]).sum().backward()
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
    print(f"{'layout':<12}{'ref s':>9}{'policy s':>10}{'total s':>9}{'speed-up':>10}{'policy x':>10}{'peak GiB':>10}"
          f"{'+GiB':>8}{'micro':>7}{'max|dlogp|':>12}{'grad rel':>10}")
    base = res["padded"]
    for name in [k for k in LAYOUTS if k in res]:
        r = res[name]
        total, base_total = r["ref_s"] + r["policy_s"], base["ref_s"] + base["policy_s"]
        print(f"{name:<12}{r['ref_s']:>9.3f}{r['policy_s']:>10.3f}{total:>9.3f}{base_total / total:>9.2f}x"
              f"{base['policy_s'] / r['policy_s']:>9.2f}x{r['peak_gib']:>10.1f}{r['peak_gib'] - res['base_gib']:>8.1f}"
              f"{r['micro_batches']:>7}"
              f"{r['max_logp_diff']:>12.2e}{r['grad_rel_diff']:>10.2e}")
    print("padded = one row per completion with its prompt copy (perf.shared_prompt=false perf.packing=false); "
          "shared = prompt once per group; packed = shared + no padding (the defaults); packed-sdpa = packed with SDPA "
          "in place of the varlen flash kernel (perf.varlen_attention=false);\n"
          "speed-up = padded total / total, policy x = the same for policy log-probs + backward alone; "
          "+GiB = peak above the weights, optimizer and engine buffers held before; "
          "max|dlogp| (reference log-probs) and grad rel (policy gradient) against padded")


class Phase:
    """The part of the benchmark running now, named in an out-of-memory report."""

    name = "build"


def run_steps(args: argparse.Namespace, cfg: GRPOConfig, ctx, phase: Phase) -> dict:
    """Build the model, optimizer and engine from ``cfg``, run one warm-up step and ``args.steps`` timed ones."""
    device = ctx.device
    dtype = resolve_dtype(args.dtype or cfg.model.dtype, device)
    n_local = cfg.data.prompts_per_step // ctx.world_size  # the global batch stays the preset's, as in `tlvr grpo`
    lora = cfg.tune.lora.enabled
    torch.manual_seed(0)
    model = build(args.config, device, dtype)
    ref = None
    if cfg.algo.beta > 0 and not lora:  # full fine-tuning: a second, frozen model, as `tlvr grpo` loads it
        ref = build(args.config, device, dtype)
        ref.load_state_dict(model.state_dict())
        ref.requires_grad_(False).eval()
    apply_job_tuning(model, cfg.tune, cfg.optim)
    if cfg.algo.beta > 0 and lora:
        ref = BaseReference(model)
    # before the optimizer: fsdp2 swaps the parameters
    par = Parallel(PolicyLogprobs(model), model, ctx, args.strategy, prefix="model.")
    optimizer = build_optimizer(model, cfg.optim, cfg.tune)
    scheduler = build_scheduler(optimizer, cfg.optim, 687)
    tok = model.tokenizer
    size = model.config.vision_config.image_size
    problem = "What does the man do after picking up the cup?\nA. drink\nB. leave\nC. sit\nD. wave\nE. run"
    first = ctx.rank * n_local  # each process's own prompts, as the data order deals them
    rows = [GRPORow(index=i, problem=problem, solution="<answer>A</answer>", video_filename=f"./v{i}.mp4",
                    video_path=Path(f"/synthetic/v{i}.mp4"), extra={}) for i in range(first, first + n_local)]
    ids = [prompt_ids(tok, r, cfg.data.question_template) for r in rows]
    pixels = [torch.rand(args.frames, 3, size, size) * 2 - 1 for _ in rows]
    batch = PromptBatch(rows, ids, pixels)
    prompt_len = len(ids[0]) - 1 + model.config.num_queries
    new_tokens = cfg.rollout.max_new_tokens
    group = rollout_group(cfg, ctx, model.language_model)
    engine = rollout_engine(cfg, model.language_model, par, prompt_len + new_tokens, group)
    rollouts = DrawnLengths(engine, parse_lengths(args.lengths, new_tokens))
    grpo_step = GRPOStep(cfg, model, ref, par, optimizer, scheduler, rollouts, tp_group=group)
    n_params = sum(p.numel() for p in model.parameters()) / 1e9
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e9
    if ctx.is_main:
        adapters = f", LoRA rank {cfg.tune.lora.rank}" if lora else ""
        decoding = f"rollouts tensor-parallel over {group.size()} processes, " if group is not None else ""
        print(f"model {args.config}: {n_params:.2f} B params ({n_trained:.3f} B trained{adapters}), "
              f"optimizer {cfg.optim.kind} / masters {cfg.optim.master_weights} ({type(optimizer).__name__}), "
              f"prompt {prompt_len} embeddings, {cfg.data.prompts_per_step} prompts x G {cfg.algo.num_generations} x "
              f"{new_tokens} new tokens, micro-batch {cfg.perf.micro_batch_size}, {decoding}"
              f"engine batch {engine.max_batch}, "
              f"(lengths {args.lengths}), {args.frames} frames, {device} {dtype}, {ctx.world_size} process(es), "
              f"{par.strategy}, log-probs {_layout_name(cfg)}", flush=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    phase.name = "warm-up step"
    sync()
    t = time.perf_counter()
    grpo_step(batch, 0)  # compiles and captures the engine
    sync()
    if ctx.is_main:
        print(f"warm-up step: {time.perf_counter() - t:.1f} s (compiles, captures)", flush=True)
    times, parts, kept = [], {}, 0
    for step in range(1, args.steps + 1):
        phase.name = f"step {step}"
        sync()
        t = time.perf_counter()
        step_out = grpo_step(batch, step)
        m, kept = step_out.metrics, kept + step_out.tokens
        ctx.barrier()
        sync()
        times.append(time.perf_counter() - t)
        for k in PARTS:
            parts[k] = parts.get(k, 0.0) + m.get(k, 0.0) / args.steps
    step_s = sum(times) / len(times)
    n_tok = kept * ctx.world_size // args.steps  # completion tokens per step, eos included (the drawn lengths)
    out = {"step_s": step_s, "parts": {k[5:-2]: v for k, v in parts.items()}, "tokens_per_step": n_tok,
           "trained_params_b": n_trained}
    if ctx.is_main:  # the steps' numbers first, whatever the comparison below does
        print(f"timed steps: {step_s:.2f} s/step " + ", ".join(f"{k[5:-2]} {v:.2f}" for k, v in parts.items()),
              flush=True)
    if rollouts.span is not None:
        phase.name = "rollout stops"
        out["rollout_stops"] = stops = rollouts.compare_stops(sync)
        if ctx.is_main:
            print(f"the last rollout again, rows stopped at their drawn lengths {stops['stopped_s']:.2f} s; decoded "
                  f"to {new_tokens} and cut {stops['cut_s']:.2f} s ({stops['cut_s'] / stops['stopped_s']:.2f}x)",
                  flush=True)
    if args.profile:
        phase.name = "profiled step"
        out["profile"] = profile_step(lambda: grpo_step(batch, args.steps + 1), args.profile, sync, ctx.is_main)
    if args.compare_training and ref is None:
        raise SystemExit("--compare-training times the reference log-probs too: use a preset with algo.beta > 0")
    if args.compare_training:
        phase.name = "compare training"
        out["compare_training"] = compare_training(cfg, model, ref, par, batch, rollouts.last, args.compare_repeats,
                                                   sync)
        if ctx.is_main:
            kernel = varlen_attention_kernel(device, dtype) if cfg.perf.varlen_attention else None
            attention = f"varlen ({kernel})" if kernel else "SDPA, padded inside attention only"
            print_comparison(out["compare_training"], args.lengths, cfg.perf.micro_batch_size,
                             cfg.optim.gradient_checkpointing, attention)
    if args.reference_estimate and ctx.is_main:
        phase.name = "reference estimate"
        shape = (prompt_len + new_tokens // 2, model.config.hidden_size)
        out["reference_step_s"] = _reference_step(model.language_model, shape, n_tok, step_s - parts["time/rollout_s"],
                                                  args.reference_tokens, device, dtype)
    return out


def profile_step(step, rows: int, sync, show: bool) -> list[dict]:
    """One more step under ``torch.profiler``: the ``rows`` GPU kernels that took the most time, with their
    share of the step's kernel time (CUDA graph replays included: CUPTI sees the kernels inside them);
    without a GPU, the CPU operators by their own time."""
    from torch.profiler import ProfilerActivity, profile

    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        sync()
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type.name == "CUDA"]
    if kernels:
        what, spent = "GPU kernel", lambda e: e.self_device_time_total
    else:
        kernels, what, spent = list(events), "CPU operator", lambda e: e.self_cpu_time_total
    total = sum(spent(e) for e in kernels) or 1.0
    kernels.sort(key=lambda e: -spent(e))
    top = [{"kernel": e.key[:90], "calls": e.count, "ms": spent(e) / 1e3, "share": spent(e) / total}
           for e in kernels[:rows]]
    if show:
        print(f"\nprofiled step: {total / 1e6:.2f} s of {what} time; top {rows}")
        print(f"{'ms':>9} {'share':>6} {'calls':>7}  {what}")
        for k in top:
            print(f"{k['ms']:>9.1f} {k['share']:>6.1%} {k['calls']:>7}  {k['kernel']}")
    return top


def _reference_step(lm, shape: tuple[int, int], n_tok: int, rest_s: float, n: int, device, dtype) -> float:
    """The reference's rollout: each completion sampled alone, every token a full forward of the whole sequence
    (timed at the mean length, extrapolated to ``n_tok`` tokens), plus the rest of our step."""
    with torch.no_grad():
        x = torch.randn(1, *shape, device=device, dtype=dtype)
        lm(inputs_embeds=x, use_cache=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            lm(inputs_embeds=x, use_cache=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * n_tok + rest_s


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="nextqa", help="GRPO preset whose tune/optim/perf/engine/algo/rollout keys run")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a preset key, repeatable")
    ap.add_argument("--memory-cap-gib", type=float, default=0.0, help="cap this process's GPU memory (GiB; 0: no cap)")
    ap.add_argument("--config", choices=["3b", "tiny"], default="3b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="", help="model dtype (default: the preset's model.dtype)")
    ap.add_argument("--prompts", type=int, default=0, help="prompts per step, global (default: the preset's)")
    ap.add_argument("--generations", type=int, default=0, help="G (default: the preset's)")
    ap.add_argument("--new-tokens", type=int, default=0, help="tokens per completion (default: the preset's)")
    ap.add_argument("--micro-batch", type=int, default=0, help="perf.micro_batch_size (default: the preset's)")
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    ap.add_argument("--no-graphs", action="store_true")
    ap.add_argument("--no-compile", action="store_true", help="Decode without torch.compile (CUDA graphs only).")
    ap.add_argument("--engine-max-batch", type=int, default=0,
                    help="rows the engine decodes at once (default: the preset's, at most this process's completions)")
    ap.add_argument("--no-fused-weights", action="store_true", help="engine.fused_weights=false (3 more GEMMs a layer)")
    ap.add_argument("--strategy", choices=["auto", "ddp", "fsdp2"], default="auto",
                    help="dist.strategy (auto: ddp with several processes)")
    ap.add_argument("--rollout-parallel", choices=["data", "tensor"], default="data",
                    help="dist.rollout_parallel: each process decodes its own prompts (data), or all of the step's "
                         "with 1/N of the weights (tensor; needs torchrun with N > 1)")
    ap.add_argument("--reference-estimate", action="store_true",
                    help="also estimate the step done the reference way (no KV cache), from a few timed forwards")
    ap.add_argument("--reference-tokens", type=int, default=4, help="tokens timed for that estimate")
    # completion lengths and the training log-prob layout
    ap.add_argument("--lengths", default="forced",
                    help="forced: every completion max_new_tokens long; "
                         "uniform:A-B: eos forced at a length drawn per completion from A..B")
    ap.add_argument("--logprob-path", choices=list(LAYOUTS), default="",
                    help="layout of the timed steps (default: the preset's perf.shared_prompt / perf.packing): padded "
                         "(both off), shared, packed")
    ap.add_argument("--compare-training", action="store_true",
                    help="then time reference log-probs and policy log-probs + backward of one step under every "
                         "layout, side by side")
    ap.add_argument("--compare-repeats", type=int, default=3,
                    help="timed runs per layout in --compare-training (after one warm-up); the median is printed")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="after the timed steps, profile one more and print its N most expensive GPU kernels")
    ap.add_argument("--no-grad-checkpointing", action="store_true", help="keep activations instead of recomputing them")
    args = ap.parse_args(argv)
    if args.compare_training and args.strategy == "fsdp2":
        raise SystemExit("--compare-training: fsdp2 keeps the padded layout (perf.shared_prompt / perf.packing are "
                         "ignored there)")

    ctx = init_distributed(args.device, need_group=args.strategy == "fsdp2")  # no group for one plain process
    cfg = bench_config(args, ctx.world_size)
    try:
        check_rollout_processes(cfg, ctx.world_size)
    except TlvrError as e:
        raise SystemExit(str(e)) from None
    if cfg.data.prompts_per_step % ctx.world_size:
        raise SystemExit(f"{cfg.data.prompts_per_step} prompts per step must divide over {ctx.world_size} processes")
    if cfg.tune.lora.enabled and args.strategy == "fsdp2":
        raise SystemExit("tune.lora trains with dist.strategy ddp or none")
    device = ctx.device
    cuda = device.type == "cuda"
    if args.memory_cap_gib and cuda:
        total = torch.cuda.get_device_properties(device).total_memory
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gib * GIB / total), index)
    result: dict = {"preset": args.preset, "overrides": args.set, "config": args.config, "device": _device_name(device),
                    "processes": ctx.world_size, "rollout_parallel": args.rollout_parallel,
                    "cap_gib": args.memory_cap_gib if cuda else None, "completed": False}
    phase = Phase()
    try:
        result.update(run_steps(args, cfg, ctx, phase), completed=True)
    except Exception as e:
        if not _is_oom(e):
            raise
        result["oom"] = f"{phase.name}: {type(e).__name__}: {str(e).strip().splitlines()[0]}"
    if cuda:
        # the fullest process; allocated: live tensors; reserved: what the caching allocator holds (the cap bounds it)
        mine = (torch.cuda.max_memory_allocated(device) / GIB, torch.cuda.max_memory_reserved(device) / GIB)
        peaks = ctx.all_gather_objects(mine)
        result["peak_allocated_gib"] = max(a for a, _ in peaks)
        result["peak_reserved_gib"] = max(r for _, r in peaks)
    if ctx.is_main:
        print_result(result)
    shutdown_distributed()
    return result


def _is_oom(e: BaseException) -> bool:
    """An allocation failure: torch's own error, or one raised by a library (cuBLAS, the compiler) around it."""
    while e is not None:
        if isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower() or "ALLOC_FAILED" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _layout_name(cfg: GRPOConfig) -> str:
    key = (cfg.perf.shared_prompt, cfg.perf.packing)
    return next((name for name, layout in LAYOUTS.items() if layout == key), f"packing only {key}")


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)


def print_result(r: dict) -> None:
    """The table for people, then one ``RESULT {json}`` line for scripts."""
    print()
    if r["completed"]:
        print(f"{'part':<22}{'s/step':>10}")
        for k, v in r["parts"].items():
            print(f"{'  of which optimizer' if k == 'optimizer' else k:<22}{v:>10.2f}")
        print(f"{'total':<22}{r['step_s']:>10.2f}")
        rollout = r["parts"].get("rollout", 0.0)
        print(f"rollout {r['tokens_per_step'] / rollout if rollout else float('nan'):.0f} tok/s; "
              f"step {r['tokens_per_step'] / r['step_s']:.0f} completion tok/s")
        if "reference_step_s" in r:
            print(f"reference-style step (no KV cache, one sequence at a time, extrapolated): "
                  f"~{r['reference_step_s']:.0f} s, "
                  f"ratio {r['reference_step_s'] / r['step_s']:.1f}x")
    else:
        cap = f" under the {r['cap_gib']:g} GiB cap" if r.get("cap_gib") else ""
        print(f"OUT OF MEMORY{cap} during {r['oom']}")
    if "peak_reserved_gib" in r:
        print(f"peak memory: {r['peak_allocated_gib']:.2f} GiB allocated, {r['peak_reserved_gib']:.2f} GiB reserved")
    if r.get("cap_gib"):
        fits = r["completed"] and r["peak_reserved_gib"] <= r["cap_gib"]
        print(f"{'FITS' if fits else 'DOES NOT FIT'} the {r['cap_gib']:g} GiB cap ({r['preset']} on {r['device']})")
    print("RESULT " + json.dumps(r, sort_keys=True), flush=True)


if __name__ == "__main__":
    sys.exit(0 if main()["completed"] else 3)
