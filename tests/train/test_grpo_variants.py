"""The GRPO variants against written-out formulas on hand-made tensors (clip-higher, GSPO's sequence
ratio, the overlong penalty and mask, group filtering), and the rollout → tensor boundary (eos)."""

from __future__ import annotations

import math

import pytest
import torch

from tlvr_cli.engine.generate import Completion
from tlvr_cli.train.grpo_math import completion_mask, informative_groups, policy_loss
from tlvr_cli.train.rewards import overlong_penalty
from tlvr_cli.train.rollout import completions_tensor

EOS = 9


def test_finished_rows_keep_their_eos_in_the_tensor_and_the_mask():
    # the example: both stopped on eos, after 4 and 2 content tokens
    t = 5
    outs = [Completion([t, t, t, t], True), Completion([t, t], True)]
    comps, finished = completions_tensor(outs, EOS, EOS, torch.device("cpu"))
    assert comps.tolist() == [[t, t, t, t, EOS], [t, t, EOS, EOS, EOS]]
    mask = completion_mask(comps, EOS)
    assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert mask.sum(1).tolist() == [5, 3]  # completion_length counts the eos, as the reference
    assert finished.tolist() == [True, True]


def test_rows_cut_at_max_new_tokens_carry_no_eos():
    outs = [Completion([1, 2, 3], False), Completion([4], True)]
    comps, finished = completions_tensor(outs, EOS, EOS, torch.device("cpu"))
    assert comps.tolist() == [[1, 2, 3], [4, EOS, EOS]]
    assert completion_mask(comps, EOS).tolist() == [[1, 1, 1], [1, 1, 0]]
    assert finished.tolist() == [False, True]


def _loss(logp, old, adv, mask, **kw):
    return policy_loss(logp, None, torch.tensor(adv), mask, beta=0.0, old_logp=old, **kw)


def test_clip_higher_is_asymmetric():
    # one token per sequence: ratios 1.25 (A > 0), 1.5 (A > 0), 0.5 (A < 0), 0.9 (A < 0)
    ratios = torch.tensor([[1.25], [1.5], [0.5], [0.9]])
    logp = ratios.log().clone().requires_grad_(True)
    old = torch.zeros(4, 1)
    adv = [1.0, 1.0, -1.0, -1.0]
    loss, stats = _loss(logp, old, adv, torch.ones(4, 1), clip_eps_low=0.2, clip_eps_high=0.28)
    # min(r·A, clip(r, 0.8, 1.28)·A): 1.25 stays (a symmetric 0.2 would clip it), 1.5 → 1.28, 0.5 → 0.8
    objective = [1.25, 1.28, -0.8, -0.9]
    assert loss.item() == pytest.approx(-sum(objective) / 4, rel=1e-6)
    assert float(stats["clip_fraction"]) == pytest.approx(0.5)
    (grad,) = torch.autograd.grad(loss, logp)
    # d/dlogp of -r·A/4 is -r·A/4 where unclipped, 0 where the clip binds
    assert grad[:, 0].tolist() == pytest.approx([-1.25 / 4, 0.0, 0.0, 0.9 / 4], rel=1e-6)
    symmetric, _ = _loss(logp, old, adv, torch.ones(4, 1), clip_eps_low=0.2, clip_eps_high=0.2)
    assert symmetric.item() == pytest.approx(-(1.2 + 1.2 - 0.8 - 0.9) / 4, rel=1e-6)


def test_gspo_sequence_ratio_and_clipping():
    # sequence 0: token log-ratios 0.1, 0.3 → s = exp(0.2); sequence 1: 0.0002 and a masked token → s = exp(0.0002)
    logp = torch.tensor([[0.1, 0.3], [0.0002, 5.0]], requires_grad=True)
    old = torch.zeros(2, 2)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss, stats = _loss(logp, old, [1.0, 2.0], mask, clip_eps_low=3e-4, clip_eps_high=4e-4, importance_level="sequence")
    s0, s1 = math.exp(0.2), math.exp(0.0002)
    # sequence 0 is clipped at 1 + 4e-4 (no gradient); sequence 1 (s1 < 1 + 4e-4) is not
    expect = -((1 + 4e-4) * 1.0 + s1 * 2.0) / 2
    assert loss.item() == pytest.approx(expect, rel=1e-6)
    assert float(stats["clip_fraction"]) == pytest.approx(0.5)
    (grad,) = torch.autograd.grad(loss, logp)
    # the gradient of s1·A over the sequence mean: each unmasked token gets s1·A/|y|, halved by the mean
    # over 2 sequences
    assert grad.flatten().tolist() == pytest.approx([0.0, 0.0, -s1 * 2.0 / 1 / 2, 0.0], rel=1e-5)
    # at token level the same tensors clip token by token instead
    token, _ = _loss(logp, old, [1.0, 2.0], mask, clip_eps_low=3e-4, clip_eps_high=4e-4)
    assert token.item() == pytest.approx(-(((1 + 4e-4) * 2) / 2 * 1.0 + s1 * 2.0) / 2, rel=1e-6)
    assert s0 > 1 + 4e-4


