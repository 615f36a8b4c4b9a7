"""Experiment trackers: fake wandb/trackio modules receive every metric, the config, the sample tables
and the curves from real tiny runs; a tracker failing mid-run is reported once and training goes on;
the real TensorBoard, wandb (offline) and trackio (local) packages, where installed, record the same."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

from tlvr_cli.config import load_config
from tlvr_cli.errors import TlvrError
from tlvr_cli.jobs import ColdstartConfig, GRPOConfig, OutputConfig, SynthConfig
from tlvr_cli.model.checkpoint import read_generation_settings
from tlvr_cli.train.metrics import MetricsLogger, read_metrics
from tlvr_cli.train.trackers import TrackerRun, import_tracker, open_trackers, trackers_for_run, wandb_mode


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    """Half the size of the training tests' set (tests/train/conftest.py): the tracker runs only need steps."""
    from tlvr_cli.synth import write_synthetic_dataset

    root = tmp_path_factory.mktemp("synth")
    write_synthetic_dataset(SynthConfig(root=str(root), train=8, eval=4, coldstart=4, size=32, seed=0))
    return root


@pytest.fixture(autouse=True)
def no_credentials(tmp_path, monkeypatch):
    """No W&B key, no netrc, no Space: every tracker runs offline, and nothing is written to $HOME."""
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "TRACKIO_SPACE_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "home" / var.lower()))


def grpo_cfg(root: Path, ckpt: Path, run: Path, trackers: list[str], steps: int = 2) -> GRPOConfig:
    return load_config(GRPOConfig, None, extra={
        "model": {"path": str(ckpt), "dtype": "float32", "device": "cpu"},
        "data": {"root": str(root), "prompts_per_step": 2, "num_workers": 0},
        "rollout": {"max_new_tokens": 6}, "algo": {"num_generations": 2},
        "optim": {"lr": 1e-3, "scheduler": "constant", "warmup_ratio": 0.0, "max_steps": steps,
                  "gradient_checkpointing": False},
        "engine": {"max_batch": 4, "cuda_graphs": False}, "sample_every": 1,
        "output": {"run_dir": str(run), "trackers": trackers}})


def coldstart_cfg(root: Path, ckpt: Path, run: Path, trackers: list[str]) -> ColdstartConfig:
    return load_config(ColdstartConfig, None, extra={
        "model": {"path": str(ckpt), "dtype": "float32", "device": "cpu"},
        "data": {"root": str(root), "annotations": "coldstart.json", "num_workers": 0, "max_length": 1024},
        "optim": {"lr": 1e-3, "max_steps": 2, "gradient_checkpointing": False},
        "output": {"run_dir": str(run), "trackers": trackers}})


# ----------------------------------------------------------------------------- fake tracker modules


class FakeRun:
    def __init__(self, module: FakeModule, kwargs: dict) -> None:
        self.module, self.kwargs = module, kwargs
        self.dir = str(Path(kwargs.get("dir", ".")) / "wandb" / "offline-run-x" / "files")
        self.url = None
        self.logged: list[tuple[int, dict]] = []
        self.finished = 0

    def log(self, values: dict, step: int) -> None:
        if self.module.fail_at_log is not None and len(self.logged) + 1 >= self.module.fail_at_log:
            raise RuntimeError("connection to the tracker lost")
        self.logged.append((step, values))

    def finish(self) -> None:
        self.finished += 1


class FakeModule(types.ModuleType):
    """The calls tlvr makes on wandb and trackio: init, log, Table, Image, finish (and wandb's Settings)."""

    def __init__(self, name: str, fail_at_log: int | None = None) -> None:
        super().__init__(name)
        self.runs: list[FakeRun] = []
        self.fail_at_log = fail_at_log
        self.TRACKIO_DIR = "/fake/trackio"

    def init(self, **kwargs) -> FakeRun:
        self.runs.append(FakeRun(self, kwargs))
        return self.runs[-1]

    def finish(self) -> None:  # trackio's module-level finish: the current run
        self.runs[-1].finish()

    def Settings(self, **kwargs) -> dict:  # noqa: N802 - the tracker's own name
        return kwargs

    def Table(self, columns: list[str], data: list[list]) -> tuple:  # noqa: N802
        return ("table", columns, data)

    def Image(self, path: str) -> tuple:  # noqa: N802
        return ("image", Path(path))


