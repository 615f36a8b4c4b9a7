"""What produced an evaluation's answers, so a rerun reuses only rows the same evaluation would write.

An output directory records its *resume key* in ``provenance.json`` before the first answer is
appended: the model (resolved path and a SHA-256 fingerprint of the files that decide its outputs),
the benchmark and split, protocol, mode, frame protocol, frames, dtype and max new tokens, and, for
the sampling ``paper`` protocol only, the seed and sampling parameters (greedy answers do not depend
on them). A run into a directory whose answers have another key is refused with one line naming what
differs; settings that cannot change an answer (batch size, workers, limit, engine speed switches)
are not part of the key, so a resume may change them. The default directory is named after the model
and a hash of the key's settings (``runs/eval/<benchmark>/<model>-<mode>-<protocol>-<hash>``), so
evaluating another model or other settings starts a new directory instead of hitting the refusal.

Fingerprinting a checkpoint reads it once, in 256 MB chunks hashed in parallel (7 GB from the page
cache: 0.7 s on a 16-core host); the per-file digests are kept in ``provenance.json`` with each file's size and
mtime, so a resume of an unchanged checkpoint hashes nothing, and in ``data_root()/file-digests.json``
by resolved path, size, mtime and ctime (git's index rule), so evaluating the same checkpoint again
(another benchmark, other settings, a new directory) hashes nothing either. ``overwrite_stale``
deletes answers of another key instead of refusing (the demo re-evaluates its own directories).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from ..errors import TlvrError
from ..files import data_root, write_json_atomic
from ..jobs import EvalConfig
from ..model.checkpoint import resolve_checkpoint
from ..runtime import resolve_device, resolve_dtype
from .answers import answer_files, read_answers, speed_files

PROVENANCE = "provenance.json"
HASH_CHUNK = 256 << 20  # a file's digest is the SHA-256 of its 256 MB chunks' digests, hashed in parallel
STALE_RESULTS = ("results.json", "results.md", PROVENANCE)  # deleted with the answers by overwrite_stale
# the checkpoint files that decide the answers: config, weights, tokenizer (not README or generation_config.json)
_MODEL_FILES = re.compile(r"config\.json|.*\.safetensors(\.index\.json)?|tokenizer.*\.json|vocab\.json|merges\.txt"
                          r"|special_tokens_map\.json|added_tokens\.json")


def run_settings(cfg: EvalConfig, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """The key's settings (everything but the weights fingerprint); ``dtype`` is the model's when given,
    else ``cfg.model.dtype`` resolved on ``cfg.model.device``."""
    if dtype is None:
        dtype = resolve_dtype(cfg.model.dtype, resolve_device(cfg.model.device))
    settings: dict[str, Any] = {
        "model": model_identity(cfg.model.path), "benchmark": cfg.benchmark,
        "split": cfg.duration if cfg.benchmark == "videomme" else "", "protocol": cfg.protocol, "mode": cfg.mode,
        "frame_protocol": cfg.frame_protocol, "frames": cfg.video.num_frames,
        "dtype": str(dtype).removeprefix("torch."), "max_new_tokens": cfg.sampling.max_new_tokens,
    }
    if cfg.protocol == "paper":  # greedy decoding and its no-fallback parse use neither
        settings.update(seed=cfg.seed, temperature=cfg.sampling.temperature, top_k=cfg.sampling.top_k,
                        top_p=cfg.sampling.top_p)
    return settings


def model_identity(path: str) -> str:
    """``tiny``, or the checkpoint's resolved directory (a hub id resolves to its snapshot)."""
    if path == "tiny":
        return path
    try:
        return str(resolve_checkpoint(path).resolve())
    except TlvrError:
        return path  # not loadable from here (a model passed in memory): its fingerprint tells it apart


def default_dir_name(cfg: EvalConfig, settings: dict[str, Any]) -> Path:
    """``runs/eval/<benchmark>[-<duration>]/<model>-<mode>-<protocol>-<8 hex of the settings>``."""
    bench = cfg.benchmark + (f"-{cfg.duration}" if cfg.benchmark == "videomme" else "")
    parts = [p for p in Path(cfg.model.path).parts if p not in ("/", ".", "..")][-2:]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(parts)) or "model"
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    return Path("runs") / "eval" / bench / f"{slug}-{cfg.mode}-{cfg.protocol}-{digest}"


def read_provenance(out_dir: Path) -> dict[str, Any] | None:
    path = Path(out_dir) / PROVENANCE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise TlvrError(f"{path}: not valid JSON (delete the directory or choose another --output-dir)") from None
    if not isinstance(data, dict) or not isinstance(data.get("key"), dict):
        raise TlvrError(f"{path}: no resume key in it (delete the directory or choose another --output-dir)")
    return data


