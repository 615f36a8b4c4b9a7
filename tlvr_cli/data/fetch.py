"""Download the released checkpoints, the NextQA training set and the four benchmarks from the Hugging Face hub.

Every target is one hub repo; we list its files, download the ones matching the target's patterns into its
destination, 8 files at a time (skipping files already present with the hub's size; each downloaded file is
checked as it arrives against the hash the hub lists, SHA-256 for LFS files and the git blob SHA-1 for the
rest, and a mismatch deletes it before extraction), extract archives
next to where they lie, and write ``<dest>/tlvr-manifest.json``. Layout under the data root (``--root`` /
``$TLVR_DATA`` / ``~/.cache/tlvr``):

    models/TinyLLaVA-Video-R1/                        r1         config.json, *.safetensors, tokenizer files
    models/TinyLLaVA-Video-Coldstart_NextQA_16/       coldstart  (same; the dir name is the repo name, so
    models/TinyLLaVA-Video-Qwen2.5-3B-Group-16-512/   base        `--model <hub id>` finds it, see checkpoint.py)
    train/                                            nextqa     spec §1
        nextqa_0-30s.jsonl, nextqa-coldstart-16.json, NextQA/NExTVideo/<dir>/<id>.mp4
    videomme/                                         videomme   spec §3
        videomme/test-00000-of-00001.parquet, data/<videoID>.mp4, subtitle/<videoID>.srt
    mvbench/                                          mvbench    spec §4 (branch main, zips extracted in video/)
        json/<task>.json, video/{star,ssv2_video,clevrer,perception,...}/..., video/nturgbd/ (by hand)
    mlvu/                                             mlvu       spec §5 (gated)
        json/1_plotQA.json ... 9_summary.json, video/<n_task>/<video>.mp4
    mmvu/                                             mmvu       spec §6 (mirrors the repo 1:1)
        validation.json, videos/<Subject>/<n>.mp4

An archive is extracted into the directory holding it, through a temp dir, and then marked done with
``.extracted-<archive name>``; without the marker it is extracted again from scratch. When a repo wraps everything
in one top folder (MLVU's ``MLVU/``), its entries are linked into the destination so the layout above holds.
The hub clients live in ``hub.py``, the extraction in ``archive.py``, the worker threads in ``threads.py``; this
module holds the targets and the run.
"""

from __future__ import annotations

import difflib
import fnmatch
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from ..errors import TlvrError, first_line
from ..files import write_json_atomic
from .archive import extract_archive, extraction_marker, is_archive, now_utc
from .hub import HfHubClient, HubClient, RemoteFile, local_digest
from .threads import in_parallel

MANIFEST = "tlvr-manifest.json"
DOWNLOAD_WORKERS = 8  # files in flight at once: a repo of a thousand videos is a thousand round trips
# spec §2: skips TensorBoard logs and training_args.bin
_MODEL_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model")


@dataclass(frozen=True)
class Target:
    name: str
    repo_id: str
    repo_type: Literal["model", "dataset"]
    kind: Literal["model", "dataset"]
    allow_patterns: tuple[str, ...]
    dest: str  # relative to the data root
    description: str
    expect: tuple[str, ...] = ()  # files the spec names; their absence from the listing is only a warning
    anchor: str = ""  # a file that must sit directly under dest once fetched (used to undo a wrapping top folder)
    gated: bool = False

    @property
    def url(self) -> str:
        return f"https://huggingface.co/{'datasets/' if self.repo_type == 'dataset' else ''}{self.repo_id}"


def _model(name: str, repo: str, description: str) -> Target:
    return Target(name, repo, "model", "model", _MODEL_PATTERNS, f"models/{repo.split('/')[-1]}", description,
                  expect=("config.json",), anchor="config.json")


