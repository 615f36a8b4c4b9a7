"""The cold start's global batch: the reference preset's 4 samples per step at any process count."""

from __future__ import annotations

import pytest
from train_runs import coldstart_cfg

from tlvr_cli.config import load_config
from tlvr_cli.errors import TlvrError
from tlvr_cli.jobs import ColdstartConfig
from tlvr_cli.train.metrics import read_metrics
from tlvr_cli.train.sft import grad_accum_steps, run_coldstart


def test_coldstart_preset_keeps_a_global_batch_of_four():
    cfg = load_config(ColdstartConfig, "coldstart")
    assert cfg.batch_size == 1 and cfg.global_batch_size == 4
    # one GPU: 4 accumulated micro-batches (the reference's 4 steps of 4); two: 2 each; four: 1 each
    assert [grad_accum_steps(cfg, n) for n in (1, 2, 4)] == [4, 2, 1]
    with pytest.raises(TlvrError, match="not a multiple of batch_size=1 x 3 processes"):
        grad_accum_steps(cfg, 3)
    with pytest.raises(TlvrError, match="not both"):
        grad_accum_steps(load_config(ColdstartConfig, "coldstart", ["grad_accum=2"]), 1)
    assert grad_accum_steps(load_config(ColdstartConfig, None, ["grad_accum=3"]), 2) == 3  # no global batch: as given


def test_global_batch_sets_the_number_of_steps(synth_root, tiny_ckpt, tmp_path):
    # 8 records, 4 per optimizer step on one process: 2 steps of 4 accumulated micro-batches
    cfg = coldstart_cfg(synth_root, tmp_path / "run", tiny_ckpt, batch_size=1, global_batch_size=4)
    run_coldstart(cfg, show_progress=False)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
