"""Checkpoint files as the reference reads them (transformers 4.49, spec §1.6-1.7): config.json in
the 4.x names, slow-tokenizer files that tokenise like the fast tokenizer, generation settings,
byte-identical re-saves, and older tlvr (5.x-only) configs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import unicodedata
from itertools import pairwise
from pathlib import Path

import pytest
import regex
import torch

from tlvr_cli.errors import TlvrError
from tlvr_cli.model.checkpoint import frame_size, generation_from_sampling, load_model, load_tokenizer, save_model
from tlvr_cli.model.config import TinyLlavaConfig
from tlvr_cli.model.tokenizer_files import QWEN2_SPLIT, slow_tokenizer_class

# Qwen2.5-3B's text config (spec §1.1), with its released unused 32k sliding window
QWEN25_3B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                 num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
                 rms_norm_eps=1e-6, max_window_layers=36, sliding_window=32768, use_sliding_window=False,
                 tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151643, model_type="qwen2")
R1_LIKE = {"model_type": "tinyllava", "llm_model_name_or_path": "Qwen/Qwen2.5-3B",
           "vision_model_name_or_path": "google/siglip-so400m-patch14-384", "connector_type": "groupresampler",
           "num_queries": 512, "num_resampler_layers": 3, "torch_dtype": "bfloat16", "text_config": QWEN25_3B,
           "vision_config": {"model_type": "siglip_vision_model"}}

# transformers 4.49 constructor arguments (read off its signatures), plus the PretrainedConfig
# fields the model depends on
QWEN2_449 = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
             "use_cache", "tie_word_embeddings", "rope_theta", "rope_scaling", "use_sliding_window", "sliding_window",
             "max_window_layers", "attention_dropout", "torch_dtype", "bos_token_id", "eos_token_id"]
SIGLIP_449 = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
              "image_size", "patch_size", "hidden_act", "layer_norm_eps", "attention_dropout", "torch_dtype"]

# the reference's TinyLlavaConfig.__init__ arguments (configuration_tinyllava.py, spec §1.6) and the
# JSON types its saved files hold (tokenizer_name_or_path falls back to the LLM path, so a string)
STR, INT, NONE, BOOL, DICT = str, int, type(None), bool, dict
REFERENCE_FIELDS = {
    "llm_model_name_or_path": STR, "tokenizer_name_or_path": STR, "vision_model_name_or_path": STR,
    "vision_model_name_or_path2": STR, "connector_type": STR, "text_config": DICT, "hidden_size": INT,
    "vocab_size": INT, "ignore_index": INT, "image_token_index": INT, "pad_token": (STR, NONE),
    "pad_token_id": (INT, NONE), "tokenizer_padding_side": STR, "tokenizer_model_max_length": INT,
    "vision_config": DICT, "vision_hidden_size": INT, "vision_feature_layer": INT,
    "vision_feature_select_strategy": STR, "image_aspect_ratio": STR, "resampler_hidden_size": (INT, NONE),
    "num_queries": INT, "num_resampler_layers": INT, "use_cache": BOOL, "cache_dir": (STR, NONE),
    "tokenizer_use_fast": BOOL, "tune_type_llm": STR, "tune_type_connector": STR, "tune_type_vision_tower": STR,
    "tune_vision_tower_from_layer": INT,
}

STRINGS = ["Hello world", "The answer is 42.\n\nIt's 3,141 or 2 apples", "I'M HERE  and   there\t tabs",
           "caf\u00e9 cafe\u0301 \u4f60\u597d \U0001F600", "a<|endoftext|>b <|endoftext|> ",
           "<|im_start|>user\nhi<|im_end|>", "<think>reasoning</think> <answer>B</answer>", "\n\n\n  x\r\ny",
           "don't DON'T we'll 12345 1.5e-3"]


def saved_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


# ---------------------------------------------------------------------------- config.json


@pytest.mark.parametrize("which", ["tiny", "qwen2.5-3b"])
def test_saved_config_read_the_4x_way_gives_the_rope_base(tmp_path, tiny_model, which):
    if which == "tiny":
        cfg, text = saved_config(save_model(tiny_model, tmp_path / "ck")), tiny_model.config.text_config
        assert cfg["torch_dtype"] == cfg["text_config"]["torch_dtype"] == "float32"
    else:
        config = TinyLlavaConfig.from_dict(R1_LIKE)
        cfg, text = json.loads(config.to_json_string()), config.text_config
    t = cfg["text_config"]
    assert t["rope_theta"] == text.rope_parameters["rope_theta"] == 1e6  # 4.x reads this key alone
    assert t["rope_scaling"] is None and t["rope_parameters"]["rope_theta"] == 1e6
    # 4.49 applies a set sliding_window even with use_sliding_window false: the unused one is null
    assert t["sliding_window"] is None and t["use_sliding_window"] is False
    for k in QWEN2_449:
        if k not in ("rope_theta", "rope_scaling", "torch_dtype"):
            assert t[k] == getattr(text, k), k
    v = cfg["vision_config"]
    assert set(SIGLIP_449) <= set(v) and v["model_name_or_path"] == cfg["vision_model_name_or_path"]
    if which == "qwen2.5-3b":
        assert (t["num_hidden_layers"], t["max_window_layers"], t["torch_dtype"]) == (36, 36, "bfloat16")
        assert (v["hidden_size"], v["num_hidden_layers"], v["image_size"]) == (1152, 27, 384)


def test_rope_scaling_is_written_in_the_4x_form_and_read_back():
    config = TinyLlavaConfig.from_dict(
        {**R1_LIKE, "text_config": {**QWEN25_3B, "rope_scaling": {"type": "linear", "factor": 2.0}}})
    t = json.loads(config.to_json_string())["text_config"]
    assert t["rope_scaling"]["rope_type"] == "linear" and t["rope_scaling"]["factor"] == 2.0 and t["rope_theta"] == 1e6
    again = TinyLlavaConfig.from_dict(json.loads(config.to_json_string())).text_config.rope_parameters
    assert again == config.text_config.rope_parameters


@pytest.mark.parametrize("which", ["tiny", "qwen2.5-3b"])
def test_every_reference_config_field_is_written_with_its_json_type(tmp_path, tiny_model, which):
    cfg = (saved_config(save_model(tiny_model, tmp_path / "ck")) if which == "tiny"
           else json.loads(TinyLlavaConfig.from_dict(R1_LIKE).to_json_string()))
    wrong = {k: type(cfg.get(k, KeyError)).__name__ for k, t in REFERENCE_FIELDS.items()
             if k not in cfg or not isinstance(cfg[k], t)}
    assert not wrong
    assert (cfg["ignore_index"], cfg["image_token_index"], cfg["model_type"]) == (-100, -200, "tinyllava")
    assert (cfg["hidden_size"] == cfg["text_config"]["hidden_size"]
            and cfg["vision_hidden_size"] == cfg["vision_config"]["hidden_size"])
    assert cfg["tokenizer_name_or_path"] == (cfg["llm_model_name_or_path"] if which != "tiny" else "tiny")
    if which == "tiny":
        assert cfg["use_cache"] is True  # as the reference's save


def test_older_5x_only_and_released_4x_only_configs_load_with_the_right_rope_base(tmp_path, tiny_model):
    out = save_model(tiny_model, tmp_path / "ck")
    cfg = saved_config(out)
    old = json.loads(json.dumps(cfg))
    for k in ("rope_theta", "rope_scaling", "torch_dtype"):
        old["text_config"].pop(k)
    released = json.loads(json.dumps(cfg))
    released["text_config"].pop("rope_parameters")
    for form in (old, released):
        (out / "config.json").write_text(json.dumps(form))
        loaded = load_model(str(out), dtype="float32", device="cpu").eval()
        assert loaded.config.text_config.rope_parameters["rope_theta"] == 1e6
        ids = torch.tensor([[5, 17, 80, 3, 9]])
        assert torch.equal(loaded.language_model(input_ids=ids).logits, tiny_model.language_model(input_ids=ids).logits)
    clash = json.loads(json.dumps(cfg))
    clash["text_config"]["rope_theta"] = 10000.0
    with pytest.raises(TlvrError, match="rope_theta 10000.0 disagrees"):
        TinyLlavaConfig.from_dict(clash)


def test_frame_size_reads_the_saved_field_or_the_configs_default(tmp_path, tiny_model):
    ckpt = save_model(tiny_model, tmp_path / "tiny")
    assert frame_size(str(ckpt)) == tiny_model.config.vision_config.image_size == frame_size("tiny")
    released = tmp_path / "released"
    released.mkdir()
    (released / "config.json").write_text(json.dumps(R1_LIKE))  # no image_size: so400m's 384
    parsed = TinyLlavaConfig.from_json_file(released / "config.json")
    assert frame_size(str(released)) == parsed.vision_config.image_size == 384
    (released / "config.json").write_text(json.dumps({**R1_LIKE, "vision_config": {"image_size": 224}}))
    assert frame_size(str(released)) == 224


# ---------------------------------------------------------------------------- generation_config.json and re-saves


def test_generation_config_is_released_by_default_and_records_sampling(tmp_path, tiny_model):
    eos = tiny_model.config.text_config.eos_token_id
    out = save_model(tiny_model, tmp_path / "plain")
    assert (json.loads((out / "generation_config.json").read_text())
            == {"bos_token_id": eos, "eos_token_id": eos, "use_cache": False})
    sampling = generation_from_sampling(temperature=1.0, top_k=50, top_p=1.0, max_new_tokens=1024)
    out = save_model(tiny_model, tmp_path / "grpo", generation=sampling)
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen == {"bos_token_id": eos, "eos_token_id": eos, "use_cache": False, "do_sample": True, "temperature": 1.0,
                   "top_k": 50, "top_p": 1.0, "max_new_tokens": 1024}
    assert generation_from_sampling(0.0, 50, 1.0, 64) == {"do_sample": False, "max_new_tokens": 64}
    with pytest.raises(TlvrError, match="'temprature' is not recorded"):
        save_model(tiny_model, tmp_path / "bad", generation={"temprature": 0.7})
    with pytest.raises(TlvrError, match="top_k=True: expected a int"):
        save_model(tiny_model, tmp_path / "bad", generation={"top_k": True})
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.tmp").exists()
    (out / "generation_config.json").write_text("{")
    with pytest.raises(TlvrError, match="generation_config.json: line 1: malformed JSON"):
        load_model(str(out), device="cpu")


def test_a_loaded_checkpoint_saves_back_byte_identical(tmp_path, tiny_model):
    first = save_model(tiny_model, tmp_path / "a", generation=generation_from_sampling(0.7, 20, 0.9, 256))
    second = save_model(load_model(str(first), dtype="float32", device="cpu"), tmp_path / "b")
    names = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
             "merges.txt"]
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_a_model_whose_weights_the_engine_fused_saves_the_same_weights(tmp_path):
    # the engine moves q/k/v and gate/up into one buffer per part (views of one storage): the saved
    # file holds each tensor on its own, with the values a plain model saves
    from safetensors.torch import load_file

    from tlvr_cli.engine.weights import fuse_layer
    from tlvr_cli.model.tiny import build_tiny_model

    plain, fused = build_tiny_model(seed=0), build_tiny_model(seed=0)
    for layer in fused.language_model.model.layers:
        fuse_layer(layer)
    a = load_file(save_model(plain, tmp_path / "a") / "model.safetensors")
    b = load_file(save_model(fused, tmp_path / "b") / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    reloaded = load_model(str(tmp_path / "b"), dtype="float32", device="cpu")
    assert torch.equal(reloaded.language_model.model.layers[0].mlp.up_proj.weight,
                       plain.language_model.model.layers[0].mlp.up_proj.weight)


# ---------------------------------------------------------------------------- tokenizer files


GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of the 256 bytes onto printable characters."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


class SlowBPE:
    """What transformers 4.x's slow GPT2Tokenizer / Qwen2Tokenizer do with vocab.json + merges.txt
    + tokenizer_config.json: split out added tokens, (Qwen2: NFC), regex pre-split, byte map, BPE."""

    def __init__(self, d: Path, cls: str | None = None) -> None:
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        self.cls = cls or cfg["tokenizer_class"]
        assert self.cls in ("GPT2Tokenizer", "Qwen2Tokenizer")
        self.vocab = json.loads((d / "vocab.json").read_text())
        lines = (d / "merges.txt").read_text().split("\n")
        assert lines[0].startswith("#version")
        self.ranks = {tuple(line.split(" ")): i for i, line in enumerate(x for x in lines[1:] if x)}
        self.added = {t["content"]: int(i) for i, t in cfg["added_tokens_decoder"].items()}
        self.specials = regex.compile(
            "(" + "|".join(regex.escape(t) for t in sorted(self.added, key=len, reverse=True)) + ")")
        self.split = regex.compile(QWEN2_SPLIT if self.cls == "Qwen2Tokenizer" else GPT2_SPLIT)
        self.bytes = byte_to_unicode()

    def bpe(self, word: str) -> list[str]:
        parts = list(word)
        while len(parts) > 1:
            rank, first, second = min((self.ranks.get(p, math.inf), *p) for p in pairwise(parts))
            if rank == math.inf:
                break
            merged, i = [], 0
            while i < len(parts):  # every occurrence of the best pair, left to right
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == (first, second):
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece in self.specials.split(text):
            if piece in self.added:
                ids.append(self.added[piece])
                continue
            if self.cls == "Qwen2Tokenizer":
                piece = unicodedata.normalize("NFC", piece)
            for word in self.split.findall(piece):
                ids += [self.vocab[t] for t in self.bpe("".join(self.bytes[b] for b in word.encode()))]
        return ids


def qwen2_style_tokenizer(tiny_tokenizer):
    """A Qwen2.5-shaped tokenizer (Qwen2 split + NFC, specials after the BPE vocab) on the tiny merges."""
    from transformers import Qwen2Tokenizer

    model = json.loads(tiny_tokenizer.backend_tokenizer.to_str())["model"]
    vocab = {t: i - 1 for t, i in model["vocab"].items() if i > 0}  # id 0 is <|endoftext|>
    tok = Qwen2Tokenizer(vocab=vocab, merges=[tuple(m) for m in model["merges"]])
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tok


def model_with(tokenizer):
    from tlvr_cli.model.tiny import tiny_config
    from tlvr_cli.model.tinyllava import TinyLlava

    torch.manual_seed(0)
    return TinyLlava(tiny_config(len(tokenizer)), tokenizer)


@pytest.mark.parametrize("kind", ["tiny", "qwen2"])
def test_saved_slow_tokenizer_files_tokenise_like_the_fast_tokenizer(tmp_path, tiny_tokenizer, kind):
    fast = tiny_tokenizer if kind == "tiny" else qwen2_style_tokenizer(tiny_tokenizer)
    out = save_model(model_with(fast), tmp_path / "ck")
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == {"tiny": "GPT2Tokenizer", "qwen2": "Qwen2Tokenizer"}[kind]
    assert cfg["eos_token"] == cfg["pad_token"] == "<|endoftext|>" and cfg["bos_token"] is None
    assert "extra_special_tokens" not in cfg  # a list there breaks 4.49's loader
    if kind == "qwen2":
        assert cfg["additional_special_tokens"] == ["<|im_start|>", "<|im_end|>"]
        assert {i: t["content"] for i, t in cfg["added_tokens_decoder"].items()} == {
            "674": "<|endoftext|>", "675": "<|im_start|>", "676": "<|im_end|>"}
    expected = [fast(s, add_special_tokens=False)["input_ids"] for s in STRINGS]
    assert [SlowBPE(out).encode(s) for s in STRINGS] == expected
    other = "Qwen2Tokenizer" if kind == "tiny" else "GPT2Tokenizer"
    assert [SlowBPE(out, other).encode(s) for s in STRINGS] != expected  # the strings tell the two splits apart
    reloaded = load_tokenizer(out)
    assert [reloaded(s, add_special_tokens=False)["input_ids"] for s in STRINGS] == expected
    assert [reloaded.decode(ids) for ids in expected] == [fast.decode(ids) for ids in expected]


def test_a_tokenizer_without_a_slow_twin_is_refused(tiny_tokenizer):
    backend = json.loads(tiny_tokenizer.backend_tokenizer.to_str())
    assert slow_tokenizer_class(backend) == "GPT2Tokenizer"
    with pytest.raises(TlvrError, match="no slow"):
        slow_tokenizer_class({**backend, "normalizer": {"type": "Lowercase"}})
    with pytest.raises(TlvrError, match="no slow"):
        slow_tokenizer_class({**backend, "model": {**backend["model"], "byte_fallback": True}})


# ---------------------------------------------------------------------------- transformers 4.x itself (opt-in)

TF4_SCRIPT = r"""
import json, sys, torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
ck, strings, ids = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
text = Qwen2Config.from_dict(json.load(open(ck + "/config.json"))["text_config"])
slow = AutoTokenizer.from_pretrained(ck, use_fast=False)
lm = Qwen2ForCausalLM(text).eval()
lm.load_state_dict({k[15:]: v for k, v in load_file(ck + "/model.safetensors").items()
                    if k.startswith("language_model.")}, strict=False)
