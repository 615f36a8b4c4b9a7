"""Every benchmark reader keeps annotation video paths inside the benchmark's folders: a name that
climbs out with ``..`` (to a file that exists there) or is absolute is refused, naming the annotation."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import fixtures_eval as fx
import pytest

from tlvr_cli.errors import TlvrError
from tlvr_cli.eval.benchmarks import get_benchmark
from tlvr_cli.jobs import EvalConfig

ESCAPE = "../../x.mp4"


def load(name: str, root: Path):
    return get_benchmark(name).load_items(root, dataclasses.replace(EvalConfig(), benchmark=name, duration="all"))


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _synthetic(root: Path, video: str) -> Path:
    fx.build_synthetic(root)
    rows = [json.loads(line) for line in (root / "eval.jsonl").read_text().splitlines()]
    rows[1]["video_filename"] = video
    (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _mmvu(root: Path, video: str) -> Path:
    fx.build_mmvu(root)
    url = video if video.startswith("/") else f"{fx.MMVU_URL}/{video}"
    _edit_json(root / "validation.json", lambda recs: recs[2].update(video=url))
    return root


def _mlvu(root: Path, video: str) -> Path:
    fx.build_mlvu(root)
    _edit_json(root / "json" / "3_ego.json", lambda recs: recs[1].update(video=video))
    return root


def _mvbench(root: Path, video: str) -> Path:
    fx.build_mvbench(root)
    _edit_json(root / "json" / "action_count.json", lambda recs: recs[0].update(video=video))
    return root


def _videomme(root: Path, video: str) -> Path:
    import pyarrow.parquet as pq

    fx.build_videomme(root)
    path = root / "videomme" / "test-00000-of-00001.parquet"
    table = pq.read_table(path).to_pylist()
    table[3]["videoID"] = video.removesuffix(".mp4")
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(table, schema=pq.read_schema(path)), path)
    return root


BUILDERS = {"synthetic": (_synthetic, "line 2"), "mmvu": (_mmvu, "item 2"), "mlvu": (_mlvu, "3_ego.json item 1"),
            "mvbench": (_mvbench, "action_count.json item 0"), "videomme": (_videomme, "row 3")}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_a_video_path_climbing_out_is_refused(name, tmp_path):
    build, where = BUILDERS[name]
    root = tmp_path / "data" / "bench"
    fx._touch(tmp_path / "x.mp4")  # the file the path reaches: it exists, so only the check stops it
    fx._touch(tmp_path / "data" / "x.mp4")
    build(root, ESCAPE)
    with pytest.raises(TlvrError, match=f"{where}: video path '../../x.mp4' escapes"):
        load(name, root)


@pytest.mark.parametrize("name", ["mlvu", "mvbench", "videomme"])
def test_an_absolute_video_path_is_refused(name, tmp_path):
    build, where = BUILDERS[name]
    outside = fx._touch(tmp_path / "outside.mp4")
    build(tmp_path / "bench", str(outside))
    with pytest.raises(TlvrError, match=f"{where}: video path .* is absolute"):
        load(name, tmp_path / "bench")


@pytest.mark.parametrize("name", ["synthetic", "mmvu"])
def test_root_relative_names_stay_under_the_root(name, tmp_path):
    # these formats name videos from the root ("./NextQA/…", "/videos/…" after the URL prefix):
    # a leading slash is the root, never the filesystem's
    build, _ = BUILDERS[name]
    root = build(tmp_path / "bench", "/etc/x.mp4")
    items = load(name, root)
    assert any(it.video == root / "etc" / "x.mp4" for it in items)
    assert all(it.video.is_relative_to(root) for it in items)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_a_dot_dot_that_stays_inside_is_kept(name, tmp_path):
    build, _ = BUILDERS[name]
    root = build(tmp_path / "bench", "sub/../y.mp4")
    assert any(it.video.name == "y.mp4" and ".." not in it.video.parts for it in load(name, root))
