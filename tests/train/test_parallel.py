"""``dist.Parallel`` with FSDP2 in one process (a process group of one): mixed-precision shards,
gathered parameters for rollouts, consolidated saving, and the frozen-tower rule."""

from __future__ import annotations

import pytest
import torch

from tlvr_cli.errors import TlvrError
from tlvr_cli.jobs import TuneConfig
from tlvr_cli.model.checkpoint import read_state_dict
from tlvr_cli.model.tiny import build_tiny_model
from tlvr_cli.runtime import init_distributed, shutdown_distributed
from tlvr_cli.train.parallel import Parallel
from tlvr_cli.train.policy import PolicyLogprobs
from tlvr_cli.train.run_dir import save_final
from tlvr_cli.train.setup import apply_tuning


@pytest.fixture
def ctx(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    ctx = init_distributed("cpu", "gloo", need_group=True)
    yield ctx
    shutdown_distributed()


def test_fsdp2_shards_fp32_masters_and_saves_the_released_dtype(ctx, tmp_path):
    from torch.distributed.tensor import DTensor

    torch.manual_seed(0)
    model = build_tiny_model().to(torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_tuning(model, TuneConfig(), gradient_checkpointing=False)
    par = Parallel(PolicyLogprobs(model), model, ctx, "fsdp2", prefix="model.")
    q = model.language_model.model.layers[0].self_attn.q_proj
    assert par.sharded and isinstance(q.weight, DTensor) and q.weight.dtype == torch.float32
    assert not isinstance(next(model.vision_tower.parameters()), DTensor)  # the frozen tower stays whole
    with par.full_params():  # what the rollout engine reads: whole tensors in the compute dtype
        assert not isinstance(q.weight, DTensor) and q.weight.dtype == torch.bfloat16
        assert torch.equal(q.weight, before["language_model.model.layers.0.self_attn.q_proj.weight"])
    assert isinstance(q.weight, DTensor)
    out = save_final(tmp_path, par)
    saved = read_state_dict(out)
    assert {v.dtype for v in saved.values()} == {torch.bfloat16}
    for k, v in saved.items():
        assert torch.equal(v, before[k]), k


def test_fsdp2_refuses_a_trainable_tower(ctx):
    model = build_tiny_model()
    apply_tuning(model, TuneConfig(vision_tower=True), gradient_checkpointing=False)
    with pytest.raises(TlvrError, match="tune.vision_tower=false"):
        Parallel(model, model, ctx, "fsdp2")


def test_fsdp2_checkpoint_keeps_the_fp32_masters(ctx, tmp_path):
    from tlvr_cli.jobs import OptimConfig
    from tlvr_cli.train.optim import build_optimizer, build_scheduler
    from tlvr_cli.train.run_dir import TrainState, checkpoint_dir, load_checkpoint, save_checkpoint

    def setup():
        torch.manual_seed(0)
        model = build_tiny_model().to(torch.bfloat16)
        apply_tuning(model, TuneConfig(), gradient_checkpointing=False)
        par = Parallel(PolicyLogprobs(model), model, ctx, "fsdp2", prefix="model.")
        opt = build_optimizer(model, OptimConfig(lr=1e-3))
        return model, par, opt, build_scheduler(opt, OptimConfig(lr=1e-3), 10)

    model, par, opt, sched = setup()
    for p in model.parameters():  # one step on made-up gradients: the fp32 masters leave the bf16 grid
        if p.requires_grad:
            p.grad = torch.full_like(p, 1e-3)
    opt.step()
    sched.step()
    masters = {n: p.full_tensor().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert any(not torch.equal(v, v.to(torch.bfloat16).float()) for v in masters.values())
    save_checkpoint(tmp_path, TrainState(step=1), par, opt, sched, "job: grpo\n", keep_last=2)

    model2, par2, opt2, sched2 = setup()
    st = load_checkpoint(checkpoint_dir(tmp_path, 1), par2, opt2, sched2)
    assert st.step == 1 and sched2.last_epoch == 1
    for n, p in model2.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.full_tensor(), masters[n]), n
    state = opt2.state_dict()["state"]
    assert state and all(torch.equal(a["exp_avg"].full_tensor(), b["exp_avg"].full_tensor())
                         for a, b in zip(state.values(), opt.state_dict()["state"].values()))
