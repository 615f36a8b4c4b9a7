"""Inputs that are not what they claim are refused in one line: files given to `eval score` and
`eval compare` that are not answers files; and missing data names the command that writes it."""

from __future__ import annotations

import json
import subprocess
import sys

from tlvr_entry import child_env, one_line, tlvr


def _answers(path, n=3):
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"item_id": str(i), "task": "all", "gold": "A", "parsed": "A" if i % 2 else "B", "correct": bool(i % 2),
             "output": "<answer>A</answer>"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_score_and_compare_refuse_files_that_are_not_answers(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "reward": 0.5}\n{"step": 2, "reward": 0.6}\n')
    report = tmp_path / "check-videos.json"
    report.write_text(json.dumps({"target": "videos", "counts": {"ok": 3}, "bad": []}, indent=2))
    answers = _answers(tmp_path / "eval" / "answers.jsonl")
    for args in (("score", str(metrics), "-b", "synthetic"), ("score", str(report), "-b", "synthetic"),
                 ("compare", str(answers), str(metrics), "-b", "synthetic"),
                 ("compare", str(report), str(answers), "-b", "synthetic")):
        out = tlvr("eval", *args, cwd=tmp_path)
        assert out.returncode == 2, (args, out.stdout)
        line = one_line(out.stderr)
        assert line.startswith("error: ") and "not an answers file" in line
    scored = tlvr("eval", "score", str(answers), "-b", "synthetic", "--no-write", cwd=tmp_path)
    assert scored.returncode == 0, scored.stderr


def test_missing_data_names_the_command_that_writes_it(tmp_path, make_video):
    out = tlvr("eval", "synthetic", "--model", "tiny", cwd=tmp_path, TLVR_DATA=str(tmp_path / "cache"))
    assert out.returncode == 2
    missing = tmp_path / "cache" / "synthetic" / "eval.jsonl"
    assert one_line(out.stderr) == f"error: synthetic eval split: missing {missing} (write it with `tlvr data synth`)"
    # after the demo, the demo's copy is offered with the option the command has
    (tmp_path / "runs" / "demo-data").mkdir(parents=True)
    (tmp_path / "runs" / "demo-data" / "eval.jsonl").write_text("")
    out = tlvr("eval", "synthetic", "--model", "runs/demo/final", "--limit", "1", cwd=tmp_path,
               TLVR_DATA=str(tmp_path / "cache"))
    assert "or use the demo's with --data-dir runs/demo-data" in one_line(out.stderr)
    make_video("v.mp4")  # the video is checked first: a real one, so the missing model is what fails
    fetch = tlvr("infer", "v.mp4", "q", "--model", "Zhang199/TinyLLaVA-Video-R1", cwd=tmp_path,
                 TLVR_DATA=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")
    assert "run `tlvr data fetch r1`" in one_line(fetch.stderr)
    train = tlvr("grpo", "--preset", "nextqa", "--set", "model.path=tiny", cwd=tmp_path,
                 TLVR_DATA=str(tmp_path / "cache"))
    assert one_line(train.stderr).endswith("(write it with `tlvr data fetch nextqa`)")


def test_missing_data_fails_before_torch_is_imported(tmp_path):
    # the eval, GRPO and cold-start commands check their data first: with torch unimportable, the data
    # error (not an ImportError) comes out, in about a second instead of the ten an import of the stack takes
    probe = "import sys\nsys.modules['torch'] = None\nfrom tlvr_cli.cli import main\nmain(sys.argv[1:])"
    for args, want in ((("eval", "synthetic", "--model", "tiny"), "(write it with `tlvr data synth`)"),
                       (("grpo", "--preset", "nextqa"), "(write it with `tlvr data fetch nextqa`)"),
                       (("coldstart",), "(write it with `tlvr data fetch nextqa`)")):
        out = subprocess.run([sys.executable, "-c", probe, *args], cwd=tmp_path, capture_output=True, text=True,
                             env=child_env(TLVR_DATA=str(tmp_path / "cache")), timeout=120)
        assert out.returncode == 2, (args, out.stderr)
        assert one_line(out.stderr).endswith(want), args
