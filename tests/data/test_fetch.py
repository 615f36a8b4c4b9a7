"""`tlvr data fetch`: layout, extraction markers, idempotence, dry run and hub errors, against a hub laid out on
disk, read directly or served over HTTP to the real client (``fake_hub_server``)."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest
from fake_hub_server import COMMIT, hub_server

from tlvr_cli.data.archive import extract_archive, extraction_marker
from tlvr_cli.data.fetch import MANIFEST, TARGETS, fetch_targets
from tlvr_cli.data.hub import HfHubClient, LocalHubClient
from tlvr_cli.data.threads import in_parallel
from tlvr_cli.errors import TlvrError

VIDEO = b"\x00\x00\x00\x18ftypmp42" + bytes(range(64))


class CountingClient(LocalHubClient):
    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.downloads: list[str] = []

    def download(self, repo_id, repo_type, filename, local_dir, on_bytes=None):
        self.downloads.append(f"{repo_id}:{filename}")
        return super().download(repo_id, repo_type, filename, local_dir, on_bytes)


class OfflineClient:
    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def list_files(self, repo_id, repo_type):
        raise self.exc

    def download(self, *args, **kwargs):
        raise self.exc


def _write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def _tar_gz(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture()
def hub(tmp_path) -> Path:
    root = tmp_path / "hub"
    model = root / "models" / "Zhang199" / "TinyLLaVA-Video-R1"
    _write(model / "config.json", json.dumps({"model_type": "tinyllava", "group": 16}))
    _write(model / "model.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    for name in ("tokenizer_config.json", "vocab.json", "special_tokens_map.json"):
        _write(model / name, "{}")
    _write(model / "merges.txt", "#version: 0.2\n")
    _write(model / "runs" / "events.out.tfevents.1", b"tb")  # not selected

    train = root / "datasets" / "Zhang199" / "TinyLLaVA-Video-R1-training-data"
    row = {"problem_id": 0, "problem": "Q?\nA. a\nB. b\nC. c\nD. d\nE. e", "data_type": "video",
           "problem_type": "multiple choice", "solution": "<answer>B</answer>",
           "video_filename": "./NextQA/NExTVideo/0001/1.mp4"}
    _write(train / "nextqa_0-30s.jsonl", json.dumps(row) + "\n")
    cold = [{"video": "NextQA/NExTVideo/0001/1.mp4", "conversations": [
        {"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "<think>t</think>\n<answer>B</answer>"}]}]
    _write(train / "nextqa-coldstart-16.json", json.dumps(cold))
    _write(train / "README.md", "card")
    _tar_gz(train / "NextQA.tar.gz", {"NextQA/NExTVideo/0001/1.mp4": VIDEO})

    mmvu = root / "datasets" / "yale-nlp" / "MMVU"
    url = "https://huggingface.co/datasets/yale-nlp/MMVU/resolve/main/videos/Biology/1.mp4"
    _write(mmvu / "validation.json", json.dumps([{"id": "1", "video": url, "question_type": "multiple-choice"}]))
    _write(mmvu / "videos" / "Biology" / "1.mp4", VIDEO)

    mlvu = root / "datasets" / "MLVU" / "MVLU" / "MLVU"  # the wrapping top folder of spec §5
    _write(mlvu / "json" / "1_plotQA.json", "[]")
    _write(mlvu / "video" / "1_plotQA" / "movie101_66.mp4", VIDEO)
    return root


def test_fetch_layout_and_manifest(hub, tmp_path):
    data = tmp_path / "data"
    client = CountingClient(hub)
    results = fetch_targets(["r1", "nextqa", "mmvu", "mlvu"], data, client=client, progress=False)
    assert [r.problems for r in results] == [[], [], [], []]

    model = data / "models" / "TinyLLaVA-Video-R1"
    assert (model / "config.json").is_file() and (model / "model.safetensors").is_file()
    assert (model / "merges.txt").is_file() and not (model / "runs").exists()

    train = data / "train"
    assert (train / "nextqa_0-30s.jsonl").is_file() and (train / "nextqa-coldstart-16.json").is_file()
    assert (train / "NextQA" / "NExTVideo" / "0001" / "1.mp4").read_bytes() == VIDEO
    assert extraction_marker(train / "NextQA.tar.gz").is_file()
    assert not list(train.glob(".tlvr-extract-*"))
    assert not (train / "README.md").exists()

    assert (data / "mmvu" / "validation.json").is_file()
    assert (data / "mmvu" / "videos" / "Biology" / "1.mp4").read_bytes() == VIDEO
    assert (data / "mlvu" / "json" / "1_plotQA.json").is_file()  # linked out of MLVU/
    assert (data / "mlvu" / "video" / "1_plotQA" / "movie101_66.mp4").is_file()

    manifest = json.loads((train / MANIFEST).read_text())
    assert (manifest["repo"] == "Zhang199/TinyLLaVA-Video-R1-training-data"
            and manifest["extracted"] == ["NextQA.tar.gz"])
    sizes = {f["path"]: (f["size"], f["sha256"]) for f in manifest["files"]}
    assert sizes["nextqa_0-30s.jsonl"][0] == (train / "nextqa_0-30s.jsonl").stat().st_size
    assert all(len(sha) == 64 for _, sha in sizes.values())


def test_second_fetch_downloads_nothing(hub, tmp_path):
    client = CountingClient(hub)
    fetch_targets(["r1", "nextqa"], tmp_path / "data", client=client, progress=False)
    first = len(client.downloads)
    assert first == 9  # 6 model files, 2 annotations, 1 archive
    results = fetch_targets(["r1", "nextqa"], tmp_path / "data", client=client, progress=False)
    assert len(client.downloads) == first
    assert all(r.up_to_date and not r.extracted for r in results)


def test_deleted_archive_is_not_downloaded_again(hub, tmp_path):
    client = CountingClient(hub)
    fetch_targets(["nextqa"], tmp_path / "data", client=client, progress=False, keep_archives=False)
    assert not (tmp_path / "data" / "train" / "NextQA.tar.gz").exists()
    n = len(client.downloads)
    fetch_targets(["nextqa"], tmp_path / "data", client=client, progress=False, keep_archives=False)
    assert len(client.downloads) == n


def test_an_archive_changed_on_the_hub_is_downloaded_and_extracted_again(hub, tmp_path):
    train = tmp_path / "data" / "train"
    fetch_targets(["nextqa"], tmp_path / "data", client=LocalHubClient(hub), progress=False)
    newer = VIDEO + b"re-encoded"
    _tar_gz(hub / "datasets" / "Zhang199" / "TinyLLaVA-Video-R1-training-data" / "NextQA.tar.gz",
            {"NextQA/NExTVideo/0001/1.mp4": newer})  # another size: a new revision of the archive
    [result] = fetch_targets(["nextqa"], tmp_path / "data", client=LocalHubClient(hub), progress=False)
    assert result.downloaded == ["NextQA.tar.gz"] and result.extracted == ["NextQA.tar.gz"]
    assert (train / "NextQA" / "NExTVideo" / "0001" / "1.mp4").read_bytes() == newer


def test_interrupted_extraction_is_redone(hub, tmp_path):
    client = CountingClient(hub)
    fetch_targets(["nextqa"], tmp_path / "data", client=client, progress=False)
    train = tmp_path / "data" / "train"
    video = train / "NextQA" / "NExTVideo" / "0001" / "1.mp4"
    extraction_marker(train / "NextQA.tar.gz").unlink()
    video.write_bytes(b"half")  # a half-written member
    _write(train / ".tlvr-extract-NextQA.tar.gz" / "NextQA" / "junk", b"junk")  # a stale stage dir
    results = fetch_targets(["nextqa"], tmp_path / "data", client=client, progress=False)
    assert results[0].extracted == ["NextQA.tar.gz"] and results[0].up_to_date
    assert video.read_bytes() == VIDEO
    assert extraction_marker(train / "NextQA.tar.gz").is_file()
    assert not (train / ".tlvr-extract-NextQA.tar.gz").exists() and not (train / "NextQA" / "junk").exists()


def test_dry_run_downloads_nothing(hub, tmp_path):
    client = CountingClient(hub)
    results = fetch_targets(["r1", "mmvu"], tmp_path / "data", client=client, dry_run=True, progress=False)
    assert client.downloads == [] and not (tmp_path / "data").exists()
    model_bytes = sum(p.stat().st_size for p in (hub / "models" / "Zhang199" / "TinyLLaVA-Video-R1").iterdir()
                      if p.is_file())
    assert results[0].bytes_to_download == model_bytes
    assert results[1].bytes_to_download == sum(p.stat().st_size
                                               for p in (hub / "datasets" / "yale-nlp" / "MMVU").rglob("*")
                                               if p.is_file())
    assert [len(r.to_download) for r in results] == [6, 2]


def test_missing_videos_are_reported(hub, tmp_path):
    (hub / "datasets" / "Zhang199" / "TinyLLaVA-Video-R1-training-data" / "NextQA.tar.gz").unlink()
    [result] = fetch_targets(["nextqa"], tmp_path / "data", client=LocalHubClient(hub), progress=False)
    assert result.problems and "1 of 1 videos are missing" in result.problems[0]


def test_unknown_target_suggests_close_match(hub):
    with pytest.raises(TlvrError) as err:
        fetch_targets(["videome"], Path("/nonexistent"), client=LocalHubClient(hub), progress=False)
    assert "did you mean 'videomme'" in str(err.value) and "mvbench" in str(err.value)


def test_offline_client_names_repo_and_by_hand_path(tmp_path):
    from huggingface_hub.errors import LocalEntryNotFoundError

    for exc in (LocalEntryNotFoundError("no cache"), ConnectionError("no route")):
        with pytest.raises(TlvrError) as err:
            fetch_targets(["videomme"], tmp_path, client=OfflineClient(exc), progress=False)
        msg = str(err.value)
        assert "\n" not in msg and "lmms-lab/Video-MME" in msg and "offline" in msg
        assert "https://huggingface.co/datasets/lmms-lab/Video-MME" in msg and str(tmp_path / "videomme") in msg
    with pytest.raises(TlvrError) as err:
        fetch_targets(["mlvu"], tmp_path, client=OfflineClient(ConnectionError()), progress=False)
    assert "accept its terms" in str(err.value)


def test_offline_after_complete_fetch_is_up_to_date(hub, tmp_path):
    fetch_targets(["mmvu"], tmp_path, client=LocalHubClient(hub), progress=False)
    [result] = fetch_targets(["mmvu"], tmp_path, client=OfflineClient(ConnectionError()), progress=False)
    assert result.up_to_date and "unreachable" in result.warnings[0]
    # offline, --verify checks the files against the hashes the manifest recorded
    [verified] = fetch_targets(["mmvu"], tmp_path, client=OfflineClient(ConnectionError()), progress=False,
                               verify=True)
    assert not verified.problems
    (tmp_path / "mmvu" / "videos" / "Biology" / "1.mp4").write_bytes(VIDEO[::-1])
    [changed] = fetch_targets(["mmvu"], tmp_path, client=OfflineClient(ConnectionError()), progress=False,
                              verify=True)
    assert changed.problems == ["mmvu: 1 file(s) changed since the fetch and the hub is unreachable to download "
                                "them again: videos/Biology/1.mp4"]


def test_real_client_with_hub_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "1")
    with pytest.raises(TlvrError) as err:
        fetch_targets(["r1"], tmp_path, client=HfHubClient(timeout=1.0), progress=False)
    assert "Zhang199/TinyLLaVA-Video-R1" in str(err.value) and "by hand" in str(err.value)


def test_real_client_unreachable_endpoint(refused_endpoint, tmp_path):
    client = HfHubClient(timeout=2.0, endpoint=refused_endpoint)
    with pytest.raises(TlvrError, match=r"cannot reach the Hugging Face hub for lmms-lab/Video-MME \(offline\?\)"):
        fetch_targets(["videomme"], tmp_path, client=client, dry_run=True, progress=False)


def _tree(root: Path) -> dict[str, bytes]:
    """The files under ``root`` and their bytes, without the manifests and extraction markers (they hold
    times) and the hub library's own metadata."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != MANIFEST and not p.name.startswith(".extracted-")
            and ".cache" not in p.relative_to(root).parts}


