"""The tiny Qwen2 config of the engine tests (a module, so tests and their conftest import the same one),
how two bf16 runs of the engine agree, and running a test module's checks in Triton's interpreter."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import Qwen2Config

HERE = Path(__file__).resolve().parent
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="needs Triton (pip install 'tlvr[triton]'; its interpreter runs on CPU)")


def tiny_config(**over) -> Qwen2Config:
    # a wide init so greedy outputs vary from token to token (the default 0.02 repeats one token)
    kw = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, initializer_range=0.3)
    return Qwen2Config(**{**kw, **over})


def agree(a: list[list[int]], b: list[list[int]]) -> None:
    """Two bf16 runs' greedy tokens agree as runs whose sums round in another order can: the first token
    (drawn from the prefill they share) in every row, whole rows but for at most one where two logits
    nearly tie."""
    assert all(x[0] == y[0] for x, y in zip(a, b))
    assert sum(x == y for x, y in zip(a, b)) >= len(a) - 1


def in_interpreter(code: str) -> None:
    """Run ``code`` (which imports the test modules here as it needs) in Triton's interpreter on CPU: in a
    process of its own, as the interpreter is chosen when Triton is imported; fails with its traceback."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(HERE), *sys.path])}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