def weights_fingerprint(path: str, model: torch.nn.Module | None = None,
                        known: dict[str, list] | None = None) -> tuple[str, dict[str, list]]:
    """(SHA-256 hex, per-file ``[size, mtime_ns, sha256]``) of the model that answers: ``model``'s
    tensors when one is given (or for ``tiny``), else the checkpoint's files; a file whose size and
    mtime match ``known`` keeps its recorded digest instead of being read again."""
    if model is None and path == "tiny":
        from ..model.tiny import build_tiny_model

        model = build_tiny_model()
    if model is not None:
        return _state_digest(model), {}
    ckpt = resolve_checkpoint(path)
    files = sorted(f for f in ckpt.iterdir() if f.is_file() and _MODEL_FILES.fullmatch(f.name))
    known = known or {}
    remembered = _read_digest_cache()
    stats: dict[str, list] = {}
    todo = []
    for f in files:
        st = f.stat()
        old = known.get(f.name)
        if old and old[:2] == [st.st_size, st.st_mtime_ns]:
            stats[f.name] = old
        elif (sha := _remembered_digest(remembered, f, st)) is not None:
            stats[f.name] = [st.st_size, st.st_mtime_ns, sha]
        else:
            stats[f.name] = [st.st_size, st.st_mtime_ns, None]
            todo += [(f, start) for start in range(0, max(1, st.st_size), HASH_CHUNK)]
    if todo:  # the chunks of every file hashed in parallel threads (hashlib releases the GIL)
        with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1, len(todo))) as pool:
            digests = list(pool.map(lambda job: _chunk_digest(*job), todo))
        hashed = {f for f, _ in todo}
        for f in hashed:
            chunks = b"".join(d for (g, _), d in zip(todo, digests) if g == f)
            stats[f.name][2] = hashlib.sha256(chunks).hexdigest()
        _remember_digests(remembered, {f: stats[f.name][2] for f in hashed})
    total = hashlib.sha256("".join(f"{name}:{s[2]}\n" for name, s in sorted(stats.items())).encode())
    return total.hexdigest(), stats


DIGEST_CACHE = "file-digests.json"
RACY_S = 2.0


def _read_digest_cache() -> dict[str, dict]:
    """``data_root()/file-digests.json``: {resolved path: {size, mtime_ns, ctime_ns, sha256}}; {} when
    missing or unreadable (it is only a cache)."""
    try:
        data = json.loads((data_root() / DIGEST_CACHE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _file_stat(st: os.stat_result) -> dict[str, int]:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}


def _remembered_digest(cache: dict[str, dict], f: Path, st: os.stat_result) -> str | None:
    """The cached digest of ``f`` if its size, mtime and ctime are those it was hashed with."""
    entry = cache.get(str(f.resolve()))
    if not isinstance(entry, dict) or any(entry.get(k) != v for k, v in _file_stat(st).items()):
        return None
    sha = entry.get("sha256")
    return sha if isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha) else None


def _remember_digests(cache: dict[str, dict], digests: dict[Path, str]) -> None:
    """Add ``digests`` to the cache file (entries of files that no longer exist are dropped); a cache
    that cannot be written (read-only home) only means hashing again next time. A file modified in the
    last ``RACY_S`` seconds is not remembered: a second write within the same timestamp tick would
    keep its size, mtime and ctime (git's "racy" entries)."""
    merged = {path: entry for path, entry in cache.items() if Path(path).exists()}
    now = time.time_ns()
    for f, sha in digests.items():
        st = f.stat()
        if now - max(st.st_mtime_ns, st.st_ctime_ns) > RACY_S * 1e9:
            merged[str(f.resolve())] = {**_file_stat(st), "sha256": sha}
    try:
        data_root().mkdir(parents=True, exist_ok=True)
        write_json_atomic(data_root() / DIGEST_CACHE, merged)
    except OSError:
        pass


def _chunk_digest(path: Path, start: int) -> bytes:
    h = hashlib.sha256()
    with path.open("rb") as f:
        f.seek(start)
        left = HASH_CHUNK
        while left > 0:
            block = f.read(min(left, 16 << 20))
            if not block:
                break
            h.update(block)
            left -= len(block)
    return h.digest()


def _state_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_resume(out_dir: Path, key: dict[str, Any], provenance: dict[str, Any] | None, *,
                 overwrite: bool = False) -> None:
    """Refuse (one line naming what differs) when ``out_dir`` holds answers written under another key,
    or answers without a key (written before keys were recorded); with ``overwrite``, delete them
    (answers and results) instead."""
    files = answer_files(out_dir)
    if not any(read_answers(p) for p in files):
        return
    if provenance is None:
        problem = f"holds answers but no {PROVENANCE}, so what produced them is unknown"
    else:
        old = provenance["key"]
        diff = [k for k in dict.fromkeys([*old, *key]) if old.get(k) != key.get(k)]
        if not diff:
            return
        problem = "holds answers of another evaluation (" + "; ".join(
            f"{k}: {_short(old.get(k))} -> {_short(key.get(k))}" for k in diff) + ")"
    if overwrite:
        for path in [*files, *speed_files(out_dir), *(Path(out_dir) / name for name in STALE_RESULTS)]:
            path.unlink(missing_ok=True)
        return
    raise TlvrError(f"{out_dir} {problem}: choose another --output-dir (or leave it unset for a directory per "
                    "model and settings), delete it, or set overwrite_stale=true")


def _short(v: Any) -> str:
    s = "unset" if v is None else str(v)
    return s[:12] if re.fullmatch(r"[0-9a-f]{64}", s) else s


def write_provenance(out_dir: Path, key: dict[str, Any], files: dict[str, list]) -> None:
    write_json_atomic(Path(out_dir) / PROVENANCE, {"key": key, "files": files})