def test_real_client_fetches_from_a_hub_server_as_from_a_hub_on_disk(hub, tmp_path, hub_online):
    targets = ["r1", "nextqa", "mmvu", "mlvu"]
    fetch_targets(targets, tmp_path / "on-disk", client=LocalHubClient(hub), progress=False)
    with hub_server(hub) as server:
        client = HfHubClient(token="hf_test", timeout=5.0, endpoint=server.url)
        results = fetch_targets(targets, tmp_path / "served", client=client, progress=False)
        assert [r.problems for r in results] == [[], [], [], []]
        # every file is read at the commit the listing pinned, never at a branch name
        assert server.downloads() and all(f"/resolve/{COMMIT}/" in path for path in server.downloads())
        assert any(path.endswith("/resolve/" + COMMIT + "/NextQA.tar.gz") for path in server.downloads())
        sent = len(server.downloads())
        again = fetch_targets(targets, tmp_path / "served", client=client, progress=False)
        assert len(server.downloads()) == sent and all(r.up_to_date for r in again)  # nothing sent twice
    assert _tree(tmp_path / "served") == _tree(tmp_path / "on-disk")
    assert (tmp_path / "served" / "train" / "NextQA" / "NExTVideo" / "0001" / "1.mp4").read_bytes() == VIDEO
    assert extraction_marker(tmp_path / "served" / "train" / "NextQA.tar.gz").is_file()
    manifest = json.loads((tmp_path / "served" / "models" / "TinyLLaVA-Video-R1" / MANIFEST).read_text())
    assert manifest["revision"] == COMMIT


