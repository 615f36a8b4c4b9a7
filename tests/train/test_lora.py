"""LoRA GRPO (tune.lora): the engine's merged copy against the unmerged peft model, the released layout
and peft's adapter format, what trains, the reference as the base, resume, and the errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from tlvr_cli.engine.generate import Engine
from tlvr_cli.engine.sampling import SamplingParams
from tlvr_cli.errors import TlvrError
from tlvr_cli.jobs import LoraTuneConfig, TuneConfig

peft = pytest.importorskip("peft")

LORA = LoraTuneConfig(enabled=True, rank=4)


def _adapted(model, seed: int = 1):
    """``model`` with adapters whose B is nonzero (fresh adapters are exact no-ops)."""
    from tlvr_cli.train.setup import apply_tuning

    apply_tuning(model, TuneConfig(lora=LORA), gradient_checkpointing=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def _prompts(model, lengths=(5, 9, 3)):
    g = torch.Generator().manual_seed(2)
    embed = model.language_model.get_input_embeddings()
    with torch.no_grad():
        return [embed(torch.randint(10, 400, (n,), generator=g).to(embed.weight.device)) for n in lengths]


def _hf_greedy(lm, prompt, n):
    """Greedy tokens of the unmerged peft model: HF's own decoding through peft's layers (eos made unreachable)."""
    out = lm.generate(inputs_embeds=prompt[None], attention_mask=torch.ones(1, prompt.shape[0], dtype=torch.long),
                      do_sample=False, max_new_tokens=n, eos_token_id=lm.config.vocab_size - 1, pad_token_id=0,
                      use_cache=True)
    return out[0].tolist()


def test_engine_decodes_the_merged_weights_like_the_unmerged_peft_model(tiny_model):
    from tlvr_cli.train.lora import MergedWeights, adapters_disabled, lora_layers

    model = _adapted(tiny_model)
    lm = model.language_model
    prompts = _prompts(model)
    base = {n: p.detach().clone() for n, p in lm.named_parameters() if "base_layer" in n}
    engine = Engine(lm, max_batch=2, max_seq_len=64, weights=MergedWeights(lm))
    want = [_hf_greedy(lm, p, 10) for p in prompts]
    with adapters_disabled(model):
        assert [_hf_greedy(lm, p, 10) for p in prompts] != want  # the adapters change these tokens
    assert [o.tokens for o in engine.generate(prompts, SamplingParams(0.0), 10, -1)] == want
    # the copy aliases every frozen weight and owns only the adapted projections, merged
    copy = engine._copy
    assert copy.model.embed_tokens.weight.data_ptr() == lm.model.embed_tokens.weight.data_ptr()
    layer = lora_layers(lm)["model.layers.0.mlp.up_proj"]
    assert copy.model.layers[0].mlp.up_proj.weight.data_ptr() != layer.base_layer.weight.data_ptr()
    merged = layer.base_layer.weight + layer.get_delta_weight("default")
    assert torch.allclose(copy.model.layers[0].mlp.up_proj.weight, merged)
    # an optimizer step on the adapters: the next call decodes the new merged weights; the base never changes
    with torch.no_grad():
        for n, p in lm.named_parameters():
            if "lora_A" in n:
                p.mul_(-2.0)
    moved = [_hf_greedy(lm, p, 10) for p in prompts]
    assert moved != want
    assert [o.tokens for o in engine.generate(prompts, SamplingParams(0.0), 10, -1)] == moved
    assert all(torch.equal(p, base[n]) for n, p in lm.named_parameters() if "base_layer" in n)


def test_fused_buffers_of_the_copy_hold_the_merged_projections(tiny_model):
    # the compiled GPU path decodes from concatenated q|k|v and gate|up weights: here they are the copy's
    from tlvr_cli.train.lora import MergedWeights, lora_layers, merged_weight

    model = _adapted(tiny_model)
    lm = model.language_model
    engine = Engine(lm, max_batch=2, max_seq_len=64, weights=MergedWeights(lm))
    layers = lora_layers(lm)

    def expected(i):
        def merged(name):
            return merged_weight(layers[f"model.layers.{i}.{name}"])

        a = lm.model.layers[i].self_attn
        return (torch.cat([merged("self_attn.q_proj"), merged("self_attn.k_proj"), merged("self_attn.v_proj")]),
                torch.cat([a.q_proj.base_layer.bias, a.k_proj.base_layer.bias, a.v_proj.base_layer.bias]),
                torch.cat([merged("mlp.gate_proj"), merged("mlp.up_proj")]))

    engine._sync_copy(torch.device("cpu"), torch.float32, fused=True)
    for i in range(2):
        assert all(torch.allclose(got, want) for got, want in zip(engine._fused[i], expected(i)))
    q = engine._copy.model.layers[0].self_attn.q_proj.weight
    assert q.untyped_storage().data_ptr() == engine._fused[0][0].untyped_storage().data_ptr()
    with torch.no_grad():
        for n, p in lm.named_parameters():
            if "lora_B" in n:
                p.add_(0.1)
    engine._sync_copy(torch.device("cpu"), torch.float32, fused=True)
    assert all(torch.allclose(got, want) for got, want in zip(engine._fused[1], expected(1)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_merged_copy_with_graphs_and_compile_matches_eager_on_gpu(tiny_model):
    from tlvr_cli.train.lora import MergedWeights

    model = _adapted(tiny_model.cuda())  # fp32, as the engine's own GPU test
    lm = model.language_model
    prompts = _prompts(model)
    eager = Engine(lm, max_batch=4, max_seq_len=64, weights=MergedWeights(lm))
    eager = eager.generate(prompts, SamplingParams(0.0), 10, -1)
    fast = Engine(lm, max_batch=4, max_seq_len=64, cuda_graphs=True, compile=True, weights=MergedWeights(lm))
    for _ in range(2):  # the second call replays the graphs captured by the first
        assert [o.tokens for o in fast.generate(prompts, SamplingParams(0.0), 10, -1)] == [o.tokens for o in eager]


def test_released_layout_and_peft_adapter_format(tiny_model, tmp_path):
    from tlvr_cli.model.checkpoint import load_model, save_model
    from tlvr_cli.model.tiny import build_tiny_model
    from tlvr_cli.train.lora import released_state, save_adapter

    plain_keys = set(build_tiny_model().state_dict())
    model = _adapted(tiny_model)
    ids = torch.randint(10, 400, (1, 12))
    with torch.no_grad():
        want = model.language_model(input_ids=ids).logits
    sd = released_state(model)
    assert set(sd) == plain_keys
    out = save_model(model, tmp_path / "merged", state=sd)
    save_adapter(model, out / "adapter")
    assert not (out / "adapter_config.json").exists()  # transformers would load the base model instead
    merged = load_model(str(out), device="cpu")
    with torch.no_grad():
        assert torch.allclose(merged.language_model(input_ids=ids).logits, want, atol=1e-5)
    # peft's own loader rebuilds the adapted LLM from the base LLM and adapter/
    base_lm = build_tiny_model().language_model.eval()
    loaded = peft.PeftModel.from_pretrained(base_lm, str(out / "adapter")).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, want, atol=1e-6)


def test_grpo_steps_train_only_adapters_and_connector_and_the_reference_is_the_base(tiny_model):
    from tlvr_cli.config import load_config
    from tlvr_cli.data.records import GRPORow
    from tlvr_cli.jobs import GRPOConfig
    from tlvr_cli.model.tiny import build_tiny_model
    from tlvr_cli.runtime import init_distributed
    from tlvr_cli.train.grpo_step import GRPOStep
    from tlvr_cli.train.lora import BaseReference, MergedWeights, reference_mode
    from tlvr_cli.train.optim import build_optimizer, build_scheduler
    from tlvr_cli.train.parallel import Parallel
    from tlvr_cli.train.policy import PolicyLogprobs, sequence_logprobs
    from tlvr_cli.train.rollout import PromptBatch, prompt_ids
    from tlvr_cli.train.setup import apply_tuning

    cfg = load_config(GRPOConfig, None, extra={
        "model": {"device": "cpu", "dtype": "float32"}, "rollout": {"max_new_tokens": 6},
        "optim": {"lr": 1e-2, "scheduler": "constant", "warmup_ratio": 0.0},
        "tune": {"lora": {"enabled": True, "rank": 4}},
        "perf": {"micro_batch_size": 3}, "engine": {"max_batch": 8, "cuda_graphs": False},
        "algo": {"num_generations": 4, "advantage_noise_std": 0.5}})  # noise: advantages that do not vanish
    model = tiny_model
    apply_tuning(model, cfg.tune, gradient_checkpointing=False)
    ref = BaseReference(model)
    par = Parallel(PolicyLogprobs(model), model, init_distributed("cpu"), "none", prefix="model.")
    opt = build_optimizer(model, cfg.optim, cfg.tune)
    step = GRPOStep(cfg, model, ref, par, opt, build_scheduler(opt, cfg.optim, 10),
                    Engine(model.language_model, max_batch=8, max_seq_len=256,
                           weights=MergedWeights(model.language_model)))
    rows = [GRPORow(index=i, problem=f"What colour? {i}\nA. red\nB. blue", solution="<answer>A</answer>",
                    video_filename="v.mp4", video_path=Path(f"/v{i}.mp4"), extra={}) for i in range(2)]
    g = torch.Generator().manual_seed(0)
    batch = PromptBatch(rows, [prompt_ids(model.tokenizer, r, cfg.data.question_template) for r in rows],
                        [torch.rand(2, 3, 32, 32, generator=g) * 2 - 1 for _ in rows])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for i in range(2):
        out = step(batch, i)
    assert out.metrics["kl"] > 0
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".lora_" in k or k.startswith("connector.") for k in changed)
    assert any(k.startswith("connector.") for k in changed) and any("lora_B" in k for k in changed)
    # the reference (adapters off, start connector) computes exactly the start model's log-probs
    start = build_tiny_model(seed=0).eval()
    feats = start.tower_features(torch.stack([p.float() for p in batch.pixels]))
    completions = torch.randint(10, 400, (8, 6), generator=g)
    args = (feats, batch.input_ids, [i // 4 for i in range(8)], completions, torch.full((8,), 6))
    with torch.no_grad():
        want = sequence_logprobs(start, *args, list(range(8)), chunk_size=64)
        with reference_mode(ref):
            got = sequence_logprobs(ref, *args, list(range(8)), chunk_size=64)
        policy = sequence_logprobs(model, *args, list(range(8)), chunk_size=64)
    assert torch.equal(got, want)
    assert not torch.allclose(policy, want)
    assert all(p.requires_grad for n, p in model.named_parameters() if ".lora_" in n)  # switched back on


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lora_grpo_run_writes_both_formats_and_resumes_exactly(tmp_path, dtype):
    from train_runs import grpo_cfg, same_weights

    from tlvr_cli.jobs import SynthConfig
    from tlvr_cli.model.checkpoint import load_model, save_model
    from tlvr_cli.model.tiny import build_tiny_model
    from tlvr_cli.synth import write_synthetic_dataset
    from tlvr_cli.train.grpo import run_grpo

    root = tmp_path / "synth"
    write_synthetic_dataset(SynthConfig(root=str(root), train=8, eval=2, coldstart=2, size=32, seed=0))
    ckpt = save_model(build_tiny_model(), tmp_path / "tiny")
    extra = {"tune": {"lora": {"enabled": True, "rank": 4, "connector_lr": 1e-3}}, "model": {"dtype": dtype},
             "rollout": {"max_new_tokens": 6}}

    def run(name, steps, resume=None):
        cfg = grpo_cfg(root, tmp_path / name, ckpt, optim={"max_steps": steps, "lr": 1e-2}, **extra)
        return run_grpo(cfg, resume=resume, show_progress=False)

    full = run("a", 3)
    assert {p.name for p in (full / "adapter").iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    assert load_model(str(full), device="cpu") is not None  # the merged model loads as any checkpoint
    run("b", 1)
    resumed = run("b", 3, resume="auto")
    same_weights(full, resumed)
    from safetensors.torch import load_file

    a, b = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (full, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [[json.loads(line)["kl"] for line in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
            for n in "ab"]
    assert rows[0] == rows[1] and rows[0][-1] > 0


def test_errors_are_one_line(tiny_model, tmp_path, monkeypatch):
    from tlvr_cli.train import run_dir
    from tlvr_cli.train.setup import apply_tuning

    with pytest.raises(TlvrError, match="target_modules"):
        apply_tuning(tiny_model, TuneConfig(lora=LoraTuneConfig(enabled=True, target_modules=["nothing_proj"])),
                     gradient_checkpointing=False)
    monkeypatch.setitem(sys.modules, "peft", None)  # as if not installed
    with pytest.raises(TlvrError, match=r"pip install 'tlvr\[lora\]'"):
        apply_tuning(tiny_model, TuneConfig(lora=LORA), gradient_checkpointing=False)
    # a LoRA checkpoint is not resumed as a full fine-tuning run
    (tmp_path / "adapter").mkdir()
    (tmp_path / run_dir.STATE_FILE).write_text('{"optimizer": {}}')
    from safetensors.torch import save_file

    save_file({}, str(tmp_path / run_dir.TENSORS_FILE))
    with pytest.raises(TlvrError, match="tune.lora"):
        run_dir.load_checkpoint(tmp_path, type("P", (), {"model": tiny_model})(), None, None)
