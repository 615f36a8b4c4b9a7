"""The run directory: everything a training run writes, and the rule by which it resumes.

    <run_dir>/config.yaml                  the resolved config of the run
    <run_dir>/metrics.jsonl                one line per logged step (``metrics.MetricsLogger``)
    <run_dir>/checkpoints/step-000040/     the model in the released layout (loadable by ``tlvr infer``
                                           and by the reference code), trainer_state.json (step, data
                                           cursor, scheduler, RNG, optimizer structure),
                                           trainer_state.safetensors (optimizer moments, fp32 masters,
                                           torch RNG) and the config.yaml it ran with
    <run_dir>/final/                       the released-layout model at the end

A LoRA run (``tune.lora``) writes its merged weights in the released layout and its adapters in peft's
format beside them, ``step-N/adapter/`` and ``final/adapter/`` (``lora.save_adapter``); it resumes from the
adapters, the released file's other trained weights and the run's start checkpoint (``lora.checkpoint_state``).

The rule, the same for the cold start and GRPO (``plan_run``): a run directory holds one run. Running
a job again into it goes on with that run (resumes from the latest checkpoint, or reuses ``final/``
when the run is complete) as long as the resolved config equals the saved ``config.yaml`` up to the
keys in ``SAFE_TO_CHANGE`` (where and how often it logs and saves, how long it runs, how its inputs
are loaded). Any other difference is refused, naming each key, unless ``--force``: then the run
resumes with the new config, the old one is kept as ``config.previous.yaml`` and every change is
appended to ``config-changes.jsonl``.

The trainer state is JSON and safetensors only: loading it cannot run code (a pickle could).
Checkpoint directories are written under a temporary name and renamed, so a crash never leaves a
half checkpoint that ``--resume auto`` would pick. Every process calls the save and load functions
(sharded weights are gathered collectively); rank 0 writes.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from ..config import deep_merge, read_yaml, to_yaml
from ..errors import Interrupted, TlvrError
from ..files import write_json_atomic, write_text_atomic
from ..jobs import OutputConfig
from ..progress import note
from .parallel import Parallel

STATE_FILE = "trainer_state.json"
TENSORS_FILE = "trainer_state.safetensors"
LEGACY_STATE_FILE = "trainer_state.pt"


# ----------------------------------------------------------------------------- data position


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The sample order of one epoch: a seeded permutation, reproducible on resume."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


@dataclass
class DataCursor:
    """Where the data order stands: the epoch and the position in that epoch's permutation. The one
    source of the data position: steps draw their samples from it, and it is saved with the state."""

    epoch: int = 0
    position: int = 0

    def take(self, n: int, size: int, seed: int) -> tuple[list[int], DataCursor]:
        """The next ``size`` dataset indices of a dataset of ``n`` (fewer at the end of an epoch) and the
        cursor after them; an epoch's last draw moves the cursor to the start of the next epoch."""
        order = epoch_order(n, seed, self.epoch)
        taken = order[self.position:self.position + size]
        position = self.position + len(taken)
        after = DataCursor(self.epoch + 1, 0) if position >= n else DataCursor(self.epoch, position)
        return taken, after


