"""Process-group plumbing for ``torchrun`` / ``accelerate launch`` (both set RANK/WORLD_SIZE/LOCAL_RANK),
and the two ways of spreading the trained model over the processes (``dist.strategy``):

* ``ddp`` (the default with several processes): torch's ``DistributedDataParallel`` replicas,
  gradients all-reduced during backward; bf16 parameters with fp32 masters in the optimizer. The
  3B model fits one 80 GB GPU this way.
* ``fsdp2``: torch's ``fully_shard`` (FSDP2) — each decoder layer and the rest of the trained model
  (connector, embeddings, final norm) is one unit whose fp32 parameters, gradients and AdamW moments
  are split over the processes, all-gathered in the model's dtype for compute (mixed precision) and
  reduce-scattered in fp32. The frozen vision tower stays replicated. Rollouts gather the full
  parameters once per step (``Parallel.full_params``). Works with one process too.

A single process with ``auto``/``ddp`` runs the same code with no process group.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn

from ..errors import TlvrError


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


def init_distributed(device: str = "auto", backend: str = "auto", *, need_group: bool = False) -> DistContext:
    """Join the process group the launcher describes (no-op for a single process unless
    ``need_group``: FSDP2 wants a process group even for one process)."""
    from ..model.checkpoint import resolve_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda" and (world > 1 or need_group):
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if (world > 1 or need_group) and not torch_dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if dev.type == "cuda" else "gloo"
        if world > 1:
            torch_dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
        else:  # launched without torchrun: a group of one, no rendezvous needed
            torch_dist.init_process_group(backend=backend, store=torch_dist.HashStore(), rank=0, world_size=1)
    return DistContext(rank=rank, world_size=world, local_rank=local, device=dev)


def shutdown_distributed() -> None:
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


class Parallel:
    """The trained model as spread over the processes: what to call for the training forward,
    how to skip gradient sync, how to see full parameters, and how to save and restore.

    ``root`` is the module whose forward the training loop calls (the model itself, or a wrapper
    holding it as ``root.<prefix>``); ``model`` is the TinyLLaVA model inside it.
    """

    def __init__(self, root: nn.Module, model: nn.Module, ctx: DistContext, strategy: str = "auto", prefix: str = "") -> None:
        self.model, self.ctx, self.prefix = model, ctx, prefix
        self.strategy = "fsdp2" if strategy == "fsdp2" else "ddp" if ctx.enabled and strategy in ("auto", "ddp") else "none"
        self.save_dtype: torch.dtype | None = None  # fsdp2 with mixed precision: the dtype weights are released in
        if self.strategy == "fsdp2":
            self._shard(root)
            self.module = root
        elif self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            # gradient_as_bucket_view: the grads live in the all-reduce buckets, no second copy of them (3B: 7 GB in bf16)
            self.module = DistributedDataParallel(root, device_ids=ids, gradient_as_bucket_view=True)
        else:
            self.module = root

    @property
    def sharded(self) -> bool:
        return self.strategy == "fsdp2"

    def _shard(self, root: nn.Module) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

        if not torch_dist.is_initialized():
            raise TlvrError("dist.strategy=fsdp2 needs a process group (init_distributed(..., need_group=True))")
        tower = set(self.model.vision_tower.parameters())
        if any(p.requires_grad for p in tower):
            # the tower stays replicated outside the shards (GRPO runs it on its own, once per video):
            # its gradients would never be averaged over the processes
            raise TlvrError("dist.strategy=fsdp2 keeps the vision tower frozen and replicated; set tune.vision_tower=false "
                            "or train the tower with dist.strategy=ddp")
        dtype = next(p.dtype for p in self.model.language_model.parameters())
        mp = MixedPrecisionPolicy()
        if dtype in (torch.bfloat16, torch.float16):
            # the sharded parameters are the fp32 masters; compute sees them gathered in the model's dtype
            for p in root.parameters():
                if p not in tower:
                    p.data = p.data.float()
            mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
            self.save_dtype = dtype
        mesh = init_device_mesh(self.ctx.device.type, (self.ctx.world_size,))
        for layer in self.model.language_model.model.layers:
            fully_shard(layer, mesh=mesh, mp_policy=mp)
        fully_shard(root, mesh=mesh, mp_policy=mp, ignored_params=tower)
        self._units = [m for m in root.modules() if isinstance(m, FSDPModule)]

    def no_sync(self, skip_sync: bool):
        """Accumulate gradients locally (no all-reduce / reduce-scatter) when ``skip_sync``: every
        micro-batch of a step but the last."""
        if not skip_sync:
            return nullcontext()
        if self.strategy == "ddp":
            return self.module.no_sync()
        if self.sharded:
            return self._fsdp_no_sync()
        return nullcontext()

    @contextmanager
    def _fsdp_no_sync(self) -> Iterator[None]:
        self.module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.module.set_requires_gradient_sync(True)

    @contextmanager
    def full_params(self) -> Iterator[None]:
        """Full (gathered) parameters on every process inside the block: the rollout engine and
        direct submodule calls read them as plain tensors. A no-op for replicas."""
        if not self.sharded:
            yield
            return
        for m in self._units:
            m.unshard()
        try:
            yield
        finally:
            for m in self._units:
                m.reshard()

    # ------------------------------------------------------------ checkpoints

    def _full_state(self) -> dict[str, torch.Tensor]:
        """The consolidated state of the sharded ``model`` (keys without the prefix), on CPU at rank 0
        and empty elsewhere. Collective: every process calls it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k.removeprefix(self.prefix): v for k, v in sd.items()}

    def save_checkpoint(self, run_dir: Path, st: Any, optimizer: Any, scheduler: Any, config_yaml: str, keep_last: int) -> None:
        """Write ``step-N`` (all processes take part in gathering; rank 0 writes). Under fsdp2 the
        optimizer state is gathered by parameter name, and with mixed precision the fp32 masters go
        into ``trainer_state.pt`` beside the released weights (rounded to the model's dtype)."""
        from . import state as S

        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            weights = self._full_state()
            osd = get_optimizer_state_dict(self.module, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            opt = {"layout": "fsdp2", "state": osd, **({"masters": weights} if self.save_dtype is not None else {})}
        else:
            weights, opt = None, {"layout": "replicated", "state": optimizer.state_dict()}
        if self.ctx.is_main:
            S.save_checkpoint(run_dir, st, self.model, opt, scheduler, config_yaml, keep_last=keep_last,
                              weights=weights, weights_dtype=self.save_dtype)
        self.ctx.barrier()

    def save_final(self, run_dir: Path) -> Path:
        """Write the final model (released layout) to ``<run_dir>/final``."""
        from ..model.checkpoint import save_model

        out = Path(run_dir) / "final"
        weights = self._full_state() if self.sharded else None
        if self.ctx.is_main:
            save_model(self.model, out, state=weights, dtype=self.save_dtype)
        self.ctx.barrier()
        return out

    def load_checkpoint(self, ckpt: Path, optimizer: Any, scheduler: Any):
        """Restore weights, optimizer, scheduler and RNG from ``ckpt``; returns the ``TrainState``."""
        from ..model.checkpoint import load_weights_into, read_state_dict
        from . import state as S

        payload = S.read_trainer_state(ckpt)
        opt = payload["optimizer"]
        if "layout" not in opt:  # written before the layout was recorded
            opt = {"layout": "replicated", "state": opt}
        layout = opt["layout"]
        want = "fsdp2" if self.sharded else "replicated"
        if layout != want:
            raise TlvrError(f"{ckpt}: optimizer state was saved with dist.strategy={'fsdp2' if layout == 'fsdp2' else 'ddp'}; "
                            f"resume with the same strategy (any number of processes)")
        if not self.sharded:
            load_weights_into(self.model, ckpt)
            optimizer.load_state_dict(opt["state"])
        else:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

            from ..model.checkpoint import checked_state

            weights = checked_state(self.model, opt.get("masters") or read_state_dict(ckpt), ckpt)
            own = self.model.state_dict()
            full = {self.prefix + k: v.to(own[k].dtype) for k, v in weights.items()}
            set_model_state_dict(self.module, full, options=StateDictOptions(full_state_dict=True, strict=False))
            set_optimizer_state_dict(self.module, optimizer, opt["state"], options=StateDictOptions(full_state_dict=True))
        return S.restore_trainer_state(payload, scheduler)
