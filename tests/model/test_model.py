"""The model against spec §1: connector math and size, tower layer/patch selection, splice,
checkpoint layout and round trip, config parsing, template and label masking."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tlvr_cli.data.template import SYSTEM, build_prompt, build_sft_example, tokenize_with_image
from tlvr_cli.errors import TlvrError
from tlvr_cli.model.checkpoint import load_model, load_weights, read_state_dict, save_model
from tlvr_cli.model.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX, TinyLlavaConfig
from tlvr_cli.model.connector import PerceiverResampler, group_bounds, sinusoidal_encoding

QWEN25_3B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                 num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
                 rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151643)

# the visible part of the released R1 config.json (spec §1.6)
R1_CONFIG = {
    "_name_or_path": "Zhang199/TinyLLaVA-Video-Coldstart_NextQA_16",
    "architectures": ["TinyLlavaForConditionalGeneration"], "connector_type": "groupresampler", "group": 16,
    "hidden_size": 2048, "image_aspect_ratio": "square", "image_token_index": 32000, "ignore_index": -7,
    "llm_model_name_or_path": "Qwen/Qwen2.5-3B", "model_type": "tinyllava", "num_queries": 512,
    "num_resampler_layers": 3, "pad_token": "<|endoftext|>", "resampler_hidden_size": 768,
    "tokenizer_model_max_length": 3072, "tokenizer_name_or_path": "Qwen/Qwen2.5-3B", "tokenizer_padding_side": "right",
    "tokenizer_use_fast": False, "torch_dtype": "bfloat16",
    "vision_model_name_or_path": "google/siglip-so400m-patch14-384", "vision_feature_layer": -2,
    "vision_feature_select_strategy": "patch", "text_config": {**QWEN25_3B, "model_type": "qwen2"},
    "vision_config": {"model_type": "siglip_vision_model"},
}


# ---------------------------------------------------------------------------- connector


def naive_resampler(m: PerceiverResampler, x: torch.Tensor) -> torch.Tensor:
    """Spec §1.4 written out literally: one video, chunk by chunk, explicit attention with max-subtraction."""
    x = m.linear(x[0])
    outs = []
    for s, e in group_bounds(x.shape[0], m.groups):
        f = x[s:e]
        lat = m.latents
        for attn, ff in m.layers:
            fh, lh = attn.norm_media(f), attn.norm_latents(lat)
            q = attn.to_q(lh)
            kv = attn.to_kv(torch.cat([fh, lh]))
            k, v = kv[:, : kv.shape[1] // 2], kv[:, kv.shape[1] // 2:]
            h, d = attn.heads, attn.dim_head
            q, k, v = (t.view(-1, h, d).transpose(0, 1) for t in (q, k, v))
            sim = (q * d**-0.5) @ k.transpose(1, 2)
            sim = sim - sim.amax(-1, keepdim=True).detach()
            o = (sim.softmax(-1) @ v).transpose(0, 1).reshape(-1, h * d)
            lat = attn.to_out(o) + lat
            lat = ff(lat) + lat
        outs.append(m.norm(lat))
    out = torch.cat(outs)
    return (out + sinusoidal_encoding(out.shape[0], out.shape[1], torch.float32))[None]


def test_connector_parameter_count_matches_spec():
    m = PerceiverResampler(1152, 2048, 512, 16, 3, 8, 64)
    assert sum(p.numel() for p in m.parameters()) == 115_714_048
    names = {n for n, _ in m.named_parameters()}
    assert {"latents", "linear.weight", "linear.bias", "layers.0.0.to_kv.weight", "layers.2.1.3.weight",
            "norm.bias"} <= names
    assert m.layers[0][0].to_kv.weight.shape == (1024, 2048) and m.layers[0][1][1].weight.shape == (8192, 2048)


@pytest.mark.parametrize("frames", [16, 5])  # 5 frames: 16 unequal chunks not aligned with frames
def test_connector_matches_literal_spec(frames):
    torch.manual_seed(0)
    m = PerceiverResampler(24, 32, 64, 16, 2, 2, 8).double()
    x = torch.randn(1, frames * 7, 24, dtype=torch.float64)
    ours = m(x)
    assert ours.shape == (1, 64, 32)
    assert torch.allclose(ours, naive_resampler(m, x).double(), atol=1e-10)


def test_group_bounds_give_extra_tokens_to_the_first_chunks():
    assert group_bounds(35, 16)[:4] == [(0, 3), (3, 6), (6, 9), (9, 11)]
    assert group_bounds(16 * 728, 16)[1] == (728, 1456)


def test_position_encoding_is_rounded_through_fp16():
    pe = sinusoidal_encoding(512, 2048, torch.float32)
    assert pe[0, 0] == 0 and pe[0, 1] == 1
    i, p = 5, 300
    angle = p * math.exp(-2 * i * math.log(10000.0) / 2048)
    assert pe[p, 2 * i] == torch.tensor(math.sin(angle), dtype=torch.float16).float()
    assert pe[p, 2 * i + 1] == torch.tensor(math.cos(angle), dtype=torch.float16).float()


# ---------------------------------------------------------------------------- tower, splice


def test_tower_takes_layer_minus_two_and_drops_the_first_patch(tiny_model):
    tower = tiny_model.vision_tower
    x = torch.randn(3, 3, 32, 32)
    ours = tower(x)
    ref = tower.vision_model(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]
    assert ours.shape == (3, 15, 64) and torch.equal(ours, ref)
    # the residual stream runs laid out plainly (HF's patch embedding is a transposed view): the same
    # values, without a strided copy in every layer
    assert ours.stride()[-1] == 1


def test_splice_inserts_visual_tokens_and_masks_them(tiny_model):
    tok = tiny_model.tokenizer
    ids_a = tokenize_with_image(tok, build_prompt("<image>\nWhat color is the square?"))
    ids_b = tokenize_with_image(tok, build_prompt("no image here"))
    q, d = tiny_model.config.num_queries, tiny_model.config.hidden_size
    visual = torch.randn(2, q, d)
    labels = [list(ids_a), list(ids_b)]
    batch = tiny_model.embed_inputs([ids_a, ids_b], visual, [[t if t >= 0 else 7 for t in row] for row in labels])
    k = ids_a.index(IMAGE_TOKEN_INDEX)
    assert batch.lengths == [len(ids_a) - 1 + q, len(ids_b)]
    assert torch.equal(batch.inputs_embeds[0, k:k + q], visual[0])
    assert (batch.labels[0, k:k + q] == IGNORE_INDEX).all() and batch.labels[0, k + q] == ids_a[k + 1]
    emb = tiny_model.language_model.get_input_embeddings()
    assert torch.equal(batch.inputs_embeds[0, :k], emb(torch.tensor(ids_a[:k])))
    n = batch.lengths[1]
    assert (batch.inputs_embeds[1, n:] == 0).all() and batch.attention_mask[1, n:].sum() == 0
    assert (batch.labels[1, n:] == IGNORE_INDEX).all()
    assert batch.position_ids[1, :5].tolist() == [0, 1, 2, 3, 4]


def test_splice_truncates_to_model_max_length(tiny_model):
    tiny_model.config.tokenizer_model_max_length = 40
    batch = tiny_model.embed_inputs([[5] * 10 + [IMAGE_TOKEN_INDEX] + [6] * 10], torch.randn(1, 64, 128))
    assert batch.lengths == [40]


def test_forward_loss_is_mean_ce_over_supervised_tokens(tiny_model):
    tok = tiny_model.tokenizer
    ex = build_sft_example(tok, [{"from": "human", "value": "<image>\nWhat color?"},
                                 {"from": "gpt", "value": "<answer>A</answer>"}],
                           1024, tiny_model.config.num_queries)
    video = torch.randn(1, 16, 3, 32, 32)
    out = tiny_model([ex.input_ids], [ex.labels], video)
    batch = tiny_model.embed_inputs([ex.input_ids], tiny_model.encode_videos(video), [ex.labels])
    logits = tiny_model.language_model(inputs_embeds=batch.inputs_embeds).logits[0, :-1]
    target = batch.labels[0, 1:]
    keep = target != IGNORE_INDEX
    assert torch.allclose(out.loss, torch.nn.functional.cross_entropy(logits[keep], target[keep]), atol=1e-6)


# ---------------------------------------------------------------------------- config and checkpoints


def test_released_config_parses_offline_and_keeps_reference_quirks(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(R1_CONFIG))
    cfg = TinyLlavaConfig.from_json_file(tmp_path / "config.json")
    assert cfg.image_token_index == -200 and cfg.ignore_index == -100  # the file's values are ignored
    assert cfg.hidden_size == 2048 and cfg.vocab_size == 151936 and cfg.vision_hidden_size == 1152
    assert cfg.vision_config.image_size == 384 and cfg.vision_config.num_hidden_layers == 27  # SigLIP defaults
    assert (cfg.tokens_per_frame == 728 and cfg.extra["resampler_hidden_size"] if "resampler_hidden_size" in cfg.extra
            else True)
    again = TinyLlavaConfig.from_dict(json.loads(cfg.to_json_string()))
    assert again.to_dict() == cfg.to_dict()


def test_full_size_state_dict_keys_match_released_layout():
    from tlvr_cli.model.tinyllava import TinyLlava

    cfg = TinyLlavaConfig.from_dict(R1_CONFIG)
    with torch.device("meta"):
        model = TinyLlava(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["language_model.model.embed_tokens.weight"] == (151936, 2048)
    assert shapes["language_model.model.layers.35.self_attn.k_proj.weight"] == (256, 2048)
    assert shapes["language_model.model.layers.0.self_attn.q_proj.bias"] == (2048,)
    assert shapes["language_model.model.layers.0.mlp.down_proj.weight"] == (2048, 11008)
    assert shapes["vision_tower._vision_tower.vision_model.embeddings.patch_embedding.weight"] == (1152, 3, 14, 14)
    assert shapes["vision_tower._vision_tower.vision_model.embeddings.position_embedding.weight"] == (729, 1152)
    assert "vision_tower._vision_tower.vision_model.encoder.layers.26.mlp.fc2.bias" in shapes
    assert "vision_tower._vision_tower.vision_model.head.probe" in shapes
    assert shapes["connector._connector.latents"] == (32, 2048)
    assert shapes["connector._connector.layers.2.0.to_out.weight"] == (2048, 512)
    assert shapes["connector._connector.layers.1.1.0.weight"] == (2048,)
    conn = sum(v.numel() for k, v in model.state_dict().items() if k.startswith("connector."))
    assert conn == 115_714_048


def test_checkpoint_round_trip_and_tied_head(tmp_path, tiny_model):
    out = save_model(tiny_model, tmp_path / "ck")
    from safetensors.torch import load_file

    keys = set(load_file(str(out / "model.safetensors")))
    assert "language_model.lm_head.weight" not in keys and "connector._connector.latents" in keys
    assert json.loads((out / "config.json").read_text())["model_type"] == "tinyllava"
    loaded = load_model(str(out), dtype="float32", device="cpu").eval()
    for (k, a), b in zip(tiny_model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    assert loaded.language_model.lm_head.weight.data_ptr() == loaded.language_model.model.embed_tokens.weight.data_ptr()
    ids = [tokenize_with_image(tiny_model.tokenizer, build_prompt("<image>\nhello"))]
    video = torch.randn(1, 16, 3, 32, 32)
    assert torch.equal(tiny_model(ids, videos=video).logits, loaded(ids, videos=video).logits)
    assert loaded.tokenizer.eos_token_id == tiny_model.tokenizer.eos_token_id == loaded.tokenizer.pad_token_id


def test_a_loaded_model_equals_one_built_then_copied_into_buffers_included(tmp_path, tiny_model):
    # load_model builds the parameters on the meta device and assigns the weights read: the non-persistent
    # buffers (rotary tables, position ids) must still be built, and nothing may stay on meta
    out = save_model(tiny_model, tmp_path / "ck")
    loaded = load_model(str(out), dtype="float32", device="cpu")
    built = TinyLlavaConfig.from_json_file(out / "config.json")
    from tlvr_cli.model.tinyllava import TinyLlava

    copied = TinyLlava(built, tiny_model.tokenizer)
    load_weights(copied, read_state_dict(out), out)
    assert not [n for n, t in [*loaded.named_parameters(), *loaded.named_buffers()] if t.is_meta]
    for theirs, ours in ((copied.named_buffers(), loaded.named_buffers()), (copied.state_dict(), loaded.state_dict())):
        theirs, ours = dict(theirs), dict(ours)
        assert sorted(theirs) == sorted(ours)
        assert all(torch.equal(theirs[k], ours[k]) for k in ours)
    assert all(p.requires_grad for p in loaded.parameters())
    assert loaded.language_model.lm_head.weight is loaded.language_model.model.embed_tokens.weight
    assert {p.dtype for p in load_model(str(out), dtype="bfloat16", device="cpu").parameters()} == {torch.bfloat16}


def test_an_untied_checkpoint_without_lm_head_gets_its_own_copy_of_the_embedding(tmp_path, tiny_model):
    out = save_model(tiny_model, tmp_path / "ck")  # tied: lm_head is not written
    cfg = json.loads((out / "config.json").read_text())
    cfg["text_config"]["tie_word_embeddings"] = False
    (out / "config.json").write_text(json.dumps(cfg))
    lm = load_model(str(out), dtype="float32", device="cpu").language_model
    head, embed = lm.lm_head.weight, lm.model.embed_tokens.weight
    assert torch.equal(head, embed) and head.data_ptr() != embed.data_ptr()  # trained apart, as two parameters


def test_weights_read_ahead_are_the_ones_load_model_uses(tmp_path, tiny_model):
    from tlvr_cli.model.checkpoint import read_weights_ahead

    out = save_model(tiny_model, tmp_path / "ck")
    assert read_weights_ahead("tiny", device="cpu") is None
    pending = read_weights_ahead(str(out), dtype="float32", device="cpu")
    loaded = load_model(str(out), dtype="float32", device="cpu", weights=pending)
    assert all(torch.equal(a, b) for a, b in zip(tiny_model.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(RuntimeError, match="taken already"):  # handed over: only the model holds them now
        pending.take()
    other = read_weights_ahead(str(out), device="cpu")
    with pytest.raises(ValueError, match="bfloat16"):
        load_model(str(out), dtype="bfloat16", device="cpu", weights=other)
    other.take()  # the file is rewritten below: let the read end first
    (out / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    broken = read_weights_ahead(str(out), dtype="float32", device="cpu")  # returns at once; the error comes with
    with pytest.raises(TlvrError, match="model.safetensors: unreadable weights"):  # the weights
        load_model(str(out), dtype="float32", device="cpu", weights=broken)


def test_weights_that_do_not_match_give_one_clear_error(tmp_path, tiny_model):
    out = save_model(tiny_model, tmp_path / "ck")
    cfg = json.loads((out / "config.json").read_text())
    cfg["num_resampler_layers"] = 3
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(TlvrError, match="missing"):
        load_model(str(out), device="cpu")
    with pytest.raises(TlvrError, match="not found"):
        load_model(str(tmp_path / "nope"), device="cpu")
    with pytest.raises(TlvrError, match="model_type"):
        TinyLlavaConfig.from_dict({**R1_CONFIG, "model_type": "llava"})


def test_save_is_atomic_and_replaces(tmp_path, tiny_model):
    out = save_model(tiny_model, tmp_path / "ck")
    save_model(tiny_model, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    load_weights(tiny_model, read_state_dict(out), out)


# ---------------------------------------------------------------------------- template


def test_inference_prompt_is_the_reference_string():
    assert build_prompt("Why? <image>") == f"{SYSTEM} USER: <image>\nWhy? ASSISTANT:"
    assert build_prompt("<image>\nq", "a") == f"{SYSTEM} USER: <image>\nq ASSISTANT: a<|endoftext|>"


def test_tokenize_with_image_joins_pieces(tiny_tokenizer):
    ids = tokenize_with_image(tiny_tokenizer, "ab<image>cd")
    assert ids == tiny_tokenizer("ab").input_ids + [IMAGE_TOKEN_INDEX] + tiny_tokenizer("cd").input_ids


def test_labels_cover_answer_and_final_eos_only(tiny_tokenizer):
    conv = [{"from": "human", "value": "<image>\nWhat color is the square?"},
            {"from": "gpt", "value": "<think>It is red.</think>\n<answer>A</answer>"}]
    ex = build_sft_example(tiny_tokenizer, conv, 3072, 64)
    assert ex.ok and not ex.truncated
    sup = [t for t, label in zip(ex.input_ids, ex.labels) if label != IGNORE_INDEX]
    assert tiny_tokenizer.decode(sup) == " <think>It is red.</think>\n<answer>A</answer><|endoftext|>"
    assert ex.labels[-1] == tiny_tokenizer.eos_token_id


def test_multi_round_and_bad_records(tiny_tokenizer):
    conv = [{"from": "human", "value": "<image>\nq1"}, {"from": "gpt", "value": "a1"},
            {"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"}]
    ex = build_sft_example(tiny_tokenizer, conv, 3072)
    sup = tiny_tokenizer.decode([t for t, label in zip(ex.input_ids, ex.labels) if label != IGNORE_INDEX])
    assert ex.ok and sup == " a1<|endoftext|> a2<|endoftext|>"
    bad = build_sft_example(tiny_tokenizer,
                            [{"from": "human", "value": "q"}, {"from": "gpt", "value": "x ASSISTANT: y"}], 3072)
    assert not bad.ok and "label mask" in bad.reason
    odd = build_sft_example(tiny_tokenizer, [{"from": "human", "value": "q"}], 3072)
    assert not odd.ok


def test_truncation_is_flagged(tiny_tokenizer):
    conv = [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "word " * 200}]
    ex = build_sft_example(tiny_tokenizer, conv, 120, 64)
    assert ex.ok and ex.truncated and len(ex.input_ids) + 63 == 120
