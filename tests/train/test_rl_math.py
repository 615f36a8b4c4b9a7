"""Rewards, R1 combination, advantages, KL, loss and chunked log-probs against spec §5.2–5.3."""

from __future__ import annotations

import pytest
import torch

from tlvr_cli.errors import TlvrError
from tlvr_cli.jobs import GRPOAlgoConfig, RewardSpec
from tlvr_cli.train.grpo_math import completion_mask, group_advantages, kl_penalty, policy_loss
from tlvr_cli.train.logprobs import token_logprobs
from tlvr_cli.train.rewards import accuracy_reward, combine_r1, format_reward, load_reward_fn, score_completions


def test_accuracy_reward_string_rules():
    sol = ["<answer>C</answer>"] * 6
    comps = ["<think>x</think><answer>C</answer>", "<answer>C. pick up</answer>", "C", "<answer>B</answer>",
             "<answer></answer>", "the answer is C"]
    # "the answer is C": no tag → whole completion "the answer is C" ≠ "C" and its first char is "t"
    assert accuracy_reward(comps, sol) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert accuracy_reward(["<answer>B</answer>"], ["B"]) == [1.0]  # bare gold answer
    # no DOTALL: a tag split over lines is not an answer block
    assert accuracy_reward(["<answer>\nC</answer>"], ["<answer>C</answer>"]) == [0.0]


def test_format_reward_values():
    think = "a" * 600
    assert format_reward([f"<think>{think}</think> <answer>A</answer>"]) == [0.75]
    assert format_reward([f"<think>{'b' * 5000}</think>\n<answer>A</answer>"]) == [1.0]
    assert format_reward(["<think></think><answer>A</answer>"]) == [0.5]
    assert format_reward(["<answer>A</answer>"]) == [0.0]
    assert format_reward(["<think>x</think> <answer>A</answer> extra"]) == [0.0]
    assert format_reward(["<think>x<think>y</think> <answer>A</answer>"]) == [0.0]  # two <think>
    assert format_reward(["  <think> padded </think><answer>A</answer>\n"]) == [pytest.approx(0.5 + 0.5 * 6 / 1200)]


def test_r1_combination_and_zero_substitution():
    acc = [1.0, 1.0, 0.0, 0.0, 0.0]
    fmt = [0.0, 0.75, 0.5, 1.0, 0.0]
    assert combine_r1(acc, fmt) == [1.0, 1.75, -0.5, -1.0, -2.0]
    assert combine_r1([0.0], [0.0], None) == [0.0]


def test_score_completions_uses_configured_functions():
    algo = GRPOAlgoConfig()
    texts = ["<think>ok</think> <answer>A</answer>", "<answer>B</answer>"]
    total, comp = score_completions(texts, {"solution": ["<answer>A</answer>"] * 2, "problem": ["q"] * 2}, algo)
    assert comp["accuracy_reward"] == [1.0, 0.0] and comp["format_reward"][1] == 0.0
    assert total == [1.0 + comp["format_reward"][0], -2.0]
    weighted = GRPOAlgoConfig(reward_combination="weighted", zero_reward_value=None,
                              rewards=[RewardSpec("tlvr_cli.train.rewards:accuracy_reward", 2.0)])
    assert score_completions(texts, {"solution": ["A", "A"]}, weighted)[0] == [2.0, 0.0]
    with pytest.raises(TlvrError, match="module:function"):
        load_reward_fn("nonsense")
    with pytest.raises(TlvrError, match="no_such"):
        load_reward_fn("tlvr_cli.train.rewards:no_such")


def test_completion_mask_includes_first_eos_only():
    eos = 9
    c = torch.tensor([[1, 2, 9, 9, 9], [1, 2, 3, 4, 5], [9, 9, 9, 9, 9]])
    assert completion_mask(c, eos).tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]


def test_group_advantages_unbiased_std_and_noise():
    r = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0])
    adv = group_advantages(r, 4, eps=1e-4)
    std = torch.tensor([1.0, 2.0, 3.0, 4.0]).std()  # unbiased
    assert torch.allclose(adv[:4], (torch.tensor([1.0, 2.0, 3.0, 4.0]) - 2.5) / (std + 1e-4))
    assert torch.equal(adv[4:], torch.zeros(4))
    n1 = group_advantages(r, 4, noise_std=0.02, noise_seeds=[3, 7])
    assert torch.equal(n1, group_advantages(r, 4, noise_std=0.02, noise_seeds=[3, 7]))
    assert (n1[4:] != 0).all() and (n1[4:].abs() < 0.2).all()
    # a group's noise follows its own seed, not its place in the batch
    alone = group_advantages(r[4:], 4, noise_std=0.02, noise_seeds=[7])
    assert torch.equal(n1[4:], alone)
    assert not torch.equal(n1[4:], group_advantages(r[4:], 4, noise_std=0.02, noise_seeds=[8]))
    with pytest.raises(ValueError, match="one seed per group"):
        group_advantages(r, 4, noise_std=0.02)