@pytest.mark.parametrize("workers", [1, 4])
def test_files_download_workers_at_a_time(hub, tmp_path, hub_online, workers):
    with hub_server(hub, latency=0.02) as server:
        [result] = fetch_targets(["r1"], tmp_path / "data", client=HfHubClient(token="hf_test", endpoint=server.url),
                                 progress=False, workers=workers)
    assert result.downloaded == ["config.json", "merges.txt", "model.safetensors", "special_tokens_map.json",
                                 "tokenizer_config.json", "vocab.json"]  # the listing's order, whatever finished first
    # one HEAD then one GET per file: more than one file's requests overlap only with several workers
    assert server.load["most"] == 1 if workers == 1 else 2 <= server.load["most"] <= workers


def test_in_parallel_yields_each_result_and_raises_the_first_failure_after_those_in_flight():
    import threading
    import time

    assert sorted(in_parallel(lambda n: n * n, list(range(20)), 4)) == [(n, n * n) for n in range(20)]
    started, finished = [], []

    def job(n):
        started.append(n)
        if n == 0:
            raise ValueError("broken")
        time.sleep(0.05)
        finished.append(n)
        return n

    with pytest.raises(ValueError, match="broken"):
        list(in_parallel(job, list(range(50)), 3))
    assert sorted(finished) == sorted(set(started) - {0}) and len(started) < 50  # in flight done, the rest dropped
    # Ctrl-C does not wait for the work in flight (a download of gigabytes): it is raised at once
    release = threading.Event()

    def blocked(n):
        if n == 0:
            raise KeyboardInterrupt
        release.wait(10)

    t = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        list(in_parallel(blocked, [1, 0], 2))
    assert time.perf_counter() - t < 5
    release.set()