lm.tie_weights()
with torch.no_grad():
    logits = lm(input_ids=torch.tensor([ids])).logits[0].tolist()
print(json.dumps({"rope_theta": text.rope_theta, "cls": type(slow).__name__, "logits": logits,
                  "ids": [slow(s, add_special_tokens=False)["input_ids"] for s in strings]}))
"""


@pytest.mark.skipif(not os.environ.get("TLVR_TRANSFORMERS4"),
                    reason="set TLVR_TRANSFORMERS4 to a site dir holding transformers 4.x")
def test_transformers_4x_reads_the_checkpoint_like_tlvr(tmp_path, tiny_model):
    out = save_model(tiny_model, tmp_path / "ck")
    ids = tiny_model.tokenizer("The answer is 42. It's B", add_special_tokens=False)["input_ids"]
    env = {**os.environ, "PYTHONPATH": os.environ["TLVR_TRANSFORMERS4"]}
    run = subprocess.run([sys.executable, "-c", TF4_SCRIPT, str(out), json.dumps(STRINGS), json.dumps(ids)], env=env,
                         capture_output=True, text=True, check=True)
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["rope_theta"] == 1e6 and got["cls"] == "GPT2Tokenizer"
    assert got["ids"] == [tiny_model.tokenizer(s, add_special_tokens=False)["input_ids"] for s in STRINGS]
    with torch.no_grad():
        ours = tiny_model.language_model(input_ids=torch.tensor([ids])).logits[0]
    assert torch.allclose(torch.tensor(got["logits"]), ours, atol=1e-5)