@dataclass
class TrainState:
    step: int = 0
    cursor: DataCursor = field(default_factory=DataCursor)
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- RNG


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state(tensors: dict[str, torch.Tensor]) -> dict:
    """Python's and numpy's generator states as plain JSON; torch's (byte tensors) into ``tensors``."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    return {"python": [version, list(internal), gauss],
            "numpy": [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]}


def _set_rng_state(state: dict, tensors: dict[str, torch.Tensor]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")),
                                       key=lambda k: int(k.split(".")[-1]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


# ----------------------------------------------------------------------------- JSON + tensors codec


def _pack(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """``obj`` as JSON with every tensor moved into ``tensors`` (referenced by key); non-string dict
    keys (optimizer state is keyed by parameter index) and tuples are tagged so they come back."""
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _pack(v, tensors) for k, v in obj.items()}
        return {"__items__": [[_pack(k, tensors), _pack(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_pack(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_pack(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in the trainer state")


def _unpack(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__items__" in obj:
            return {_unpack(k, tensors): _unpack(v, tensors) for k, v in obj["__items__"]}
        if "__tuple__" in obj:
            return tuple(_unpack(v, tensors) for v in obj["__tuple__"])
        return {k: _unpack(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unpack(v, tensors) for v in obj]
    return obj


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:06d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp") and (p / STATE_FILE).exists()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def resolve_resume(run_dir: Path, resume: str | None) -> Path | None:
    """``None``/'' → start fresh; 'auto' → the latest checkpoint if any; else an explicit directory."""
    if not resume:
        return None
    if resume == "auto":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).exists():
        if (path / LEGACY_STATE_FILE).exists():
            raise TlvrError(f"--resume {resume}: {LEGACY_STATE_FILE} is a pickle written by an older tlvr; it is not "
                            f"loaded (a pickle can run code): restart the run")
        raise TlvrError(f"--resume {resume}: not a checkpoint directory (no {STATE_FILE})")
    return path


def save_checkpoint(run_dir: Path, state: TrainState, par: Parallel, optimizer: Any, scheduler: Any, config_yaml: str,
                    keep_last: int = 2) -> Path:
    """Write ``step-N`` (collective: sharded weights and optimizer state are gathered on every
    process; rank 0 writes) and prune older step checkpoints beyond ``keep_last``."""
    weights = par.full_state()
    opt = par.optimizer_state(optimizer, weights)
    final = checkpoint_dir(run_dir, state.step)
    if par.ctx.is_main:
        tmp = final.with_name(final.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        _save_weights(par, tmp, weights)
        tensors: dict[str, torch.Tensor] = {}
        payload = {"step": state.step, "cursor": asdict(state.cursor), "extra": state.extra,
                   "scheduler": scheduler.state_dict(), "rng": _rng_state(tensors), "optimizer": _pack(opt, tensors)}
        save_file(tensors, str(tmp / TENSORS_FILE))
        write_json_atomic(tmp / STATE_FILE, payload)
        write_text_atomic(tmp / "config.yaml", config_yaml)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        if keep_last > 0:
            for old in list_checkpoints(run_dir)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    par.ctx.barrier()
    return final


def read_trainer_state(ckpt: Path, *, with_tensors: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    """The JSON payload and (unless ``with_tensors`` is off) the tensors of a checkpoint's trainer state
    (on CPU); no code runs."""
    ckpt = Path(ckpt)
    try:
        payload = json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))
        tensors = load_file(str(ckpt / TENSORS_FILE)) if with_tensors else {}
    except (OSError, ValueError) as e:
        raise TlvrError(f"{ckpt}: unreadable trainer state ({type(e).__name__}: {e})") from None
    return payload, tensors


def load_checkpoint(ckpt: Path, par: Parallel, optimizer: Any, scheduler: Any) -> TrainState:
    """Restore weights, optimizer, scheduler and RNG from ``ckpt``; returns the ``TrainState``."""
    from ..model.checkpoint import read_state_dict
    from .lora import ADAPTER_DIR, checkpoint_state, has_adapters

    payload, tensors = read_trainer_state(ckpt)
    opt = _unpack(payload["optimizer"], tensors)
    if has_adapters(par.model):
        weights = checkpoint_state(par.model, Path(ckpt))
    elif (Path(ckpt) / ADAPTER_DIR).is_dir():
        raise TlvrError(f"{ckpt}: written by a LoRA run; resume it with the tune.lora settings it was saved with")
    else:
        weights = opt.get("masters") or read_state_dict(Path(ckpt))
    par.load_state(weights, optimizer, opt, where=ckpt)
    scheduler.load_state_dict(payload["scheduler"])
    _set_rng_state(payload["rng"], tensors)
    return TrainState(step=payload["step"], cursor=DataCursor(**payload["cursor"]), extra=payload.get("extra", {}))


def save_final(run_dir: Path, par: Parallel, generation: dict[str, Any] | None = None) -> Path:
    """Write the final model (released layout) to ``<run_dir>/final`` (collective, like a checkpoint);
    ``generation``: the sampling settings its generation_config.json records."""
    out = Path(run_dir) / "final"
    weights = par.full_state()
    if par.ctx.is_main:
        _save_weights(par, out, weights, generation)
    par.ctx.barrier()
    return out


def _save_weights(par: Parallel, out: Path, weights: dict[str, torch.Tensor] | None,
                  generation: dict[str, Any] | None = None) -> None:
    """The model in the released layout into ``out`` (``weights``: gathered shards, None for a replica); a
    LoRA model merged, with its adapters in peft's format in ``out/adapter``."""
    from ..model.checkpoint import save_model
    from .lora import ADAPTER_DIR, has_adapters, released_state, save_adapter

    lora = has_adapters(par.model)
    save_model(par.model, out, state=released_state(par.model) if lora else weights, dtype=par.save_dtype,
               generation=generation)
    if lora:
        save_adapter(par.model, out / ADAPTER_DIR)