def test_download_workers_must_be_positive(hub, tmp_path):
    with pytest.raises(TlvrError, match="download workers must be >= 1, got 0"):
        fetch_targets(["r1"], tmp_path, client=LocalHubClient(hub), progress=False, workers=0)


def test_a_file_that_arrives_short_is_one_line_and_the_next_fetch_completes(hub, tmp_path, hub_online):
    model = tmp_path / "data" / "models" / "TinyLLaVA-Video-R1"
    with hub_server(hub, short={"model.safetensors"}) as server:
        with pytest.raises(TlvrError) as err:
            fetch_targets(["r1"], tmp_path / "data", client=HfHubClient(token="hf_test", endpoint=server.url),
                          progress=False)
    message = str(err.value)
    assert "\n" not in message and message.startswith("r1: model.safetensors from Zhang199/TinyLLaVA-Video-R1 "
                                                       "did not arrive whole (")
    assert "run `tlvr data fetch r1` again" in message
    assert not (model / "model.safetensors").exists() and not (model / MANIFEST).exists()  # nothing half-written
    kept = {p.name for p in model.iterdir() if p.is_file()}  # those in flight beside it finished
    with hub_server(hub) as server:
        [result] = fetch_targets(["r1"], tmp_path / "data", client=HfHubClient(token="hf_test", endpoint=server.url),
                                 progress=False)
        assert not result.problems and (model / "model.safetensors").read_bytes() == (
            hub / "models" / "Zhang199" / "TinyLLaVA-Video-R1" / "model.safetensors").read_bytes()
        # the files that came whole the first time are not sent again
        wanted = {"config.json", "merges.txt", "model.safetensors", "special_tokens_map.json", "tokenizer_config.json",
                  "vocab.json"}
        assert sorted(p.rsplit("/", 1)[-1] for p in server.downloads()) == sorted(wanted - kept)
        assert result.downloaded == sorted(wanted - kept)  # in the listing's order


