"""The embedded demo end to end (`tlvr grpo --preset demo`), shortened to seconds of training."""

from __future__ import annotations

import json
import shlex

import pytest
import torch

pytestmark = pytest.mark.slow

SHORT = [
    "--set", "prepare.synth.train=16", "--set", "prepare.synth.eval=8", "--set", "prepare.synth.coldstart=16",
    "--set", "prepare.eval_limit=6", "--set", "optim.max_steps=2", "--set", "data.prompts_per_step=2",
    "--set", "algo.num_generations=2", "--set", "rollout.max_new_tokens=12", "--set", "data.num_workers=0",
]


def test_demo_end_to_end(tmp_path, monkeypatch, capsys):
    from test_readme import argv_in_bash

    from tlvr_cli.cli import run_cli
    from tlvr_cli.model.checkpoint import load_model
    from tlvr_cli.train.rewards import format_reward

    monkeypatch.chdir(tmp_path)
    # the demo names its cold-start preset; a two-line preset on top of demo-coldstart keeps it short
    (tmp_path / "cs.yaml").write_text("base: demo-coldstart\noptim:\n  epochs: 1\ndata:\n  num_workers: 0\n")
    argv = ["grpo", "--preset", "demo", *SHORT, "--set", f"prepare.coldstart_preset={tmp_path / 'cs.yaml'}"]
    assert run_cli(argv) == 0

    run = tmp_path / "runs" / "demo"
    scores = json.loads((run / "demo.json").read_text())
    assert [s["model"] for s in scores] == ["cold start", "GRPO"]
    assert all(s["n"] == 6 for s in scores)
    for score, name in zip(scores, ("coldstart", "grpo")):
        # the table's numbers are the answers files' numbers: accuracy = correct items, format = format reward > 0
        for stage, acc, fmt in ((f"eval-{name}", "accuracy", "format_rate"),
                                (f"eval-{name}-sampled", "sampled_accuracy", "sampled_format_rate")):
            rows = [json.loads(line) for line in (run / stage / "answers.jsonl").read_text().splitlines()]
            assert len(rows) == 6
            assert score[acc] == pytest.approx(100 * sum(r["correct"] for r in rows) / 6)
            assert score[fmt] == pytest.approx(100 * sum(f > 0 for f in format_reward([r["output"] for r in rows])) / 6)
            assert json.loads((run / stage / "results.json").read_text())["headline"] == pytest.approx(score[acc])
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
    run_cli(argv)
    err = capsys.readouterr().err
    assert "runs/demo-coldstart is complete: reusing runs/demo-coldstart/final" in err
    assert "runs/demo is complete: reusing runs/demo/final" in err
    assert (run / "metrics.jsonl").read_text() == metrics

    # it ends with the commands that go on from it, and they find the demo's data
    follow = [line.strip() for line in err.split("next:", 1)[1].splitlines() if line.strip().startswith("tlvr ")]
    assert follow[0] == "tlvr eval synthetic --model runs/demo/final --data-dir runs/demo-data"
    assert run_cli([*shlex.split(follow[0])[1:], "--limit", "2", "--max-new-tokens", "8"]) == 0
    infer = argv_in_bash(follow[1])
    first = json.loads((tmp_path / "runs" / "demo-data" / "eval.jsonl").read_text().splitlines()[0])
    assert infer[0] == "infer" and infer[2] == first["problem"] and "\n" in first["problem"]
    assert run_cli([*infer, "--max-new-tokens", "4"]) == 0

    # new values for the GRPO stage are refused, naming them, instead of being ignored
    capsys.readouterr()
    assert run_cli([*argv, "--set", "algo.beta=0.02"]) == 2
    assert "runs/demo holds a run with another config: algo.beta=0.01 → 0.02;" in capsys.readouterr().err
