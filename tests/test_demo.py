"""The embedded demo end to end (`tlvr grpo --preset demo`), shortened to seconds of training."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.slow

SHORT = [
    "--set", "prepare.synth.train=16", "--set", "prepare.synth.eval=8", "--set", "prepare.synth.coldstart=16",
    "--set", "prepare.eval_limit=6", "--set", "optim.max_steps=2", "--set", "data.prompts_per_step=2",
    "--set", "algo.num_generations=2", "--set", "rollout.max_new_tokens=12", "--set", "data.num_workers=0",
]


def test_demo_end_to_end(tmp_path, monkeypatch, capsys):
    from tlvr_cli.cli import main
    from tlvr_cli.model.checkpoint import load_model

    monkeypatch.chdir(tmp_path)
    # the demo names its cold-start preset; a two-line preset on top of demo-coldstart keeps it short
    (tmp_path / "cs.yaml").write_text("base: demo-coldstart\noptim:\n  epochs: 1\ndata:\n  num_workers: 0\n")
    argv = ["grpo", "--preset", "demo", *SHORT, "--set", f"prepare.coldstart_preset={tmp_path / 'cs.yaml'}"]
    main(argv)

    run = tmp_path / "runs" / "demo"
    scores = json.loads((run / "demo.json").read_text())
    assert [s["model"] for s in scores] == ["cold start", "GRPO"]
    assert all(s["n"] == 6 and 0 <= s["accuracy"] <= 100 and 0 <= s["format_rate"] <= 100 for s in scores)
    assert all(0 <= s["sampled_accuracy"] <= 100 and 0 <= s["sampled_format_rate"] <= 100 for s in scores)
    for stage in ("eval-coldstart", "eval-grpo", "eval-coldstart-sampled", "eval-grpo-sampled"):
        rows = [json.loads(line) for line in (run / stage / "answers.jsonl").read_text().splitlines()]
        assert len(rows) == 6 and {"output", "parsed", "gold", "correct"} <= set(rows[0])
        assert (run / stage / "results.json").is_file() and (run / stage / "results.md").is_file()
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "runs" / "demo-coldstart" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2

    # both checkpoints load in the released layout, and GRPO changed the weights
    cold = load_model(str(tmp_path / "runs" / "demo-coldstart" / "final"), device="cpu", dtype="float32")
    tuned = load_model(str(run / "final"), device="cpu", dtype="float32")
    a, b = cold.state_dict(), tuned.state_dict()
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k], b[k]) for k in a)

    # a second run reuses every stage: nothing is trained again
    metrics = (run / "metrics.jsonl").read_text()
    capsys.readouterr()
    main(argv)
    err = capsys.readouterr().err
    assert "reusing runs/demo-coldstart/final" in err and "reusing runs/demo/final" in err
    assert (run / "metrics.jsonl").read_text() == metrics
