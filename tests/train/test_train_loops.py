"""Cold start and GRPO on the tiny model and a small synthetic set: outputs, resume equality,
skipped videos, and the direction of a GRPO update."""

from __future__ import annotations

import json

import pytest
import torch
from train_runs import coldstart_cfg, grpo_cfg, same_weights

from tlvr_cli.model.checkpoint import load_model
from tlvr_cli.train.metrics import read_metrics
from tlvr_cli.train.rewards import score_completions


def test_coldstart_writes_outputs_and_resumes_exactly(synth_root, tiny_ckpt, tmp_path):
    from tlvr_cli.train.sft import run_coldstart

    full = run_coldstart(coldstart_cfg(synth_root, tmp_path / "a", tiny_ckpt, optim={"max_steps": 4}),
                         show_progress=False)
    run = tmp_path / "a"
    assert (run / "config.yaml").exists() and (run / "loss.png").exists()
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["train/loss"] > 0 for r in rows)
    load_model(str(full), device="cpu")

    # stop after 2 steps, then resume to 4: identical weights and metrics
    run_coldstart(coldstart_cfg(synth_root, tmp_path / "b", tiny_ckpt, optim={"max_steps": 2}), show_progress=False)
    resumed = run_coldstart(coldstart_cfg(synth_root, tmp_path / "b", tiny_ckpt, optim={"max_steps": 4}), resume="auto",
                            show_progress=False)
    same_weights(full, resumed)
    rows_b = read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert [r["train/loss"] for r in rows_b] == [r["train/loss"] for r in rows]


def test_grpo_logs_reference_metrics_and_resumes_exactly(synth_root, tiny_ckpt, tmp_path):
    from tlvr_cli.train.grpo import run_grpo

    full = run_grpo(grpo_cfg(synth_root, tmp_path / "a", tiny_ckpt, optim={"max_steps": 3}), show_progress=False)
    run = tmp_path / "a"
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    cfg = grpo_cfg(synth_root, tmp_path / "a", tiny_ckpt)
    n_seq = cfg.data.prompts_per_step * cfg.algo.num_generations
    for r in rows:
        # the reference's metrics, each checked against what it must equal
        assert 1 <= r["completion_length"] <= cfg.rollout.max_new_tokens + 1  # eos counted, as the reference
        assert r["perf/tokens_per_s"] == pytest.approx(r["completion_length"] * n_seq / r["time/step_s"], rel=1e-6)
        assert r["lr"] == pytest.approx(cfg.optim.lr) and r["grad_norm"] > 0 and r["kl"] >= 0
        groups = r["frac_zero_std"] * cfg.data.prompts_per_step  # a fraction of the step's groups
        assert groups == pytest.approx(round(groups))
        assert r["time/rollout_s"] > 0 and r["reward_std"] >= 0
    # the logged sample completions score what was logged for them
    samples = [s for line in (run / "samples.jsonl").read_text().splitlines() for s in json.loads(line)["samples"]]
    assert samples
    rewards, _ = score_completions([s["completion"] for s in samples], {"solution": [s["solution"] for s in samples]},
                                   cfg.algo)
    assert rewards == [s["reward"] for s in samples]
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"

    run_grpo(grpo_cfg(synth_root, tmp_path / "b", tiny_ckpt, optim={"max_steps": 1}), show_progress=False)
    resumed = run_grpo(grpo_cfg(synth_root, tmp_path / "b", tiny_ckpt, optim={"max_steps": 3}), resume="auto",
                       show_progress=False)
    same_weights(full, resumed)
    rows_b = read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert [r["reward"] for r in rows_b] == [r["reward"] for r in rows]
    assert [r["kl"] for r in rows_b] == [r["kl"] for r in rows]


