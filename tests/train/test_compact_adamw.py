"""The smaller optimizer states (optim.kind / optim.master_weights) and MasterAdamW's bucketed step:
exactness where it must be exact, bounded error where it quantises, accumulation of sub-ulp updates,
resume, and which optimizer each config builds."""

from __future__ import annotations

import pytest
import torch

from tlvr_cli.errors import TlvrError
from tlvr_cli.jobs import LoraTuneConfig, OptimConfig, TuneConfig
from tlvr_cli.train import compact_adamw as C
from tlvr_cli.train.optim import MasterAdamW, build_optimizer


def _params(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    # one tensor spans several chunks and ends in a partial block
    shapes = [(3, 1000), (700,), (5, 7)]
    return [torch.nn.Parameter((torch.randn(s, generator=g) * 0.1).to(dtype)) for s in shapes]


def _grads(params, step, scale=1.0):
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=g) * scale).to(p.dtype)


def _groups(params):
    return [{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:], "weight_decay": 0.0, "lr": 5e-3}]


def test_fp32_moments_on_fp32_params_equal_torch_adamw_bit_for_bit(monkeypatch):
    monkeypatch.setattr(C, "CHUNK", C.BLOCK * 4)  # several chunks per tensor
    ours, ref = _params(), _params()
    o1 = C.CompactAdamW(_groups(ours), lr=1e-2, betas=(0.9, 0.99), eps=1e-8)
    o2 = torch.optim.AdamW(_groups(ref), lr=1e-2, betas=(0.9, 0.99), eps=1e-8, foreach=False)
    for step in range(5):
        _grads(ours, step)
        _grads(ref, step)
        o1.step()
        o2.step()
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)
    assert not torch.equal(ours[0], _params()[0])


def test_quantizer_round_trip_error_and_positive_second_moments():
    q, qv = C.Quantizer(True, torch.device("cpu")), C.Quantizer(False, torch.device("cpu"))
    assert len(q.values) == 255 and len(qv.values) == 256 and q.values[q.zero] == 0 and qv.values[0] == 0
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, generator=g) * torch.logspace(-3, 0, 1000)
    codes, scale = q.encode(x)
    assert codes.dtype == torch.uint8 and scale.shape == (4,)
    back = q.decode(codes, scale)
    big = x.abs() > 0.1 * scale.repeat_interleave(C.BLOCK)[:1000]  # within a decade of its block's maximum
    assert ((back - x).abs()[big] / x.abs()[big]).max() < 0.08
    assert torch.equal(back.abs().max(), x.abs().max())  # a block's maximum is exact
    v = torch.rand(700, generator=g) ** 8 * 1e-4 + 1e-30  # tiny but positive second moments
    assert (qv.decode(*qv.encode(v)) > 0).all()
    assert torch.equal(q.decode(*q.encode(torch.zeros(300))), torch.zeros(300))


def test_8bit_moments_track_fp32_adamw():
    ours, ref = _params(), _params()
    o1 = C.CompactAdamW(_groups(ours), lr=1e-2, betas=(0.9, 0.999), eps=1e-8, moments="8bit")
    o2 = torch.optim.AdamW(_groups(ref), lr=1e-2, betas=(0.9, 0.999), eps=1e-8, foreach=False)
    start = [p.detach().clone() for p in ours]
    for step in range(10):
        _grads(ours, step)
        _grads(ref, step)
        o1.step()
        o2.step()
    for a, b, s in zip(ours, ref, start):
        moved = (b - s).norm()
        assert (a - b).norm() < 0.05 * moved
    state = o1.state[ours[0]]
    assert state["exp_avg_codes"].dtype == torch.uint8 and "exp_avg" not in state


@pytest.mark.parametrize("masters", ["kahan", "stochastic"])
def test_bf16_weights_accumulate_updates_below_their_precision(masters):
    # a constant gradient moves every weight by lr per step: 1e-4 is an eighth of bf16's half-ulp at 1.0,
    # so rounding to nearest would never move them; fp32 masters land at 1 - 200 * lr
    n, steps, lr = 4096, 200, 1e-4
    p = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16))
    opt = C.CompactAdamW([{"params": [p]}], lr=lr, betas=(0.9, 0.999), eps=1e-8, masters=masters)
    nearest = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16))
    plain = torch.optim.AdamW([nearest], lr=lr, weight_decay=0.0)
    for _ in range(steps):
        p.grad = torch.ones_like(p)
        nearest.grad = torch.ones_like(nearest)
        opt.step()
        plain.step()
    want = 1 - steps * lr
    assert torch.equal(nearest, torch.ones_like(nearest))  # the failure both modes avoid
    if masters == "kahan":  # each weight within one bf16 step of the exact value
        assert (p.float() - want).abs().max() <= 2 ** -8
    else:  # unbiased: the mean is exact, single weights are whole bf16 steps off
        assert abs(p.float().mean() - want) < 5e-4 and len(p.unique()) > 1
    assert "master" not in opt.state[p] and p.dtype == torch.bfloat16


