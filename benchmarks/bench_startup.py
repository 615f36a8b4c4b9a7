"""Start-up of a GRPO run: the first step against a steady one, with a cold and a warm compile cache.

    python benchmarks/bench_startup.py              # 3.6 B random init, one GPU: 3 steps, cold cache then warm
    python benchmarks/bench_startup.py --config tiny --device cpu --dtype float32 --prompts 2 --generations 2 \\
        --new-tokens 8 --steps 2                    # smoke run

Builds (once, reused from ``--workdir``) a random-init checkpoint in the released layout, then runs
``--steps`` real GRPO steps (``GRPOStep``: rollout through the compiled, graph-captured engine,
reference and policy log-probs, backward, AdamW; 8 prompts x G 8 x 512 forced tokens) in a fresh
process per mode, loading the policy and the reference the way ``tlvr grpo`` does
(``load_reference``: a copy of the policy): ``cold`` with an empty compile cache (``TLVR_COMPILE_CACHE``), ``warm``
with the cache the cold run left, ``nocompile`` with CUDA graphs alone. Prints, side by side, the
process wall time, imports, loading, the first step, the steady step (mean of the later ones) and
what the first step costs above a steady one (goal: at most 15 s with a warm cache), and the time
a second load of the reference would take (what the copy replaces).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

START = time.perf_counter()

sys.path.insert(0, str(Path(__file__).resolve().parent))

from random_checkpoint import random_checkpoint, repo_env  # noqa: E402

GOAL_FIRST_OVER_STEADY_S = 15.0
MODES = ("cold", "warm", "nocompile")


def child(args) -> dict:
    """One run in this (fresh) process: load as ``tlvr grpo`` does, then time ``args.steps`` steps."""
    import torch

    from tlvr_cli.config import load_config
    from tlvr_cli.data.records import GRPORow
    from tlvr_cli.jobs import GRPOConfig
    from tlvr_cli.model.checkpoint import load_model
    from tlvr_cli.runtime import init_distributed
    from tlvr_cli.train.grpo import load_reference
    from tlvr_cli.train.grpo_step import GRPOStep
    from tlvr_cli.train.optim import build_optimizer, build_scheduler
    from tlvr_cli.train.parallel import Parallel
    from tlvr_cli.train.policy import PolicyLogprobs
    from tlvr_cli.train.rollout import PromptBatch, prompt_ids
    from tlvr_cli.train.rollout_parallel import rollout_engine
    from tlvr_cli.train.setup import apply_job_tuning

    out: dict = {"import_s": time.perf_counter() - START}
    ctx = init_distributed(args.device)
    device = ctx.device

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    cfg = load_config(GRPOConfig, None, overrides=args.set, extra={
        "model": {"path": args.ckpt, "device": args.device, "dtype": args.dtype},
        "algo": {"num_generations": args.generations}, "rollout": {"max_new_tokens": args.new_tokens},
        "perf": {"force_max_new_tokens": True}, "data": {"prompts_per_step": args.prompts},
        "engine": {"max_batch": args.prompts * args.generations, "cuda_graphs": device.type == "cuda",
                   "compile": args.mode != "nocompile"}})
    t = time.perf_counter()  # the models as run_grpo loads them
    model = load_model(cfg.model)
    apply_job_tuning(model, cfg.tune, cfg.optim)
    sync()
    out["load_policy_s"] = time.perf_counter() - t
    t = time.perf_counter()
    ref = load_reference(cfg, model, device)
    sync()
    out["reference_s"] = time.perf_counter() - t
    if args.time_second_load:  # what loading the reference again from disk would cost
        t = time.perf_counter()
        second = load_model(cfg.model)
        sync()
        out["second_load_s"] = time.perf_counter() - t
        del second
        if device.type == "cuda":
            torch.cuda.empty_cache()
    par = Parallel(PolicyLogprobs(model), model, ctx, cfg.dist.strategy, prefix="model.")
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, 687)
    tok, size = model.tokenizer, model.config.vision_config.image_size
    problem = "What does the man do after picking up the cup?\nA. drink\nB. leave\nC. sit\nD. wave\nE. run"
    rows = [GRPORow(index=i, problem=problem, solution="<answer>A</answer>", video_filename=f"./v{i}.mp4",
                    video_path=Path(f"/synthetic/v{i}.mp4"), extra={}) for i in range(args.prompts)]
    ids = [prompt_ids(tok, r, cfg.data.question_template) for r in rows]
    gen = torch.Generator().manual_seed(0)
    batch = PromptBatch(rows, ids, [torch.rand(16, 3, size, size, generator=gen) * 2 - 1 for _ in rows])
    longest = max(len(i) for i in ids) - 1 + model.config.num_queries
    engine = rollout_engine(cfg, model.language_model, par, longest + args.new_tokens)
    grpo_step = GRPOStep(cfg, model, ref, par, optimizer, scheduler, engine)
    out["steps"], out["rollout"] = [], []
    for step in range(args.steps):
        sync()
        t = time.perf_counter()
        metrics = grpo_step(batch, step).metrics
        sync()
        out["steps"].append(time.perf_counter() - t)
        out["rollout"].append(metrics["time/rollout_s"])
    out["since_start_s"] = time.perf_counter() - START
    return out


def run_mode(mode: str, args, ckpt: Path, cache: Path) -> dict:
    env = {k: v for k, v in repo_env().items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    env["TLVR_COMPILE_CACHE"] = str(cache)
    cmd = [sys.executable, __file__, "--child", mode, "--ckpt", str(ckpt), "--device", args.device,
           "--dtype", args.dtype, "--prompts", str(args.prompts), "--generations", str(args.generations),
           "--new-tokens", str(args.new_tokens), "--steps", str(args.steps)]
    cmd += [f"--set={kv}" for kv in args.set]
    if mode == args.modes[0]:
        cmd.append("--time-second-load")
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} run failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["wall_s"] = time.perf_counter() - t
    steady = res["steps"][1:] or res["steps"]
    res["first_s"], res["steady_s"] = res["steps"][0], sum(steady) / len(steady)
    steady_rollout = res["rollout"][1:] or res["rollout"]
    res["first_rollout_s"], res["steady_rollout_s"] = res["rollout"][0], sum(steady_rollout) / len(steady_rollout)
    res["first_over_steady_s"] = res["first_s"] - res["steady_s"]
    return res


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=["3b", "tiny"], default="3b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a grpo config key, repeatable (e.g. optim.gradient_checkpointing=false)")
    ap.add_argument("--modes", default="cold,warm", help=f"comma-separated, in order, from {', '.join(MODES)}")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "tlvr-bench"),
                    help="where the checkpoint and the compile cache are kept")
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--time-second-load", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        args.mode = args.child
        print(json.dumps(child(args)))
        return {}

    args.modes = args.modes.split(",")
    if any(m not in MODES for m in args.modes):
        raise SystemExit(f"--modes: expected some of {', '.join(MODES)}")
    import torch

    work = Path(args.workdir)
    ckpt = random_checkpoint(work / f"ckpt-{args.config}", args.config, args.device, getattr(torch, args.dtype))
    cache = work / "compile-cache-bench"
    results = {}
    for mode in args.modes:
        if mode == "cold" and cache.exists():
            shutil.rmtree(cache)
        print(f"running {mode} ...", flush=True)
        results[mode] = run_mode(mode, args, ckpt, cache)

    print(f"\nGRPO start-up, {args.config} model, {args.device} {args.dtype}, "
          f"{args.prompts} prompts x G {args.generations} "
          f"x {args.new_tokens} forced tokens, {args.steps} steps per process")
    print(f"{'':<34}" + "".join(f"{m:>12}" for m in args.modes))
    for key, label in (("wall_s", "process wall s"), ("import_s", "imports s"), ("load_policy_s", "load policy s"),
                       ("reference_s", "reference (copy of the policy) s"),
                       ("first_s", "first step s"), ("steady_s", "steady step s"),
                       ("first_over_steady_s", "first - steady s"),
                       ("first_rollout_s", "first rollout s"), ("steady_rollout_s", "steady rollout s")):
        print(f"{label:<34}" + "".join(f"{results[m][key]:>12.2f}" for m in args.modes))
    first = results[args.modes[0]]
    if "second_load_s" in first:
        print(f"the reference as a second load from disk (before): {first['second_load_s']:.2f} s, "
              f"as a copy of the policy: {first['reference_s']:.2f} s")
    if "warm" in results:
        w = results["warm"]["first_over_steady_s"]
        print(f"warm cache: the first step costs {w:.1f} s above a steady one "
              f"(goal <= {GOAL_FIRST_OVER_STEADY_S:.0f} s)")
    if cache.exists():
        size = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
        print(f"compile cache {cache}: {size / 1e6:.1f} MB")
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
