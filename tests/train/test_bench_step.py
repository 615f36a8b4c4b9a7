"""benchmarks/bench_grpo_step.py on the tiny model: each memory preset runs the real step, and an
out-of-memory error is reported as a result, not a crash."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SMOKE = ["--config", "tiny", "--device", "cpu", "--dtype", "bfloat16", "--steps", "1", "--prompts", "2",
         "--generations", "2", "--new-tokens", "4", "--frames", "2"]


@pytest.fixture(scope="module")
def bench():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_grpo_step.py"
    spec = importlib.util.spec_from_file_location("bench_grpo_step", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("preset", ["nextqa-lora", "nextqa-48gb"])
def test_presets_run_the_real_step(bench, preset, capsys):
    if preset == "nextqa-lora":
        pytest.importorskip("peft")
    r = bench.main(["--preset", preset, "--set", "engine.max_batch=2", *SMOKE])
    assert r["completed"] and r["step_s"] > 0
    assert set(r["parts"]) == {"vision", "rollout", "score", "ref_logprob", "backward", "optimizer"}
    assert r["parts"]["optimizer"] <= r["parts"]["backward"]  # a part of it
    assert r["tokens_per_step"] == 2 * 2 * 4
    lines = capsys.readouterr().out.splitlines()
    assert json.loads(lines[-1].removeprefix("RESULT "))["preset"] == preset
    header = lines[0]
    assert ("LoRA rank 16" in header) == (preset == "nextqa-lora") and "engine batch 2" in header
    assert ("CompactAdamW" in header) == (preset == "nextqa-48gb")


def test_out_of_memory_is_reported_with_its_phase(bench, monkeypatch, capsys):
    def oom(self, batch, step):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(bench.GRPOStep, "__call__", oom)
    r = bench.main(["--preset", "nextqa", *SMOKE])
    assert not r["completed"] and r["oom"].startswith("warm-up step: OutOfMemoryError: CUDA out of memory")
    out = capsys.readouterr().out
    assert "OUT OF MEMORY during warm-up step" in out and out.splitlines()[-1].startswith("RESULT ")
    assert bench._is_oom(RuntimeError("wrapped")) is False
    wrapped = RuntimeError("compile failed")
    wrapped.__cause__ = torch.OutOfMemoryError("out of memory")
    assert bench._is_oom(wrapped)


def test_profile_lists_the_step_s_most_expensive_operations(bench, capsys):
    r = bench.main(["--preset", "nextqa-48gb", "--set", "engine.max_batch=2", "--profile", "5", *SMOKE])
    top = r["profile"]
    assert len(top) == 5 and all(t["ms"] >= 0 and t["calls"] >= 1 for t in top)
    assert [t["ms"] for t in top] == sorted((t["ms"] for t in top), reverse=True)
    assert sum(t["share"] for t in top) <= 1 + 1e-9
    assert "profiled step:" in capsys.readouterr().out


def test_drawn_lengths_stop_each_row_where_its_cut_would_leave_it(bench):
    from tlvr_cli.engine.sampling import SamplingParams
    from tlvr_cli.model.tiny import build_tiny_model

    lm = build_tiny_model().language_model.eval()
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randn(n, lm.config.hidden_size, generator=gen) for n in (9, 6, 12)]
    rollouts = bench.DrawnLengths(bench.Engine(lm, max_batch=4, max_seq_len=64), (1, 10))
    params = SamplingParams(temperature=1.0, top_k=50)
    args = (prompts, params, 10, 7)
    kw = dict(seed=5, row_keys=[100 + r for r in range(6)], num_samples=2, ignore_eos=True)
    with torch.no_grad():
        stopped, cut = (rollouts.generate(*args, stop=stop, **kw) for stop in (True, False))
    assert [(o.tokens, o.finished) for o in stopped] == [(o.tokens, o.finished) for o in cut]
    lengths = [len(o.tokens) for o in stopped]
    assert len(set(lengths)) > 1 and all(1 <= n <= 10 and o.tokens[-1] == 7 for n, o in zip(lengths, stopped))
    stops = rollouts.compare_stops(lambda: None, repeats=1)
    assert stops["stopped_s"] > 0 and stops["cut_s"] > 0


def test_uniform_lengths_run_the_real_step(bench, capsys):
    r = bench.main(["--preset", "nextqa-48gb", "--set", "engine.max_batch=2", "--lengths", "uniform:2-3", *SMOKE])
    assert r["completed"] and 2 * 2 * 2 <= r["tokens_per_step"] <= 2 * 2 * 3
    assert r["rollout_stops"]["stopped_s"] > 0 and "rows stopped at their drawn lengths" in capsys.readouterr().out