def test_a_download_error_without_a_message_is_named_by_its_type(hub, tmp_path):
    class Failing(LocalHubClient):
        def download(self, *args, **kwargs):
            raise OSError()

    with pytest.raises(TlvrError, match=r"^r1: config.json from Zhang199/TinyLLaVA-Video-R1 did not arrive whole "
                                        r"\(OSError\): run `tlvr data fetch r1` again"):
        fetch_targets(["r1"], tmp_path, client=Failing(hub), progress=False, workers=1)


def test_a_file_kept_in_git_that_arrives_corrupted_is_caught_by_its_blob_id(hub, tmp_path, hub_online):
    expected = (r"^r1: 1 file\(s\) from Zhang199/TinyLLaVA-Video-R1 arrived corrupted and were deleted: "
                r"config.json \(git SHA-1 [0-9a-f]{12}, listed [0-9a-f]{12}\)")
    with hub_server(hub, corrupt={"config.json"}) as server:
        with pytest.raises(TlvrError, match=expected):
            fetch_targets(["r1"], tmp_path, client=HfHubClient(token="hf_test", endpoint=server.url), progress=False)
    assert not (tmp_path / "models" / "TinyLLaVA-Video-R1" / "config.json").exists()


def test_a_file_that_arrives_corrupted_is_deleted_before_extraction(hub, tmp_path, hub_online):
    train = tmp_path / "data" / "train"
    with hub_server(hub, corrupt={"NextQA.tar.gz"}) as server:
        with pytest.raises(TlvrError) as err:
            fetch_targets(["nextqa"], tmp_path / "data", client=HfHubClient(token="hf_test", endpoint=server.url),
                          progress=False)
    message = str(err.value)
    assert "\n" not in message and message.startswith(
        "nextqa: 1 file(s) from Zhang199/TinyLLaVA-Video-R1-training-data arrived corrupted and were deleted: "
        "NextQA.tar.gz (SHA-256 ")
    assert message.endswith("run `tlvr data fetch nextqa` again")
    assert not (train / "NextQA.tar.gz").exists() and not (train / "NextQA").exists()  # never extracted
    assert (train / "nextqa_0-30s.jsonl").is_file() and not (train / MANIFEST).exists()
    with hub_server(hub) as server:
        [result] = fetch_targets(["nextqa"], tmp_path / "data",
                                 client=HfHubClient(token="hf_test", endpoint=server.url), progress=False)
        assert [p.rsplit("/", 1)[-1] for p in server.downloads()] == ["NextQA.tar.gz"]
    assert not result.problems and (train / "NextQA" / "NExTVideo" / "0001" / "1.mp4").read_bytes() == VIDEO


