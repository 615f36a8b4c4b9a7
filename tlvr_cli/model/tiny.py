"""The embedded tiny model: the real architecture at toy widths, with a shipped byte-level BPE
tokenizer, so every code path runs on a CPU in seconds (tests, the demo)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast

from ..data.template import EOS
from .config import TinyLlavaConfig

TOKENIZER_FILE = Path(__file__).with_name("tiny_tokenizer") / "tokenizer.json"


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """The shipped BPE tokenizer with Qwen2.5-base conventions: eos == pad == ``<|endoftext|>``, no bos."""
    tok = PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER_FILE), eos_token=EOS, pad_token=EOS, unk_token=EOS,
                                  padding_side="right", model_max_length=1024)
    return tok


def tiny_config(vocab_size: int) -> TinyLlavaConfig:
    eos = 0  # <|endoftext|> is the first special token of the shipped tokenizer
    text = dict(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, rope_theta=1e6,
                rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=eos, eos_token_id=eos,
                initializer_range=0.02, use_cache=False)
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  image_size=32, patch_size=8)
    return TinyLlavaConfig(
        llm_model_name_or_path="tiny", tokenizer_name_or_path="tiny", vision_model_name_or_path="tiny-siglip",
        connector_type="groupresampler", pad_token=EOS, tokenizer_model_max_length=1024, num_queries=64, group=16,
        num_resampler_layers=2, resampler_heads=2, resampler_head_dim=32, text_config=text, vision_config=vision,
    )


def init_weights(model: torch.nn.Module, std: float) -> None:
    """The reference's from-config init (spec §1.4): Linear/Conv/Embedding ~ N(0, std), zero bias;
    LayerNorms at 1/0; the resampler latents keep their N(0, 1) init."""
    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            torch.nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)
        elif isinstance(m, torch.nn.Embedding):
            torch.nn.init.normal_(m.weight, std=std)


def build_tiny_model(seed: int = 0):
    """A randomly initialised tiny TinyLLaVA (deterministic for a seed), fp32 on CPU."""
    from .tinyllava import TinyLlava

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    model = TinyLlava(tiny_config(len(tok)), tok)
    init_weights(model, model.config.text_config.initializer_range)
    model.language_model.tie_weights()
    return model
