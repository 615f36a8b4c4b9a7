"""Fixtures shared by the engine tests: one CPU thread, a tiny Qwen2 and prompt embeddings of the
lengths a test module names in ``LENGTHS``."""

from __future__ import annotations

import pytest
import torch
from tiny_qwen import tiny_config
from transformers import Qwen2ForCausalLM

LENGTHS = (5, 11, 3, 17, 8)  # prompt lengths of a module that names none


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Every engine test runs on one CPU thread (``one_thread``, tests/conftest.py)."""


@pytest.fixture(scope="module")
def lm() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    return Qwen2ForCausalLM(tiny_config()).eval()


@pytest.fixture(scope="module")
def prompts(lm, request) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        return [lm.get_input_embeddings()(torch.randint(0, 300, (n,), generator=gen))
                for n in getattr(request.module, "LENGTHS", LENGTHS)]
