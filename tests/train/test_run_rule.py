"""The run-directory rule (train/run_dir.plan_run), the same for the cold start and GRPO: a run goes on
only with its saved config up to the safe keys; other changes are refused naming each key, unless
forced; the CLI says where it resumed, and Ctrl-C says what was saved and the command that resumes."""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tlvr_cli.config import load_config, to_yaml
from tlvr_cli.errors import TlvrError
from tlvr_cli.jobs import ColdstartConfig, GRPOConfig
from tlvr_cli.train.run_dir import STATE_FILE, checkpoint_dir, plan_run

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cli"))
from tlvr_entry import child_env, command, one_line, tlvr  # noqa: E402


def fake_run(run: Path, cfg, steps: list[int], final: bool = False) -> None:
    """A run directory as a finished or interrupted run leaves it (config, checkpoints, final model)."""
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(to_yaml(cfg))
    for step in steps:
        ckpt = checkpoint_dir(run, step)
        ckpt.mkdir(parents=True)
        (ckpt / STATE_FILE).write_text(json.dumps({"step": step}))
    if final:
        (run / "final").mkdir()
        (run / "final" / "config.json").write_text("{}")


def grpo(run: Path, *overrides: str) -> GRPOConfig:
    return load_config(GRPOConfig, None, list(overrides), extra={"output": {"run_dir": str(run)}})


def test_an_empty_run_dir_starts_fresh(tmp_path):
    plan = plan_run(tmp_path / "run", None, grpo(tmp_path / "run"), 10)
    assert plan.resume_from is None and not plan.complete and plan.message == ""
    auto = plan_run(tmp_path / "run", "auto", grpo(tmp_path / "run"), 10)
    assert auto.resume_from is None
    assert auto.message == f"--resume auto: no checkpoint in {tmp_path / 'run'}: starting fresh"


def test_the_same_config_resumes_or_reuses(tmp_path):
    run = tmp_path / "run"
    fake_run(run, grpo(run), [2, 4])
    for resume in (None, "auto"):
        plan = plan_run(run, resume, grpo(run), 10)
        assert plan.resume_from == checkpoint_dir(run, 4) and not plan.changes
        assert plan.message == f"resuming {run} from step 4 of 10 ({checkpoint_dir(run, 4)})"
    explicit = plan_run(run, str(checkpoint_dir(run, 2)), grpo(run), 10)
    assert explicit.resume_from == checkpoint_dir(run, 2)
    (run / "final").mkdir()
    (run / "final" / "config.json").write_text("{}")
    done = plan_run(run, None, grpo(run), 4)
    assert done.complete and done.message == f"{run} is complete: reusing {run / 'final'}"
    with pytest.raises(TlvrError, match="is at step 4, past the 3 steps"):
        plan_run(run, None, grpo(run), 3)


def test_a_changed_config_is_refused_naming_each_key(tmp_path):
    # issue: `--resume auto --set optim.lr=0.5 --set algo.beta=0` used to overwrite config.yaml silently
    run = tmp_path / "run"
    fake_run(run, grpo(run), [2])
    for resume in (None, "auto"):
        with pytest.raises(TlvrError) as e:
            plan_run(run, resume, grpo(run, "optim.lr=0.5", "algo.beta=0", "output.log_every=5"), 10)
        message = str(e.value)
        assert message.startswith(f"{run} holds a run with another config: algo.beta=0.01 → 0.0, optim.lr=1e-06 → 0.5;")
        assert "--resume auto" in message and "--force" in message and "log_every" not in message
    forced = plan_run(run, "auto", grpo(run, "optim.lr=0.5"), 10, force=True)
    assert forced.resume_from == checkpoint_dir(run, 2) and forced.changes == {"optim.lr": (1e-06, 0.5)}
    assert forced.message.endswith("(forced: optim.lr=1e-06 → 0.5)")


def test_safe_keys_may_change(tmp_path):
    run = tmp_path / "run"
    fake_run(run, grpo(run), [2])
    changed = ["optim.max_steps=9", "output.save_every=3", "output.keep_last=5", "output.log_every=2",
               "output.trackers=[tensorboard]", "sample_every=0", "data.num_workers=0", "dist.timeout_minutes=5"]
    plan = plan_run(run, None, grpo(run, *changed), 9)
    assert plan.resume_from == checkpoint_dir(run, 2)
    assert sorted(plan.changes) == sorted(c.split("=")[0] for c in changed)


def test_a_config_written_before_a_key_existed_is_not_a_change(tmp_path):
    run = tmp_path / "run"
    fake_run(run, grpo(run), [2])
    saved = yaml.safe_load((run / "config.yaml").read_text())
    del saved["algo"]["beta"], saved["sample_every"]
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    assert plan_run(run, None, grpo(run), 10).changes == {}