def _metric_calls(run: FakeRun) -> list[tuple[int, dict]]:
    return [(step, v) for step, v in run.logged if not any(isinstance(x, tuple) for x in v.values())]


def test_fake_wandb_receives_metrics_config_samples_and_curves(synth_root, tiny_ckpt, tmp_path, monkeypatch, capsys):
    from tlvr_cli.train.grpo import run_grpo

    fake = FakeModule("wandb")
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run_dir = tmp_path / "grpo-a"
    final = run_grpo(grpo_cfg(synth_root, tiny_ckpt, run_dir, ["wandb"]), show_progress=False)
    # the final model records the rollout sampling settings it was trained with
    assert read_generation_settings(final) == {"do_sample": True, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
                                               "max_new_tokens": 6}

    [run] = fake.runs
    init = run.kwargs
    assert (init["project"], init["name"], init["mode"]) == ("tlvr", "grpo-a", "offline")
    assert init["config"] == yaml.safe_load((run_dir / "config.yaml").read_text())
    assert init["config"]["output"]["trackers"] == ["wandb"]
    assert f"wandb: offline run in {run_dir / 'wandb' / 'offline-run-x'}" in capsys.readouterr().err
    # every metrics.jsonl value under its own name and step (None = a non-finite value, not sent)
    expected = [(r["step"], {k: v for k, v in r.items() if k != "step" and v is not None}) for r in
                read_metrics(run_dir / "metrics.jsonl")]
    assert _metric_calls(run) == expected and [s for s, _ in expected] == [1, 2]
    assert {"reward", "kl", "completion_length", "rewards/accuracy_reward", "time/step_s"} <= set(expected[0][1])
    # the samples.jsonl rows, as one table per sampled step
    tables = [(step, v["samples"]) for step, v in run.logged if "samples" in v]
    lines = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert [step for step, _ in tables] == [line["step"] for line in lines] == [1, 2]
    for (step, (kind, columns, data)), line in zip(tables, lines):
        keys = list(line["samples"][0])  # every field samples.jsonl has, in its order
        assert kind == "table" and columns == ["step", *keys]
        assert {"problem", "solution", "completion", "reward"} <= set(keys)
        assert data == [[step, *(s[k] for k in keys)] for s in line["samples"]]
    # the curves PNG at the last step, then one finish
    [(step, image)] = [(step, v["curves"]) for step, v in run.logged if "curves" in v]
    assert step == 2 and image == ("image", run_dir / "curves.png") and image[1].read_bytes()[:4] == b"\x89PNG"
    assert run.finished == 1


def test_a_tracker_failing_mid_run_is_reported_once_and_training_goes_on(synth_root, tiny_ckpt, tmp_path, monkeypatch,
                                                                          capsys):
    from tlvr_cli.train.grpo import run_grpo

    healthy, failing = FakeModule("wandb"), FakeModule("trackio", fail_at_log=2)
    monkeypatch.setitem(sys.modules, "wandb", healthy)
    monkeypatch.setitem(sys.modules, "trackio", failing)
    final = run_grpo(grpo_cfg(synth_root, tiny_ckpt, tmp_path / "run", ["wandb", "trackio"], steps=3),
                     show_progress=False)

    assert (final / "model.safetensors").exists()
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3]
    err = capsys.readouterr().err
    assert err.count("tracker trackio failed (RuntimeError: connection to the tracker lost)") == 1
    assert len(failing.runs[0].logged) == 1 and failing.runs[0].finished == 1  # closed once when dropped
    assert [s for s, _ in _metric_calls(healthy.runs[0])] == [1, 2, 3] and healthy.runs[0].finished == 1