def test_gspo_value_is_one_and_gradient_is_the_sequence_mean_on_policy():
    logp = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, _ = _loss(logp, logp.detach(), [3.0], mask, importance_level="sequence")
    assert loss.item() == pytest.approx(-3.0)
    (grad,) = torch.autograd.grad(loss, logp)
    assert grad.flatten().tolist() == pytest.approx([-1.5, -1.5, 0.0])


def test_overlong_penalty_values():
    # DAPO eq. 13 with L_max 512, L_cache 102: 0 up to 410 tokens, then −(L − 410)/102
    got = overlong_penalty([10, 410, 411, 461, 512], max_tokens=512, buffer=102)
    assert got == pytest.approx([0.0, 0.0, -1 / 102, -51 / 102, -1.0])
    assert overlong_penalty([512], max_tokens=512, buffer=102, factor=0.5) == [pytest.approx(-0.5)]
    assert overlong_penalty([512, 3], max_tokens=512, buffer=0) == [0.0, 0.0]


def test_truncated_rows_masked_out_of_the_loss():
    logp = torch.tensor([[-1.0, -1.0], [-2.0, -2.0]], requires_grad=True)
    finished = torch.tensor([True, False])
    mask = torch.ones(2, 2) * finished[:, None]
    loss, _ = policy_loss(logp, None, torch.tensor([1.0, 5.0]), mask, beta=0.0)
    (grad,) = torch.autograd.grad(loss, logp)
    # sequence mean over both sequences (TRL's rule): the truncated one adds nothing but still counts
    assert loss.item() == pytest.approx(-0.5)
    assert grad[1].abs().sum() == 0 and grad[0].tolist() == pytest.approx([-0.25, -0.25])


def test_informative_groups_find_constant_groups():
    values = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, -2.0, -2.0, -2.0])
    assert informative_groups(values, 2) == [False, True, True, False]
    assert informative_groups(values, 4) == [True, True]


def test_accuracy_only_preset_is_length_free():
    from tlvr_cli.config import load_config
    from tlvr_cli.jobs import GRPOConfig
    from tlvr_cli.train.rewards import score_completions

    algo = load_config(GRPOConfig, "nextqa-accuracy").algo
    texts = ["<think>" + "x" * 2000 + "</think> <answer>A</answer>", "<think>y</think> <answer>A</answer>", "A",
             "<think>z</think> <answer>B</answer>"]
    total, parts = score_completions(texts, {"solution": ["<answer>A</answer>"] * 4}, algo)
    assert total == [1.0, 1.0, 1.0, 0.0] and list(parts) == ["accuracy_reward"]


def test_variant_presets_carry_their_published_values():
    from tlvr_cli.config import load_config
    from tlvr_cli.jobs import GRPOConfig

    dapo, gspo, dr = (load_config(GRPOConfig, f"nextqa-{v}").algo for v in ("dapo", "gspo", "drgrpo"))
    assert (dapo.clip_eps_low, dapo.clip_eps_high, dapo.loss_aggregation) == (0.2, 0.28, "token_mean")
    assert dapo.dynamic_sampling and dapo.overlong_buffer == round(512 * 4096 / 20480) and dapo.mini_batches > 1
    assert gspo.importance_level == "sequence" and gspo.mini_batches == 4
    assert (gspo.clip_eps_low, gspo.clip_eps_high) == (3e-4, 4e-4)
    assert (dr.scale_rewards, dr.loss_aggregation) == (False, "dr_grpo")
    assert dapo.beta == gspo.beta == dr.beta == 0.0  # none of the three objectives has a KL term
