"""The flat log-prob layouts (prompt once per group, completions without padding) against the padded
rows: equal log-probs, loss and every parameter's gradient (CPU fp32, ≤ 1e-5 relative), with and
without gradient checkpointing; the group-keeping micro-batch plan; one GRPO run either way."""

from __future__ import annotations

import pytest
import torch

from tlvr_cli.data.template import build_prompt, tokenize_with_image
from tlvr_cli.jobs import OptimConfig, TuneConfig
from tlvr_cli.train.packed import PackedLayout, packed_hidden
from tlvr_cli.train.policy import micro_batch_order, sequence_logprobs
from tlvr_cli.train.setup import apply_job_tuning, apply_tuning

FLAT = [(True, False), (True, True), (False, True)]  # (shared_prompt, packing); (False, False) is the padded path
TOL = 1e-5


@pytest.fixture()
def batch(tiny_model):
    """Two prompts of different lengths, G = 4 completions each, of lengths 1 to the full width."""
    tok = tiny_model.tokenizer
    ids = [tokenize_with_image(tok, build_prompt("<image>\nWhat is on the table?")),
           tokenize_with_image(tok, build_prompt("<image>\nWhy does the man in the red coat leave the room so early?"))]
    assert len(ids[0]) != len(ids[1])
    pixels = torch.randn(2, 16, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    feats = tiny_model.tower_features(pixels).detach()
    comps = torch.randint(1, 600, (8, 11), generator=torch.Generator().manual_seed(4))
    lengths = torch.tensor([11, 3, 6, 1, 7, 2, 11, 4])
    weights = torch.randn(8, 11, generator=torch.Generator().manual_seed(5))  # a distinct gradient for every token
    return feats, ids, [i // 4 for i in range(8)], comps, lengths, weights  # sequence_logprobs' order, then weights


def _loss_and_grads(model, batch, rows, **layout):
    model.zero_grad(set_to_none=True)
    logp = sequence_logprobs(model, *batch[:5], rows, chunk_size=100, **layout)
    loss = (logp * batch[5][rows]).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logp.detach(), loss.detach(), grads


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("shared_prompt,packing", FLAT)
def test_flat_layouts_match_padded_rows_in_loss_and_every_gradient(tiny_model, batch, checkpointing, shared_prompt,
                                                                    packing):
    model = tiny_model.train()
    apply_tuning(model, TuneConfig(), gradient_checkpointing=checkpointing)
    rows = [5, 0, 1, 2, 3, 4, 6, 7]  # any order: results follow ``rows``
    logp0, loss0, grads0 = _loss_and_grads(model, batch, rows)
    logp, loss, grads = _loss_and_grads(model, batch, rows, shared_prompt=shared_prompt, packing=packing)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert grads.keys() == grads0.keys() == trained
    assert any(n.startswith("connector.") for n in trained)
    assert _rel(logp, logp0) <= TOL and _rel(loss, loss0) <= TOL
    lengths = batch[4][rows]
    assert (logp[torch.arange(11)[None] >= lengths[:, None]] == 0).all()
    for n in grads0:
        assert _rel(grads[n], grads0[n]) <= TOL, n


def test_flat_layout_equals_padded_rows_on_a_split_group(tiny_model, batch):
    # a micro-batch holding part of one group and all of another, and a one-token completion alone
    with torch.no_grad():
        for rows in ([2, 3, 4, 5, 6, 7], [3]):
            want = sequence_logprobs(tiny_model, *batch[:5], rows, chunk_size=64)
            got = sequence_logprobs(tiny_model, *batch[:5], rows, chunk_size=64, shared_prompt=True, packing=True)
            assert _rel(got, want) <= TOL


class _Counted(torch.nn.Module):
    """Wraps a module and counts its calls (forward hooks do not fire during a checkpoint's recompute)."""

    def __init__(self, inner: torch.nn.Module, calls: list) -> None:
        super().__init__()
        self.inner, self.calls = inner, calls

    def forward(self, x):
        self.calls.append(1)
        return self.inner(x)


def test_checkpointing_recomputes_each_layer_in_the_flat_forward(tiny_model, batch):
    model = tiny_model.train()
    calls: list = []
    for layer in model.language_model.model.layers:
        layer.mlp.act_fn = _Counted(layer.mlp.act_fn, calls)
    for checkpointing, per_layer in ((False, 1), (True, 2)):
        apply_tuning(model, TuneConfig(), gradient_checkpointing=checkpointing)
        calls.clear()
        _loss_and_grads(model, batch, list(range(8)), shared_prompt=True, packing=True)
        assert len(calls) == per_layer * len(model.language_model.model.layers)


def test_packed_hidden_matches_the_hf_forward_of_each_sequence(tiny_model):
    lm = tiny_model.language_model
    prompts = [torch.randn(5, 128), torch.randn(3, 128)]
    comps = [torch.randn(4, 128), torch.randn(2, 128), torch.randn(0, 128), torch.randn(6, 128)]
    owner = [0, 1, 0, 1]
    with torch.no_grad():
        flat = packed_hidden(lm.model, torch.cat(prompts + comps), PackedLayout([5, 3], [4, 2, 0, 6], owner))
        layout = PackedLayout([5, 3], [4, 2, 0, 6], owner)
        for u, p in enumerate(prompts):
            h = lm.model(inputs_embeds=p[None]).last_hidden_state[0]
            s = layout.prompt_starts[u]
            assert torch.allclose(flat[s:s + len(p)], h, atol=1e-5)
        for i, c in enumerate(comps):
            h = lm.model(inputs_embeds=torch.cat([prompts[owner[i]], c])[None]).last_hidden_state[0]
            s = layout.completion_starts[i]
            assert torch.allclose(flat[s:s + len(c)], h[len(prompts[owner[i]]):], atol=1e-5)


def test_packed_attention_gradients_repeat_bit_for_bit():
    # the prompt's keys feed every completion of its group; their gradients must sum in a fixed order,
    # or a resumed run drifts from an uninterrupted one
    from tlvr_cli.train.packed import PackedAttention

    layout = PackedLayout([80, 76], [10, 2, 5, 0, 6, 1, 10, 3], [0, 0, 0, 0, 1, 1, 1, 1])
    attend = PackedAttention(layout, torch.device("cpu"), varlen=False)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(layout.total, h, 32, generator=g, requires_grad=True) for h in (4, 2, 2))
    w = torch.randn(layout.total, 128, generator=g)
    first = None
    for _ in range(40):
        q.grad = k.grad = v.grad = None
        (attend(q, k, v, 32**-0.5, 0.0) * w).sum().backward()
        grads = [q.grad.clone(), k.grad.clone(), v.grad.clone()]
        first = first or grads
        assert all(torch.equal(a, b) for a, b in zip(first, grads))


def test_packed_attention_shapes_repeat_for_varied_completion_lengths():
    # cuDNN's attention builds a plan per new shape (measured: 6.2 -> 5.0 s per GRPO step once lengths of
    # 64-512 tokens fell on a few shapes): micro-batches whose longest completion differs a little pad alike
    from tlvr_cli.engine.attention import SHAPE_ALIGN
    from tlvr_cli.train.packed import PackedAttention

    def shapes(longest: int):
        layout = PackedLayout([614, 610], [longest, 70, 3, 40], [0, 0, 1, 1])
        return [tuple(b.mask.shape) for b in PackedAttention(layout, torch.device("cpu"), varlen=False).buckets]

    assert shapes(100) == shapes(127) != shapes(129)
    assert all(q % SHAPE_ALIGN == 0 and k % SHAPE_ALIGN == 0 for _, _, q, k in shapes(100))


def test_padded_rows_run_at_an_aligned_width(tiny_model, batch):
    # the padded layout (FSDP2's) pads its rows to a multiple of SHAPE_ALIGN too, with the same log-probs
    from tlvr_cli.engine.attention import SHAPE_ALIGN

    widths = []
    hook = tiny_model.language_model.model.register_forward_pre_hook(
        lambda mod, args, kwargs: widths.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True)
    try:
        with torch.no_grad():
            padded = sequence_logprobs(tiny_model, *batch[:5], [0, 4], chunk_size=64)
    finally:
        hook.remove()
    with torch.no_grad():
        flat = sequence_logprobs(tiny_model, *batch[:5], [0, 4], chunk_size=64, shared_prompt=True, packing=True)
    assert len(widths) == 1 and widths[0] % SHAPE_ALIGN == 0
    assert _rel(padded, flat) <= TOL


def test_micro_batch_order_keeps_groups_whole():
    lengths = [3, 9, 1, 2,  5, 5, 6, 1,  8, 2, 2, 2]  # three groups of 4; longest completions 9, 6, 8
    assert micro_batch_order(lengths, 8, group_size=4) == [[1, 0, 3, 2, 8, 9, 10, 11], [6, 4, 5, 7]]
    assert micro_batch_order(lengths, 5, group_size=4) == [[1, 0, 3, 2], [8, 9, 10, 11], [6, 4, 5, 7]]
    # below one group: each group in parts, longest first
    assert micro_batch_order(lengths, 3, group_size=4) == [[1, 0, 3], [2], [8, 9, 10], [11], [6, 4, 5], [7]]
    # without groups: all sequences by length, as before
    assert micro_batch_order(lengths, 4) == [[1, 8, 6, 4], [5, 0, 3, 9], [10, 11, 2, 7]]
    with pytest.raises(ValueError, match="groups of 4"):
        micro_batch_order(lengths[:10], 8, group_size=4)


def test_grpo_run_is_the_same_with_either_layout(tmp_path):
    from tlvr_cli.config import load_config
    from tlvr_cli.jobs import GRPOConfig, SynthConfig
    from tlvr_cli.model.checkpoint import read_state_dict, save_model
    from tlvr_cli.model.tiny import build_tiny_model
    from tlvr_cli.synth import write_synthetic_dataset
    from tlvr_cli.train.grpo import run_grpo

    write_synthetic_dataset(SynthConfig(root=str(tmp_path / "synth"), train=4, eval=2, coldstart=2, size=32, seed=0))
    ckpt = save_model(build_tiny_model(), tmp_path / "tiny")
    finals = []
    for tag, flat in (("padded", False), ("flat", True)):
        cfg = load_config(GRPOConfig, None, extra={
            "model": {"path": str(ckpt), "dtype": "float32", "device": "cpu"},
            "data": {"root": str(tmp_path / "synth"), "prompts_per_step": 2, "num_workers": 0},
            "rollout": {"max_new_tokens": 8}, "algo": {"num_generations": 4},
            "optim": {"lr": 1e-3, "scheduler": "constant", "warmup_ratio": 0.0, "max_steps": 2},
            "perf": {"micro_batch_size": 3, "shared_prompt": flat, "packing": flat},
            "engine": {"max_batch": 8, "cuda_graphs": False}, "output": {"run_dir": str(tmp_path / tag)}})
        finals.append(read_state_dict(run_grpo(cfg, show_progress=False)))
    for k in finals[0]:
        assert torch.allclose(finals[0][k], finals[1][k], atol=1e-6, rtol=1e-5), k


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flat_layout_on_cuda_matches_padded_rows_and_sdpa(tiny_model, batch):
    from tlvr_cli.train.packed import varlen_attention_kernel

    model = tiny_model.to("cuda", torch.bfloat16)
    feats, ids, seq_prompt, comps, lengths, _ = batch
    args = (feats.to("cuda", torch.bfloat16), ids, seq_prompt, comps.cuda(), lengths.cuda(), list(range(8)))
    with torch.no_grad():
        want = sequence_logprobs(model, *args, chunk_size=100)
        got = sequence_logprobs(model, *args, chunk_size=100, shared_prompt=True, packing=True)
    assert torch.allclose(got, want, atol=5e-2, rtol=5e-2)  # bf16 rounding, two attention kernels
    if varlen_attention_kernel(torch.device("cuda"), torch.bfloat16) is not None:
        layout = PackedLayout([5, 4], [3, 0, 2], [0, 1, 1])
        x = torch.randn(layout.total, 128, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            a = packed_hidden(model.language_model.model, x, layout, varlen=True)
            b = packed_hidden(model.language_model.model, x, layout, varlen=False)
        assert torch.allclose(a.float(), b.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
                    reason="needs a CUDA GPU of compute capability 8.0 or newer")
def test_varlen_flash_attention_matches_sdpa_in_log_probs_and_every_gradient(tiny_model, batch):
    """PyTorch's own flash kernel (or flash-attn's) runs the flat layout's attention on such a GPU, prompts
    attended causally and completions bottom-right aligned after their prompt, as the SDPA path."""
    from tlvr_cli.train.packed import varlen_attention_kernel

    assert varlen_attention_kernel(torch.device("cuda"), torch.bfloat16) is not None
    model = tiny_model.to("cuda", torch.bfloat16).train()
    feats, ids, seq_prompt, comps, lengths, weights = batch
    args = (feats.to("cuda", torch.bfloat16), ids, seq_prompt, comps, lengths, [5, 0, 1, 2, 3, 4, 6, 7])
    w = weights.cuda()[args[-1]]
    out = []
    for varlen in (True, False):
        model.zero_grad(set_to_none=True)
        logp = sequence_logprobs(model, *args, chunk_size=100, shared_prompt=True, packing=True,
                                 varlen_attention=varlen)
        (logp * w).sum().backward()
        out.append((logp.detach(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}))
    (flash, flash_grads), (sdpa, sdpa_grads) = out
    assert torch.allclose(flash, sdpa, atol=5e-2, rtol=5e-2)
    assert flash_grads.keys() == sdpa_grads.keys()
    for name, g in sdpa_grads.items():
        assert float((flash_grads[name] - g).norm() / g.norm().clamp(min=1e-12)) < 5e-2, name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compile_layers", [False, True])
@pytest.mark.parametrize("shared_prompt,packing", FLAT)
def test_flat_log_prob_passes_never_wait_for_the_gpu(tiny_model, batch, shared_prompt, packing, compile_layers):
    """With completions and lengths on the host (as the GRPO step keeps them), a micro-batch's forward
    and backward, gradient checkpointing included, queue without one host-device synchronization."""
    model = tiny_model.to("cuda", torch.bfloat16).train()
    apply_tuning(model, TuneConfig(), gradient_checkpointing=True)
    feats, ids, seq_prompt, comps, lengths, weights = batch
    args = (feats.to("cuda", torch.bfloat16), ids, seq_prompt, comps, lengths, [5, 0, 1, 2, 3, 4, 6, 7])
    layout = {"shared_prompt": shared_prompt, "packing": packing, "compile_layers": compile_layers}
    w = weights.cuda()[args[-1]]
    (sequence_logprobs(model, *args, chunk_size=100, **layout) * w).sum().backward()  # warm-up: lazy inits
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        (sequence_logprobs(model, *args, chunk_size=100, **layout) * w).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
                    reason="needs a CUDA GPU of compute capability 8.0 or newer")
def test_packed_attention_kernels_equal_masked_float32_attention():
    """Both kernels of the flat layout, in bf16, against float32 attention over each query's visible keys
    (a prompt causally; a completion its whole prompt, then causally its own tokens), with O(1) inputs so
    a key seen or missed shows."""
    from tlvr_cli.train.packed import PackedAttention

    layout = PackedLayout([37, 20], [15, 0, 9, 30], [0, 1, 1, 0])
    heads, kv_heads, dim, scale = 8, 2, 64, 64 ** -0.5
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(layout.total, h, dim, device="cuda", generator=g) for h in (heads, kv_heads, kv_heads))
    want = torch.zeros(layout.total, heads, dim, device="cuda")
    for start, n, ranges in layout.sequences():
        keys = torch.cat([torch.arange(a, a + m) for a, m in ranges]).cuda()
        kk, vv = (t[keys].repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
        scores = torch.einsum("qhd,khd->hqk", q[start:start + n], kk) * scale
        last_seen = len(keys) - n + torch.arange(n, device="cuda")  # query t sees keys 0..last_seen[t]
        visible = torch.arange(len(keys), device="cuda")[None] <= last_seen[:, None]
        probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        want[start:start + n] = torch.einsum("hqk,khd->qhd", probs, vv)
    for varlen in (True, False):
        attend = PackedAttention(layout, torch.device("cuda"), varlen)
        got = attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), scale, 0.0).float().view_as(want)
        assert float((got - want).abs().max()) < 3e-2, f"varlen={varlen}"


