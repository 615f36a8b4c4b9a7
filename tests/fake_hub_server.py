"""A Hugging Face hub over HTTP on localhost, serving a directory laid out as ``LocalHubClient`` reads it
(``<root>/<models|datasets>/<owner>/<name>/...``) through the routes ``huggingface_hub`` calls to list and
download: repo info (the pinned commit), the recursive tree (sizes, LFS sha256), and ``resolve`` (HEAD
for the metadata, GET with byte ranges for the file); and to push: create a repo, the card's metadata
check, the pre-upload check (every file sent inline) and the commit (its files written into the repo).
It records every request it answers, the most it answered at once, and which visibility each created
repo was asked for; it can answer late (a round trip) and send chosen files cut short or corrupted."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

COMMIT = "5d1e0c1b2a3f4e5d6c7b8a9f0e1d2c3b4a5f6e7d"
LFS_SUFFIXES = (".safetensors", ".gz", ".zip", ".mp4", ".parquet", ".bin")


@dataclass
class HubServer:
    url: str
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path)
    private: dict[str, bool] = field(default_factory=dict)  # repo id -> the visibility it was created with
    load: dict[str, int] = field(default_factory=lambda: {"now": 0, "most": 0})  # requests in flight at once

    def downloads(self) -> list[str]:
        """The paths of the files sent whole or in part (GET on ``resolve``)."""
        return [path for method, path in self.requests if method == "GET" and "/resolve/" in path]


def _blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _entry(repo: Path, p: Path) -> dict:
    rel = p.relative_to(repo).as_posix()
    if p.is_dir():
        return {"type": "directory", "oid": "0" * 40, "path": rel}
    data = p.read_bytes()
    entry = {"type": "file", "oid": _blob_sha1(data), "size": len(data), "path": rel}
    if p.name.endswith(LFS_SUFFIXES):
        entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
    return entry


def _handler(root: Path, server: HubServer, short: set[str], corrupt: set[str], latency: float):
    log, private, load = server.requests, server.private, server.load
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self, route) -> None:  # each request waits ``latency`` first: a round trip to the hub
            with lock:
                load["now"] += 1
                load["most"] = max(load["most"], load["now"])
            try:
                time.sleep(latency)
                route()
            finally:
                with lock:
                    load["now"] -= 1

        def log_message(self, *args) -> None:  # quiet
            pass

        def do_GET(self) -> None:
            self._answer(self._route)

        def do_HEAD(self) -> None:
            self._answer(self._route)

        def do_POST(self) -> None:
            self._answer(self._post)

        def _post(self) -> None:
            url = urlsplit(self.path)
            log.append((self.command, url.path))
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            parts = unquote(url.path).strip("/").split("/")
            if parts[:3] == ["api", "repos", "create"]:  # {"name", "organization", "visibility" or "private", "type"?}
                spec = json.loads(body)
                repo_id = f"{spec['organization']}/{spec['name']}" if spec.get("organization") else spec["name"]
                kind = f"{spec.get('type') or 'model'}s"
                (root / kind / repo_id).mkdir(parents=True, exist_ok=True)
                private.setdefault(repo_id, spec.get("visibility") == "private" or bool(spec.get("private")))
                return self._json(200, {"url": self._page(kind, repo_id)})
            if parts == ["api", "validate-yaml"]:  # a model card's metadata, checked before the commit
                return self._json(200, {"errors": [], "warnings": []})
            if len(parts) < 5:
                return self._missing("EntryNotFound", f"no route {url.path}")
            kind, repo_id, verb = parts[1], "/".join(parts[2:4]), parts[4]
            repo = root / kind / repo_id
            if not repo.is_dir():
                return self._missing("RepoNotFound", "Repository not found")
            if verb == "preupload":  # every file goes inline in the commit
                files = json.loads(body)["files"]
                return self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                  for f in files]})
            if verb == "commit":  # NDJSON: a header line, then one line per file
                for line in body.decode().splitlines():
                    op = json.loads(line)
                    if op["key"] == "file":
                        target = repo / op["value"]["path"]
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_bytes(base64.b64decode(op["value"]["content"]))
                    elif op["key"] != "header":
                        return self._send(400, f"unsupported commit operation {op['key']}".encode())
                return self._json(200, {"commitUrl": f"{self._page(kind, repo_id)}/commit/{COMMIT}",
                                        "commitOid": COMMIT, "pullRequestUrl": None})
            return self._missing("EntryNotFound", f"no route {url.path}")

        def _page(self, kind: str, repo_id: str) -> str:
            """A repo's web address, as the hub gives it: models at the root, datasets under /datasets."""
            return f"http://{self.headers['Host']}/{'' if kind == 'models' else kind + '/'}{repo_id}"

        def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None,
                  length: int | None = None) -> None:
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body) if length is None else length))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, status: int, obj) -> None:
            self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json"})

        def _missing(self, code: str, message: str) -> None:
            self._send(404, json.dumps({"error": message}).encode(),
                       {"Content-Type": "application/json", "X-Error-Code": code, "X-Error-Message": message})

        def _route(self) -> None:
            url = urlsplit(self.path)
            log.append((self.command, url.path))
            parts = unquote(url.path).strip("/").split("/")
            if parts[0] == "api":  # /api/{models|datasets}/{owner}/{name}[/revision/{rev} | /tree/{rev}[/{path}]]
                kind, repo_id, rest = parts[1], "/".join(parts[2:4]), parts[4:]
                repo = root / kind / repo_id
                if not repo.is_dir():
                    return self._missing("RepoNotFound", "Repository not found")
                if not rest or rest[0] == "revision":
                    return self._json(200, {"id": repo_id, "sha": COMMIT, "private": False})
                if rest[0] == "tree" and rest[1] == COMMIT:
                    base = repo.joinpath(*rest[2:])
                    recursive = parse_qs(url.query).get("recursive", ["false"])[0].lower() in {"1", "true"}
                    found = sorted(base.rglob("*") if recursive else base.iterdir())
                    return self._json(200, [_entry(repo, p) for p in found])
                return self._missing("RevisionNotFound", "Invalid rev id")
            kind = "datasets" if parts[0] == "datasets" else "models"  # /[datasets/]{owner}/{name}/resolve/{rev}/{path}
            parts = parts[1:] if kind == "datasets" else parts
            repo_id, verb, rev, path = "/".join(parts[:2]), parts[2], parts[3], "/".join(parts[4:])
            file = root / kind / repo_id / path
            if verb != "resolve" or rev != COMMIT or not file.is_file():
                return self._missing("EntryNotFound", f"{path} not found at {rev}")
            data = file.read_bytes()
            entry = _entry(root / kind / repo_id, file)
            etag = entry["lfs"]["oid"] if "lfs" in entry else entry["oid"]
            headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
            start = 0
            if (ranged := self.headers.get("Range", "")).startswith("bytes="):
                start = int(ranged[len("bytes="):].split("-")[0])
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            if self.command == "HEAD":
                return self._send(200, b"", headers, length=len(data))
            if path in corrupt:  # one byte flipped on the way: the size holds, the SHA-256 does not
                data = bytes([data[0] ^ 0xFF]) + data[1:]
            body = data[start:len(data) // 2] if path in short else data[start:]  # a connection cut short
            self._send(206 if start else 200, body, headers)

    return Handler


@contextmanager
def hub_server(root: Path, short: set[str] = frozenset(), corrupt: set[str] = frozenset(),
               latency: float = 0.0) -> Iterator[HubServer]:
    """Serve ``root`` on a free localhost port while the block runs; the files named in ``short`` (paths
    in their repo) arrive with only their first half of bytes, those in ``corrupt`` with their first byte
    flipped; every request is answered ``latency`` seconds late."""
    hub = HubServer("")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(Path(root), hub, set(short), set(corrupt), latency))
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
