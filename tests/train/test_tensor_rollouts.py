"""GRPO with ``dist.rollout_parallel: tensor`` over two CPU processes (gloo): every process decodes all
the step's prompts with half of the weights, and the steps equal the single-process step (DDP and
FSDP2) and the data-parallel step (dynamic sampling, replacement draws, LoRA); the one-line errors."""

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
from train_runs import grpo_cfg, merge, with_missing_videos

from tlvr_cli.errors import TlvrError
from tlvr_cli.model.checkpoint import read_state_dict, save_model
from tlvr_cli.model.tiny import build_tiny_model
from tlvr_cli.runtime import DistContext
from tlvr_cli.train.grpo import run_grpo
from tlvr_cli.train.metrics import read_metrics
from tlvr_cli.train.rollout_parallel import rollout_group
from tlvr_cli.train.run_dir import epoch_order

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
RIGGED = '''
def rigged(completions, solution, **_):
    """Gold A or B: every completion scores 1 (a constant group, filtered); otherwise they alternate 0, 1."""
    return [1.0 if s in ("<answer>A</answer>", "<answer>B</answer>") else float(i % 2) for i, s in enumerate(solution)]
'''
DYNAMIC = {"dynamic_sampling": True, "reward_combination": "weighted", "zero_reward_value": None,
           "advantage_noise_std": 0.0, "rewards": [{"function": "rigged_reward:rigged", "weight": 1.0}]}
# four prompts of two completions per step: each process trains on two, and decodes all four
BASE = {"algo": {"num_generations": 2}, "data": {"prompts_per_step": 4, "num_workers": 0},
        "rollout": {"max_new_tokens": 6}, "perf": {"micro_batch_size": 2}, "optim": {"max_steps": 2}}