def test_grpo_skips_broken_videos_with_a_count(synth_root, tiny_ckpt, tmp_path):
    from tlvr_cli.train.grpo import run_grpo

    root = tmp_path / "data"
    rows = [json.loads(line) for line in (synth_root / "nextqa_0-30s.jsonl").read_text().splitlines()][:4]
    rows[1]["video_filename"] = "./NextQA/missing.mp4"
    bad = root / "NextQA" / "corrupt.mp4"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a video at all")
    rows[2]["video_filename"] = "./NextQA/corrupt.mp4"
    for r in (rows[0], rows[3]):
        src = synth_root / r["video_filename"][2:]
        dst = root / r["video_filename"][2:]
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(src.read_bytes())
    (root / "nextqa_0-30s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_grpo(grpo_cfg(root, tmp_path / "run", tiny_ckpt, data={"prompts_per_step": 4, "max_skip_fraction": 1.0},
                      optim={"max_steps": 1}), show_progress=False)
    m = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    # the two broken prompts of the first draw, and any drawn again, were replaced from the data order
    assert m["data/skipped"] >= 2 and m["data/groups"] == 4
    assert m["data/skipped"] == m["data/prompts_drawn"] - m["data/groups"] == m["data/extra_prompts"]


def test_policy_gradient_moves_logprobs_toward_positive_advantages(tiny_model):
    from tlvr_cli.data.template import build_prompt, tokenize_with_image
    from tlvr_cli.train.grpo_math import policy_loss
    from tlvr_cli.train.policy import sequence_logprobs

    model = tiny_model.train()
    tok = model.tokenizer
    ids = [tokenize_with_image(tok, build_prompt("<image>\nWhat color is the square?"))]
    feats = model.tower_features(torch.randn(1, 16, 3, 32, 32)).detach()
    good, bad = tok("<answer>A</answer>").input_ids, tok("<answer>B</answer>").input_ids
    width = max(len(good), len(bad))
    comps = torch.tensor([good + [0] * (width - len(good)), bad + [0] * (width - len(bad))])
    lengths = torch.tensor([len(good), len(bad)])
    mask = (torch.arange(width)[None] < lengths[:, None]).float()

    def logp():
        return sequence_logprobs(model, feats, ids, [0, 0], comps, lengths, [0, 1], chunk_size=100)

    before = (logp() * mask).sum(1).detach()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    loss, _ = policy_loss(logp(), None, torch.tensor([1.0, -1.0]), mask, beta=0.0)
    loss.backward()
    opt.step()
    after = (logp() * mask).sum(1).detach()
    assert after[0] > before[0] and after[1] < before[1]


def test_micro_batched_logprobs_equal_whole_batch(tiny_model):
    from tlvr_cli.data.template import build_prompt, tokenize_with_image
    from tlvr_cli.train.policy import sequence_logprobs

    tok = tiny_model.tokenizer
    ids = [tokenize_with_image(tok, build_prompt("<image>\nq one")),
           tokenize_with_image(tok, build_prompt("<image>\nsecond q"))]
    feats = tiny_model.tower_features(torch.randn(2, 16, 3, 32, 32))
    comps = torch.randint(1, 600, (4, 7))
    lengths = torch.tensor([7, 3, 5, 1])
    seq_prompt = [0, 0, 1, 1]
    whole = sequence_logprobs(tiny_model, feats, ids, seq_prompt, comps, lengths, [0, 1, 2, 3], chunk_size=64)
    parts = torch.cat([sequence_logprobs(tiny_model, feats, ids, seq_prompt, comps, lengths, [i], chunk_size=1000)
                       for i in range(4)])
    assert torch.allclose(whole, parts, atol=1e-5)
    # and equal to a plain forward with full logits
    visual = tiny_model.connector(feats)
    for r in range(4):
        n = int(lengths[r])
        b = tiny_model.embed_inputs([ids[seq_prompt[r]] + comps[r, :n].tolist()],
                                    visual[seq_prompt[r]:seq_prompt[r] + 1])
        logits = tiny_model.language_model(inputs_embeds=b.inputs_embeds).logits[0]
        lp = torch.log_softmax(logits[-n - 1:-1], -1).gather(1, comps[r, :n, None]).squeeze(1)
        assert torch.allclose(whole[r, :n], lp, atol=1e-5)
        assert (whole[r, n:] == 0).all()