def test_a_tracker_that_cannot_start_is_left_out(tmp_path, monkeypatch):
    broken = FakeModule("wandb")
    broken.init = lambda **kw: (_ for _ in ()).throw(PermissionError("wandb: no write access"))
    monkeypatch.setitem(sys.modules, "wandb", broken)
    warnings: list[str] = []
    run = TrackerRun(tmp_path, "tlvr", "r", {})
    assert open_trackers(["wandb"], run, warnings.append) == []
    assert warnings == ["wandb did not start (PermissionError: wandb: no write access); training goes on without it"]


def test_missing_tracker_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(TlvrError, match=r"^output.trackers: wandb is not installed: pip install 'tlvr\[wandb\]'$"):
        import_tracker("wandb")
    with pytest.raises(TlvrError, match="must be one of 'tensorboard', 'wandb', 'trackio', got 'mlflow'"):
        load_config(GRPOConfig, None, ["output.trackers=tensorboard,mlflow"])


def test_only_rank_zero_opens_trackers(tmp_path, monkeypatch):
    from tlvr_cli.train.run_dir import RunPlan, start_run

    fake = FakeModule("wandb")
    monkeypatch.setitem(sys.modules, "wandb", fake)
    par = types.SimpleNamespace(ctx=types.SimpleNamespace(is_main=False))
    plan = RunPlan(tmp_path / "run", "seed: 1\n")
    _, logger = start_run(plan, par, None, None, output=OutputConfig(trackers=["wandb"]))
    logger.log(1, {"reward": 1.0})
    logger.close()
    assert fake.runs == [] and not (tmp_path / "run").exists()
    _, logger = start_run(plan, types.SimpleNamespace(ctx=types.SimpleNamespace(is_main=True)), None, None,
                          output=OutputConfig(trackers=["wandb"]))
    logger.close()
    assert fake.runs[0].kwargs["config"] == {"seed": 1}


def test_resumed_run_is_a_new_tracker_run_named_after_its_step(tmp_path, monkeypatch):
    fake = FakeModule("trackio")
    monkeypatch.setitem(sys.modules, "trackio", fake)
    out = OutputConfig(trackers=["trackio"], tracker_project="p")
    [tracker] = trackers_for_run(out, tmp_path / "exp", "a: 1\n", 40, print)
    assert fake.runs[0].kwargs == {"project": "p", "name": "exp-from-40", "config": {"a": 1}}
    assert tracker.note == "trackio: logged locally in /fake/trackio (view: trackio show --project p)"


def test_wandb_goes_online_only_with_credentials(tmp_path, monkeypatch):
    assert wandb_mode() == "offline"
    (tmp_path / "home").mkdir(exist_ok=True)
    netrc = tmp_path / "home" / ".netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password secret\n")
    netrc.chmod(0o600)
    assert wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == "disabled"


def test_metrics_logger_drops_none_and_keeps_samples_on_resume(tmp_path):
    log = MetricsLogger(tmp_path)
    for step in (1, 2, 3):
        log.log(step, {"reward": float(step)})
        log.log_samples(step, [{"completion": f"c{step}", "reward": 1.0}])
    log.close()
    MetricsLogger(tmp_path, resume_step=2).close()
    assert [json.loads(line)["step"] for line in (tmp_path / "samples.jsonl").read_text().splitlines()] == [1, 2]
    MetricsLogger(tmp_path).close()  # a fresh start in the same directory starts both files anew
    assert (tmp_path / "samples.jsonl").read_text() == "" and (tmp_path / "metrics.jsonl").read_text() == ""


# ----------------------------------------------------------------------------- the real packages