# ----------------------------------------------------------------------------- the resume rule

# keys that may differ between the runs of one run directory: where and how often it logs and saves
# (the output section, trackers), how long it runs (optim.max_steps: the schedule spans the new
# total from the resumed step on), how its inputs are loaded, how the rollouts are spread (the same
# samples either way, as with any number of processes), and what the demo evaluates afterwards
SAFE_TO_CHANGE = ("output", "trackers", "optim.max_steps", "sample_every", "data.num_workers", "data.feature_cache_gb",
                  "data.max_skip_fraction", "dist.rollout_parallel", "dist.rollout_tensor_size",
                  "dist.timeout_minutes", "prepare.evaluate", "prepare.eval_limit", "prepare.eval_batch_size",
                  "prepare.eval_sampled")
CONFIG = "config.yaml"
PREVIOUS_CONFIG = "config.previous.yaml"
CONFIG_CHANGES = "config-changes.jsonl"
ABSENT = "(absent)"


@dataclass
class RunPlan:
    """What a training job does with its run directory; ``message`` says it (empty for a plain fresh start)."""

    run_dir: Path
    config_yaml: str
    resume_from: Path | None = None
    complete: bool = False  # the run already finished with this config: ``final/`` is the result
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # saved → new, recorded when the run goes on
    message: str = ""


def total_steps(items: int, per_step: int, epochs: int, max_steps: int) -> int:
    """Optimizer steps of a run: ``epochs`` passes over ``items`` in steps of ``per_step`` (the last one
    partial), capped at ``max_steps`` when that is set (> 0)."""
    total = math.ceil(items / per_step) * epochs
    return min(total, max_steps) if max_steps else total


def plan_run(run_dir: Path, resume: str | None, cfg: Any, total: int, *, force: bool = False,
             announce: bool = False) -> RunPlan:
    """Apply the run-directory rule (module docstring) before anything is loaded: which checkpoint to
    resume (``resume``: None or 'auto' → the latest, or a checkpoint directory), whether the run is
    complete, or a one-line refusal naming the keys that differ from the saved config. ``announce``
    (one process of a run) prints the plan's message."""
    run_dir = Path(run_dir)
    ckpts = list_checkpoints(run_dir)
    has_final = (run_dir / "final" / "config.json").exists()
    explicit = bool(resume) and resume != "auto"
    ckpt = resolve_resume(run_dir, resume) if explicit else (ckpts[-1] if ckpts else None)
    goes_on = bool(ckpts) or has_final or explicit  # something trained is there: the config must match it
    saved = _saved_config(run_dir, ckpt)
    changes = config_changes(saved, cfg) if saved is not None and goes_on else {}
    unsafe = {k: v for k, v in changes.items() if not is_safe_to_change(k)}
    if unsafe and not force:
        raise TlvrError(f"{run_dir} holds a run with another config: {describe_changes(unsafe)}; run it unchanged to "
                        f"go on with it (--resume auto), add --force to resume it with the new config (the old one "
                        f"is kept in {PREVIOUS_CONFIG}), or use another output.run_dir")
    plan = RunPlan(run_dir, to_yaml(cfg), ckpt, changes=changes)
    step = checkpoint_step(ckpt) if ckpt is not None else None
    if step is not None and step > total:
        raise TlvrError(f"{ckpt} is at step {step}, past the {total} steps this config trains (optim.max_steps or "
                        f"the data shrank): use another output.run_dir")
    forced = f" (forced: {describe_changes(unsafe)})" if unsafe else ""
    if has_final and (step is None or step == total):
        plan.complete = True
        plan.message = f"{run_dir} is complete{forced}: reusing {run_dir / 'final'}"
    elif ckpt is not None:
        plan.message = f"resuming {run_dir} from step {step} of {total} ({ckpt}){forced}"
    elif resume == "auto":
        plan.message = f"--resume auto: no checkpoint in {run_dir}: starting fresh"
    if announce and plan.message:
        note(plan.message)
    return plan


