"""Config builders for the training-loop tests (the tiny model on a small synthetic set, CPU, fp32) and
data sets with missing videos."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from tlvr_cli.config import load_config
from tlvr_cli.jobs import ColdstartConfig, GRPOConfig
from tlvr_cli.model.checkpoint import read_state_dict


def coldstart_cfg(root: Path, run: Path, ckpt: Path, **extra) -> ColdstartConfig:
    base = {"model": {"path": str(ckpt), "dtype": "float32", "device": "cpu"},
            "data": {"root": str(root), "annotations": "coldstart.json", "num_workers": 0, "max_length": 1024},
            "optim": {"lr": 1e-3, "scheduler": "constant", "gradient_checkpointing": False},
            "batch_size": 2, "output": {"run_dir": str(run)}}
    return load_config(ColdstartConfig, None, extra=merge(base, extra))


def grpo_cfg(root: Path, run: Path, ckpt: Path, **extra) -> GRPOConfig:
    base = {"model": {"path": str(ckpt), "dtype": "float32", "device": "cpu"},
            "data": {"root": str(root), "prompts_per_step": 2, "num_workers": 1},
            "rollout": {"max_new_tokens": 8}, "algo": {"num_generations": 4},
            "optim": {"lr": 1e-3, "scheduler": "constant", "warmup_ratio": 0.0, "gradient_checkpointing": False},
            "perf": {"micro_batch_size": 3}, "engine": {"max_batch": 8, "cuda_graphs": False},
            "sample_every": 1, "output": {"run_dir": str(run)}}
    return load_config(GRPOConfig, None, extra=merge(base, extra))


def merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def same_weights(a: Path, b: Path) -> None:
    sa, sb = read_state_dict(a), read_state_dict(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def with_missing_videos(synth_root: Path, root: Path, n: int, broken: list[int]) -> None:
    """The first ``n`` GRPO rows of ``synth_root`` under ``root``, their videos copied, except rows ``broken``,
    whose video does not exist."""
    rows = [json.loads(line) for line in (synth_root / "nextqa_0-30s.jsonl").read_text().splitlines()][:n]
    for i, r in enumerate(rows):
        if i in broken:
            r["video_filename"] = "./NextQA/missing.mp4"
        else:
            dst = root / r["video_filename"][2:]
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(synth_root / r["video_filename"][2:], dst)
    root.mkdir(parents=True, exist_ok=True)
    (root / "nextqa_0-30s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
