"""The trained model as spread over the processes (``dist.strategy``):

* ``ddp`` (the default with several processes): torch's ``DistributedDataParallel`` replicas,
  gradients all-reduced during backward; bf16 parameters with fp32 masters in the optimizer. The
  3B model fits one 80 GB GPU this way.
* ``fsdp2``: torch's ``fully_shard`` (FSDP2) — each decoder layer and the rest of the trained model
  (connector, embeddings, final norm) is one unit whose fp32 parameters, gradients and AdamW moments
  are split over the processes, all-gathered in the model's dtype for compute (mixed precision) and
  reduce-scattered in fp32. The frozen vision tower stays replicated. Rollouts gather the full
  parameters once per step (``Parallel.full_params``). Works with one process too.

A single process with ``auto``/``ddp`` runs the same code unwrapped. The process group itself is
``runtime.init_distributed``'s; the run directory (what is saved and restored) is ``run_dir``'s.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn

from ..errors import TlvrError
from ..runtime import DistContext


class Parallel:
    """The trained model as spread over the processes: what to call for the training forward,
    how to skip gradient sync, how to see full parameters, and how to save and restore.

    ``root`` is the module whose forward the training loop calls (the model itself, or a wrapper
    holding it as ``root.<prefix>``); ``model`` is the TinyLLaVA model inside it.
    """

    def __init__(self, root: nn.Module, model: nn.Module, ctx: DistContext, strategy: str = "auto",
                 prefix: str = "") -> None:
        self.model, self.ctx, self.prefix = model, ctx, prefix
        self.strategy = ("fsdp2" if strategy == "fsdp2" else "ddp" if ctx.enabled and strategy in ("auto", "ddp")
                         else "none")
        self.save_dtype: torch.dtype | None = None  # fsdp2 with mixed precision: the dtype weights are released in
        if self.strategy == "fsdp2":
            self._shard(root)
            self.module = root
        elif self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            # gradient_as_bucket_view: the grads live in the all-reduce buckets, no second copy of them
            # (3B: 7 GB in bf16)
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
            raise TlvrError("dist.strategy=fsdp2 keeps the vision tower frozen and replicated; "
                            "set tune.vision_tower=false or train the tower with dist.strategy=ddp")
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

    # ------------------------------------------------------------ state for checkpoints

    def full_state(self) -> dict[str, torch.Tensor] | None:
        """The consolidated weights of a sharded ``model`` (keys without the prefix; on CPU at rank 0,
        empty elsewhere); None for replicas, whose own state dict is whole. Collective."""
        if not self.sharded:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k.removeprefix(self.prefix): v for k, v in sd.items()}

    def optimizer_state(self, optimizer: Any, full_state: dict[str, torch.Tensor] | None = None) -> dict:
        """The optimizer state tagged with its layout. Under fsdp2 it is gathered by parameter name
        and, with mixed precision, carries the fp32 masters (``full_state``, gathered once for both:
        the released weights are their rounding to the model's dtype). Collective."""
        if not self.sharded:
            return {"layout": "replicated", "state": optimizer.state_dict()}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        osd = get_optimizer_state_dict(self.module, optimizer,
                                       options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        masters = full_state if full_state is not None else self.full_state()
        return {"layout": "fsdp2", "state": osd, **({"masters": masters} if self.save_dtype is not None else {})}

    def load_state(self, weights: dict[str, torch.Tensor], optimizer: Any, opt: dict, *, where: Any) -> None:
        """Restore ``weights`` (the released state dict, or the fp32 masters) and the layout-tagged
        optimizer state ``opt`` written by ``optimizer_state``; refuses a state of the other strategy."""
        from ..model.checkpoint import checked_state, load_weights

        want = "fsdp2" if self.sharded else "replicated"
        if opt["layout"] != want:
            raise TlvrError(f"{where}: optimizer state was saved with "
                            f"dist.strategy={'fsdp2' if opt['layout'] == 'fsdp2' else 'ddp'}; "
                            f"resume with the same strategy (any number of processes)")
        if not self.sharded:
            load_weights(self.model, weights, where)
            optimizer.load_state_dict(opt["state"])
            return
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        weights = checked_state(self.model, weights, where)
        own = self.model.state_dict()
        full = {self.prefix + k: v.to(own[k].dtype) for k, v in weights.items()}
        set_model_state_dict(self.module, full, options=StateDictOptions(full_state_dict=True, strict=False))
        set_optimizer_state_dict(self.module, optimizer, opt["state"], options=StateDictOptions(full_state_dict=True))
