"""Process-group plumbing for ``torchrun`` / ``accelerate launch`` (both set RANK/WORLD_SIZE/LOCAL_RANK).

Several processes train data-parallel replicas with torch's ``DistributedDataParallel`` (gradients
all-reduced during backward; the 3B model with fp32 masters fits one 80 GB GPU, so no sharding is
needed to replicate it). A single process runs the same code with no process group.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as torch_dist


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            torch_dist.barrier()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            t = t.clone()
            torch_dist.all_reduce(t, op=torch_dist.ReduceOp.SUM)
        return t

    def all_reduce_max(self, value: int) -> int:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.long, device=self.device if self.device.type == "cuda" else "cpu")
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
        return int(t.item())

    def all_gather_objects(self, obj: Any) -> list[Any]:
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch_dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        if not self.enabled:
            return obj
        box = [obj]
        torch_dist.broadcast_object_list(box, src=0)
        return box[0]


def init_distributed(device: str = "auto", backend: str = "auto") -> DistContext:
    """Join the process group the launcher describes (no-op for a single process)."""
    from ..model.checkpoint import resolve_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda" and world > 1:
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if world > 1 and not torch_dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if dev.type == "cuda" else "gloo"
        torch_dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    return DistContext(rank=rank, world_size=world, local_rank=local, device=dev)


def shutdown_distributed() -> None:
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def wrap_data_parallel(module: torch.nn.Module, ctx: DistContext, strategy: str = "auto") -> torch.nn.Module:
    """``module`` under DistributedDataParallel when several processes run (strategy auto/ddp)."""
    if not ctx.enabled or strategy == "none":
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    # gradient_as_bucket_view: the grads live in the all-reduce buckets, no second copy of them (3B: 7 GB in bf16)
    return DistributedDataParallel(module, device_ids=ids, gradient_as_bucket_view=True)


def maybe_no_sync(module: torch.nn.Module, skip_sync: bool):
    """``module.no_sync()`` (accumulate locally) for every micro-batch but the last of a step."""
    if skip_sync and hasattr(module, "no_sync"):
        return module.no_sync()
    return nullcontext()
