"""``tlvr push``: a checkpoint in the released layout to a hub model repo (``create_repo`` +
``upload_folder``), with a model card, the run's resolved config and its training curves.

The upload is staged in a temporary directory beside the checkpoint (hard links where the filesystem
allows, copies otherwise), so the checkpoint directory itself is never written to. A step checkpoint's
trainer state (optimizer moments, RNG) is left out: the repo holds what loads the model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .data.fetch import human_size, is_network_error
from .data.hub import HfHubClient, HubUploader
from .errors import TlvrError, first_line
from .model.checkpoint import HUB_ID, INDEX, WEIGHTS
from .model_card import model_card
from .runs import RunSummary, find_eval_results, is_run_dir, read_run

# what a run directory's step checkpoint holds besides the model; the card is written anew
NOT_UPLOADED = {"trainer_state.json", "trainer_state.safetensors", "trainer_state.pt", "config.yaml", "README.md"}
CARD = "README.md"
CURVES = "curves.png"
CONFIG = "tlvr_config.yaml"


@dataclass
class PushFile:
    path_in_repo: str
    source: Path | None  # None: written by tlvr (the card)
    size: int


@dataclass
class PushPlan:
    checkpoint: Path
    repo_id: str
    run_dir: Path | None
    card: str
    files: list[PushFile] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


@dataclass
class PushResult:
    plan: PushPlan
    url: str = ""  # the repo's URL (empty for a dry run)
    commit_url: str = ""


def find_run_dir(checkpoint: Path) -> Path | None:
    """The run directory a checkpoint was written by: ``<run>/final`` or ``<run>/checkpoints/step-N``."""
    for candidate in (checkpoint.parent, checkpoint.parent.parent):
        if is_run_dir(candidate):
            return candidate
    return None


def _check_checkpoint(checkpoint: Path) -> None:
    if not checkpoint.is_dir():
        raise TlvrError(f"{checkpoint}: checkpoint directory not found")
    if is_run_dir(checkpoint):
        raise TlvrError(f"{checkpoint} is a run directory: push its final model, {checkpoint / 'final'}")
    weights = (checkpoint / WEIGHTS).is_file() or (checkpoint / INDEX).is_file()
    if not (checkpoint / "config.json").is_file() or not weights:
        raise TlvrError(f"{checkpoint}: not a checkpoint in the released layout (needs config.json and {WEIGHTS} "
                        f"or {INDEX})")


def plan_push(checkpoint: Path, repo_id: str) -> PushPlan:
    """What ``push`` uploads: the checkpoint's files, the run's config and curves, and the card."""
    import yaml

    checkpoint = Path(checkpoint)
    if not HUB_ID.fullmatch(repo_id):
        raise TlvrError(f"{repo_id!r} is not a hub repo id (expected owner/name)")
    _check_checkpoint(checkpoint)
    run_dir = find_run_dir(checkpoint)
    files = [PushFile(p.relative_to(checkpoint).as_posix(), p, p.stat().st_size) for p in sorted(checkpoint.rglob("*"))
             if p.is_file() and p.relative_to(checkpoint).parts[0] not in NOT_UPLOADED]
    config: dict = {}
    run: RunSummary | None = None
    curves = None
    if run_dir is not None:
        run = read_run(run_dir)
        config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        files.append(PushFile(CONFIG, run_dir / "config.yaml", (run_dir / "config.yaml").stat().st_size))
        # GRPO writes curves.png, the cold start loss.png
        curves = next((run_dir / n for n in (CURVES, "loss.png") if (run_dir / n).is_file()), None)
        if curves is not None:
            files.append(PushFile(CURVES, curves, curves.stat().st_size))
    results = find_eval_results(run_dir) if run_dir is not None else find_eval_results(checkpoint)
    card = model_card(checkpoint, repo_id, config, run, results, curves=curves is not None)
    files.append(PushFile(CARD, None, len(card.encode())))
    return PushPlan(checkpoint, repo_id, run_dir, card, files)


def _stage(plan: PushPlan, folder: Path) -> None:
    for f in plan.files:
        dst = folder / f.path_in_repo
        dst.parent.mkdir(parents=True, exist_ok=True)
        if f.source is None:
            dst.write_text(plan.card, encoding="utf-8")
            continue
        try:
            os.link(f.source, dst)  # no second copy of the weights
        except OSError:
            shutil.copyfile(f.source, dst)


def push_checkpoint(checkpoint: Path, repo_id: str, *, private: bool = False, dry_run: bool = False,
                    client: HubUploader | None = None) -> PushResult:
    """Upload ``checkpoint`` with its card to the model repo ``repo_id`` (created if missing); ``dry_run``
    only plans. Hub failures (offline, no or a read-only token) are one-line errors."""
    plan = plan_push(checkpoint, repo_id)
    if dry_run:
        return PushResult(plan)
    client = client or HfHubClient()
    url = _hub_call(lambda: client.create_repo(repo_id, "model", private=private), repo_id)
    staging = Path(tempfile.mkdtemp(prefix=".push-", dir=plan.checkpoint.parent))
    try:
        _stage(plan, staging)
        message = f"Upload {plan.checkpoint.name} with tlvr"
        commit = _hub_call(lambda: client.upload_folder(repo_id, "model", staging, message), repo_id)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return PushResult(plan, url, commit)


def push_error_message(exc: BaseException, repo_id: str) -> str | None:
    """One line naming the repo, the cause and the fix; None when ``exc`` is not a hub/network failure."""
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalTokenNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    token = "set HF_TOKEN to a token with write access (or run `hf auth login`)"
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, LocalTokenNotFoundError):
        return f"not logged in to the Hugging Face hub, so {repo_id} cannot be pushed: {token}"
    if status in (401, 403) or isinstance(exc, RepositoryNotFoundError):
        return (f"the hub refused to push {repo_id} (HTTP {status or 'not found'}): the token cannot write to "
                f"{repo_id.split('/')[0]}; {token}")
    if isinstance(exc, OfflineModeIsEnabled):
        return f"cannot push {repo_id}: HF_HUB_OFFLINE is set (unset it; `--dry-run` lists what would be uploaded)"
    if isinstance(exc, (ConnectionError, TimeoutError)) or is_network_error(exc):
        return (f"cannot reach the Hugging Face hub to push {repo_id} (offline?); `--dry-run` lists what would be "
                f"uploaded")
    if isinstance(exc, HfHubHTTPError):
        return f"hub error pushing {repo_id} ({first_line(exc)})"
    if isinstance(exc, FileNotFoundError):
        return f"cannot push {repo_id} ({exc})"
    return None


def _hub_call(fn, repo_id: str) -> str:
    try:
        return fn()
    except TlvrError:
        raise
    except Exception as exc:
        message = push_error_message(exc, repo_id)
        if message is None:
            raise
        raise TlvrError(message) from exc


def plan_lines(plan: PushPlan) -> list[str]:
    """The dry run's listing: one line per file with its size, then the total."""
    width = max(len(f.path_in_repo) for f in plan.files)
    lines = [f"{f.path_in_repo:<{width}}  {human_size(f.size):>9}  "
             + (f"{f.source}" if f.source is not None else "(model card, written by tlvr)") for f in plan.files]
    return lines + [f"{len(plan.files)} files, {human_size(plan.total_bytes)} to {plan.repo_id}"]
