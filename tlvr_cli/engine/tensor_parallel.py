"""Tensor-parallel decoding: how one rank's shard of the model is laid out (the shard itself is the
engine's weight copy, ``weights.py``), and the agreement check between ranks.

Over a process group of N ranks each rank keeps a copy holding 1/N of every decoder layer
(Megatron-style). q/k/v and gate/up are column-parallel (split by output rows): rank r owns query
heads [r·H/N, (r+1)·H/N), the KV heads [r·KV/N, (r+1)·KV/N) those queries read under GQA, their
q/k/v biases, and intermediate columns [r·I/N, (r+1)·I/N). o_proj and down_proj are row-parallel
(split by input columns): their outputs are partial sums, all-reduced once after attention and once
after the MLP (``layers.attn_out``), so every rank then holds the same residual stream. Embeddings,
norms and the LM head are replicated: every rank computes the same full logits and, with the keyed
sampler, draws the same tokens without communicating. A rank's KV cache holds its KV heads only.

The LM head is replicated rather than vocabulary-sharded because identical full logits keep the
sampler (top-k with ties, top-p, full-vocabulary sorts) exactly the single-process one with no
collective, and the saving is small: Qwen2.5-3B's tied head is 10% of its weights, and sharding it
over 2 ranks would trade 0.31 GB less read per step (~65 µs at 4.8 TB/s) for an all-gather of
(rows, 151936) logits per step (20-40 MB at 64 rows).

"""

from __future__ import annotations

import copy as copylib
from dataclasses import dataclass

import torch
import torch.distributed as dist

COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # weight rows (and bias) split
ROW_PARALLEL = ("o_proj", "down_proj")  # weight columns split; a bias would be added once per rank


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in a tensor-parallel group: it holds shard ``rank`` of ``world``."""

    group: dist.ProcessGroup
    rank: int
    world: int

    @classmethod
    def over(cls, group: dist.ProcessGroup, lm: torch.nn.Module) -> TensorParallel:
        """The place of this process in ``group``, after checking that ``lm`` splits into ``group.size()`` shards."""
        world = group.size()
        check_shardable(lm, world)
        return cls(group, group.rank(), world)


def check_shardable(lm: torch.nn.Module, world: int) -> None:
    """Raise ValueError unless heads, KV heads and the MLP width divide by ``world`` and the
    row-parallel projections have no bias."""
    cfg = lm.config
    for what, n in (("attention heads", cfg.num_attention_heads), ("key/value heads", cfg.num_key_value_heads),
                    ("intermediate size", cfg.intermediate_size)):
        if n % world:
            raise ValueError(f"tensor parallelism over {world} ranks needs {what} divisible by {world}, got {n}")
    for name, module in lm.named_modules():
        if name.rpartition(".")[2] in ROW_PARALLEL and module.bias is not None:
            raise ValueError(f"tensor parallelism needs row-parallel projections without bias, but {name} has one")


def shard_config(cfg, world: int):
    """``cfg`` with 1/``world`` of the heads, KV heads and MLP width (head size kept): the config of one shard."""
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    cfg = copylib.deepcopy(cfg)
    cfg.head_dim = head_dim  # fewer heads must not shrink hidden_size // heads
    cfg.num_attention_heads //= world
    cfg.num_key_value_heads //= world
    cfg.intermediate_size //= world
    return cfg


def shard_dim(name: str) -> int | None:
    """The dim along which parameter ``name`` is split across ranks; None when it is replicated."""
    module = name.rsplit(".", 2)[-2]  # "model.layers.0.self_attn.q_proj.weight" -> "q_proj"
    if module in COLUMN_PARALLEL:
        return 0
    if module in ROW_PARALLEL:
        return 1
    return None


def fingerprint(prompts: list[torch.Tensor], seeds: torch.Tensor, settings: tuple[float, ...]) -> torch.Tensor:
    """A small int64 summary of one generate call's inputs (prompt lengths and sums, seeds, settings)
    that every tensor-parallel rank must agree on."""
    lens = [float(p.shape[0]) for p in prompts]
    sums = [torch.stack([p.double().sum(), p.double().square().sum()]).to(seeds.device) for p in prompts]
    floats = torch.cat([torch.tensor([*settings, *lens], dtype=torch.float64, device=seeds.device), *sums])
    return torch.cat([floats.view(torch.long), seeds])


def assert_same(tp: TensorParallel, t: torch.Tensor, what: str) -> None:
    """Raise unless every rank holds the same ``t``. Ranks that disagree on tokens would next
    disagree on how many rows and steps to run, and their collectives would hang instead of failing."""
    t = t.contiguous()
    parts = [torch.empty_like(t) for _ in range(tp.world)]
    dist.all_gather(parts, t, group=tp.group)
    bad = [r for r, x in enumerate(parts) if not torch.equal(x, parts[0])]
    if bad:
        raise RuntimeError(f"tensor-parallel ranks disagree on {what}: ranks {bad} differ from rank 0 "
                           "(every rank must call generate with the same prompts, seeds and settings)")
