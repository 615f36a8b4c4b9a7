"""Hub clients for ``tlvr data fetch`` and ``tlvr push``: the real Hugging Face hub (pinned revision,
resumable downloads, ``create_repo`` + ``upload_folder``, honours ``HF_HUB_OFFLINE``) and a hub laid out
on disk (tests, mirrors)."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int | None
    sha256: str | None = None  # listed for LFS files
    git_sha1: str | None = None  # the git blob id, listed for the files kept in git itself

    @property
    def listed_digest(self) -> str | None:
        """The hash the hub lists to check a download against (``local_digest`` computes it)."""
        return self.sha256 or self.git_sha1

    @property
    def digest_name(self) -> str:
        return "SHA-256" if self.sha256 else "git SHA-1"


class HubClient(Protocol):
    def list_files(self, repo_id: str, repo_type: str) -> list[RemoteFile]: ...

    def download(self, repo_id: str, repo_type: str, filename: str, local_dir: Path,
                 on_bytes: Callable[[int], None] | None = None) -> Path: ...


class HubUploader(Protocol):
    def create_repo(self, repo_id: str, repo_type: str, *, private: bool) -> str: ...

    def upload_folder(self, repo_id: str, repo_type: str, folder: Path, commit_message: str) -> str: ...


class HfHubClient:
    """The real hub: lists with ``list_repo_tree`` (sizes, LFS sha256) and downloads with ``hf_hub_download``."""

    def __init__(self, token: str | None = None, timeout: float = 10.0, endpoint: str | None = None) -> None:
        self.token = token  # None = huggingface_hub's own lookup (HF_TOKEN, `hf auth login`)
        self.timeout = timeout
        self.endpoint = endpoint  # None = HF_ENDPOINT or huggingface.co
        self.revisions: dict[str, str] = {}

    def list_files(self, repo_id: str, repo_type: str) -> list[RemoteFile]:
        from huggingface_hub import HfApi
        from huggingface_hub.hf_api import RepoFile

        _raise_if_offline()
        api = HfApi(token=self.token, endpoint=self.endpoint)
        # Pin the revision so the listing and every download see the same commit.
        sha = api.repo_info(repo_id, repo_type=repo_type, timeout=self.timeout).sha
        if sha:
            self.revisions[repo_id] = sha
        return [RemoteFile(e.path, e.size, e.lfs.sha256 if e.lfs else None, None if e.lfs else e.blob_id)
                for e in api.list_repo_tree(repo_id, recursive=True, repo_type=repo_type, revision=sha)
                if isinstance(e, RepoFile)]

    def create_repo(self, repo_id: str, repo_type: str, *, private: bool) -> str:
        """Create the repo (an existing one is kept as it is); returns its URL."""
        from huggingface_hub import HfApi

        _raise_if_offline()
        api = HfApi(token=self.token, endpoint=self.endpoint)
        return str(api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True))

    def upload_folder(self, repo_id: str, repo_type: str, folder: Path, commit_message: str) -> str:
        """One commit adding (or replacing) every file of ``folder``; returns the commit's URL."""
        from huggingface_hub import HfApi

        _raise_if_offline()
        api = HfApi(token=self.token, endpoint=self.endpoint)
        return str(api.upload_folder(repo_id=repo_id, repo_type=repo_type, folder_path=str(folder),
                                     commit_message=commit_message).commit_url)

    def resolved_revision(self, repo_id: str) -> str | None:
        return self.revisions.get(repo_id)

    def download(self, repo_id: str, repo_type: str, filename: str, local_dir: Path,
                 on_bytes: Callable[[int], None] | None = None) -> Path:
        from huggingface_hub import hf_hub_download

        _raise_if_offline()
        # hf_hub_download resumes partial files kept under local_dir/.cache/huggingface.
        return Path(hf_hub_download(repo_id, filename, repo_type=repo_type, revision=self.revisions.get(repo_id),
                                    local_dir=local_dir, token=self.token, etag_timeout=self.timeout,
                                    endpoint=self.endpoint,
                                    tqdm_class=_forwarding_tqdm(on_bytes) if on_bytes else None))


class LocalHubClient:
    """A hub laid out on disk: ``<root>/<repo_type>s/<owner>/<name>/...``; downloads and uploads are
    copies; ``private`` records the visibility each created repo was asked for."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.private: dict[str, bool] = {}

    def _repo(self, repo_id: str, repo_type: str) -> Path:
        repo = self.root / f"{repo_type}s" / repo_id
        if not repo.is_dir():
            raise FileNotFoundError(f"{repo_id}: no such repo under {self.root}")
        return repo

    def list_files(self, repo_id: str, repo_type: str) -> list[RemoteFile]:
        repo = self._repo(repo_id, repo_type)
        return [RemoteFile(p.relative_to(repo).as_posix(), p.stat().st_size, file_sha256(p))
                for p in sorted(repo.rglob("*")) if p.is_file()]

    def download(self, repo_id: str, repo_type: str, filename: str, local_dir: Path,
                 on_bytes: Callable[[int], None] | None = None) -> Path:
        src = self._repo(repo_id, repo_type) / filename
        dst = Path(local_dir) / filename
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        if on_bytes:
            on_bytes(dst.stat().st_size)
        return dst


    def create_repo(self, repo_id: str, repo_type: str, *, private: bool) -> str:
        repo = self.root / f"{repo_type}s" / repo_id
        repo.mkdir(parents=True, exist_ok=True)
        self.private.setdefault(repo_id, private)  # as the hub: an existing repo keeps its visibility
        return repo.as_uri()

    def upload_folder(self, repo_id: str, repo_type: str, folder: Path, commit_message: str) -> str:
        repo = self._repo(repo_id, repo_type)
        shutil.copytree(folder, repo, dirs_exist_ok=True)
        return repo.as_uri()


def _raise_if_offline() -> None:
    # huggingface_hub reads HF_HUB_OFFLINE once at import; read it again so a late setting still avoids any request.
    from huggingface_hub import constants
    from huggingface_hub.errors import OfflineModeIsEnabled

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}:
        raise OfflineModeIsEnabled("HF_HUB_OFFLINE is set")


def _forwarding_tqdm(on_bytes: Callable[[int], None]):
    from tqdm.auto import tqdm

    class ForwardingTqdm(tqdm):  # silent bar whose byte counts feed our rich progress
        def __init__(self, *args, **kwargs):
            # Xet downloads report a "reconstructing" bar beside the byte bar; count bytes once.
            self._forward = "reconstructing" not in str(kwargs.get("desc") or "")
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

        def update(self, n=1):
            if n and self._forward:
                on_bytes(int(n))
            return super().update(n)

    return ForwardingTqdm


def local_digest(path: Path, rf: RemoteFile) -> str | None:
    """``path``'s hash of the kind the hub lists for ``rf`` (None where it lists none)."""
    if rf.sha256:
        return file_sha256(path)
    return git_blob_sha1(path) if rf.git_sha1 else None


def git_blob_sha1(path: Path) -> str:
    """A file's git blob id: the SHA-1 of ``blob <size>\\0`` and its bytes."""
    return _hash_file(hashlib.sha1(b"blob %d\0" % Path(path).stat().st_size), path)


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes (the hub lists it for LFS files)."""
    return _hash_file(hashlib.sha256(), path)


def _hash_file(h, path: Path) -> str:
    """``h`` updated with the file's bytes, read in 1 MiB chunks; its hex digest."""
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
