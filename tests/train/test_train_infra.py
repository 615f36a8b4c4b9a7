"""Optimizer with fp32 masters, LR schedules (HF rules), checkpoint atomicity and metrics logging."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from tlvr_cli.jobs import OptimConfig
from tlvr_cli.train.metrics import MetricsLogger, plot_metrics, read_metrics
from tlvr_cli.train.optim import MasterAdamW, build_optimizer, build_scheduler, lr_factor, warmup_steps
from tlvr_cli.train.run_dir import STATE_FILE, checkpoint_dir, epoch_order, resolve_resume


def test_warmup_and_cosine_follow_hf():
    assert warmup_steps(687, 0.03) == 21  # spec §5.4
    assert lr_factor(0, 687, 21, "cosine") == 0.0
    assert lr_factor(10, 687, 21, "cosine") == pytest.approx(10 / 21)
    assert lr_factor(21, 687, 21, "cosine") == pytest.approx(1.0)
    mid = 21 + (687 - 21) // 2
    assert lr_factor(mid, 687, 21, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * (mid - 21) / 666)))
    assert lr_factor(687, 687, 21, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(5, 16, 0, "constant") == 1.0
    assert lr_factor(8, 16, 0, "linear") == pytest.approx(0.5)


def test_scheduler_drives_optimizer_lr():
    model = nn.Linear(4, 4)
    cfg = OptimConfig(lr=1e-3, scheduler="cosine", warmup_ratio=0.25)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, 8)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(5e-4) and lrs[2] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))


def test_master_weights_match_fp32_adamw():
    torch.manual_seed(0)
    ref = nn.Linear(8, 8)
    low = nn.Linear(8, 8).to(torch.bfloat16)
    with torch.no_grad():
        low.weight.copy_(ref.weight)
        low.bias.copy_(ref.bias)
        ref.weight.copy_(low.weight.float())
        ref.bias.copy_(low.bias.float())
    cfg = OptimConfig(lr=1e-2)
    o_ref, o_low = build_optimizer(ref, cfg), build_optimizer(low, cfg)
    assert isinstance(o_low, MasterAdamW)
    for _ in range(5):
        g = torch.randn(8, 8)
        ref.weight.grad, ref.bias.grad = g.clone(), g[0].clone()
        low.weight.grad, low.bias.grad = g.to(torch.bfloat16), g[0].to(torch.bfloat16)
        o_ref.step()
        o_low.step()
    # masters follow the fp32 trajectory up to bf16 gradient rounding; params are their bf16 rounding
    master = o_low.inner.param_groups[0]["params"][0]
    assert torch.allclose(master, ref.weight, atol=2e-3)
    assert torch.equal(low.weight, master.to(torch.bfloat16))
    # state dict round trip restores masters exactly
    state = o_low.state_dict()
    with torch.no_grad():
        low.weight.zero_()
    o_low.load_state_dict(state)
    assert torch.equal(low.weight, master.to(torch.bfloat16))


def test_epoch_order_is_seeded():
    a, b = epoch_order(50, 42, 0), epoch_order(50, 42, 0)
    assert a == b and sorted(a) == list(range(50))
    assert epoch_order(50, 42, 1) != a


def test_resolve_resume_ignores_partial_checkpoints(tmp_path):
    assert resolve_resume(tmp_path, "auto") is None
    done = checkpoint_dir(tmp_path, 4)
    done.mkdir(parents=True)
    (done / STATE_FILE).write_bytes(b"x")
    partial = checkpoint_dir(tmp_path, 8).with_name("step-000008.tmp")
    partial.mkdir()
    (partial / STATE_FILE).write_bytes(b"x")
    assert resolve_resume(tmp_path, "auto") == done
    assert resolve_resume(tmp_path, None) is None
    with pytest.raises(Exception, match="not a checkpoint directory"):
        resolve_resume(tmp_path, str(tmp_path / "nope"))


def test_metrics_truncate_on_resume_and_plot(tmp_path):
    log = MetricsLogger(tmp_path)
    for step in range(1, 7):
        log.log(step, {"reward": step * 0.1, "kl": torch.tensor(0.01)})
    log.close()
    log = MetricsLogger(tmp_path, resume_step=3)
    log.log(4, {"reward": 9.0, "kl": 0.0})
    log.close()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["reward"] == 9.0
    png = plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "c.png", ["reward", "kl", "absent"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.dumps(rows)