def test_uncheckpointed_layers_are_the_last_ones(tiny_model):
    layers = tiny_model.language_model.model.layers
    for kept in (0, 1, len(layers), len(layers) + 5):
        apply_tuning(tiny_model, TuneConfig(), gradient_checkpointing=True, uncheckpointed_layers=kept)
        flags = [layer.gradient_checkpointing for layer in layers]
        n = min(kept, len(layers))
        assert flags == [True] * (len(layers) - n) + [False] * n


def test_a_token_budget_keeps_more_layers_for_short_micro_batches(tiny_model, batch, monkeypatch):
    # optim.uncheckpointed_tokens: the last N // T layers of a T-token micro-batch are not recomputed (and
    # never fewer than uncheckpointed_layers); the loss and every gradient are those of full recomputation
    from tlvr_cli.train import packed

    model = tiny_model.train()
    decoder = model.language_model.model
    n = len(decoder.layers)
    # as a job sets it, from its optim section
    apply_job_tuning(model, TuneConfig(), OptimConfig(uncheckpointed_layers=1, uncheckpointed_tokens=100))
    assert packed.checkpointed_layers(decoder, 1000) == [True] * (n - 1) + [False]  # 100 // 1000 = 0: the static 1
    assert packed.checkpointed_layers(decoder, 100) == [True] * (n - 1) + [False]
    assert packed.checkpointed_layers(decoder, 50) == [True] * (n - 2) + [False] * 2
    assert packed.checkpointed_layers(decoder, 1) == [False] * n
    with torch.no_grad():  # no backward, nothing recomputed
        assert packed.checkpointed_layers(decoder, 1000) == [False] * n
    model.eval()  # eval mode alike
    assert packed.checkpointed_layers(decoder, 1000) == [False] * n
    model.train()

    calls = []
    layer_fn = packed._decoder_layer
    monkeypatch.setattr(packed, "_decoder_layer", lambda *a: calls.append(1) or layer_fn(*a))
    layout = {"shared_prompt": True, "packing": True}
    rows = [5, 0, 1, 2, 3, 4, 6, 7]
    out = {}
    for tokens in (0, 10**9):
        apply_tuning(model, TuneConfig(), gradient_checkpointing=True, uncheckpointed_tokens=tokens)
        calls.clear()
        out[tokens] = _loss_and_grads(model, batch, rows, **layout)
        out[tokens] = (*out[tokens], len(calls))
    assert out[0][3] == 2 * n and out[10**9][3] == n  # every layer recomputed, then none
    (logp0, loss0, grads0, _), (logp, loss, grads, _) = out[0], out[10**9]
    assert _rel(logp, logp0) <= TOL and _rel(loss, loss0) <= TOL
    assert all(_rel(grads[k], grads0[k]) <= TOL for k in grads0)