def test_a_local_copy_that_changed_is_downloaded_again(hub, tmp_path, hub_online):
    model = tmp_path / "data" / "models" / "TinyLLaVA-Video-R1"
    repo = hub / "models" / "Zhang199" / "TinyLLaVA-Video-R1"
    with hub_server(hub) as server:
        client = HfHubClient(token="hf_test", endpoint=server.url)
        fetch_targets(["r1"], tmp_path / "data", client=client, progress=False)
        (model / "config.json").write_text("{}")  # another size: found by the plain fetch
        weights = (model / "model.safetensors").read_bytes()
        (model / "model.safetensors").write_bytes(bytes([weights[0] ^ 1]) + weights[1:])  # same size: --verify
        (model / "merges.txt").write_text("#version: 0.3\n")  # kept in git, not LFS: its blob id is listed
        sent = len(server.downloads())
        [plain] = fetch_targets(["r1"], tmp_path / "data", client=client, progress=False)
        # the hub library keeps a local file its own metadata says is current: the stale copy must go first
        assert plain.downloaded == ["config.json"] and len(server.downloads()) == sent + 1
        assert (model / "config.json").read_bytes() == (repo / "config.json").read_bytes()
        assert (model / "model.safetensors").read_bytes() != weights  # a plain fetch checks sizes only
        [verified] = fetch_targets(["r1"], tmp_path / "data", client=client, progress=False, verify=True)
        assert verified.downloaded == ["merges.txt", "model.safetensors"]
        assert (model / "model.safetensors").read_bytes() == weights
        assert (model / "merges.txt").read_bytes() == (repo / "merges.txt").read_bytes()
        [again] = fetch_targets(["r1"], tmp_path / "data", client=client, progress=False, verify=True)
        assert again.up_to_date and not again.downloaded


@pytest.mark.parametrize("status", [401, 403])
def test_unauthorized_and_gated(status, tmp_path):
    import httpx2
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError

    response = httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/api/x"))
    with pytest.raises(TlvrError) as err:
        fetch_targets(["mmvu"], tmp_path, client=OfflineClient(HfHubHTTPError("denied", response=response)),
                      progress=False)
    assert f"HTTP {status}" in str(err.value) and "yale-nlp/MMVU" in str(err.value) and "HF_TOKEN" in str(err.value)
    with pytest.raises(TlvrError) as err:
        fetch_targets(["mlvu"], tmp_path, client=OfflineClient(GatedRepoError("gated", response=response)),
                      progress=False)
    assert ("gated" in str(err.value) and "accept its terms" in str(err.value)
            and str(tmp_path / "mlvu") in str(err.value))


def test_path_traversal_is_rejected(tmp_path):
    evil = _tar_gz(tmp_path / "d" / "evil.tar.gz", {"../escape.txt": b"x"})
    with pytest.raises(TlvrError, match="unsafe member"):
        extract_archive(evil)
    assert not (tmp_path / "escape.txt").exists() and not extraction_marker(evil).exists()

    zpath = tmp_path / "z" / "evil.zip"
    zpath.parent.mkdir()
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("ok/file.txt", "fine")
        zf.writestr("/abs/evil.txt", "x")
    with pytest.raises(TlvrError, match="unsafe member"):
        extract_archive(zpath)
    assert not (tmp_path / "z" / "ok").exists()

    link = tmp_path / "l" / "link.tar"
    link.parent.mkdir()
    with tarfile.open(link, "w") as tf:
        info = tarfile.TarInfo("a/up")
        info.type, info.linkname = tarfile.SYMTYPE, "../../outside"
        tf.addfile(info)
    with pytest.raises(TlvrError, match="unsafe member"):
        extract_archive(link)


