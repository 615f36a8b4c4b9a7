"""The tokenizer files of a checkpoint in the released layout (spec §1.7).

The reference loads its tokenizer with ``use_fast=False`` (a slow ``Qwen2Tokenizer`` on
transformers 4.49), which reads ``vocab.json`` and ``merges.txt`` and the class named in
``tokenizer_config.json``; transformers 5 saves only ``tokenizer.json``. So the slow files are
derived here from the fast tokenizer's byte-level BPE model, and ``tokenizer_config.json`` gets
the 4.x keys. The slow class is chosen by the fast pipeline's pre-tokenisation, since that is the
one step the slow classes hard-code: the GPT-2 split for ``GPT2Tokenizer``, the Qwen2 split plus NFC
for ``Qwen2Tokenizer``; any other pipeline has no slow twin and is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import TlvrError

# the pre-tokenisation pattern of transformers' Qwen2Tokenizer (and of Qwen2.5's tokenizer.json)
QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
               r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
MERGES_HEADER = "#version: 0.2"


def slow_tokenizer_class(backend: dict[str, Any]) -> str:
    """The transformers 4.x slow class that tokenises like the fast pipeline ``backend`` (tokenizer.json)."""
    model, pre, norm = backend.get("model") or {}, backend.get("pre_tokenizer") or {}, backend.get("normalizer")
    plain_bpe = (model.get("type") == "BPE" and not model.get("dropout") and not model.get("byte_fallback")
                 and not model.get("continuing_subword_prefix") and not model.get("end_of_word_suffix")
                 and not model.get("ignore_merges"))
    if plain_bpe and norm is None and _is_byte_level(pre, use_regex=True):
        return "GPT2Tokenizer"
    steps = pre.get("pretokenizers") or []
    if (plain_bpe and norm == {"type": "NFC"} and pre.get("type") == "Sequence" and len(steps) == 2
            and steps[0].get("type") == "Split" and steps[0].get("pattern") == {"Regex": QWEN2_SPLIT}
            and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert")
            and _is_byte_level(steps[1], use_regex=False)):
        return "Qwen2Tokenizer"
    raise TlvrError("the tokenizer is not a GPT-2 or Qwen2 byte-level BPE: it has no slow (vocab.json/merges.txt) "
                    "form that transformers 4.x would tokenise identically")


def _is_byte_level(step: dict[str, Any], *, use_regex: bool) -> bool:
    return (step.get("type") == "ByteLevel" and not step.get("add_prefix_space")
            and step.get("use_regex", True) == use_regex)


def save_tokenizer(tok, out: Path) -> None:
    """Write ``tok`` (a fast tokenizer) as ``tokenizer.json`` plus ``vocab.json``, ``merges.txt`` and a
    ``tokenizer_config.json`` that transformers 4.x (slow or fast) and 5.x both load."""
    backend = json.loads(tok.backend_tokenizer.to_str())
    cls = slow_tokenizer_class(backend)
    backend["padding"] = backend["truncation"] = None  # state left by batched calls, not part of the tokenizer
    model = backend["model"]
    for k in ("continuing_subword_prefix", "end_of_word_suffix"):
        model[k] = model.get(k) or None  # 5.x's GPT2Tokenizer writes "" for none: same BPE, one spelling
    _write_json(out / "tokenizer.json", backend)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    if any(len(m.split(" ")) != 2 for m in merges):
        raise TlvrError("a BPE merge has a token containing a space: merges.txt cannot hold it")
    _write_json(out / "vocab.json", dict(sorted(model["vocab"].items())))
    (out / "merges.txt").write_text("\n".join([MERGES_HEADER, *merges]) + "\n", encoding="utf-8")
    _write_json(out / "tokenizer_config.json", tokenizer_config(tok, backend, cls))


def tokenizer_config(tok, backend: dict[str, Any], cls: str) -> dict[str, Any]:
    """tokenizer_config.json in transformers 4.49's names (5.x reads them too)."""
    added = {str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
             for t in sorted(backend.get("added_tokens", []), key=lambda t: t["id"])}
    named = ("bos_token", "eos_token", "unk_token", "pad_token")
    cfg: dict[str, Any] = {
        "tokenizer_class": cls,
        "backend": "tokenizers",  # 5.x: build from tokenizer.json
        "added_tokens_decoder": added,  # 4.x slow tokenizers take their added tokens (and ids) from here
        **{k: getattr(tok, k) for k in named},
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "split_special_tokens": False,
        "model_max_length": tok.model_max_length,
        "padding_side": tok.padding_side,
    }
    if cls == "GPT2Tokenizer":
        cfg["add_bos_token"] = False
    # 5.x saves these as a list under ``extra_special_tokens``, a key 4.49 reads as a dict of
    # named tokens (and fails on a list); ``additional_special_tokens`` is read by both
    extras = [t["content"] for t in added.values() if t["special"] and t["content"] not in {cfg[k] for k in named}]
    if extras:
        cfg["additional_special_tokens"] = extras
    if isinstance(getattr(tok, "chat_template", None), str):
        cfg["chat_template"] = tok.chat_template
    return dict(sorted(cfg.items()))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
