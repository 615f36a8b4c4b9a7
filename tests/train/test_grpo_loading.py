"""GRPO's reference model: from the policy's start checkpoint it is a copy of the loaded policy (one
read of the weights), identical to loading the checkpoint again and independent of the policy after."""

from __future__ import annotations

import torch

from tlvr_cli.config import load_config
from tlvr_cli.jobs import GRPOConfig
from tlvr_cli.model.checkpoint import load_model, save_model
from tlvr_cli.model.tiny import build_tiny_model
from tlvr_cli.train.grpo import load_reference
from tlvr_cli.train.setup import apply_tuning

CPU = torch.device("cpu")


def loaded_policy(ckpt, *overrides: str):
    cfg = load_config(GRPOConfig, None, [f"model.path={ckpt}", "model.device=cpu", "model.dtype=float32", *overrides])
    policy = load_model(cfg.model)
    apply_tuning(policy, cfg.tune, gradient_checkpointing=True)  # as run_grpo, before the reference
    return cfg, policy


def test_reference_copy_equals_a_second_load_and_is_independent(tmp_path, monkeypatch):
    ckpt = save_model(build_tiny_model(seed=3), tmp_path / "ck")
    cfg, policy = loaded_policy(ckpt)

    def refuse(*_, **__):
        raise AssertionError("the checkpoint was read a second time")

    monkeypatch.setattr("tlvr_cli.train.grpo.load_model", refuse)
    ref = load_reference(cfg, policy, CPU)  # no second read of the checkpoint
    again = load_model(str(ckpt), dtype="float32", device="cpu").state_dict()
    ref_sd, policy_sd = ref.state_dict(), policy.state_dict()
    assert ref_sd.keys() == again.keys() == policy_sd.keys()
    assert all(torch.equal(ref_sd[k], again[k]) and torch.equal(policy_sd[k], again[k]) for k in again)
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(ref.parameters(), policy.parameters()))
    lm = ref.language_model
    assert lm.lm_head.weight is lm.model.embed_tokens.weight  # still tied, as loaded
    assert not any(p.requires_grad for p in ref.parameters()) and not ref.training
    assert any(p.requires_grad for p in policy.parameters()) and ref.tokenizer is policy.tokenizer
    first = next(iter(again))
    with torch.no_grad():
        policy.state_dict()[first].add_(1.0)  # a policy update leaves the reference as it was
    assert torch.equal(ref.state_dict()[first], again[first])
    assert not torch.equal(policy.state_dict()[first], again[first])


def test_another_reference_checkpoint_is_loaded(tmp_path):
    policy_ck = save_model(build_tiny_model(seed=3), tmp_path / "policy")
    ref_ck = save_model(build_tiny_model(seed=4), tmp_path / "ref")
    cfg, policy = loaded_policy(policy_ck, f"ref_model={ref_ck}")
    ref = load_reference(cfg, policy, CPU)
    want = load_model(str(ref_ck), dtype="float32", device="cpu").state_dict()
    assert all(torch.equal(ref.state_dict()[k], v) for k, v in want.items())
    assert not torch.equal(next(policy.parameters()), next(ref.parameters()))
