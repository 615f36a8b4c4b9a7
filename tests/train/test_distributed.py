"""Two CPU processes (gloo) against one: cold start and GRPO with the same global batch give the
same weights; a sharded evaluation gives the same answers and report as an unsharded one."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tlvr_cli.model.checkpoint import read_state_dict
from tlvr_cli.train.metrics import read_metrics
from tlvr_cli.train.run_dir import read_trainer_state

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: str, nprocs: int, tmp: Path) -> None:
    """Run ``script`` under ``torch.distributed.run`` with ``nprocs`` CPU processes."""
    path = tmp / f"job_{nprocs}.py"
    path.write_text(textwrap.dedent(script))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TLVR_DATA": str(tmp / "data")}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nprocs}", f"--master-port={free_port()}",
           "--master-addr=127.0.0.1", str(path)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=500)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tlvr_cli.jobs import SynthConfig
    from tlvr_cli.model.checkpoint import save_model
    from tlvr_cli.model.tiny import build_tiny_model
    from tlvr_cli.synth import write_synthetic_dataset

    tmp = tmp_path_factory.mktemp("dist")
    write_synthetic_dataset(SynthConfig(root=str(tmp / "synth"), train=8, eval=6, coldstart=4, size=32, seed=1))
    save_model(build_tiny_model(), tmp / "tiny")
    return tmp


JOB = """
import sys
from tlvr_cli.config import load_config
from tlvr_cli.jobs import ColdstartConfig, GRPOConfig, EvalConfig
from tlvr_cli.train.sft import run_coldstart
from tlvr_cli.train.grpo import run_grpo
from tlvr_cli.eval.distributed import run_eval_sharded
tmp, tag = {tmp!r}, {tag!r}
model = {{"path": tmp + "/tiny", "dtype": "float32", "device": "cpu"}}
# the global batch of 2 is 2 accumulated micro-batches on one process, 1 per process on two
cs = load_config(ColdstartConfig, None, extra={{"model": model, "batch_size": 1, "global_batch_size": 2,
    "data": {{"root": tmp + "/synth", "annotations": "coldstart.json", "num_workers": 0}},
    "optim": {{"lr": 1e-3, "scheduler": "constant", "gradient_checkpointing": False, "max_steps": 2}},
    "output": {{"run_dir": tmp + "/cs-" + tag}}}})
run_coldstart(cs, show_progress=False)
g = load_config(GRPOConfig, None, extra={{"model": model, "algo": {{"num_generations": 2}},
    "data": {{"root": tmp + "/synth", "prompts_per_step": 2, "num_workers": 0}}, "rollout": {{"max_new_tokens": 6}},
    "optim": {{"lr": 1e-3, "scheduler": "constant", "warmup_ratio": 0.0, "gradient_checkpointing": False,
        "max_steps": 2}},
    "perf": {{"micro_batch_size": 2}}, "engine": {{"cuda_graphs": False}},
    "output": {{"run_dir": tmp + "/grpo-" + tag}}}})
run_grpo(g, show_progress=False)
ev = load_config(EvalConfig, None, extra={{"model": model, "benchmark": "synthetic", "data_dir": tmp + "/synth",
    "sampling": {{"max_new_tokens": 6}}, "engine": {{"max_batch": 2}}, "bootstrap": 50,
    "output_dir": tmp + "/eval-" + tag}})