_ARCHIVES = ("*.zip", "*.tar", "*.tar.gz", "*.tgz")
TARGETS: dict[str, Target] = {t.name: t for t in (
    _model("r1", "Zhang199/TinyLLaVA-Video-R1", "Final GRPO model (TinyLLaVA-Video-R1)."),
    _model("coldstart", "Zhang199/TinyLLaVA-Video-Coldstart_NextQA_16", "Cold-start SFT model (GRPO init)."),
    _model("base", "Zhang199/TinyLLaVA-Video-Qwen2.5-3B-Group-16-512",
           "Base TinyLLaVA-Video, 16 frames / 512 queries."),
    # spec §1: the two annotation names are verified; how the videos are packed in the repo is UNVERIFIED, so we take
    # any archive or loose mp4 and check afterwards that every video_filename resolves.
    Target("nextqa", "Zhang199/TinyLLaVA-Video-R1-training-data", "dataset", "dataset",
           ("nextqa_0-30s.jsonl", "nextqa-coldstart-16.json", *_ARCHIVES, "*.mp4"), "train",
           "NextQA 0-30 s GRPO set (5,496 rows) + 16 cold-start rows, with videos.",
           expect=("nextqa_0-30s.jsonl", "nextqa-coldstart-16.json"), anchor="nextqa_0-30s.jsonl"),
    Target("videomme", "lmms-lab/Video-MME", "dataset", "dataset", ("videomme/*.parquet", "*.zip"), "videomme",
           "Video-MME: 900 videos, 2,700 questions (parquet + 20 video zips + subtitles).",
           expect=("videomme/test-00000-of-00001.parquet", "subtitle.zip"),
           anchor="videomme/test-00000-of-00001.parquet"),
    # spec §4: branch main; the zip names other than clevrer/perception/... are UNVERIFIED, hence "video/*.zip".
    Target("mvbench", "OpenGVLab/MVBench", "dataset", "dataset", ("json/*.json", "video/*.zip", "video/*.txt"),
           "mvbench", "MVBench: 20 tasks x 200 questions (json + video zips; NTU RGB+D by hand).",
           expect=("json/action_sequence.json", "json/fine_grained_pose.json", "video/clevrer.zip"),
           anchor="json/action_sequence.json"),
    # spec §5: the MLVU/ top folder and the video/<n_task>/ nesting are UNVERIFIED; the anchor step tolerates both.
    Target("mlvu", "MLVU/MVLU", "dataset", "dataset", ("*.json", "*.mp4", *_ARCHIVES), "mlvu",
           "MLVU dev: 7 multiple-choice tasks, 2,175 questions (gated: accept the terms first).",
           expect=("json/1_plotQA.json",), anchor="json/1_plotQA.json", gated=True),
    # spec §6: test.json and the videos/<Subject>/ naming are UNVERIFIED; the tree is mirrored as it is.
    Target("mmvu", "yale-nlp/MMVU", "dataset", "dataset", ("validation.json", "videos/*", *_ARCHIVES), "mmvu",
           "MMVU validation: 1,000 questions, multiple-choice subset scored.",
           expect=("validation.json",), anchor="validation.json"),
)}


@dataclass
class FetchResult:
    target: str
    repo_id: str
    dest: Path
    revision: str | None = None
    files: list[RemoteFile] = field(default_factory=list)  # everything the target selects
    to_download: list[RemoteFile] = field(default_factory=list)
    downloaded: list[str] = field(default_factory=list)
    extracted: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # the data is unusable as is (e.g. missing videos)
    dry_run: bool = False

    @property
    def bytes_to_download(self) -> int:
        return sum(f.size or 0 for f in self.to_download)

    @property
    def up_to_date(self) -> bool:
        return not self.to_download


# ----------------------------------------------------------------------------------------------------------------
# errors


def hub_error_message(exc: BaseException, target: Target, dest: Path) -> str | None:
    """One line naming the repo, the cause and the by-hand fallback; None when ``exc`` is not a hub/network failure."""
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    by_hand = f"download it by hand from {target.url} and place its files under {dest}"
    terms = f"accept its terms at {target.url} while logged in, set HF_TOKEN, and retry; or " if target.gated else ""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, GatedRepoError) or (target.gated and status in (401, 403)):
        return (f"access to {target.repo_id} is gated: "
                f"{terms or 'request access, set HF_TOKEN, and retry; or '}{by_hand}")
    if isinstance(exc, RepositoryNotFoundError) or status in (401, 403):
        return (f"the hub refused {target.repo_id} (HTTP {status or 'not found'}: wrong token, private or renamed "
                f"repo): {terms}check HF_TOKEN, or {by_hand}")
    if isinstance(exc, (LocalEntryNotFoundError, ConnectionError, TimeoutError)) or is_network_error(exc):
        return f"cannot reach the Hugging Face hub for {target.repo_id} (offline?): {terms}{by_hand}"
    if isinstance(exc, HfHubHTTPError):
        return f"hub error for {target.repo_id} ({first_line(exc)}): {terms}{by_hand}"
    if isinstance(exc, FileNotFoundError):
        return f"{target.repo_id} was not found ({exc}): {by_hand}"
    return None