def test_real_tensorboard_records_scalars_config_and_curves(synth_root, tiny_ckpt, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tlvr_cli.train.sft import run_coldstart

    run_dir = tmp_path / "cs"
    run_coldstart(coldstart_cfg(synth_root, tiny_ckpt, run_dir, ["tensorboard"]), show_progress=False)
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0, "images": 0})
    acc.Reload()
    rows = read_metrics(run_dir / "metrics.jsonl")
    got = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert got == [(r["step"], pytest.approx(r["train/loss"], rel=1e-6)) for r in rows]
    assert "lr: 0.001" in acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    [image] = acc.Images("curves")
    assert image.step == 2 and image.encoded_image_string[:4] == b"\x89PNG"


def _wandb_records(path: Path) -> list:
    """The records of an offline run's .wandb file (W&B's leveldb-style log: 7-byte header, 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, out, part = path.read_bytes(), 7, [], b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        part = chunk if kind in (1, 2) else part + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(part)
            out.append(record)
    return out


def test_real_wandb_offline_run_holds_metrics_config_and_table(synth_root, tiny_ckpt, tmp_path):
    pytest.importorskip("wandb")
    from tlvr_cli.train.grpo import run_grpo

    run_dir = tmp_path / "g"
    run_grpo(grpo_cfg(synth_root, tiny_ckpt, run_dir, ["wandb"]), show_progress=False)
    [wandb_file] = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    records = _wandb_records(wandb_file)
    [run] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert run.display_name == "g" and config["rollout"]["max_new_tokens"] == 6
    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            history.setdefault(row["_step"], {}).update(row)
    for m in read_metrics(run_dir / "metrics.jsonl"):
        assert history[m["step"]]["reward"] == pytest.approx(m["reward"])
        assert history[m["step"]]["kl"] == pytest.approx(m["kl"])
    assert history[2]["curves/_type"] == "image-file"
    table = json.loads((wandb_file.parent / "files" / history[2]["samples/path"]).read_text())
    last = json.loads((run_dir / "samples.jsonl").read_text().splitlines()[-1])
    assert table["columns"][0] == "step"
    assert [row[3] for row in table["data"]] == [s["completion"] for s in last["samples"]]


TRACKIO_SCRIPT = """
import json, sys
from pathlib import Path
from tlvr_cli.train.metrics import MetricsLogger
from tlvr_cli.train.trackers import TrackerRun, open_trackers
import trackio

run_dir = Path(sys.argv[1])
trackers = open_trackers(["trackio"], TrackerRun(run_dir, "tlvr-test", "r", {"optim": {"lr": 0.5}}), print)
log = MetricsLogger(run_dir, trackers=trackers)
log.log(1, {"reward": 0.25, "kl": None})
log.log(2, {"reward": 0.75})
log.log_samples(2, [{"completion": "<answer>A</answer>", "reward": 1.0}])
log.close()
store = trackio.SQLiteStorage
print(json.dumps({"logs": store.get_logs("tlvr-test", "r"), "config": store.get_run_config("tlvr-test", "r")}))
"""


def test_real_trackio_logs_locally(tmp_path):
    pytest.importorskip("trackio")
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "store"), "PYTHONPATH": str(Path(__file__).parents[2])}
    done = subprocess.run([sys.executable, "-c", TRACKIO_SCRIPT, str(tmp_path / "run")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    [out] = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert "Trackio" not in done.stdout  # its banners are replaced by the one-line note
    assert f"trackio: logged locally in {tmp_path / 'store'}" in done.stderr
    assert out["config"]["optim"] == {"lr": 0.5}
    scalars = [(row["step"], row["reward"]) for row in out["logs"] if "reward" in row]
    assert scalars == [(1, 0.25), (2, 0.75)] and not any("kl" in row for row in out["logs"])
    [table] = [row["samples"] for row in out["logs"] if "samples" in row]
    assert table["_value"] == [{"step": 2, "completion": "<answer>A</answer>", "reward": 1.0}]