JOB = """
import json, sys
sys.path.insert(0, {here!r})
from train_runs import grpo_cfg
from tlvr_cli.errors import TlvrError
from tlvr_cli.runtime import launch_rank
from tlvr_cli.train.grpo import run_grpo
tmp, synth, ckpt = {tmp!r}, {synth!r}, {ckpt!r}
for name, over in json.loads({runs!r}):
    root = over.pop("root", synth)
    try:
        run_grpo(grpo_cfg(root, tmp + "/" + name, over.pop("ckpt", ckpt), **over), show_progress=False)
    except TlvrError as e:  # what a user sees, written per rank for the test to read
        open(f"{{tmp}}/{{name}}.error.{{launch_rank()}}", "w").write(str(e))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp: Path, runs: list[tuple[str, dict]], synth: Path, ckpt: Path, nprocs: int = 2) -> None:
    """The GRPO runs ``runs`` (name, config overrides) one after another in ``nprocs`` CPU processes."""
    script = tmp / f"job-{runs[0][0]}.py"
    script.write_text(textwrap.dedent(JOB.format(here=str(Path(__file__).parent), tmp=str(tmp), synth=str(synth),
                                                 ckpt=str(ckpt), runs=json.dumps(runs))))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp)]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nprocs}", f"--master-port={free_port()}",
           "--master-addr=127.0.0.1", str(script)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def metrics(run: Path) -> list[dict]:
    return read_metrics(run / "metrics.jsonl")


def assert_same_steps(a: Path, b: Path) -> None:
    """The same rewards, KL, gradient norms and draws at every step, and the same final weights."""
    ma, mb = metrics(a), metrics(b)
    assert len(ma) == len(mb) == 2
    for key in ("reward", "completion_length", "kl", "grad_norm", "data/draws", "data/prompts_drawn"):
        assert [m[key] for m in ma] == pytest.approx([m[key] for m in mb], abs=1e-5), key
    wa, wb = read_state_dict(a / "final"), read_state_dict(b / "final")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k


def assert_decoded_every_row(data: Path, tensor: Path) -> None:
    """Each tensor-parallel process decoded the rows of both processes (the logs average over them)."""
    assert [2 * m["perf/rollout_rows"] for m in metrics(data)] == [m["perf/rollout_rows"] for m in metrics(tensor)]


def with_(over: dict, **extra) -> dict:
    return merge(over, extra)


@pytest.fixture()
def rigged(tmp_path, monkeypatch) -> Path:
    (tmp_path / "rigged_reward.py").write_text(RIGGED)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_tensor_rollouts_match_one_process(synth_root, tiny_ckpt, tmp_path):
    run_grpo(grpo_cfg(synth_root, tmp_path / "one", tiny_ckpt, **BASE), show_progress=False)
    tensor = with_(BASE, dist={"rollout_parallel": "tensor"})
    runs = [("ddp", tensor), ("fsdp2", with_(tensor, dist={"strategy": "fsdp2"})),
            ("groups-of-one", with_(tensor, dist={"rollout_tensor_size": 1}))]
    launch(tmp_path, runs, synth_root, tiny_ckpt)
    for run, rows in (("ddp", 8), ("fsdp2", 8), ("groups-of-one", 4)):
        assert_same_steps(tmp_path / "one", tmp_path / run)
        # each process decoded its group's 4 prompts x 2 completions (a group of one: its own 2 x 2)
        assert [m["perf/rollout_rows"] for m in metrics(tmp_path / run)] == [rows, rows]


def test_tensor_rollouts_match_data_parallel_over_several_draws(synth_root, tiny_ckpt, tmp_path, rigged):
    root = tmp_path / "broken"
    # the first step's prompts of rank 0 (of two) have no video: it draws again
    with_missing_videos(synth_root, root, 12, epoch_order(12, 42, 0)[:4:2])
    dynamic = with_(BASE, algo=DYNAMIC)
    replace = with_(BASE, root=str(root), data={"max_skip_fraction": 0.5})
    runs = [(f"{name}-{mode}", with_(over, dist={"rollout_parallel": mode}))
            for name, over in (("dynamic", dynamic), ("replace", replace)) for mode in ("data", "tensor")]
    launch(tmp_path, runs, synth_root, tiny_ckpt)
    for name in ("dynamic", "replace"):
        assert_same_steps(tmp_path / f"{name}-data", tmp_path / f"{name}-tensor")
        assert_decoded_every_row(tmp_path / f"{name}-data", tmp_path / f"{name}-tensor")
    # several draws per step, the same number on both processes: constant groups filtered, then refilled
    dyn = metrics(tmp_path / "dynamic-tensor")
    assert max(m["data/draws"] for m in dyn) >= 2 and sum(m["dynamic/filtered_fraction"] for m in dyn) > 0
    # step 1: rank 0's two prompts failed, so it decoded only rank 1's in the first draw, then drew again
    first = metrics(tmp_path / "replace-tensor")[0]
    assert (first["data/draws"], first["data/skipped"], first["data/groups"]) == (2, 2, 4)


def test_lora_tensor_rollouts_match_data_parallel(synth_root, tiny_ckpt, tmp_path):
    pytest.importorskip("peft")
    lora = with_(BASE, tune={"lora": {"enabled": True, "rank": 4, "connector_lr": 1e-3}})
    launch(tmp_path, [(f"lora-{mode}", with_(lora, dist={"rollout_parallel": mode})) for mode in ("data", "tensor")],
           synth_root, tiny_ckpt)
    # step 2 decodes from merged weights W + BA (B is zero until the first update), each process its slices
    assert_same_steps(tmp_path / "lora-data", tmp_path / "lora-tensor")
    assert_decoded_every_row(tmp_path / "lora-data", tmp_path / "lora-tensor")


def test_tensor_rollouts_need_processes_and_a_model_that_divides(synth_root, tiny_ckpt, tmp_path, monkeypatch):
    with pytest.raises(TlvrError, match=r"^dist\.rollout_parallel=tensor splits the weights over several processes, "
                                        r"but this run has one: launch it with torchrun") as err:
        run_grpo(grpo_cfg(synth_root, tmp_path / "one", tiny_ckpt, **with_(BASE, dist={"rollout_parallel": "tensor"})),
                 show_progress=False)
    assert "\n" not in str(err.value) and not (tmp_path / "one").exists()
    # four processes on a host: Qwen2.5-3B's (and the tiny model's) 2 KV heads split in two, not four; checked
    # before the groups are made
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    lm, four = build_tiny_model().language_model, DistContext(world_size=4)
    cfg = grpo_cfg(synth_root, tmp_path / "four", tiny_ckpt, dist={"rollout_parallel": "tensor"})
    with pytest.raises(TlvrError) as err:
        rollout_group(cfg, four, lm)
    assert str(err.value) == ("dist.rollout_parallel=tensor: tensor parallelism over 4 ranks needs key/value heads "
                              "divisible by 4, got 2; use dist.rollout_tensor_size=2 or dist.rollout_parallel=data")
    cfg.dist.rollout_tensor_size = 3
    with pytest.raises(TlvrError, match=r"^dist\.rollout_tensor_size=3 must divide the 4 processes of a host$"):
        rollout_group(cfg, four, lm)
    odd = build_tiny_model()
    odd.config.text_config.num_key_value_heads = 1  # saved as is: the loaded model has one KV head
    with torch.no_grad():
        for layer in odd.language_model.model.layers:
            for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.weight = torch.nn.Parameter(proj.weight[:32].clone())
                proj.bias = torch.nn.Parameter(proj.bias[:32].clone())
    ckpt = save_model(odd, tmp_path / "odd-model")
    launch(tmp_path, [("odd", with_(BASE, ckpt=str(ckpt), dist={"rollout_parallel": "tensor"}))], synth_root, tiny_ckpt)
    for rank in range(2):
        assert (tmp_path / f"odd.error.{rank}").read_text() == (
            "dist.rollout_parallel=tensor: tensor parallelism over 2 ranks needs key/value heads divisible by 2, "
            "got 1; use dist.rollout_parallel=data")
    assert not (tmp_path / "odd").exists()  # refused before the run directory is written


def test_bench_step_tensor_rollouts(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
           "--master-addr=127.0.0.1", str(ROOT / "benchmarks" / "bench_grpo_step.py"), "--rollout-parallel", "tensor",
           "--config", "tiny", "--device", "cpu", "--dtype", "float32", "--steps", "1", "--prompts", "4",
           "--generations", "2", "--new-tokens", "4", "--frames", "2"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    lines = res.stdout.splitlines()
    r = json.loads(next(line for line in lines if line.startswith("RESULT ")).removeprefix("RESULT "))
    assert r["completed"] and r["rollout_parallel"] == "tensor" and r["tokens_per_step"] == 4 * 2 * 4
    assert set(r["parts"]) == {"vision", "rollout", "score", "ref_logprob", "backward", "optimizer"}
    assert "rollouts tensor-parallel over 2 processes, engine batch 8" in lines[0]
