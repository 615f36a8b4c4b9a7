"""Experiment trackers (``output.trackers``): TensorBoard, Weights & Biases and trackio, each an optional
extra. A tracker receives what ``metrics.MetricsLogger`` writes — every metrics.jsonl value under its
own name and step, the sample completions as a table, the curves PNG — and the resolved config when
it opens.

Offline unless credentials say otherwise: wandb runs in offline mode (files under the run directory,
``wandb sync`` uploads them) unless ``WANDB_MODE`` or a W&B API key is set; trackio logs to its local
store unless ``TRACKIO_SPACE_ID`` names a Space; TensorBoard writes event files under the run
directory. Each tracker names where its files went in one line when it opens.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import netrc
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml

from ..errors import TlvrError
from ..jobs import OutputConfig

# the module each tracker imports; the extra that installs it is named after the tracker
MODULES = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb", "trackio": "trackio"}


class Tracker(Protocol):
    name: str
    note: str  # one line: where the tracker's files went

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None: ...

    def log_table(self, step: int, key: str, columns: list[str], rows: list[list]) -> None: ...

    def log_image(self, step: int, key: str, path: Path) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class TrackerRun:
    """What a tracker is told when it opens."""

    run_dir: Path
    project: str
    name: str
    config: dict
    resume_step: int | None = None


# ----------------------------------------------------------------------------- TensorBoard


class TensorBoardTracker:
    name = "tensorboard"

    def __init__(self, module: Any, run: TrackerRun) -> None:
        log_dir = run.run_dir / "tensorboard"
        # a resumed run drops the events it logged after the checkpoint it resumes from
        purge = run.resume_step + 1 if run.resume_step is not None else None
        self.writer = module.SummaryWriter(str(log_dir), purge_step=purge)
        config = yaml.safe_dump(run.config, sort_keys=False)
        self.writer.add_text("config", "".join(f"    {line}\n" for line in config.splitlines()), run.resume_step or 0)
        self.note = f"tensorboard: event files in {log_dir} (view: tensorboard --logdir {log_dir})"

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def log_table(self, step: int, key: str, columns: list[str], rows: list[list]) -> None:
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(_table_cell(v) for v in row) + " |" for row in rows]
        self.writer.add_text(key, "\n".join(lines), step)

    def log_image(self, step: int, key: str, path: Path) -> None:
        import numpy as np
        from PIL import Image

        with Image.open(path) as im:
            pixels = np.asarray(im.convert("RGB"))
        self.writer.add_image(key, pixels, step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


def _table_cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", "<br>")


# ----------------------------------------------------------------------------- Weights & Biases


def wandb_mode() -> str:
    """``WANDB_MODE`` when set; otherwise online only when a W&B API key is configured (env or netrc)."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return "online" if netrc.netrc().authenticators(host) else "offline"
    except (OSError, netrc.NetrcParseError):
        return "offline"


class _RunLogger:
    """What wandb and trackio share: ``module.init`` returns a run whose ``log(dict, step=)`` takes
    scalars and ``module.Table`` / ``module.Image`` values alike."""

    module: Any
    run: Any

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(dict(metrics), step=step)

    def log_table(self, step: int, key: str, columns: list[str], rows: list[list]) -> None:
        self.run.log({key: self.module.Table(columns=columns, data=rows)}, step=step)

    def log_image(self, step: int, key: str, path: Path) -> None:
        self.run.log({key: self.module.Image(str(path))}, step=step)


class WandbTracker(_RunLogger):
    name = "wandb"

    def __init__(self, module: Any, run: TrackerRun) -> None:
        self.module = module
        mode = wandb_mode()
        # console off: wandb would otherwise wrap stdout/stderr under the progress bar
        self.run = module.init(project=run.project, name=run.name, dir=str(run.run_dir), config=run.config, mode=mode,
                               settings=module.Settings(console="off", silent=True))
        if mode == "offline":
            files = Path(self.run.dir).parent
            self.note = f"wandb: offline run in {files} (no W&B credentials set; upload with `wandb sync {files}`)"
        else:
            self.note = f"wandb: {mode} run {getattr(self.run, 'url', None) or run.name}"

    def close(self) -> None:
        self.run.finish()


# ----------------------------------------------------------------------------- trackio


class TrackioTracker(_RunLogger):
    name = "trackio"

    def __init__(self, module: Any, run: TrackerRun) -> None:
        self.module = module
        with _quiet():  # trackio prints a banner; our one-line note says the same
            self.run = module.init(project=run.project, name=run.name, config=run.config)
        space = os.environ.get("TRACKIO_SPACE_ID")
        if space:
            self.note = f"trackio: logging to the Space {space} (project {run.project})"
        else:
            store = getattr(module, "TRACKIO_DIR", "the trackio store")
            self.note = f"trackio: logged locally in {store} (view: trackio show --project {run.project})"

    def close(self) -> None:
        with _quiet():  # the module's finish also forgets the run, so trackio's exit hook does not finish it again
            self.module.finish()


@contextlib.contextmanager
def _quiet():
    with contextlib.redirect_stdout(io.StringIO()):
        yield


# ----------------------------------------------------------------------------- opening

TRACKERS: dict[str, Callable[[Any, TrackerRun], Tracker]] = {
    "tensorboard": TensorBoardTracker, "wandb": WandbTracker, "trackio": TrackioTracker}


def import_tracker(name: str) -> Any:
    """The module a tracker needs; a one-line error naming the extra that installs it."""
    if name not in TRACKERS:
        raise TlvrError(f"output.trackers: unknown tracker {name!r}; expected some of {', '.join(TRACKERS)}")
    try:
        return importlib.import_module(MODULES[name])
    except ImportError:
        raise TlvrError(f"output.trackers: {name} is not installed: pip install 'tlvr[{name}]'") from None


def open_trackers(names: Sequence[str], run: TrackerRun, warn: Callable[[str], None]) -> list[Tracker]:
    """Open each named tracker (missing packages are errors, before anything is opened); one that
    fails to start is reported through ``warn`` and left out, so training goes on without it."""
    modules = {name: import_tracker(name) for name in dict.fromkeys(names)}
    opened = []
    for name, module in modules.items():
        try:
            tracker = TRACKERS[name](module, run)
        except Exception as e:
            warn(f"{name} did not start ({type(e).__name__}: {e}); training goes on without it")
            continue
        opened.append(tracker)
    return opened


def trackers_for_run(output: OutputConfig, run_dir: Path, config_yaml: str, resume_step: int | None,
                     warn: Callable[[str], None]) -> list[Tracker]:
    """The trackers ``output.trackers`` names, opened for this run with the resolved config as their run config;
    a resumed run is a new tracker run named after the step it resumes from."""
    if not output.trackers:
        return []
    name = output.tracker_run_name or Path(run_dir).resolve().name
    if resume_step is not None:
        name = f"{name}-from-{resume_step}"
    run = TrackerRun(Path(run_dir), output.tracker_project, name, yaml.safe_load(config_yaml) or {}, resume_step)
    return open_trackers(output.trackers, run, warn)