def test_compiled_layers_match_eager_in_loss_and_every_gradient(tiny_model, batch, monkeypatch):
    # perf.compile_layers takes effect on GPU only; here it is let in on CPU to check its maths (fp32)
    from tlvr_cli.train import packed

    monkeypatch.setattr(packed, "COMPILE_DEVICES", ("cpu",))
    model = tiny_model.train()
    apply_tuning(model, TuneConfig(), gradient_checkpointing=True, uncheckpointed_layers=1)
    layout = {"shared_prompt": True, "packing": True}
    rows = [5, 0, 1, 2, 3, 4, 6, 7]
    logp0, loss0, grads0 = _loss_and_grads(model, batch, rows, **layout)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    logp, loss, grads = _loss_and_grads(model, batch, rows, compile_layers=True, **layout)
    assert counters["stats"]["unique_graphs"] >= 2  # both halves ran compiled
    assert _rel(logp, logp0) <= TOL and _rel(loss, loss0) <= TOL
    assert grads.keys() == grads0.keys()
    assert all(_rel(grads[n], grads0[n]) <= TOL for n in grads0)
    graphs = counters["stats"]["unique_graphs"]
    _loss_and_grads(model, batch, rows[:3], compile_layers=True, **layout)  # another token count ...
    assert counters["stats"]["unique_graphs"] == graphs  # ... runs the same dynamic graphs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_layers_match_eager_on_gpu_in_bf16(tiny_model, batch):
    model = tiny_model.to("cuda", torch.bfloat16).train()
    apply_tuning(model, TuneConfig(), gradient_checkpointing=True)
    feats, ids, seq_prompt, comps, lengths, weights = batch
    args = (feats.to("cuda", torch.bfloat16), ids, seq_prompt, comps, lengths)
    rows = [5, 0, 1, 2, 3, 4, 6, 7]
    w = weights.cuda()[rows]
    out = {}
    for compiled in (False, True):
        model.zero_grad(set_to_none=True)
        logp = sequence_logprobs(model, *args, rows, chunk_size=100, shared_prompt=True, packing=True,
                                 compile_layers=compiled)
        (logp * w).sum().backward()
        out[compiled] = logp.detach().float(), {n: p.grad.float() for n, p in model.named_parameters()
                                                if p.grad is not None}
    (logp0, grads0), (logp1, grads1) = out[False], out[True]
    assert float((logp1 - logp0).abs().max()) < 5e-2  # bf16: the fused kernels round once, eager after every op
    assert grads1.keys() == grads0.keys()
    for n in grads0:
        assert float((grads1[n] - grads0[n]).norm() / grads0[n].norm().clamp(min=1e-30)) < 5e-2, n
