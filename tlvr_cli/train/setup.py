"""Pieces shared by the training loops: which parts train, and which samples they read (less the videos
a check report rules out). Imports nothing heavy (torch only for type checking): the training commands
check their data with ``read_samples`` before torch is imported."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import TlvrError
from ..files import resolve_root
from ..jobs import OptimConfig, TuneConfig

if TYPE_CHECKING:
    from torch import nn

T = TypeVar("T")


def apply_tuning(model: nn.Module, tune: TuneConfig, *, gradient_checkpointing: bool,
                 uncheckpointed_layers: int = 0, uncheckpointed_tokens: int = 0) -> None:
    """Set ``requires_grad`` per part (spec §4: tower frozen, connector and LLM trained); with ``tune.lora``
    the LLM gets adapters (``lora.add_adapters``) and only they train in it. ``gradient_checkpointing``
    recomputes the LLM's decoder layers in backward, all but the last ``uncheckpointed_layers``; the flat
    log-prob layout keeps more of them per micro-batch under ``uncheckpointed_tokens``
    (``packed.checkpointed_layers``)."""
    lora = tune.lora.enabled
    if lora:
        from .lora import add_adapters, is_adapter

        add_adapters(model, tune.lora)
    for part, flag in ((model.language_model, tune.llm and not lora), (model.connector, tune.connector),
                       (model.vision_tower, tune.vision_tower)):
        for p in part.parameters():
            p.requires_grad_(flag)
    if lora:
        for name, p in model.language_model.named_parameters():
            p.requires_grad_(is_adapter(name))
    if not tune.vision_tower:
        model.vision_tower.eval()
    if gradient_checkpointing:
        # non-reentrant checkpointing needs no input-grad hook (the reference's enable_input_require_grads)
        lm = model.language_model
        if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns there
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        layers = lm.model.layers
        for layer in layers[max(0, len(layers) - uncheckpointed_layers):]:
            layer.gradient_checkpointing = False
        lm.model.uncheckpointed_tokens = uncheckpointed_tokens
    model.language_model.config.use_cache = False


def apply_job_tuning(model: nn.Module, tune: TuneConfig, optim: OptimConfig) -> None:
    """``apply_tuning`` with a job's checkpointing settings (``optim.gradient_checkpointing`` and the layers
    and tokens it keeps)."""
    apply_tuning(model, tune, gradient_checkpointing=optim.gradient_checkpointing,
                 uncheckpointed_layers=optim.uncheckpointed_layers, uncheckpointed_tokens=optim.uncheckpointed_tokens)


def drop_reported_videos(samples: list[T], report: str) -> tuple[list[T], int]:
    """The samples (rows or records with a ``video_path``) whose video a `tlvr data check` report
    does not mark bad, and how many were dropped (none without a report)."""
    if not report:
        return samples, 0
    from ..data.check import load_skip_set

    bad = load_skip_set(Path(report))
    kept = [s for s in samples if str(s.video_path) not in bad]
    return kept, len(samples) - len(kept)


def read_samples(read: Callable[[Path, Path], list[T]], data: Any, what: str) -> tuple[list[T], int]:
    """``read(annotations, root)`` of a training ``data`` section (its ``root``, ``annotations`` and
    ``skip_report``) less the videos the report marks bad, and how many were dropped; a one-line error
    naming the file when no ``what`` (rows, records) are left."""
    root = resolve_root(data.root, "train")
    samples, dropped = drop_reported_videos(read(root / data.annotations, root), data.skip_report)
    if not samples:
        raise TlvrError(f"{root / data.annotations}: no usable {what}")
    return samples, dropped
