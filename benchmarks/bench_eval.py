"""Evaluation throughput: ``run_eval`` at default settings beside the reference-style loop and the
engine's rollout speed on the same prompts.

    python benchmarks/bench_eval.py                       # 3B + SigLIP shapes, random init, CUDA: the goal run
    python benchmarks/bench_eval.py --config tiny --device cpu --items 12 --max-new-tokens 16 --reference-tokens 4

Builds a random-init checkpoint in the released layout (bf16 for 3b), writes the synthetic benchmark
(``--items`` questions, 3 per video), then times:
  * ``tlvr eval``: the real ``run_eval`` with the CLI's defaults (greedy, engine sized from free
    memory, CUDA graphs + compile, 4 decode workers, shared video features), after a warm-up run on
    a few items that fills the compile cache; wall time with and without loading the model;
  * the reference-style loop: one item at a time, decode, tower, HF ``generate`` with a KV cache in
    fp32, estimated from ``--reference-items`` items timed at 1 and ``--reference-tokens`` new tokens
    and extrapolated linearly to the eval's mean answer length;
  * the engine's raw throughput on the eval's own work: ``Engine.generate`` on all the eval's prompts
    (precomputed) at the eval's engine size, after a warm-up call; and the same requests with each
    video's shared prompt part prefilled once, as the eval does (``share_prefix``);
  * the engine's rollout throughput as GRPO decodes (the ``nextqa`` preset's rollout: 8 prompts x G 8,
    512 new tokens each, T 1 / top-k 50, prompts of ``ROLLOUT_PROMPT_LEN`` positions, the preset's
    engine settings).
A random-init model hardly ever emits eos, so every answer runs to max_new_tokens (1024 by default).
Goals (H200): eval >= 10,000 generated tok/s and >= 80 % of the rollout throughput. Both ratios are
printed: against the GRPO rollout (the goal's yardstick: what the engine does in rollouts) and against
the engine on the eval's own requests (the stricter one: what the eval's own overheads cost).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# tlvr_cli is imported inside the functions: where the eval's decode workers are spawned (not on
# Linux) they re-import this script, and they need torch only, not the model stack

QWEN25_3B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                 num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
                 rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, use_cache=False)
GOAL_TOKENS_PER_S = 10_000
GOAL_OF_ROLLOUT = 0.8
LOAD_REPEATS = 3  # model loads timed after the eval; the fastest is its "model load"
REFERENCE_REPEATS = 3
ROLLOUT_PROMPT_LEN = 650  # a NextQA prompt: system prompt, 512 visual tokens, question and options


def build_checkpoint(config: str, device: torch.device, out: Path) -> Path:
    """A random-init TinyLLaVA in the released layout (3b: Qwen2.5-3B + SigLIP-so400m shapes, bf16)."""
    from tlvr_cli.model.checkpoint import save_model
    from tlvr_cli.model.config import TinyLlavaConfig
    from tlvr_cli.model.tiny import build_tiny_model, tiny_tokenizer
    from tlvr_cli.model.tinyllava import TinyLlava

    if config == "tiny":
        return save_model(build_tiny_model(), out)
    torch.manual_seed(0)
    cfg = TinyLlavaConfig(text_config={**QWEN25_3B}, vision_config={}, tokenizer_model_max_length=3072)
    with torch.device(device):  # initialise on the device: a 3B fp32 init on CPU takes minutes
        model = TinyLlava(cfg, tiny_tokenizer())
    model.language_model.tie_weights()
    return save_model(model, out, dtype=torch.bfloat16)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def eval_config(args, ckpt: Path, data: Path, out: Path, **extra):
    from tlvr_cli.config import load_config
    from tlvr_cli.jobs import EvalConfig

    given = {"model": {"path": str(ckpt), "device": args.device}, "benchmark": "synthetic", "data_dir": str(data),
             "output_dir": str(out), **extra}
    if args.max_new_tokens:
        given["sampling"] = {"max_new_tokens": args.max_new_tokens}
    return load_config(EvalConfig, None, extra=given)


def time_eval(args, ckpt: Path, data: Path, work: Path, device: torch.device) -> dict:
    """The real run_eval at default settings: a warm-up on a few items, then the whole benchmark."""
    from tlvr_cli.eval.runner import run_eval
    from tlvr_cli.model.checkpoint import load_model

    run_eval(eval_config(args, ckpt, data, work / "eval-warmup", limit=min(8, args.items)), show_progress=False)
    cfg = eval_config(args, ckpt, data, work / "eval")
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
    synchronize(device)
    t = time.perf_counter()
    if profiler is not None:
        profiler.enable()
    report = run_eval(cfg, show_progress=False)
    synchronize(device)
    wall = time.perf_counter() - t
    if profiler is not None:
        import pstats

        profiler.disable()
        print(f"\nhost profile of the timed run_eval ({wall:.2f} s), by cumulative time:")
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(args.profile)
    rows = [json.loads(line) for line in (work / "eval" / "answers.jsonl").read_text().splitlines()]
    model, load = None, float("inf")
    for _ in range(LOAD_REPEATS):  # the fastest, as the eval's own load reads a warm file cache
        model = None
        t = time.perf_counter()
        model = load_model(cfg.model)
        synchronize(device)
        load = min(load, time.perf_counter() - t)
    return {"cfg": cfg, "model": model, "wall": wall, "load": load, "tokens": sum(r.get("new_tokens", 0) for r in rows),
            "items": len(rows), "skipped": report.n_skipped,
            "speed": json.loads((work / "eval" / "speed.json").read_text())}


def eval_requests(model, cfg, items) -> list:
    """The engine requests the eval builds for ``items`` (features shared per video, and with
    ``share_prefix`` each video's common prompt part as one shared prefix)."""
    from tlvr_cli.eval import runner
    from tlvr_cli.eval.decode_ahead import DecodePool, decode_video, video_jobs

    size = model.config.vision_config.image_size
    decoded = DecodePool(0).decode(video_jobs(items, True), lambda v, s: decode_video(v, s, cfg.video, size))
    return list(runner._requests(model, decoded, lambda job, err: None, cfg.share_prefix))


def eval_prompts(model, cfg, items) -> list[torch.Tensor]:
    """The prompt embeddings the eval feeds the engine for ``items``."""
    return [r.prompt for r in eval_requests(model, cfg, items)]


def time_rollout(model, cfg, requests: list, device: torch.device) -> dict:
    """``Engine.generate`` over all the requests' prompts at once, each prefilled whole, built as the eval
    builds its engine (the second call is timed), and the same rows with the requests' shared prefixes
    prefilled once (``generate_stream``; rows finish in any order)."""
    from tlvr_cli.engine.sampling import SamplingParams
    from tlvr_cli.eval.runner import eval_engine

    max_new = cfg.sampling.max_new_tokens
    engine = eval_engine(cfg, model)
    greedy = SamplingParams(temperature=0.0)
    eos = model.tokenizer.eos_token_id
    prompts = [r.prompt for r in requests]
    with torch.no_grad():
        t = time.perf_counter()
        engine.generate(prompts, greedy, max_new, eos)  # captures the graphs (compiled code: from the warm cache)
        synchronize(device)
        first = time.perf_counter() - t
        t = time.perf_counter()
        outs = engine.generate(prompts, greedy, max_new, eos)
        synchronize(device)
        wall = time.perf_counter() - t
        t = time.perf_counter()
        shared = list(engine.generate_stream(requests, greedy, max_new, eos))
        synchronize(device)
        shared_wall = time.perf_counter() - t
    return {"wall": wall, "first_wall": first, "tokens": sum(len(o.tokens) for o in outs), "items": len(prompts),
            "max_batch": engine.max_batch, "shared_wall": shared_wall,
            "shared_tokens": sum(len(f.completion.tokens) for f in shared),
            "shared_prefixes": len({r.prefix for r in requests if r.prefix is not None})}


def time_grpo_rollout(model, device: torch.device, new_tokens: int = 0) -> dict:
    """The second of two identical rollouts as ``tlvr grpo --preset nextqa`` decodes them (its engine
    settings, sampling and group size), from random prompt embeddings of ``ROLLOUT_PROMPT_LEN``
    positions, every row running to ``new_tokens`` (0: the preset's ``max_new_tokens``)."""
    from tlvr_cli.config import load_config
    from tlvr_cli.engine.generate import Engine
    from tlvr_cli.engine.sampling import SamplingParams
    from tlvr_cli.jobs import GRPOConfig

    cfg = load_config(GRPOConfig, "nextqa")
    r, g, n = cfg.rollout, cfg.algo.num_generations, cfg.data.prompts_per_step
    new = new_tokens or r.max_new_tokens
    lm = model.language_model
    options = {**cfg.engine.engine_kwargs(), "max_batch": n * g}
    engine = Engine(lm, max_seq_len=ROLLOUT_PROMPT_LEN + new, **options)
    params = SamplingParams(temperature=r.temperature, top_k=r.top_k, top_p=r.top_p)
    gen = torch.Generator(device="cpu").manual_seed(0)
    width = lm.config.hidden_size
    prompts = [(torch.randn(ROLLOUT_PROMPT_LEN, width, generator=gen) * 0.02).to(device, lm.dtype) for _ in range(n)]
    walls = []
    with torch.no_grad():
        for _ in range(2):  # the first allocates the cache and captures the graphs
            synchronize(device)
            t = time.perf_counter()
            outs = engine.generate(prompts, params, new, 0, num_samples=g, ignore_eos=True)
            synchronize(device)
            walls.append(time.perf_counter() - t)
    return {"wall": walls[1], "tokens": sum(len(o.tokens) for o in outs), "rows": n * g, "new": new}


def time_reference(ckpt: Path, cfg, items, args, device: torch.device, mean_tokens: float) -> dict:
    """Seconds per item of the reference's loop (fp32, one item at a time: decode, tower, HF generate
    with a KV cache, sampling at T 1 / top-k 50 as the authors' scripts)."""
    from tlvr_cli.model.checkpoint import load_model

    model = load_model(str(ckpt), dtype="float32", device=str(device)).eval()
    items = items[: args.reference_items]
    lm = model.language_model
    r = max(2, args.reference_tokens)

    def one(item, n: int) -> float:
        synchronize(device)
        t = time.perf_counter()
        (prompt,) = eval_prompts(model, cfg, [item])
        mask = torch.ones(1, prompt.shape[0], dtype=torch.long, device=device)
        with torch.no_grad():
            lm.generate(inputs_embeds=prompt[None], attention_mask=mask, do_sample=True, top_k=50, temperature=1.0,
                        max_new_tokens=n, min_new_tokens=n,
                        eos_token_id=model.tokenizer.eos_token_id, pad_token_id=model.tokenizer.eos_token_id)
        synchronize(device)
        return time.perf_counter() - t

    one(items[0], 2)  # warm-up
    per_item = []
    for item in items:
        # the fastest of a few runs at 1 and at r tokens: the least disturbed by other work on the machine
        first, longer = (min(one(item, n) for _ in range(REFERENCE_REPEATS)) for n in (1, r))
        per_item.append(first + (mean_tokens - 1) * max(0.0, longer - first) / (r - 1))
    return {"per_item": sum(per_item) / len(per_item), "timed": len(items), "tokens": r}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=["3b", "tiny"], default="3b", help="Model shapes (random init).")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--items", type=int, default=128, help="Questions in the synthetic benchmark (3 per video).")
    ap.add_argument("--max-new-tokens", type=int, default=0, help="Override the eval default (1024); 0 keeps it.")
    ap.add_argument("--rollout-new-tokens", type=int, default=0,
                    help="New tokens per row of the GRPO rollout timed beside the eval (0: the nextqa preset's 512).")
    ap.add_argument("--reference-items", type=int, default=2, help="Items timed for the reference-loop estimate.")
    ap.add_argument("--reference-tokens", type=int, default=32, help="New tokens per timed reference item.")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="profile the timed eval on the host (cProfile) and print its N heaviest calls")
    ap.add_argument("--workdir", default="", help="Where the checkpoint, data and answers go (default: a temp dir).")
    args = ap.parse_args(argv)
    from tlvr_cli.eval.benchmarks import load_eval_items
    from tlvr_cli.eval.decode_ahead import video_jobs
    from tlvr_cli.jobs import SynthConfig
    from tlvr_cli.synth import write_synthetic_dataset

    device = torch.device(args.device)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_eval-"))
    ckpt = build_checkpoint(args.config, device, work / "ckpt")
    data = work / "synth"
    write_synthetic_dataset(SynthConfig(root=str(data), train=0, eval=args.items, coldstart=0, size=64), progress=False)

    ev = time_eval(args, ckpt, data, work, device)
    cfg, model = ev.pop("cfg"), ev.pop("model").eval()
    dtype = next(model.parameters()).dtype
    items = load_eval_items(cfg)
    rollout = time_rollout(model, cfg, eval_requests(model, cfg, items), device)
    grpo = time_grpo_rollout(model, device, args.rollout_new_tokens)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    mean_tokens = ev["tokens"] / max(1, ev["items"] - ev["skipped"])
    ref = time_reference(ckpt, cfg, items, args, device, mean_tokens)

    videos = len(video_jobs(items, True))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"bench_eval: {args.config} on {device} ({name}); synthetic, {ev['items']} questions on {videos} videos, "
          f"{cfg.video.num_frames} frames, max_new_tokens {cfg.sampling.max_new_tokens}, {cfg.protocol}, "
          f"{str(dtype).removeprefix('torch.')} (reference float32), engine max_batch {rollout['max_batch']}"
          f"{' (auto)' if cfg.engine.max_batch == 0 else ''}, decode_workers {cfg.decode_workers}")
    n, tokens = ev["items"], ev["tokens"]
    ref_s = ref["per_item"] * n
    rows = [("reference loop (fp32, 1 item, est.)", n, mean_tokens * n, ref_s),
            ("tlvr eval, default settings", n, tokens, ev["wall"]),
            ("engine rollout, first call (captures)", rollout["items"], rollout["tokens"], rollout["first_wall"]),
            ("engine rollout, same prompts", rollout["items"], rollout["tokens"], rollout["wall"])]
    if rollout["shared_prefixes"]:
        rows.append(("engine rollout, prefixes shared", rollout["items"], rollout["shared_tokens"],
                     rollout["shared_wall"]))
    grpo_label = f"GRPO rollout, {grpo['rows']} rows x {grpo['new']}"
    rows.append((grpo_label, grpo["rows"], grpo["tokens"], grpo["wall"]))
    if ev["wall"] > ev["load"]:  # on a tiny model the load, timed apart, can outlast the eval it overlaps in
        rows.insert(2, ("tlvr eval, without model load", n, tokens, ev["wall"] - ev["load"]))
    print(f"{'method':<38}{'items':>7}{'gen tokens':>12}{'seconds':>10}{'items/s':>10}{'tok/s':>11}"
          f"{'vs reference':>14}")
    rates = {}
    for label, items, toks, secs in rows:
        rates[label] = toks / secs
        print(f"{label:<38}{items:>7}{toks:>12.0f}{secs:>10.2f}{items / secs:>10.2f}{toks / secs:>11.1f}"
              f"{ref_s / secs * (toks / (mean_tokens * n)):>13.1f}x")
    # the goal's yardstick is the GRPO rollout; the engine on the eval's own work (with the prefixes it
    # shares) is the stricter one
    eval_rate = rates["tlvr eval, default settings"]
    roll_rate = rates[grpo_label]
    same_rate = rates.get("engine rollout, prefixes shared", rates["engine rollout, same prompts"])
    if rollout["shared_prefixes"]:
        print(f"eval / engine on the same requests: {eval_rate / same_rate:.1%} with the prefixes shared, "
              f"{eval_rate / rates['engine rollout, same prompts']:.1%} with every prompt prefilled whole; "
              f"{rollout['shared_prefixes']} shared prefixes")
    else:
        print(f"eval / engine on the same requests: {eval_rate / same_rate:.1%}")
    print(f"eval / GRPO rollout throughput: {eval_rate / roll_rate:.1%} (goal >= {GOAL_OF_ROLLOUT:.0%}: "
          f"{'met' if eval_rate >= GOAL_OF_ROLLOUT * roll_rate else 'not met'}); eval {eval_rate:,.0f} generated tok/s "
          f"(goal >= {GOAL_TOKENS_PER_S:,}: {'met' if eval_rate >= GOAL_TOKENS_PER_S else 'not met'}); "
          f"model load {ev['load']:.1f} s; reference timed on {ref['timed']} items x {ref['tokens']} tokens")
    sp = ev["speed"]
    print(f"the eval's own record (speed.json): model load {sp['load_s']:.2f} s in the run, engine start to first "
          f"answer {sp['first_answer_s']:.2f} s, engine start to last answer {sp['generate_s']:.2f} s "
          f"({sp['tokens_per_s']:,.0f} tok/s), whole run {sp['wall_s']:.2f} s")
    if device.type == "cuda":
        print(f"peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
    return {"tokens_per_s": rates, "items_per_s": {label: items / secs for label, items, _, secs in rows},
            "shared_prefixes": rollout["shared_prefixes"],
            "eval_of_rollout": eval_rate / roll_rate, "eval_of_same_work": eval_rate / same_rate,
            "skipped": ev["skipped"], "speed": ev["speed"]}


if __name__ == "__main__":
    main()