def test_stochastic_rounding_is_unbiased():
    x = torch.full((20000,), 1.0 + 2 ** -9)  # a quarter of the way from 1 to the next bf16 value
    out = C.stochastic_round_bf16(x, torch.Generator().manual_seed(0)).float()
    assert set(out.unique().tolist()) == {1.0, 1.0 + 2 ** -7}
    assert abs(out.mean().item() - x[0].item()) < 1e-4
    exact = torch.tensor([0.5, -3.0, float("inf")])
    assert torch.equal(C.stochastic_round_bf16(exact, torch.Generator()).float(), exact)


@pytest.mark.parametrize("moments,masters", [("8bit", "stochastic"), ("8bit", "kahan"), ("fp32", "fp32")])
def test_state_dict_resume_continues_exactly(moments, masters):
    def run(params, opt, steps):
        for step in steps:
            _grads(params, step)
            opt.step()

    full = _params(torch.bfloat16)
    o = C.CompactAdamW(_groups(full), lr=1e-2, betas=(0.9, 0.999), eps=1e-8, moments=moments, masters=masters)
    run(full, o, range(4))
    half = _params(torch.bfloat16)
    o = C.CompactAdamW(_groups(half), lr=1e-2, betas=(0.9, 0.999), eps=1e-8, moments=moments, masters=masters)
    run(half, o, range(2))
    saved = o.state_dict()
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in half]
    o2 = C.CompactAdamW(_groups(resumed), lr=1.0, betas=(0.9, 0.999), eps=1e-8, moments=moments, masters=masters)
    o2.load_state_dict(saved)
    assert o2.param_groups[1]["lr"] == 5e-3
    if masters == "fp32":
        assert o2.state[resumed[0]]["master"].dtype == torch.float32  # torch's loader would cast it to bf16
    run(resumed, o2, range(2, 4))
    for a, b in zip(full, resumed):
        assert torch.equal(a, b)


def test_master_adamw_buckets_step_bit_for_bit():
    one, many = _params(torch.bfloat16), _params(torch.bfloat16)
    o1 = MasterAdamW(_groups(one), lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
    o2 = MasterAdamW(_groups(many), lr=1e-2, betas=(0.9, 0.999), eps=1e-8, grad_bucket=100)
    assert len(o1.buckets) == 1 and len(o2.buckets) == 3
    for step in range(3):
        _grads(one, step)
        _grads(many, step)
        many[2].grad = None if step == 1 else many[2].grad  # a parameter without a gradient is skipped
        one[2].grad = None if step == 1 else one[2].grad
        o1.step()
        o2.step()
    for a, b in zip(one, many):
        assert torch.equal(a, b)


def test_build_optimizer_picks_the_state_and_keeps_the_default(tiny_model):
    low = tiny_model.to(torch.bfloat16)
    assert isinstance(build_optimizer(low, OptimConfig()), MasterAdamW)  # the reference's: fp32 masters + moments
    opt = build_optimizer(low, OptimConfig(kind="adamw8bit", master_weights="stochastic"))
    assert isinstance(opt, C.CompactAdamW) and (opt.moments, opt.masters) == ("8bit", "stochastic")
    assert isinstance(build_optimizer(low, OptimConfig(master_weights="kahan")), C.CompactAdamW)
    with pytest.raises(TlvrError, match="bfloat16"):
        build_optimizer(tiny_model.to(torch.float16), OptimConfig(master_weights="stochastic"))


def test_connector_lr_applies_beside_adapters(tiny_model):
    pytest.importorskip("peft")
    from tlvr_cli.train.setup import apply_tuning

    tune = TuneConfig(lora=LoraTuneConfig(enabled=True, rank=4, connector_lr=1e-6))
    apply_tuning(tiny_model, tune, gradient_checkpointing=False)
    opt = build_optimizer(tiny_model, OptimConfig(lr=1e-4), tune)
    names = {id(p): n for n, p in tiny_model.named_parameters()}
    for g in opt.param_groups:
        kinds = {".lora_" in names[id(p)] for p in g["params"]}
        assert len(kinds) == 1 and g["lr"] == (1e-4 if kinds == {True} else 1e-6)