def is_network_error(exc: BaseException) -> bool:
    # requests and httpx(2) connection/timeout errors, matched by module so neither needs importing.
    for cls in type(exc).__mro__:
        if cls.__module__.split(".")[0] in {"requests", "httpx", "httpx2", "urllib3"} and \
                any(k in cls.__name__ for k in ("Connect", "Timeout", "Transport", "Network", "Proxy")):
            return True
    return False


def _hub_call(fn: Callable, target: Target, dest: Path):
    try:
        return fn()
    except TlvrError:
        raise
    except Exception as exc:
        message = hub_error_message(exc, target, dest)
        if message is None:
            raise
        raise TlvrError(message) from exc


# ----------------------------------------------------------------------------------------------------------------
# fetch


def resolve_targets(names: list[str]) -> list[Target]:
    out: list[Target] = []
    for name in names:
        key = name.strip().lower()
        if key not in TARGETS:
            close = difflib.get_close_matches(key, list(TARGETS), n=1, cutoff=0.5)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise TlvrError(f"unknown fetch target {name!r}: {hint}valid targets: {', '.join(TARGETS)}")
        if TARGETS[key] not in out:
            out.append(TARGETS[key])
    return out


def _is_present(dest: Path, rf: RemoteFile) -> bool:
    local = dest / rf.path
    if local.is_file() and (rf.size is None or local.stat().st_size == rf.size):
        return True
    marker = extraction_marker(local)  # an archive extracted earlier and then deleted still counts
    if is_archive(rf.path) and marker.is_file():
        try:
            return rf.size is None or json.loads(marker.read_text()).get("size") == rf.size
        except (OSError, ValueError):
            return False
    return False


def _changed(dest: Path, present: list[RemoteFile]) -> list[RemoteFile]:
    """The files among ``present`` whose bytes no longer hash to what the hub lists (SHA-256 for LFS files,
    the git blob SHA-1 for the rest; archives extracted and deleted cannot be checked)."""
    checkable = [f for f in present if f.listed_digest and (dest / f.path).is_file()]
    digests = dict(in_parallel(lambda f: local_digest(dest / f.path, f), checkable, min(4, os.cpu_count() or 1)))
    return [f for f in checkable if digests[f] != f.listed_digest]


def _select(target: Target, listing: list[RemoteFile]) -> list[RemoteFile]:
    return [f for f in listing if any(fnmatch.fnmatch(f.path, p) for p in target.allow_patterns)]


def plan_target(target: Target, root: Path, client: HubClient, *, verify: bool = False) -> FetchResult:
    """List the repo and decide which files are missing locally (with ``verify``, also those present whose
    hash differs from the listing's); downloads nothing."""
    dest = root / target.dest
    try:
        listing = client.list_files(target.repo_id, target.repo_type)
    except Exception as exc:
        message = hub_error_message(exc, target, dest)
        if message is None:
            raise
        offline = _from_manifest(target, dest)
        if offline is None:
            raise TlvrError(message) from exc
        if verify and (changed := _changed(dest, offline.files)):  # checked against the manifest's hashes
            offline.problems.append(f"{target.name}: {len(changed)} file(s) changed since the fetch and the hub is "
                                    f"unreachable to download them again: {', '.join(f.path for f in changed)}")
        return offline
    revision = getattr(client, "resolved_revision", lambda _r: None)(target.repo_id)
    files = _select(target, listing)
    missing = {f.path for f in files if not _is_present(dest, f)}
    if verify:
        missing |= {f.path for f in _changed(dest, [f for f in files if f.path not in missing])}
    result = FetchResult(target.name, target.repo_id, dest, revision, files, [f for f in files if f.path in missing])
    names = {f.path for f in listing}
    for expected in target.expect:  # names from the spec, some UNVERIFIED: tell the user, don't fail
        if expected not in names and not any(n.endswith("/" + expected) for n in names):
            result.warnings.append(f"{target.repo_id}: expected file {expected!r} is not in the hub listing")
    if not files:
        result.problems.append(f"{target.repo_id}: no file matches {', '.join(target.allow_patterns)}")
    return result


