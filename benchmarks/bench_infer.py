"""``tlvr infer`` end to end: one question about one video, timed as a user runs it.

    python benchmarks/bench_infer.py                        # 3.6 B random init, bf16 on the GPU
    python benchmarks/bench_infer.py --config tiny --device cpu --dtype float32 --max-new-tokens 16   # smoke run

Builds (once, reused from ``--workdir``) a random-init checkpoint in the released layout and a test
video written with PyAV, then runs the real command in fresh processes:
``python -m tlvr_cli infer VIDEO "question" --model CKPT --max-new-tokens N --greedy --json``.
The first run reads the checkpoint from disk, later runs from the file cache (the goal is stated for
a warm file cache). Prints the wall time of each run beside the timings the command reports
(import, load, video decode and frame resize on its thread during the import, the frames'
normalization on the device, tower + prompt, generation), the generated tok/s, the same command
decoding without CUDA graphs (``--set cuda_graphs=false``, the path every question took before) and
how long a missing video takes to be reported.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from random_checkpoint import random_checkpoint, repo_env  # noqa: E402

QUESTION = "What does the person do after picking up the cup?\nA. drink\nB. leave\nC. sit\nD. wave\nE. run"
GOAL_WALL_S = 8.0
GOAL_TOK_S = 150.0


def write_test_video(path: Path, seconds: float, size: tuple[int, int], fps: int) -> Path:
    """A moving gradient as H.264 (mpeg4 where libx264 is missing), so decoding costs what a real clip does."""
    import av

    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = size
    y, x = np.mgrid[0:h, 0:w]
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    with av.open(str(tmp), "w") as out:
        try:
            stream = out.add_stream("libx264", rate=fps)
        except Exception:  # an ffmpeg build without x264
            stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(int(seconds * fps)):
            planes = [(x + 3 * i) % 256, (y + 2 * i) % 256, np.full_like(x, (5 * i) % 256)]
            frame = np.stack(planes, -1).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    tmp.rename(path)
    return path


def run_infer(video: Path, ckpt: Path, args, extra: list[str]) -> dict:
    """One ``tlvr infer --json`` in a fresh process: its wall time, exit code and reported timings."""
    cmd = [sys.executable, "-m", "tlvr_cli", "infer", str(video), QUESTION, "--model", str(ckpt),
           "--max-new-tokens", str(args.max_new_tokens), "--greedy", "--device", args.device, "--dtype", args.dtype,
           "--json", *extra]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=repo_env())
    wall = time.perf_counter() - t
    result = {"wall_s": wall, "rc": proc.returncode}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        out = json.loads(lines[-1])
        result.update(out["timings"], new_tokens=out["new_tokens"])
        # interpreter start, CLI, config, exit: what the command's own parts leave (the video decodes
        # on a thread during the import)
        result["other_s"] = wall - sum(v for k, v in out["timings"].items() if k != "decode_s")
        result["tok_s"] = out["new_tokens"] / out["timings"]["generate_s"]
    else:
        result["error"] = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "no output"
    return result


def breakdown(video: Path, ckpt: Path, args) -> dict[str, float]:
    """The same question in this process, part by part: what a first call pays (library start-up,
    tower warm-up, graph capture) against a second one, and how much of the load is reading the weights."""
    from tlvr_cli.data.template import tokenize_with_image
    from tlvr_cli.engine.generate import Engine
    from tlvr_cli.engine.sampling import SamplingParams
    from tlvr_cli.infer import inference_prompt
    from tlvr_cli.model.checkpoint import load_model, read_state_dict
    from tlvr_cli.video.decode import read_frames
    from tlvr_cli.video.preprocess import preprocess_frames

    device = torch.device(args.device)

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - t

    out: dict[str, float] = {}
    _, out["read_weights_s"] = timed(lambda: read_state_dict(ckpt))
    model, out["load_s"] = timed(lambda: load_model(str(ckpt), dtype=args.dtype, device=args.device).eval())
    frames = read_frames(video, 16)
    dtype = next(model.vision_tower.parameters()).dtype
    pixels = preprocess_frames(frames.frames, size=model.config.vision_config.image_size)[None].to(device, dtype)

    def first_kernels():  # one small GEMM, conv and attention: the library start-up any first call pays
        x = torch.randn(1, 4, 64, 64, device=device, dtype=dtype)
        F = torch.nn.functional
        return x @ x, F.conv2d(x, x[:, :, :3, :3]), F.scaled_dot_product_attention(x, x, x)

    with torch.no_grad():
        _, out["first_kernels_s"] = timed(first_kernels)
        for name in ("tower_first_s", "tower_second_s"):
            feats, out[name] = timed(lambda: model.encode_videos(pixels))
        ids = tokenize_with_image(model.tokenizer, inference_prompt(QUESTION, True))
        prompt = model.prompt_embeddings([ids], feats)
    n = args.max_new_tokens
    for graphs in (True, False):
        engine = Engine(model.language_model, max_batch=1, max_seq_len=prompt[0].shape[0] + n, cuda_graphs=graphs,
                        split_kv=False)  # as tlvr infer decodes
        for call in ("first", "second"):
            res, s = timed(lambda: engine.generate(prompt, SamplingParams(temperature=0.0), n, None, sync_every=4))
            out[f"{'graphs' if graphs else 'eager'}_{call}_tok_s"] = len(res[0].tokens) / s
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=["3b", "tiny"], default="3b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--runs", type=int, default=2, help="runs of the command (the first also warms the file cache)")
    ap.add_argument("--no-eager", action="store_true", help="skip the comparison run without CUDA graphs")
    ap.add_argument("--breakdown", action="store_true",
                    help="also time the parts in this process (first vs second calls)")
    ap.add_argument("--video-seconds", type=float, default=30.0)
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "tlvr-bench"),
                    help="where the checkpoint and the video are kept between runs")
    args = ap.parse_args(argv)

    work = Path(args.workdir)
    ckpt = random_checkpoint(work / f"ckpt-{args.config}", args.config, args.device, getattr(torch, args.dtype))
    video = write_test_video(work / "video-640x360.mp4", args.video_seconds, (360, 640), 24)

    runs = [run_infer(video, ckpt, args, []) for _ in range(args.runs)]
    with_eager = not args.no_eager and args.device != "cpu"  # on CPU both paths are eager
    eager = run_infer(video, ckpt, args, ["--set", "cuda_graphs=false"]) if with_eager else None
    missing = run_infer(work / "missing.mp4", ckpt, args, [])

    cols = [f"run {i + 1}" for i in range(len(runs))] + (["no graphs"] if eager else [])
    table = runs + ([eager] if eager else [])
    print(f"\n`tlvr infer`, {args.config} model, {args.device} {args.dtype}, {args.max_new_tokens} new tokens, greedy")
    print(f"{'':<30}" + "".join(f"{c:>12}" for c in cols))
    for key, label in (("wall_s", "wall s"), ("import_s", "torch + transformers import s"), ("load_s", "load s"),
                       ("decode_s", "video decode s (during import)"), ("preprocess_s", "frame normalize s"),
                       ("encode_s", "tower + prompt s"), ("generate_s", "generation s"),
                       ("other_s", "start-up, CLI and exit s"), ("new_tokens", "new tokens"),
                       ("tok_s", "tok/s")):
        print(f"{label:<30}" + "".join(f"{r.get(key, float('nan')):>12.2f}" for r in table))
    for r in table:
        if r["rc"] != 0:
            print(f"a run failed (exit {r['rc']}): {r.get('error')}")
    print(f"missing video reported after {missing['wall_s']:.2f} s (exit {missing['rc']}: {missing.get('error', '')})")
    warm = runs[-1]
    if "tok_s" in warm:
        print(f"warm run: {warm['wall_s']:.1f} s wall (goal <= {GOAL_WALL_S:.0f} s), {warm['tok_s']:.0f} tok/s "
              f"(goal >= {GOAL_TOK_S:.0f})" + (f"; {warm['tok_s'] / eager['tok_s']:.1f}x the tok/s without graphs"
                                               if eager and "tok_s" in eager else ""))
    report = {"runs": runs, "no_graphs": eager, "missing_video": missing}
    if args.breakdown:
        report["breakdown"] = breakdown(video, ckpt, args)
        print("in-process: " + ", ".join(f"{k} {v:.2f}" for k, v in report["breakdown"].items()))
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
