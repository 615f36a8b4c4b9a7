"""benchmarks/bench_eval.py runs end to end on the tiny config on CPU and reports every rate."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def test_bench_eval_smoke(tmp_path, one_thread):
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_eval.py"
    spec = importlib.util.spec_from_file_location("bench_eval", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--config", "tiny", "--device", "cpu", "--items", "6", "--max-new-tokens", "4",
                         "--reference-items", "1", "--reference-tokens", "3", "--rollout-new-tokens", "3",
                         "--workdir", str(tmp_path)])
    rates = result["tokens_per_s"]
    # every row but "without model load", which is left out where the load, timed apart, outlasts the eval
    assert len(rates) in (6, 7) and "tlvr eval, default settings" in rates and all(r > 0 for r in rates.values())
    assert result["shared_prefixes"] == 2 and "engine rollout, prefixes shared" in rates  # 6 questions on 2 videos
    assert rates["GRPO rollout, 64 rows x 3"] > 0  # the nextqa preset's 8 prompts x G 8
    assert result["skipped"] == 0 and 0 < result["eval_of_rollout"] and 0 < result["eval_of_same_work"]
    assert result["speed"]["questions"] == 6 and result["speed"]["generated_tokens"] == 24
