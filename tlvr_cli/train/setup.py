"""Pieces shared by the training loops: model loading, trainable parts, run start and resume, skip lists."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..config import ModelConfig
from ..jobs import TuneConfig
from .dist import DistContext, Parallel


def prepare_model(cfg: ModelConfig, ctx: DistContext):
    """Load the checkpoint named by ``cfg`` onto this rank's device in the configured dtype."""
    from ..model.checkpoint import load_model

    return load_model(cfg.path, dtype=cfg.dtype, device=str(ctx.device), attn_implementation=cfg.attn_implementation)


def apply_tuning(model: nn.Module, tune: TuneConfig, *, gradient_checkpointing: bool) -> None:
    """Set ``requires_grad`` per part (spec §4: tower frozen, connector and LLM trained)."""
    for part, flag in ((model.language_model, tune.llm), (model.connector, tune.connector), (model.vision_tower, tune.vision_tower)):
        for p in part.parameters():
            p.requires_grad_(flag)
    if not tune.vision_tower:
        model.vision_tower.eval()
    if gradient_checkpointing:
        # non-reentrant checkpointing needs no input-grad hook (the reference's enable_input_require_grads)
        lm = model.language_model
        if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns there
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.language_model.config.use_cache = False


def load_skip_set_if_any(report: str) -> set[str]:
    """Video paths a `tlvr data check` report marks bad (empty when no report is given)."""
    if not report:
        return set()
    from ..data.check import load_skip_set

    return load_skip_set(Path(report))


def start_run(run_dir: Path, resume: str | None, par: Parallel, optimizer, scheduler, config_yaml: str, *, seed: int,
              tensorboard: bool):
    """Restore weights, optimizer, scheduler and trainer state from the checkpoint ``resume`` names (if any),
    write the resolved config into the run directory, and open its metrics log.

    Returns ``(state, logger)``.
    """
    from . import state as S
    from .metrics import MetricsLogger

    ckpt = S.resolve_resume(run_dir, resume)
    st = S.TrainState(cursor=S.DataCursor(seed=seed))
    if ckpt is not None:
        st = par.load_checkpoint(ckpt, optimizer, scheduler)
    if par.ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config_yaml)
    logger = MetricsLogger(run_dir, resume_step=st.step if ckpt else None, tensorboard=tensorboard, enabled=par.ctx.is_main)
    return st, logger
