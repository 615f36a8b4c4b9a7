"""AdamW with optional fp32 master weights, and the HF-style learning-rate schedules.

Memory plan for bf16 training (the reference ran DeepSpeed bf16, which keeps fp32 master weights):
the model's parameters stay bf16, so the rollout engine and the forward pass read them directly; the
optimizer keeps an fp32 master copy and fp32 AdamW moments, steps on the masters and writes the
rounded result back into the bf16 parameters. fp32 models use plain ``torch.optim.AdamW``. The
smaller states of ``optim.kind`` / ``optim.master_weights`` are ``compact_adamw.CompactAdamW``'s.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..jobs import OptimConfig, TuneConfig

NO_DECAY_MARKERS = ("bias", "norm", "latents")
GRAD_BUCKET = 1 << 28  # values whose fp32 gradients exist at once in MasterAdamW.step (1 GiB, not one per weight)


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Named parameters that require grad, with tied weights listed once."""
    seen: set[int] = set()
    out = []
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    return out


def param_groups(named: Iterable[tuple[str, nn.Parameter]], weight_decay: float,
                 lr_of: Callable[[str], float | None] | None = None) -> list[dict]:
    """Decay / no-decay groups (spec §4: LayerNorm and biases undecayed; identical at weight_decay 0), split
    further by ``lr_of(name)`` where it gives a parameter its own learning rate (None: the optimizer's)."""
    groups: dict[tuple[bool, float | None], list[nn.Parameter]] = {}
    for name, p in named:
        decayed = not (any(m in name.lower() for m in NO_DECAY_MARKERS) or p.ndim < 2)
        groups.setdefault((decayed, lr_of(name) if lr_of else None), []).append(p)
    out = []
    for lr in dict.fromkeys(k[1] for k in groups):
        for decayed in (True, False):
            if (decayed, lr) in groups:
                g = {"params": groups[decayed, lr], "weight_decay": weight_decay if decayed else 0.0}
                out.append(g if lr is None else {**g, "lr": lr})
    return out


class MasterAdamW:
    """AdamW over fp32 master copies of low-precision parameters (bf16/fp16).

    ``step()`` reads the parameters' grads, updates the fp32 masters and copies them back. Its
    state dict holds the masters, so resuming restores them exactly.
    """

    def __init__(self, groups: list[dict], lr: float, betas: tuple[float, float], eps: float,
                 grad_bucket: int = GRAD_BUCKET) -> None:
        self.model_params = [list(g["params"]) for g in groups]
        master_groups = []
        for g, params in zip(groups, self.model_params):
            masters = [p.detach().float().clone() for p in params]
            master_groups.append({**g, "params": masters})
        fused = all(p.is_cuda for ps in self.model_params for p in ps)
        self.inner = torch.optim.AdamW(master_groups, lr=lr, betas=betas, eps=eps, fused=fused or None)
        # the step runs over buckets of about ``grad_bucket`` values: only one bucket's gradients are upcast
        # to fp32 at a time (all of them would be 12 GiB at 3B). AdamW updates each value on its own, so
        # the result is the same bit for bit
        pairs = [(p, m) for params, g in zip(self.model_params, self.inner.param_groups)
                 for p, m in zip(params, g["params"])]
        self.buckets: list[list[tuple[nn.Parameter, torch.Tensor]]] = [[]]
        size = 0
        for p, m in pairs:
            if size >= grad_bucket:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append((p, m))
            size += p.numel()

    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups

    @torch.no_grad()
    def step(self) -> None:
        for bucket in self.buckets:
            for p, m in bucket:
                m.grad = None if p.grad is None else p.grad.float()
            self.inner.step()  # steps the masters that have a gradient: this bucket's
            for p, m in bucket:
                if m.grad is not None:
                    p.copy_(m)
                    m.grad = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for params in self.model_params:
            for p in params:
                p.grad = None

    def state_dict(self) -> dict:
        return {"inner": self.inner.state_dict(),
                "masters": [[m for m in g["params"]] for g in self.inner.param_groups]}

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state["inner"])
        with torch.no_grad():
            for params, group, masters in zip(self.model_params, self.inner.param_groups, state["masters"]):
                for p, m, saved in zip(params, group["params"], masters):
                    m.copy_(saved)
                    p.copy_(saved)


def build_optimizer(model: nn.Module, cfg: OptimConfig,
                    tune: TuneConfig | None = None) -> torch.optim.Optimizer | MasterAdamW:
    """AdamW over the trainable parameters: torch's (with fp32 masters when the parameters are bf16/fp16), or
    ``CompactAdamW`` for the smaller states of ``cfg.kind`` / ``cfg.master_weights``. With LoRA adapters
    (``tune.lora``) the parts trained fully beside them may have their own ``tune.lora.connector_lr``."""
    named = trainable_parameters(model)
    if not named:
        raise ValueError("no trainable parameters: check the `tune` section of the preset")
    lr_of = None
    if tune is not None and tune.lora.enabled and tune.lora.connector_lr > 0:
        from .lora import is_adapter

        lr_of = lambda name: None if is_adapter(name) else tune.lora.connector_lr  # noqa: E731
    groups = param_groups(named, cfg.weight_decay, lr_of)
    betas = (float(cfg.betas[0]), float(cfg.betas[1]))
    low = any(p.dtype in (torch.bfloat16, torch.float16) for _, p in named)
    if cfg.kind == "adamw8bit" or (low and cfg.master_weights != "fp32"):
        from .compact_adamw import CompactAdamW

        return CompactAdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, masters=cfg.master_weights,
                            moments="8bit" if cfg.kind == "adamw8bit" else "fp32")
    if low:
        return MasterAdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps)
    fused = all(p.is_cuda for _, p in named)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, fused=fused or None)


def warmup_steps(total_steps: int, ratio: float) -> int:
    """HF's rule: ``ceil(total * warmup_ratio)`` (spec §5.4: 21 of 687)."""
    return math.ceil(total_steps * ratio)


def lr_factor(step: int, total_steps: int, warmup: int, kind: str) -> float:
    """Multiplier of the peak LR at optimizer step ``step`` (0-based), as transformers' schedules."""
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total_steps - warmup)
    if kind == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    raise ValueError(f"unknown scheduler {kind!r}")


def build_scheduler(optimizer: torch.optim.Optimizer | MasterAdamW, cfg: OptimConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warm = warmup_steps(total_steps, cfg.warmup_ratio)
    target = optimizer.inner if isinstance(optimizer, MasterAdamW) else optimizer
    return torch.optim.lr_scheduler.LambdaLR(target, lambda s: lr_factor(s, total_steps, warm, cfg.scheduler))


def clip_gradients(model: nn.Module, max_norm: float) -> float:
    """Clip the global grad norm (torch's, per-tensor norms accumulated in fp32); returns the norm
    before clipping. Works on sharded (DTensor) gradients too: the norm is reduced over the processes."""
    params = [p for _, p in trainable_parameters(model) if p.grad is not None]
    if not params:
        return 0.0
    total = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
    if hasattr(total, "full_tensor"):  # a DTensor: the norm of the local shards, reduced over the mesh
        total = total.full_tensor()
    if max_norm and max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=True)
    return float(total)
