"""How GRPO's rollouts spread over the processes (``dist.rollout_parallel``), and the engine that decodes them.

* ``data`` (the default): each process decodes its own share of the step's prompts with the whole model.
* ``tensor``: groups of N consecutive processes of one host (``dist.rollout_tensor_size``, default all
  of a host's) decode tensor-parallel (``engine/tensor_parallel.py``): each process holds 1/N of the
  heads and MLP columns, and every one of them decodes *all* of its group's prompts. Decoding is
  memory-bound (each step reads every weight once, whatever the rows), so splitting the weights
  divides the per-token cost by about N where splitting the rows does not. N must divide the KV
  heads: Qwen2.5-3B's 2 allow N = 2, so 4 GPUs decode as two groups of 2, each with half the rows.

With ``tensor`` the step stays the data-parallel one around the decode: each process builds its own
prompts' spliced embeddings (tower, connector, splice), ``gather_prompts`` gives every process of the
group all of them in one order (rank-major), the engine decodes them keyed by dataset index (so a row
draws the tokens it draws under ``data``), and each process keeps its own rows for rewards, advantages
and the training step (DDP or FSDP2, unchanged). The embeddings are gathered rather than the tower
features they are built from: a prompt's (L, D) embeddings are ~10x smaller than its video's
(frames x patches, V) features (3B: ~2.7 MB against ~27 MB), and the connector then runs once per prompt.
Every process must call the engine as often as the others with the same prompts: ``GRPOStep.run``
draws the same number of times on every rank (the ranks agree on the need after each draw), and a
rank whose prompts all failed still gathers and decodes the others' (the engine checks agreement).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..engine.generate import Engine
from ..engine.tensor_parallel import check_shardable
from ..errors import TlvrError
from ..jobs import GRPOConfig
from ..runtime import DistContext, launch_local_world_size, rank_group
from .lora import MergedWeights
from .parallel import Parallel


def check_rollout_processes(cfg: GRPOConfig, world_size: int) -> None:
    """A one-line error for tensor-parallel rollouts in a single process (nothing to split the weights over)."""
    if cfg.dist.rollout_parallel == "tensor" and world_size < 2:
        raise TlvrError("dist.rollout_parallel=tensor splits the weights over several processes, but this run has "
                        "one: launch it with torchrun --nproc-per-node N, or use dist.rollout_parallel=data")


def rollout_group(cfg: GRPOConfig, ctx: DistContext, lm: nn.Module) -> dist.ProcessGroup | None:
    """This process's group of ``dist.rollout_tensor_size`` processes that decode tensor-parallel (None for
    ``data``); one-line errors for a size that splits a host or does not divide ``lm``'s heads, KV heads or
    MLP width. Collective."""
    if cfg.dist.rollout_parallel != "tensor":
        return None
    check_rollout_processes(cfg, ctx.world_size)
    host = min(launch_local_world_size(), ctx.world_size)
    size = cfg.dist.rollout_tensor_size or host
    if host % size:
        raise TlvrError(f"dist.rollout_tensor_size={size} must divide the {host} processes of a host")
    try:
        check_shardable(lm, size)
    except ValueError as e:
        fits = [n for n in range(size - 1, 1, -1) if host % n == 0 and _splits(lm, n)]
        hint = f"dist.rollout_tensor_size={fits[0]} or " if fits else ""
        raise TlvrError(f"dist.rollout_parallel=tensor: {e}; use {hint}dist.rollout_parallel=data") from None
    return rank_group(size)


def _splits(lm: nn.Module, n: int) -> bool:
    try:
        check_shardable(lm, n)
    except ValueError:
        return False
    return True


def rollout_engine(cfg: GRPOConfig, lm: nn.Module, par: Parallel, max_seq_len: int,
                   group: dist.ProcessGroup | None = None) -> Engine:
    """The engine of GRPO's rollouts (``group``: decode tensor-parallel over it). LoRA: it decodes from its own
    copy of the merged weights, refreshed at every rollout; FSDP2: from a copy of the gathered weights."""
    options = cfg.engine.engine_kwargs()
    if group is not None:
        # a draw holds at most the group's share of the step; each process caches 1/N of a row, so N times the
        # rows fit
        groups = par.ctx.world_size // group.size()
        rows = cfg.data.prompts_per_step // groups * cfg.algo.num_generations
        options["max_batch"] = rows if cfg.engine.max_batch == 0 else min(rows, cfg.engine.max_batch * group.size())
    weights = MergedWeights(lm) if cfg.tune.lora.enabled else None
    return Engine(lm, max_seq_len=max_seq_len, copy_weights=par.sharded, weights=weights, tp_group=group, **options)


def gather_prompts(prompts: list[torch.Tensor], keys: list[int], group: dist.ProcessGroup,
                   like: torch.Tensor) -> tuple[list[torch.Tensor], list[int], int]:
    """Every process of ``group``'s prompt embeddings (L_i, D) and keys, rank-major: the same lists on
    every process; and where this process's own prompts start in them. ``like`` (a (.., D) tensor: the
    input embedding) gives the device and dtype, so a process without prompts takes part as well."""
    shapes: list = [None] * group.size()
    dist.all_gather_object(shapes, ([p.shape[0] for p in prompts], keys), group=group)
    width = max(sum(lens) for lens, _ in shapes)
    # one padded tensor per process: a single all-gather whatever the prompts' lengths
    mine = like.new_zeros(width, like.shape[-1])
    if prompts:
        flat = torch.cat(prompts)
        mine[:flat.shape[0]] = flat
    parts = [torch.empty_like(mine) for _ in shapes]
    dist.all_gather(parts, mine, group=group)
    out: list[torch.Tensor] = []
    for (lens, _), part in zip(shapes, parts):
        out += part[:sum(lens)].split(lens) if lens else []
    start = sum(len(lens) for lens, _ in shapes[:group.rank()])
    return out, [k for _, ks in shapes for k in ks], start
