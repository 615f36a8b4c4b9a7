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


@pytest.fixture(scope="module")
def gpu_greedy(lm, prompts):
    """A function of Engine options: the engine (CUDA graphs, 8 rows) over a bf16 CUDA copy of ``lm`` and
    its greedy tokens, 6 per row, for ``prompts`` two samples each (``tiny_qwen.agree`` compares two runs)."""
    gpu = Qwen2ForCausalLM(lm.config).to("cuda", torch.bfloat16).eval()
    gpu.load_state_dict(lm.state_dict())
    embeds = [p.to("cuda", torch.bfloat16) for p in prompts]

    def run(**options):
        from tlvr_cli.engine.generate import Engine
        from tlvr_cli.engine.sampling import SamplingParams

        engine = Engine(gpu, max_batch=8, max_seq_len=96, cuda_graphs=True, **options)
        tokens = [o.tokens for o in engine.generate(embeds, SamplingParams(temperature=0.0), 6, 299, num_samples=2)]
        return engine, tokens

    return run

