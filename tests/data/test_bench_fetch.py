"""benchmarks/bench_fetch.py runs end to end against the hub served on localhost and checks what it fetched."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def test_bench_fetch_smoke(hub_online, capsys):
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_fetch.py"
    spec = importlib.util.spec_from_file_location("bench_fetch", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--files", "12", "--size-kb", "4", "--latency-ms", "2", "--workers", "3"])
    assert sorted(result["seconds"]) == [1, 3] and all(s > 0 for s in result["seconds"].values())
    assert result["ratio"] > 0 and "3 workers:" in capsys.readouterr().out