def test_k3_kl_and_clamp():
    logp = torch.tensor([0.0, -1.0, -300.0])
    ref = torch.tensor([0.0, -2.0, 0.0])
    kl = kl_penalty(logp, ref)
    d = torch.tensor(-1.0)
    assert kl[0] == 0 and torch.isclose(kl[1], torch.exp(d) - d - 1) and kl[2] == 100.0


def test_policy_loss_value_and_gradient_match_reference_formula():
    torch.manual_seed(0)
    logp = torch.randn(4, 6, requires_grad=True)
    ref = torch.randn(4, 6)
    adv = torch.randn(4)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6, [1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]]).float()
    loss, stats = policy_loss(logp, ref, adv, mask, beta=0.01)
    # spec §5.2 step 9, written out
    d = ref - logp
    kl = (torch.exp(d) - d - 1).clamp(-100, 100)
    per_tok = -(torch.exp(logp - logp.detach()) * adv[:, None] - 0.01 * kl)
    expect = ((per_tok * mask).sum(1) / mask.sum(1)).mean()
    assert torch.allclose(loss, expect)
    g1 = torch.autograd.grad(loss, logp, retain_graph=True)[0]
    g2 = torch.autograd.grad(expect, logp)[0]
    assert torch.allclose(g1, g2)
    assert float(stats["kl"]) == pytest.approx(float(((kl.detach() * mask).sum(1) / mask.sum(1)).mean()), rel=1e-5)
    # micro-batches sum to the whole-batch loss
    a, _ = policy_loss(logp[:2], ref[:2], adv[:2], mask[:2], beta=0.01, num_sequences=4)
    b, _ = policy_loss(logp[2:], ref[2:], adv[2:], mask[2:], beta=0.01, num_sequences=4)
    assert torch.allclose(a + b, loss)
    tm, _ = policy_loss(logp, ref, adv, mask, beta=0.01, aggregation="token_mean")
    assert torch.allclose(tm, (per_tok * mask).sum() / mask.sum())
    dr, _ = policy_loss(logp, ref, adv, mask, beta=0.01, aggregation="dr_grpo", max_tokens=6)
    assert torch.allclose(dr, (per_tok * mask).sum() / (4 * 6))


def test_clipped_ratio_when_iterating():
    logp = torch.tensor([[0.5, 0.0]], requires_grad=True)
    old = torch.tensor([[0.0, 0.0]])
    loss, stats = policy_loss(logp, None, torch.tensor([1.0]), torch.ones(1, 2), beta=0.0, old_logp=old,
                              clip_eps_low=0.2, clip_eps_high=0.2)
    # token 0: ratio e^0.5 ≈ 1.65 clipped to 1.2; token 1: ratio 1
    assert torch.isclose(loss, -torch.tensor((1.2 + 1.0) / 2))
    assert float(stats["clip_fraction"]) == 0.5


def test_chunked_logprobs_match_full_log_softmax_with_gradients():
    torch.manual_seed(0)
    h = torch.randn(2, 7, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(53, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 53, (2, 7))
    ours = token_logprobs(h, w, t, chunk_size=10)
    full = torch.log_softmax(h @ w.T, -1).gather(-1, t[..., None]).squeeze(-1)
    assert torch.allclose(ours.double(), full, atol=1e-5)
    weights = torch.randn(2, 7, dtype=torch.float64)
    g_ours = torch.autograd.grad((ours * weights).sum(), (h, w))
    g_full = torch.autograd.grad((full * weights).sum(), (h, w))
    for a, b in zip(g_ours, g_full):
        assert torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])])
def test_chunked_logprobs_in_bf16_are_as_close_to_exact_as_autograd_through_the_lm_head(device):
    # the backward's GEMMs run in bf16 (fp32 output where the GPU has it): its error against the exact
    # (fp64) gradients stays within that of plain bf16 autograd through log_softmax(h @ wᵀ), which is
    # what the reference differentiates
    torch.manual_seed(0)
    h64 = torch.randn(96, 64, dtype=torch.float64, device=device)
    w64 = torch.randn(1000, 64, dtype=torch.float64, device=device) / 8
    t = torch.randint(0, 1000, (96,), device=device)
    weights = torch.randn(96, dtype=torch.float64, device=device)

    def grads(fn, dtype):
        h, w = h64.to(dtype).requires_grad_(), w64.to(dtype).requires_grad_()
        return torch.autograd.grad((fn(h, w).double() * weights).sum(), (h, w))

    def full(h, w):
        return torch.log_softmax((h @ w.T).float(), -1).gather(-1, t[:, None]).squeeze(-1)

    def chunked(h, w):
        return token_logprobs(h, w, t, chunk_size=128)

    exact = grads(full, torch.float64)
    for ours, autograd, want in zip(grads(chunked, torch.bfloat16), grads(full, torch.bfloat16), exact):
        assert ours.dtype == torch.bfloat16
        err = (ours.double() - want).norm() / want.norm()
        assert err <= 1.5 * (autograd.double() - want).norm() / want.norm() + 1e-3
