"""GRPO runs that draw further prompts from the data cursor (replacements for broken videos, DAPO
dynamic sampling), and what a run refuses or skips: prompts past the context, the reference model at
beta 0; the frame-rate mode and off-policy mini-batches on the tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_runs import grpo_cfg, same_weights, with_missing_videos

from tlvr_cli.errors import TlvrError
from tlvr_cli.model.checkpoint import read_state_dict
from tlvr_cli.train import grpo as grpo_mod
from tlvr_cli.train import rollout as rollout_mod
from tlvr_cli.train.grpo import run_grpo
from tlvr_cli.train.grpo_step import GRPOStep
from tlvr_cli.train.metrics import read_metrics
from tlvr_cli.train.run_dir import epoch_order, read_trainer_state

RIGGED = '''
def rigged(completions, solution, **_):
    """Gold A or B: every completion scores 1 (a constant group); otherwise they alternate 0, 1."""
    return [1.0 if s in ("<answer>A</answer>", "<answer>B</answer>") else float(i % 2) for i, s in enumerate(solution)]
'''
CONSTANT = ("<answer>A</answer>", "<answer>B</answer>")


def metrics(run: Path) -> list[dict]:
    return read_metrics(run / "metrics.jsonl")


@pytest.fixture()
def rigged_reward(tmp_path, monkeypatch) -> dict:
    (tmp_path / "rigged_reward.py").write_text(RIGGED)
    monkeypatch.syspath_prepend(str(tmp_path))
    return {"reward_combination": "weighted", "zero_reward_value": None, "advantage_noise_std": 0.0,
            "rewards": [{"function": "rigged_reward:rigged", "weight": 1.0}]}


@pytest.fixture()
def trained(monkeypatch) -> list:
    """The rollouts each step trains on."""
    seen = []
    original = GRPOStep.update

    def update(self, ro, spare, step):
        seen.append(ro)
        return original(self, ro, spare, step)

    monkeypatch.setattr(GRPOStep, "update", update)
    return seen


def test_dynamic_sampling_trains_only_informative_groups(synth_root, tiny_ckpt, tmp_path, rigged_reward, trained):
    algo = {**rigged_reward, "dynamic_sampling": True}
    run_grpo(grpo_cfg(synth_root, tmp_path / "run", tiny_ckpt, algo=algo, data={"prompts_per_step": 4},
                      optim={"max_steps": 3}), show_progress=False)
    assert len(trained) == 3
    for ro in trained:
        assert len(ro.rows) == 4  # the step still has the requested groups
        assert not {r.solution for r in ro.rows} & set(CONSTANT)  # no constant group reaches the loss
    m = metrics(tmp_path / "run")
    assert all(r["data/groups"] == 4 for r in m)
    # 7 of the 16 rows have gold A or B: some draws are filtered, and the cursor paid for the extra draws
    assert sum(r["dynamic/filtered_fraction"] for r in m) > 0 and max(r["data/draws"] for r in m) >= 2
    assert m[-1]["data/extra_prompts"] == sum(r["data/prompts_drawn"] for r in m) - 3 * 4


def test_without_dynamic_sampling_constant_groups_are_trained(synth_root, tiny_ckpt, tmp_path, rigged_reward, trained):
    run_grpo(grpo_cfg(synth_root, tmp_path / "run", tiny_ckpt, algo=rigged_reward, data={"prompts_per_step": 4},
                      optim={"max_steps": 4}), show_progress=False)
    assert any(set(r.solution for r in ro.rows) & set(CONSTANT) for ro in trained)
    assert all(r["data/draws"] == 1 and r["data/extra_prompts"] == 0 for r in metrics(tmp_path / "run"))


def test_dynamic_sampling_resumes_exactly(synth_root, tiny_ckpt, tmp_path, rigged_reward):
    def cfg(run: str, steps: int):
        return grpo_cfg(synth_root, tmp_path / run, tiny_ckpt, algo={**rigged_reward, "dynamic_sampling": True},
                        data={"prompts_per_step": 4}, optim={"max_steps": steps}, output={"save_every": 1})

    full = run_grpo(cfg("a", 3), show_progress=False)
    run_grpo(cfg("b", 1), show_progress=False)
    resumed = run_grpo(cfg("b", 3), resume="auto", show_progress=False)
    same_weights(full, resumed)
    keys = ("reward", "kl", "data/draws", "data/prompts_drawn", "dynamic/filtered_fraction", "data/extra_prompts")
    a, b = ([[r[k] for k in keys] for r in metrics(tmp_path / run)] for run in ("a", "b"))
    assert a == b
    cursors = [read_trainer_state(tmp_path / run / "checkpoints" / "step-000003")[0]["cursor"] for run in ("a", "b")]
    assert cursors[0] == cursors[1]


def test_a_fully_broken_step_draws_replacements(synth_root, tiny_ckpt, tmp_path, trained):
    root = tmp_path / "data"
    broken = epoch_order(12, 42, 0)[:4]  # every prompt of the first step
    with_missing_videos(synth_root, root, 12, broken)
    run_grpo(grpo_cfg(root, tmp_path / "run", tiny_ckpt, data={"prompts_per_step": 4, "max_skip_fraction": 0.5},
                      optim={"max_steps": 2}), show_progress=False)
    first, second = metrics(tmp_path / "run")
    counts = [first[k] for k in ("data/skipped", "data/draws", "data/prompts_drawn", "data/groups")]
    assert counts == [4, 2, 8, 4]
    assert first["data/extra_prompts"] == 4 and first["data/skip_fraction"] == pytest.approx(4 / 12)
    assert second["data/skipped"] == 4 and second["data/groups"] == 4
    assert not {r.index for ro in trained for r in ro.rows} & set(broken)


def test_too_many_broken_videos_stop_the_run_naming_the_key(synth_root, tiny_ckpt, tmp_path):
    root = tmp_path / "data"
    with_missing_videos(synth_root, root, 12, epoch_order(12, 42, 0)[:4])  # every prompt of the first step
    with pytest.raises(TlvrError, match=r"data\.max_skip_fraction=0\.2"):
        run_grpo(grpo_cfg(root, tmp_path / "run", tiny_ckpt, data={"prompts_per_step": 4, "max_skip_fraction": 0.2},
                          optim={"max_steps": 2}), show_progress=False)
    assert (tmp_path / "run" / "checkpoints" / "step-000001").is_dir()  # resumable past the step that failed


def test_beta_zero_loads_no_reference_model_and_runs_no_reference_forward(synth_root, tiny_ckpt, tmp_path, monkeypatch):
    from tlvr_cli.train import grpo_step as step_mod

    loads = []
    real_load = grpo_mod.load_model
    monkeypatch.setattr(grpo_mod, "load_model", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    calls = []
    real_logprobs = step_mod.sequence_logprobs
    monkeypatch.setattr(step_mod, "sequence_logprobs", lambda *a, **k: calls.append(1) or real_logprobs(*a, **k))
    run_grpo(grpo_cfg(synth_root, tmp_path / "free", tiny_ckpt, algo={"beta": 0.0}, optim={"max_steps": 1}),
             show_progress=False)
    assert len(loads) == 1 and calls == []
    m = metrics(tmp_path / "free")[0]
    assert m["kl"] == 0.0
    run_grpo(grpo_cfg(synth_root, tmp_path / "kl", tiny_ckpt, optim={"max_steps": 1}), show_progress=False)
    # with beta > 0: a reference (a copy of the loaded policy, not a second load) and its forward
    assert len(loads) == 2 and calls


def test_a_prompt_past_the_context_is_a_one_line_error(synth_root, tiny_ckpt, tmp_path):
    with pytest.raises(TlvrError, match=r"row \d+ .*rollout\.max_new_tokens=1000.*context of 1024") as err:
        run_grpo(grpo_cfg(synth_root, tmp_path / "run", tiny_ckpt, rollout={"max_new_tokens": 1000},
                          engine={"max_batch": 8}), show_progress=False)
    assert "\n" not in str(err.value)


def test_frame_rate_mode_reaches_the_decoder(synth_root, tiny_ckpt, tmp_path, monkeypatch):
    seen = []
    real = rollout_mod.read_frames
    monkeypatch.setattr(rollout_mod, "read_frames", lambda path, **kw: seen.append(kw) or real(path, **kw))
    run_grpo(grpo_cfg(synth_root, tmp_path / "run", tiny_ckpt, video={"fps": 2.0, "max_frames": 3},
                      optim={"max_steps": 1}), show_progress=False)
    assert seen and all(kw["fps"] == 2.0 and kw["max_frames"] == 3 for kw in seen)


def test_videos_with_different_frame_counts_train_together(tiny_model):
    from tlvr_cli.data.records import GRPORow
    from tlvr_cli.data.template import build_prompt, tokenize_with_image
    from tlvr_cli.train.policy import connect_features, sequence_logprobs
    from tlvr_cli.train.rollout import PromptBatch, tower_features

    rows = [GRPORow(index=i, problem="q", solution="A", video_filename="", video_path=Path(f"/v{i}.mp4"), extra={})
            for i in range(2)]
    ids = [tokenize_with_image(tiny_model.tokenizer, build_prompt("<image>\nq"))] * 2
    pixels = [torch.randn(4, 3, 32, 32), torch.randn(7, 3, 32, 32)]
    feats = tower_features(tiny_model, PromptBatch(rows, ids, pixels), torch.device("cpu"), None)
    assert feats[0].shape[0] * 7 == feats[1].shape[0] * 4
    visual = connect_features(tiny_model.connector, feats, [0, 1])
    assert visual.shape[:2] == (2, tiny_model.config.num_queries)
    one = tiny_model.encode_videos(pixels[1][None])
    assert torch.allclose(visual[1:], one, atol=1e-5)
    comps = torch.tensor([[5, 6, 9], [7, 9, 9]])
    logp = sequence_logprobs(tiny_model, feats, ids, [0, 1], comps, torch.tensor([3, 2]), [0, 1], chunk_size=64)
    assert logp.shape == (2, 3) and logp[1, 2] == 0


def test_off_policy_mini_batches_clip(synth_root, tiny_ckpt, tmp_path):
    algo = {"mini_batches": 2, "clip_eps_low": 1e-4, "clip_eps_high": 1e-4, "beta": 0.0}
    run_grpo(grpo_cfg(synth_root, tmp_path / "mb", tiny_ckpt, algo=algo, optim={"max_steps": 2, "lr": 1e-2}),
             show_progress=False)
    assert any(r["clip_fraction"] > 0 for r in metrics(tmp_path / "mb"))  # the second mini-batch is off-policy
    run_grpo(grpo_cfg(synth_root, tmp_path / "one", tiny_ckpt, algo={**algo, "mini_batches": 1},
                      optim={"max_steps": 2, "lr": 1e-2}), show_progress=False)
    assert all(r["clip_fraction"] == 0 for r in metrics(tmp_path / "one"))


def test_frozen_passes_take_their_own_micro_batches(synth_root, tiny_ckpt, tmp_path, monkeypatch):
    # perf.frozen_micro_batch_size: the reference log-probs in fewer, larger forwards, the same step
    from tlvr_cli.train import grpo_step as step_mod

    calls = []
    real_logprobs = step_mod.sequence_logprobs
    monkeypatch.setattr(step_mod, "sequence_logprobs",  # a[6]: the rows of the pass
                        lambda *a, **k: calls.append(len(a[6])) or real_logprobs(*a, **k))
    runs = {}
    for size in (0, 8):
        calls.clear()
        run = tmp_path / f"frozen{size}"
        out = run_grpo(grpo_cfg(synth_root, run, tiny_ckpt, optim={"max_steps": 1},
                                perf={"frozen_micro_batch_size": size}), show_progress=False)
        runs[size] = (list(calls), metrics(run)[0], read_state_dict(out))
    (small, m0, a), (large, m8, b) = runs[0], runs[8]
    assert sum(small) == sum(large) == 8 and max(small) <= 4 and large == [8]  # micro_batch_size 3: whole groups of 4
    assert m8["kl"] == pytest.approx(m0["kl"], rel=1e-4, abs=1e-7) and m8["reward"] == m0["reward"]
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)
