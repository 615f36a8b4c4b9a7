"""Benchmark readers on fake trees with the real layouts (tests/fixtures_eval.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import fixtures_eval as fx
import pytest

from tlvr_cli.errors import TlvrError
from tlvr_cli.eval.benchmarks import BENCHMARKS, get_benchmark
from tlvr_cli.jobs import EvalConfig

INSTR = "Output the thinking process in <think> </think> and final answer (option) in <answer> </answer> tags."
OPTION = "Answer with the option's letter from the given choices directly."


def cfg(name: str, **kw) -> EvalConfig:
    return dataclasses.replace(EvalConfig(), benchmark=name, **kw)


def load(name: str, root: Path, **kw):
    return get_benchmark(name).load_items(root, cfg(name, **kw))


# ----------------------------------------------------------------------------- Video-MME


@pytest.fixture(scope="module")
def videomme(tmp_path_factory):
    return fx.build_videomme(tmp_path_factory.mktemp("Video-MME"))


@pytest.mark.parametrize("duration,count", [("short", 3), ("medium", 2), ("long", 1), ("all", 6)])
def test_videomme_duration_filter(videomme, duration, count):
    items = load("videomme", videomme, duration=duration)
    assert len(items) == count
    assert all(duration in ("all", it.meta["duration"]) for it in items)


def test_videomme_item(videomme):
    items = load("videomme", videomme, duration="short")
    it = items[0]
    assert it.prompt == ("<image>\nQuestion 001-1: how many apples are shown?\nOptions:\nA. Apples.\nB. Candles.\n"
                         "C. Berries.\nD. The three kinds are of the same number.\n" + INSTR)
    assert it.item_id == "short/001-1" and it.task == "Counting Problem"
    assert it.choices == ["A", "B", "C", "D"]
    assert [i.gold for i in items] == ["C", "A", "D"]
    assert it.video == videomme / "data" / "fFjv93ACGo8.mp4"
    assert it.frame_spec.kind == "pts_seek"
    assert load("videomme", videomme, frame_protocol="uniform")[0].frame_spec.kind == "uniform"
    ids = [i.item_id for i in load("videomme", videomme, duration="all")]
    assert len(set(ids)) == len(ids)


def test_videomme_missing_video_is_not_a_load_error(videomme):
    items = load("videomme", videomme, duration="medium")
    assert not items[1].video.exists()


def test_videomme_option_mode_prompt(videomme):
    it = load("videomme", videomme, mode="option")[0]
    assert it.prompt == ("<image>\nQuestion 001-1: how many apples are shown?\nA. Apples.\nB. Candles.\nC. Berries.\n"
                         "D. The three kinds are of the same number.\n" + OPTION)
    assert it.meta["option_texts"]["B"] == "Candles"


def test_videomme_missing_parquet(tmp_path):
    with pytest.raises(TlvrError, match="test-00000-of-00001.parquet"):
        load("videomme", tmp_path)


# ----------------------------------------------------------------------------- MVBench


@pytest.fixture(scope="module")
def mvbench(tmp_path_factory):
    return fx.build_mvbench(tmp_path_factory.mktemp("MVBench"))


def test_mvbench_items(mvbench):
    items = load("mvbench", mvbench)
    assert len(items) == 40
    assert len({i.task for i in items}) == 20
    assert items[0].task == "Fine-grained Pose"  # the reference's evaluation order
    by_id = {i.item_id: i for i in items}
    it = by_id["action_sequence/0"]
    assert it.prompt == ("<image>\nWhat happens in action_sequence 0?\nOptions:\nA. Not sure\n"
                         "B. Scattering something down\nC. Piling something up\n" + INSTR)
    assert it.gold == "C" and by_id["action_sequence/1"].gold == "A"
    assert by_id["object_shuffle/1"].gold == "@"  # gold text not among the candidates
    assert it.choices == ["A", "B", "C"]
    assert it.video == mvbench / "video" / "star" / "Charades_v1_480" / "action_sequence_0.mp4"
    assert not by_id["scene_transition/1"].video.exists()
    assert (by_id["moving_count/1"].video
            == mvbench / "video" / "data0613" / "clevrer" / "video_validation" / "moving_count_1.mp4")


def test_mvbench_frame_specs_paper(mvbench):
    by_id = {i.item_id: i for i in load("mvbench", mvbench)}
    seq = by_id["action_sequence/1"].frame_spec
    assert seq.kind == "uniform" and seq.bound is None  # the reference ignores the bound here
    assert by_id["action_sequence/1"].meta["bound"] == (2.5, 8.25)
    assert by_id["fine_grained_pose/0"].frame_spec.kind == "midpoints"
    assert by_id["action_antonym/0"].frame_spec.kind == "midpoints"
    assert by_id["action_antonym/0"].frame_spec.bound is None
    ep = by_id["episodic_reasoning/0"]
    assert ep.frame_spec.kind == "folder" and ep.frame_spec.bound == (1.5, 7.25) and ep.frame_spec.folder_fps == 3.0
    assert ep.video.is_dir()
    assert by_id["object_existence/0"].frame_spec.kind == "uniform"


def test_mvbench_frame_specs_uniform(mvbench):
    by_id = {i.item_id: i for i in load("mvbench", mvbench, frame_protocol="uniform")}
    assert by_id["action_localization/0"].frame_spec.kind == "uniform"
    assert by_id["action_localization/0"].frame_spec.bound == (1.5, 7.25)
    assert by_id["fine_grained_pose/0"].frame_spec.kind == "uniform"
    assert by_id["episodic_reasoning/0"].frame_spec.kind == "folder"


def test_mvbench_option_mode_prompt(mvbench):
    it = load("mvbench", mvbench, mode="option")[0]
    assert it.prompt == ("<image>\nWhat happens in fine_grained_pose 0?\n(A) Not sure\n(B) Scattering something down\n"
                         "(C) Piling something up\n" + OPTION)


def test_mvbench_missing_task_json(mvbench, tmp_path):
    import shutil

    root = tmp_path / "mv"
    shutil.copytree(mvbench / "json", root / "json")
    (root / "json" / "state_change.json").unlink()
    with pytest.raises(TlvrError, match="state_change.json"):
        load("mvbench", root)
    with pytest.raises(TlvrError, match="json"):
        load("mvbench", tmp_path / "nothing")


# ----------------------------------------------------------------------------- MLVU


@pytest.fixture(scope="module")
def mlvu(tmp_path_factory):
    return fx.build_mlvu(tmp_path_factory.mktemp("MLVU"))


def test_mlvu_items(mlvu):
    items = load("mlvu", mlvu)
    assert len(items) == 14  # 8_sub_scene and 9_summary are not read
    assert [i.task for i in items[::2]] == ["count", "ego", "needle", "order", "plotQA", "anomaly_reco",
                                            "topic_reasoning"]
    it = items[0]
    assert it.prompt == ("<image>\nWhat color is the car in 4_count 0?\n(A) Yellow\n(B) Red\n(C) Green\n(D) Blue\n"
                         + INSTR)
    assert it.video == mlvu / "video" / "4_count" / "count_0.mp4"
    assert [i.gold for i in items[:4]] == ["A", "@", "A", "C"]
    assert it.frame_spec.kind == "pts_seek"
    assert load("mlvu", mlvu, frame_protocol="uniform")[0].frame_spec.kind == "uniform"


def test_mlvu_missing_task_file(mlvu, tmp_path):
    import shutil

    shutil.copytree(mlvu, tmp_path / "m")
    (tmp_path / "m" / "json" / "5_order.json").unlink()
    with pytest.raises(TlvrError, match="5_order.json"):
        load("mlvu", tmp_path / "m")


# ----------------------------------------------------------------------------- MMVU


def test_mmvu_items(tmp_path):
    root = fx.build_mmvu(tmp_path / "MMVU")
    items = load("mmvu", root)
    assert [i.item_id for i in items] == ["val_0", "val_2", "val_3"]  # the open-ended item is dropped
    it = items[0]
    assert it.prompt == ("<image>\nWhich process is shown in video 0?\nA. Mitosis\nB. Meiosis\nC. Osmosis\n"
                         "D. Diffusion\nE. Apoptosis\n" + INSTR)
    assert it.choices == ["A", "B", "C", "D", "E"]
    assert [i.gold for i in items] == ["B", "E", "A"]
    assert it.video == root / "videos" / "Biology" / "0.mp4" and it.video.exists()
    assert not items[2].video.exists()
    assert it.task == "Biology" and it.frame_spec.kind == "uniform"


def test_mmvu_missing_annotations(tmp_path):
    with pytest.raises(TlvrError, match="validation.json"):
        load("mmvu", tmp_path)


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_items(tmp_path):
    root = fx.build_synthetic(tmp_path / "syn")
    items = load("synthetic", root)
    assert len(items) == 3
    it = items[0]
    assert it.prompt == "<image>\nWhat did the man do after 0?\nA. clap\nB. jump\nC. sit\nD. run\nE. wave\n" + INSTR
    assert [i.gold for i in items] == ["B", "E", "A"]
    assert it.choices == ["A", "B", "C", "D", "E"]
    assert it.video == root / "NextQA" / "NExTVideo" / "0000" / "1111.mp4" and it.video.exists()
    assert [i.task for i in items] == ["causal", "temporal", "temporal"]
    with pytest.raises(TlvrError, match="eval.jsonl"):
        load("synthetic", tmp_path / "none")


def test_registry():
    assert set(BENCHMARKS) == {"videomme", "mvbench", "mlvu", "mmvu", "synthetic"}
    assert get_benchmark("mlvu").aggregate == "macro" and get_benchmark("mvbench").aggregate == "micro"
    with pytest.raises(TlvrError, match="unknown benchmark"):
        get_benchmark("nope")