run_eval_sharded(ev, show_progress=False)
"""


@pytest.fixture(scope="module")
def single(setup):
    """The one-process reference run (replicated model, no process group)."""
    launch(JOB.format(tmp=str(setup), tag="one"), 1, setup)
    return setup


def test_two_processes_match_one(single):
    tmp = single
    launch(JOB.format(tmp=str(tmp), tag="two"), 2, tmp)
    # rollouts and advantage noise are keyed by dataset row: both runs sample the same completions
    logs = [read_metrics(tmp / f"grpo-{tag}" / "metrics.jsonl") for tag in ("one", "two")]
    for key in ("reward", "completion_length", "kl", "grad_norm"):
        assert [m[key] for m in logs[0]] == pytest.approx([m[key] for m in logs[1]], abs=1e-5), key
    cs_steps = [[json.loads(line)["step"] for line in (tmp / f"cs-{tag}" / "metrics.jsonl").read_text().splitlines()]
                for tag in ("one", "two")]
    assert cs_steps == [[1, 2], [1, 2]]  # 4 records, 2 per step, on one process and on two
    for stage in ("cs", "grpo"):
        a, b = read_state_dict(tmp / f"{stage}-one" / "final"), read_state_dict(tmp / f"{stage}-two" / "final")
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-5), (stage, k)
    one = [json.loads(line) for line in (tmp / "eval-one" / "answers.jsonl").read_text().splitlines()]
    two = [json.loads(line) for line in (tmp / "eval-two" / "answers.jsonl").read_text().splitlines()]
    assert [(r["item_id"], r["output"]) for r in one] == [(r["item_id"], r["output"]) for r in two]
    ra = json.loads((tmp / "eval-one" / "results.json").read_text())
    rb = json.loads((tmp / "eval-two" / "results.json").read_text())
    assert ra["headline"] == rb["headline"]
    # the two processes' speed records of the run, merged
    ranks = [json.loads((tmp / "eval-two" / f"speed.rank{r}.json").read_text()) for r in (0, 1)]
    speed = json.loads((tmp / "eval-two" / "speed.json").read_text())
    assert speed["processes"] == 2 and speed["questions"] == len(two) == sum(r["questions"] for r in ranks)
    assert speed["generated_tokens"] == sum(r["generated_tokens"] for r in ranks) > 0


FSDP_JOB = """
import pytest
from tlvr_cli.config import load_config
from tlvr_cli.errors import TlvrError
from tlvr_cli.jobs import ColdstartConfig, GRPOConfig
from tlvr_cli.train.sft import run_coldstart
from tlvr_cli.train.grpo import run_grpo
tmp, nproc, steps = {tmp!r}, {nproc}, {steps}
model = {{"path": tmp + "/tiny", "dtype": "float32", "device": "cpu"}}
if nproc == 2:
    cs = load_config(ColdstartConfig, None, extra={{"model": model, "batch_size": 1, "grad_accum": 1,
        "data": {{"root": tmp + "/synth", "annotations": "coldstart.json", "num_workers": 0}},
        "dist": {{"strategy": "fsdp2"}},
        "optim": {{"lr": 1e-3, "scheduler": "constant", "gradient_checkpointing": False, "max_steps": 2}},
        "output": {{"run_dir": tmp + "/cs-fsdp"}}}})
    run_coldstart(cs, show_progress=False)
def grpo(strategy, max_steps):
    return load_config(GRPOConfig, None, extra={{"model": model, "algo": {{"num_generations": 2}},
        "data": {{"root": tmp + "/synth", "prompts_per_step": 2, "num_workers": 0}}, "rollout": {{"max_new_tokens": 6}},
        "optim": {{"lr": 1e-3, "scheduler": "constant", "warmup_ratio": 0.0, "gradient_checkpointing": False,
            "max_steps": max_steps}},
        "dist": {{"strategy": strategy}}, "perf": {{"micro_batch_size": 2}}, "engine": {{"cuda_graphs": False}},
        "output": {{"run_dir": tmp + "/grpo-fsdp"}}}})
run_grpo(grpo("fsdp2", steps), resume="auto", show_progress=False)
if nproc == 1:  # an fsdp2 checkpoint does not resume as replicas: said plainly, before any step
    with pytest.raises(TlvrError, match="dist.strategy=fsdp2"):
        run_grpo(grpo("auto", 2), resume="auto", show_progress=False)
"""


def test_fsdp2_matches_replicas_and_resumes_with_more_processes(single):
    tmp = single
    launch(FSDP_JOB.format(tmp=str(tmp), nproc=1, steps=1), 1, tmp)  # GRPO step 1 sharded over one process
    launch(FSDP_JOB.format(tmp=str(tmp), nproc=2, steps=2), 2, tmp)  # cold start, and GRPO step 2 resumed over two
    for stage in ("cs", "grpo"):
        a, b = read_state_dict(tmp / f"{stage}-one" / "final"), read_state_dict(tmp / f"{stage}-fsdp" / "final")
        assert a.keys() == b.keys()
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-5), (stage, k)
    logs = [read_metrics(tmp / f"grpo-{tag}" / "metrics.jsonl") for tag in ("one", "fsdp")]
    assert [m["step"] for m in logs[1]] == [1, 2]
    state, _ = read_trainer_state(tmp / "grpo-fsdp" / "checkpoints" / "step-000002")
    assert state["optimizer"]["layout"] == "fsdp2"
    for key in ("reward", "kl", "grad_norm"):
        assert [m[key] for m in logs[0]] == pytest.approx([m[key] for m in logs[1]], abs=1e-5), key
