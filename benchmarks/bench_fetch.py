"""`tlvr data fetch` of a repo of many small files, one file at a time against ``--workers`` at a time, side
by side, from a hub served on localhost that answers each request a round trip late.

    python benchmarks/bench_fetch.py                            # 300 files of 64 KiB, 20 ms per request
    python benchmarks/bench_fetch.py --files 40 --latency-ms 5  # smoke run

MMVU's layout (``validation.json`` and one video per question) is the case it stands for: about a
thousand files, each a HEAD and a GET through ``huggingface_hub``, so the round trips, not the bytes,
set the time. The hub is ``tests/fake_hub_server.py`` (the routes the real client calls); every run
fetches into an empty directory and is checked file for file against the served repo.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the served hub is test code

from fake_hub_server import hub_server  # noqa: E402

from tlvr_cli.data.fetch import DOWNLOAD_WORKERS, fetch_targets  # noqa: E402
from tlvr_cli.data.hub import HfHubClient  # noqa: E402


def make_repo(root: Path, files: int, size: int) -> Path:
    repo = root / "datasets" / "yale-nlp" / "MMVU"
    (repo / "videos" / "Biology").mkdir(parents=True)
    (repo / "validation.json").write_text("[]")
    for i in range(files - 1):
        (repo / "videos" / "Biology" / f"{i}.mp4").write_bytes(os.urandom(size))
    return repo


def timed_fetch(url: str, dest: Path, workers: int) -> float:
    start = time.perf_counter()
    [result] = fetch_targets(["mmvu"], dest, client=HfHubClient(token="hf_bench", endpoint=url), progress=False,
                             workers=workers)
    seconds = time.perf_counter() - start
    if result.problems:
        raise SystemExit(f"fetch with {workers} workers: {result.problems}")
    return seconds


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=300)
    parser.add_argument("--size-kb", type=int, default=64)
    parser.add_argument("--latency-ms", type=float, default=20.0, help="delay before each request is answered")
    parser.add_argument("--workers", type=int, default=DOWNLOAD_WORKERS)
    args = parser.parse_args(argv)
    os.environ.pop("HF_HUB_OFFLINE", None)
    import huggingface_hub.constants

    huggingface_hub.constants.HF_HUB_OFFLINE = False
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        repo = make_repo(tmp / "hub", args.files, args.size_kb * 1024)
        out = {}
        with hub_server(tmp / "hub", latency=args.latency_ms / 1000) as server:
            for workers in (1, args.workers):
                dest = tmp / f"w{workers}"
                out[workers] = timed_fetch(server.url, dest, workers)
                got = sorted(p.relative_to(dest / "mmvu").as_posix() for p in (dest / "mmvu").rglob("*")
                             if p.is_file() and ".cache" not in p.parts and p.name != "tlvr-manifest.json")
                want = sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file())
                if got != want or any((dest / "mmvu" / f).read_bytes() != (repo / f).read_bytes() for f in want):
                    raise SystemExit(f"fetch with {workers} workers: the files differ from the served repo")
    print(f"{args.files} files of {args.size_kb} KiB, {args.latency_ms:g} ms per request (a HEAD and a GET per file)")
    print(f"{'workers':>8} {'seconds':>9} {'files/s':>9}")
    for workers, seconds in out.items():
        print(f"{workers:>8} {seconds:>9.2f} {args.files / seconds:>9.1f}")
    ratio = out[1] / out[args.workers]
    print(f"{args.workers} workers: {ratio:.1f}x the speed of one file at a time")
    return {"seconds": out, "ratio": ratio}


if __name__ == "__main__":
    main()