@pytest.mark.parametrize("name", ["NextQA.tar.gz", "video.zip", "clips.tar"])
def test_a_damaged_archive_is_one_line_and_extracts_nothing(tmp_path, name):
    good = tmp_path / "good" / name
    if name.endswith(".zip"):
        good.parent.mkdir()
        with zipfile.ZipFile(good, "w") as zf:
            zf.writestr("video/1.mp4", VIDEO * 50)
    else:
        _tar_gz(good, {"NextQA/1.mp4": VIDEO * 50})  # gzip-compressed whatever the name: read as tar too
    data = good.read_bytes()
    for damaged in (data[: len(data) // 2], data[:40] + bytes(len(data) - 40)):  # cut short; zeros after 40 bytes
        archive = _write(tmp_path / "data" / name, damaged)
        with pytest.raises(TlvrError) as err:
            extract_archive(archive)
        message = str(err.value)
        assert "\n" not in message and message.startswith(f"{archive}: damaged archive, nothing extracted (")
        assert sorted(p.name for p in archive.parent.iterdir()) == [name]  # no marker, no staging dir, no member


def test_zip_members_merge_into_existing_tree(tmp_path):
    dest = tmp_path / "videomme"
    for i in (1, 2):
        with zipfile.ZipFile(_write(dest / f"videos_chunked_0{i}.zip", b"") , "w") as zf:
            zf.writestr(f"data/v{i}.mp4", VIDEO)
    assert extract_archive(dest / "videos_chunked_01.zip") and extract_archive(dest / "videos_chunked_02.zip")
    assert sorted(p.name for p in (dest / "data").iterdir()) == ["v1.mp4", "v2.mp4"]
    assert not extract_archive(dest / "videos_chunked_01.zip")  # marker: done


def test_hub_byte_counts_reach_the_progress_bar():
    from tlvr_cli.data.hub import _forwarding_tqdm

    seen: list[int] = []
    cls = _forwarding_tqdm(seen.append)
    with cls(total=10, desc="f.zip: downloading bytes") as bar:
        bar.update(3)
        bar.update(4)
    with cls(total=10, desc="f.zip: reconstructing file") as bar:
        bar.update(5)
    assert seen == [3, 4]


def test_targets_table_covers_all():
    assert set(TARGETS) == {"r1", "coldstart", "base", "nextqa", "videomme", "mvbench", "mlvu", "mmvu"}
    assert TARGETS["nextqa"].dest == "train" and TARGETS["base"].repo_id.endswith("Group-16-512")


def test_cli_dry_run_and_list(hub, tmp_path, monkeypatch):
    import typer
    from typer.testing import CliRunner

    import tlvr_cli.data.fetch as fetch_mod
    from tlvr_cli.cli.data import data_app

    monkeypatch.setattr(fetch_mod, "HfHubClient", lambda: LocalHubClient(hub))
    app = typer.Typer()
    app.add_typer(data_app, name="data")
    runner = CliRunner()
    listed = runner.invoke(app, ["data", "fetch", "--list", "--root", str(tmp_path)])
    assert listed.exit_code == 0 and "lmms-lab/Video-MME" in listed.output
    dry = runner.invoke(app, ["data", "fetch", "r1", "--dry-run", "--root", str(tmp_path / "data"), "-q"])
    assert dry.exit_code == 0, dry.output
    assert "would download" in dry.output and "total" in dry.output and not (tmp_path / "data").exists()
    bad = runner.invoke(app, ["data", "fetch", "r2", "--root", str(tmp_path)])
    assert isinstance(bad.exception, TlvrError) and "did you mean 'r1'" in str(bad.exception)
    fetched = runner.invoke(app, ["data", "fetch", "r1", "--root", str(tmp_path / "data"), "-q"])
    merges = tmp_path / "data" / "models" / "TinyLLaVA-Video-R1" / "merges.txt"
    merges.write_text("#version: 0.3\n")  # the same size, other bytes: only --verify sees it
    verified = runner.invoke(app, ["data", "fetch", "r1", "--verify", "--workers", "2",
                                   "--root", str(tmp_path / "data"), "-q"])
    assert fetched.exit_code == verified.exit_code == 0, verified.output
    assert merges.read_text() == "#version: 0.2\n"


def test_cli_fetch_problems_exit_1(hub, tmp_path, monkeypatch, capsys):
    # the status a command raises (typer.Exit(1)) is the process's status, not swallowed into 0
    import tlvr_cli.data.fetch as fetch_mod
    from tlvr_cli.cli import run_cli

    (hub / "datasets" / "Zhang199" / "TinyLLaVA-Video-R1-training-data" / "NextQA.tar.gz").unlink()
    monkeypatch.setattr(fetch_mod, "HfHubClient", lambda: LocalHubClient(hub))
    assert run_cli(["data", "fetch", "nextqa", "--root", str(tmp_path / "data"), "-q"]) == 1
    assert run_cli(["data", "fetch", "mmvu", "--root", str(tmp_path / "data"), "-q"]) == 0