def _from_manifest(target: Target, dest: Path) -> FetchResult | None:
    """Offline: a complete earlier fetch (manifest present, every file still there) counts as up to date."""
    try:
        manifest = json.loads((dest / MANIFEST).read_text())
        files = [RemoteFile(f["path"], f.get("size"), f.get("sha256"), f.get("git_sha1")) for f in manifest["files"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if manifest.get("repo") != target.repo_id or not all(_is_present(dest, f) for f in files):
        return None
    return FetchResult(target.name, target.repo_id, dest, manifest.get("revision"), files,
                       warnings=[f"{target.repo_id}: hub unreachable; checked the files against {dest / MANIFEST}"])


def fetch_targets(targets: list[str], root: Path, *, client: HubClient | None = None, dry_run: bool = False,
                  progress: bool = True, keep_archives: bool = True, verify: bool = False,
                  workers: int = DOWNLOAD_WORKERS) -> list[FetchResult]:
    """Fetch each named target under ``root``, ``workers`` files at a time; with ``dry_run`` only list what
    would be downloaded; with ``verify`` the files already present are hashed too, and those that changed
    are downloaded again."""
    if workers < 1:
        raise TlvrError(f"download workers must be >= 1, got {workers}")
    resolved = resolve_targets(targets)
    client = client or HfHubClient()
    root = Path(root).expanduser()
    console = Console(stderr=True, highlight=False, quiet=not progress)
    results = []
    for target in resolved:
        result = plan_target(target, root, client, verify=verify)
        result.dry_run = dry_run
        if not dry_run:
            _download(target, result, client, console, workers)
            _extract_all(target, result, console, keep_archives)
            _fix_layout(target, result)
            _check(target, result)
            _write_manifest(target, result)
        for line in result.warnings + result.problems:
            console.print(f"[yellow]warning:[/] {line}")
        results.append(result)
    return results


def _download(target: Target, result: FetchResult, client: HubClient, console: Console, workers: int) -> None:
    """Download ``result.to_download``, ``workers`` files at a time, each checked against the hub's hash as soon
    as it is in; the first failure stops the rest (the files in by then are kept)."""
    if result.up_to_date:
        console.print(f"{target.name}: up to date ({len(result.files)} files in {result.dest})")
        return
    result.dest.mkdir(parents=True, exist_ok=True)
    columns = (TextColumn("[bold]{task.fields[name]}[/] {task.description}"), BarColumn(), DownloadColumn(),
               TransferSpeedColumn(), TimeRemainingColumn())
    todo = result.to_download
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(f"0 of {len(todo)} files", total=result.bytes_to_download or None, name=target.name)

        def fetch(rf: RemoteFile) -> str | None:
            """Download one file; returns its hash of the kind the hub lists to check it against, if any."""
            # a copy of another size or hash goes first: the hub library would keep a file its metadata matches
            (result.dest / rf.path).unlink(missing_ok=True)
            if is_archive(rf.path):  # a new archive is extracted again, over what the old one left
                extraction_marker(result.dest / rf.path).unlink(missing_ok=True)
            sent = 0

            def on_bytes(n: int) -> None:
                nonlocal sent
                sent += n
                bar.advance(task, n)

            try:
                _hub_call(lambda: client.download(target.repo_id, target.repo_type, rf.path, result.dest,
                                                  on_bytes=on_bytes), target, result.dest)
            except OSError as exc:  # e.g. a file that arrived short of its size (the library keeps no part of it)
                raise TlvrError(f"{target.name}: {rf.path} from {target.repo_id} did not arrive whole "
                                f"({first_line(exc)}): run `tlvr data fetch {target.name}` again; "
                                f"the files already in {result.dest} are kept") from exc
            bar.advance(task, max(0, (rf.size or 0) - sent))  # a resumed download reports only what it sent
            return local_digest(result.dest / rf.path, rf)

        corrupt = []
        for done, (rf, digest) in enumerate(in_parallel(fetch, todo, workers), 1):
            if digest is not None and digest != rf.listed_digest:
                corrupt.append((rf, digest))
            bar.update(task, description=f"{done} of {len(todo)} files")
        result.downloaded += [rf.path for rf in todo]  # all of them: a failure has raised above
        bar.update(task, description="done")
    if corrupt:  # deleted before anything is extracted from them: the next fetch downloads them again
        corrupt.sort(key=lambda pair: pair[0].path)
        for rf, _ in corrupt:
            (result.dest / rf.path).unlink(missing_ok=True)
        what = ", ".join(f"{rf.path} ({rf.digest_name} {got[:12]}, listed {rf.listed_digest[:12]})"
                         for rf, got in corrupt)
        raise TlvrError(f"{target.name}: {len(corrupt)} file(s) from {target.repo_id} arrived corrupted and were "
                        f"deleted: {what}; run `tlvr data fetch {target.name}` again")


def _extract_all(target: Target, result: FetchResult, console: Console, keep_archives: bool) -> None:
    for rf in result.files:
        archive = result.dest / rf.path
        if not is_archive(rf.path) or not archive.is_file():
            continue
        with console.status(f"{target.name}: extracting {rf.path}"):
            if extract_archive(archive, rf.size):
                result.extracted.append(rf.path)
        if not keep_archives:
            archive.unlink()


def _fix_layout(target: Target, result: FetchResult) -> None:
    """When everything sits in one wrapping folder (e.g. ``MLVU/json``), link its entries into dest."""
    dest = result.dest
    if not target.anchor or (dest / target.anchor).exists():
        return
    hits = [p for p in dest.glob(f"*/{target.anchor}") if not p.parts[len(dest.parts)].startswith(".")]
    if len(hits) != 1:
        result.warnings.append(f"{target.name}: {target.anchor} not found under {dest} after the fetch")
        return
    inner = dest / hits[0].relative_to(dest).parts[0]
    for entry in inner.iterdir():
        link = dest / entry.name
        if not link.exists() and not link.is_symlink():
            link.symlink_to(entry.relative_to(dest), target_is_directory=entry.is_dir())


def _check(target: Target, result: FetchResult) -> None:
    dest = result.dest
    if target.kind == "model" and not any(dest.glob("*.safetensors")):
        result.problems.append(f"{target.name}: no *.safetensors weights in {dest}")
    if target.name == "nextqa":
        _check_nextqa_videos(result)
    if target.name == "mvbench" and not (dest / "video" / "nturgbd").is_dir():
        # spec §4: video/nturgbd.zip was deleted from main (Oct 2024).
        result.warnings.append(f"mvbench: Fine-grained Pose needs the NTU RGB+D clips listed in "
                               f"video/MVBench_videos_ntu.txt, placed as .avi under {dest / 'video' / 'nturgbd'}")


def _check_nextqa_videos(result: FetchResult) -> None:
    dest = result.dest
    wanted: list[str] = []
    grpo = dest / "nextqa_0-30s.jsonl"
    if grpo.is_file():  # spec §1: "./NextQA/NExTVideo/..." joined to the root minus the leading "."
        wanted += [_strip_dot(json.loads(line)["video_filename"])
                   for line in grpo.read_text().splitlines() if line.strip()]
    cold = dest / "nextqa-coldstart-16.json"
    if cold.is_file():
        wanted += [r["video"] for r in json.loads(cold.read_text())]
    missing = sorted({v for v in wanted if not (dest / v).is_file()})
    if missing:
        result.problems.append(
            f"nextqa: {len(missing)} of {len(set(wanted))} videos are missing (first: {missing[0]}); they come from "
            f"lmms-lab/LLaVA-Video-178K 0_30_s_nextqa/0_30_s_nextqa_videos_1.tar.gz: extract them so that "
            f"{dest / missing[0]} exists")


def _strip_dot(video_filename: str) -> str:
    return (video_filename.removeprefix(".")).lstrip("/")


def _write_manifest(target: Target, result: FetchResult) -> None:
    if not result.dest.is_dir():
        return
    extracted = sorted(f.path for f in result.files
                       if is_archive(f.path) and extraction_marker(result.dest / f.path).is_file())
    write_json_atomic(result.dest / MANIFEST, {
        "target": target.name, "repo": target.repo_id, "repo_type": target.repo_type, "revision": result.revision,
        "files": [{"path": f.path, "size": f.size, "sha256": f.sha256, "git_sha1": f.git_sha1} for f in result.files],
        "extracted": extracted, "time": now_utc()})


# ----------------------------------------------------------------------------------------------------------------
# tables


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"


def targets_table(root: Path | None = None) -> Table:
    table = Table(title="fetch targets")
    for col in ("target", "repo", "dest", "description"):
        table.add_column(col, overflow="fold")  # a repo id or a path is folded onto the next line, never cut
    for t in TARGETS.values():
        dest = str(root / t.dest) if root else t.dest
        table.add_row(t.name, f"{t.repo_id}{' (gated)' if t.gated else ''}", dest, t.description)
    return table


def plan_table(results: list[FetchResult]) -> Table:
    dry = any(r.dry_run for r in results)
    table = Table(title="would download" if dry else "fetched")
    for col, justify in (("target", "left"), ("repo", "left"), ("files", "right"),
                         ("to download" if dry else "downloaded", "right"),
                         ("size", "right"), ("dest", "left")):
        table.add_column(col, justify=justify, overflow="fold")
    for r in results:
        table.add_row(r.target, r.repo_id, str(len(r.files)), str(len(r.to_download)),
                      human_size(r.bytes_to_download) if r.to_download else "up to date", str(r.dest))
    total = sum(r.bytes_to_download for r in results)
    table.add_row("total", "", "", str(sum(len(r.to_download) for r in results)), human_size(total), "")
    return table