def checkpoint_step(ckpt: Path) -> int:
    payload, _ = read_trainer_state(ckpt, with_tensors=False)
    return int(payload["step"])


def _saved_config(run_dir: Path, ckpt: Path | None) -> dict | None:
    """The config the run was saved with: the run directory's, else the checkpoint's (an explicit one)."""
    for path in (run_dir / CONFIG, *((ckpt / CONFIG,) if ckpt is not None else ())):
        if path.is_file():
            return read_yaml(path)
    return None


def config_changes(saved: dict, cfg: Any) -> dict[str, tuple[Any, Any]]:
    """Dotted key → (saved value, new value) for every key that differs; keys an older config.yaml
    lacks count as their defaults (a new key is not a change)."""
    new = yaml.safe_load(to_yaml(cfg))
    old = deep_merge(yaml.safe_load(to_yaml(type(cfg)())), saved)
    a, b = _flatten(old), _flatten(new)
    keys = list(b) + [k for k in a if k not in b]
    return {k: (a.get(k, ABSENT), b.get(k, ABSENT)) for k in keys if a.get(k, ABSENT) != b.get(k, ABSENT)}


def is_safe_to_change(key: str) -> bool:
    return any(key == s or key.startswith(s + ".") for s in SAFE_TO_CHANGE)


def describe_changes(changes: dict[str, tuple[Any, Any]], most: int = 6) -> str:
    """``optim.lr=1e-05 → 2e-05, algo.beta=0.04 → 0.0`` (the first ``most``, then a count)."""
    parts = [f"{k}={_show(old)} → {_show(new)}" for k, (old, new) in list(changes.items())[:most]]
    more = f" and {len(changes) - most} more" if len(changes) > most else ""
    return ", ".join(parts) + more


def _show(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _record_config(plan: RunPlan, step: int) -> None:
    """Write the run's config; when it replaces a different one, keep that one and log the change."""
    run_dir = plan.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    if plan.changes and (run_dir / CONFIG).is_file():
        write_text_atomic(run_dir / PREVIOUS_CONFIG, (run_dir / CONFIG).read_text(encoding="utf-8"))
        row = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "step": step,
               "resumed_from": str(plan.resume_from) if plan.resume_from else None,
               "changes": {k: [old, new] for k, (old, new) in plan.changes.items()},
               "forced": [k for k in plan.changes if not is_safe_to_change(k)]}
        with (run_dir / CONFIG_CHANGES).open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
    write_text_atomic(run_dir / CONFIG, plan.config_yaml)


def start_run(plan: RunPlan, par: Parallel, optimizer: Any, scheduler: Any, *, output: OutputConfig):
    """Restore the checkpoint the plan resumes from (if any), write the resolved config into the run
    directory (recording what changed) and open its metrics log (truncated to the resumed step) with
    the trackers ``output`` names (rank 0 only). Returns ``(state, logger)``."""
    from .metrics import MetricsLogger, print_warning
    from .trackers import trackers_for_run

    ckpt = plan.resume_from
    st = load_checkpoint(ckpt, par, optimizer, scheduler) if ckpt is not None else TrainState()
    if par.ctx.is_main:
        _record_config(plan, st.step)
    resume_step = st.step if ckpt else None
    trackers = (trackers_for_run(output, plan.run_dir, plan.config_yaml, resume_step, print_warning)
                if par.ctx.is_main else [])
    logger = MetricsLogger(plan.run_dir, resume_step=resume_step, trackers=trackers, enabled=par.ctx.is_main)
    return st, logger


# ----------------------------------------------------------------------------- Ctrl-C


class StopRequest:
    """Ctrl-C during a training loop: the first asks the loop to stop after the step it is in (with a
    checkpoint, see ``interrupted``); a second one stops at once (KeyboardInterrupt). ``close`` puts
    the previous handler back."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.requested = False
        self._say = say
        self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, *_: Any) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._previous)
        self._say("Ctrl-C: stopping after this step, with a checkpoint (Ctrl-C again stops now, without one)")

    def close(self) -> None:
        signal.signal(signal.SIGINT, self._previous)


def interrupted(saved: Path, step: int, total: int) -> Interrupted:
    return Interrupted(f"stopped at step {step} of {total}; checkpoint saved in {saved}", saved=saved)
