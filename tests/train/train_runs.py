"""Config builders for the training-loop tests: the tiny model on a small synthetic set, CPU, fp32."""

from __future__ import annotations

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
