"""Where a job runs: device and dtype (and copies to the device that do not stall the host), the compile
cache (under the data root, ``files.data_root``), and the process group of a multi-process launch.

Every job reads these the same way. ``torchrun`` and ``accelerate launch`` both describe a launch
with RANK / WORLD_SIZE / LOCAL_RANK; a single process without them runs with no process group
(unless one is asked for: FSDP2 wants a group even for one process).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist

from .errors import TlvrError
from .files import data_root

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


# ----------------------------------------------------------------------------- device and dtype


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → cuda when available, else cpu; an explicit cuda device without CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TlvrError(f"model.device={name!r} but CUDA is not available on this machine (use cpu or auto)")
    try:
        return torch.device(name)
    except RuntimeError:
        raise TlvrError(f"model.device={name!r}: expected cuda, cuda:N, cpu or auto") from None


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` → bf16 on GPU, fp32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise TlvrError(f"model.dtype={name!r}: expected one of float32, bfloat16, float16, auto")
    return DTYPES[name]


def host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device`` without making the host wait for the GPU. A copy from pageable host memory
    synchronizes the stream, so the host stops queueing kernels until the GPU has drained; from pinned
    memory it is asynchronous (the pinned buffer stays reserved until the copy has run). Tensors off the
    host move with a plain ``to``, a no-op where they already are."""
    if t.device.type != "cpu" or device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def row_index(rows: list[int], device: torch.device) -> torch.Tensor:
    """The indices ``rows`` as an index tensor on ``device`` (indexing a GPU tensor by a Python list copies
    the list synchronously)."""
    return host_to_device(torch.tensor(rows, dtype=torch.long), device)


def take_rows(t: torch.Tensor, rows: list[int], device: torch.device) -> torch.Tensor:
    """``t[rows]`` on ``device``, without a host-device synchronization: host tensors are indexed on the
    host and copied, GPU tensors through a ``row_index``."""
    if t.device.type == "cpu":
        return host_to_device(t[rows], device)
    return t.index_select(0, row_index(rows, t.device)).to(device)


# ----------------------------------------------------------------------------- compile cache

COMPILE_CACHE_ENV = "TLVR_COMPILE_CACHE"
INDUCTOR_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def compile_cache_dir() -> Path | None:
    """Where torch.compile's caches persist between runs: ``$TLVR_COMPILE_CACHE``, else
    ``data_root()/compile-cache``; ``TLVR_COMPILE_CACHE=off`` leaves torch's own default (a temp dir)."""
    value = os.environ.get(COMPILE_CACHE_ENV, "")
    if value.lower() == "off":
        return None
    return Path(value).expanduser() if value else data_root() / "compile-cache"


def use_compile_cache() -> Path | None:
    """Point inductor's on-disk caches at ``compile_cache_dir()`` (call before the first compile) and
    return the directory compiles will use; a TORCHINDUCTOR_CACHE_DIR set by the user wins."""
    # one directory holds every cache a warm start reads: the FX-graph and AOTAutograd caches, the
    # Triton kernels and their autotune results (inductor points TRITON_CACHE_DIR below it) and
    # dynamo's dynamic-shape profile; torch's default is a temp dir that a reboot or a fresh
    # container empties, which is why every run paid the whole compile
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    # importing torch._dynamo (transformers does) fills the variable in with torch's default: only
    # another value is the user's choice
    chosen = os.environ.get(INDUCTOR_CACHE_ENV)
    if chosen and os.path.abspath(chosen) != os.path.abspath(default_cache_dir()):
        return Path(chosen)
    path = compile_cache_dir()
    if path is None:
        return None
    path.mkdir(parents=True, exist_ok=True)
    os.environ[INDUCTOR_CACHE_ENV] = str(path.resolve())
    return path


# ----------------------------------------------------------------------------- process group


def launch_rank() -> int:
    """This process's rank as the launcher set it (0 without a launcher)."""
    return int(os.environ.get("RANK", "0"))


def launch_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class DistContext:
    """This process's place in the launch: rank, world size, local rank and its device."""

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


def launch_local_world_size() -> int:
    """How many processes the launcher runs on this host (the world size without a launcher's word)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", str(launch_world_size())))


def rank_group(size: int) -> torch_dist.ProcessGroup:
    """This process's group of ``size`` consecutive ranks (the default group when that is every rank);
    launchers number a host's processes consecutively, so a ``size`` dividing theirs stays on one host.
    Collective: every process calls it."""
    if size == launch_world_size():
        return torch_dist.group.WORLD
    group, _ = torch_dist.new_subgroups(group_size=size)
    return group


def init_distributed(device: str = "auto", backend: str = "auto", *, need_group: bool = False,
                     timeout_minutes: float = 30.0) -> DistContext:
    """Join the process group the launcher describes (no-op for a single process unless
    ``need_group``: FSDP2 wants a process group even for one process). ``timeout_minutes`` bounds
    how long a collective waits for the slowest rank (a rank decoding a long video, saving a
    checkpoint) before the job fails instead of hanging."""
    world, rank = launch_world_size(), launch_rank()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda" and (world > 1 or need_group):
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if (world > 1 or need_group) and not torch_dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if dev.type == "cuda" else "gloo"
        if world > 1:
            torch_dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_minutes))
        else:  # launched without torchrun: a group of one, no rendezvous needed
            torch_dist.init_process_group(backend=backend, store=torch_dist.HashStore(), rank=0, world_size=1)
    return DistContext(rank=rank, world_size=world, local_rank=local, device=dev)


def shutdown_distributed() -> None:
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()