def test_the_cold_start_follows_the_same_rule(tmp_path):
    run = tmp_path / "cs"
    cfg = load_config(ColdstartConfig, None, extra={"output": {"run_dir": str(run)}})
    fake_run(run, cfg, [1])
    with pytest.raises(TlvrError, match=r"optim\.lr=1e-05 → 0\.001"):
        plan_run(run, None, load_config(ColdstartConfig, None, ["optim.lr=1e-3"],
                                        extra={"output": {"run_dir": str(run)}}), 5)


# ----------------------------------------------------------------------------- through the CLI


@pytest.fixture(scope="module")
def cs_preset(tmp_path_factory) -> Path:
    """A tiny cold-start preset on a small synthetic set (a few tenths of a second per step)."""
    from tlvr_cli.jobs import SynthConfig
    from tlvr_cli.synth import write_synthetic_dataset

    tmp = tmp_path_factory.mktemp("rule")
    write_synthetic_dataset(SynthConfig(root=str(tmp / "data"), train=4, eval=2, coldstart=4, size=32, frames=4,
                                        seed=0))
    preset = tmp / "cs.yaml"
    preset.write_text(f"base: demo-coldstart\ndata:\n  root: {tmp / 'data'}\nvideo:\n  num_frames: 4\nbatch_size: 1\n")
    return preset


def test_cli_reruns_refuse_resume_reuse_and_force(cs_preset, tmp_path):
    run = tmp_path / "run"
    base = ["coldstart", "--preset", str(cs_preset), "--run-dir", str(run)]
    first = tlvr(*base, "--set", "optim.max_steps=2", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    metrics = (run / "metrics.jsonl").read_text()

    refused = tlvr(*base, "--set", "optim.max_steps=2", "--set", "optim.lr=0.001", cwd=tmp_path)
    assert refused.returncode == 2
    assert one_line(refused.stderr).startswith(f"error: {run} holds a run with another config: optim.lr=0.003 → 0.001;")
    assert (run / "metrics.jsonl").read_text() == metrics and not (run / "config.previous.yaml").exists()

    longer = tlvr(*base, "--set", "optim.max_steps=3", cwd=tmp_path)  # max_steps is safe to change
    assert longer.returncode == 0, longer.stderr
    assert f"resuming {run} from step 2 of 3 ({checkpoint_dir(run, 2)})" in longer.stderr
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    change = json.loads((run / "config-changes.jsonl").read_text().splitlines()[-1])
    assert change["changes"] == {"optim.max_steps": [2, 3]} and change["forced"] == [] and change["step"] == 2

    again = tlvr(*base, "--set", "optim.max_steps=3", cwd=tmp_path)
    assert again.returncode == 0 and f"{run} is complete: reusing {run / 'final'}" in again.stderr
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3

    forced = tlvr(*base, "--set", "optim.max_steps=4", "--set", "optim.lr=0.001", "--force", cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert "(forced: optim.lr=0.003 → 0.001)" in forced.stderr
    assert yaml.safe_load((run / "config.previous.yaml").read_text())["optim"]["lr"] == 0.003
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"] == 0.001
    change = json.loads((run / "config-changes.jsonl").read_text().splitlines()[-1])
    assert change["changes"] == {"optim.lr": [0.003, 0.001], "optim.max_steps": [3, 4]}
    assert change["forced"] == ["optim.lr"]


def test_cli_ctrl_c_names_the_checkpoint_and_the_resume_command(cs_preset, tmp_path):
    run = tmp_path / "run"
    args = ["coldstart", "--preset", str(cs_preset), "--run-dir", str(run)]  # 160 steps of a tenth of a second
    proc = subprocess.Popen(command(*args), cwd=tmp_path, env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:  # not a terminal: one plain progress line per step
        lines.append(line)
        if line.startswith("cold start step 1/160 | "):
            proc.send_signal(signal.SIGINT)
            break
    lines += proc.stderr.readlines()
    assert proc.wait(timeout=120) == 130, "".join(lines)
    step = int(json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"])
    saved = checkpoint_dir(run, step)
    resume = shlex.join(["tlvr", *args, "--resume", "auto"])
    assert 1 <= step < 160
    assert lines[-1].strip() == (f"interrupted: stopped at step {step} of 160; checkpoint saved in {saved}; "
                                 f"resume with: {resume}")
    assert any(line.startswith("Ctrl-C: stopping after this step") for line in lines)

    # the printed command resumes (here with a shorter run: max_steps may change)
    printed = shlex.split(lines[-1].split("resume with: ", 1)[1])
    assert printed[0] == "tlvr"
    resumed = tlvr(*printed[1:], "--set", f"optim.max_steps={step + 1}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {run} from step {step} of {step + 1} ({saved})" in resumed.stderr
