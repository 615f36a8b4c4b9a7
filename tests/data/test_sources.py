"""The command that writes a missing input, named by every "not found" error."""

from __future__ import annotations

from pathlib import Path

from tlvr_cli.config import load_config
from tlvr_cli.data.sources import DEMO_DATA, SYNTH_FILES, command_for, fetch_target_of_repo, missing_hint
from tlvr_cli.jobs import DemoConfig
from tlvr_cli.synth import COLDSTART_FILE, EVAL_FILE, TRAIN_FILE


def test_the_names_it_knows_are_the_writers_names():
    assert set(SYNTH_FILES) == {TRAIN_FILE, EVAL_FILE, COLDSTART_FILE}
    assert Path(load_config(DemoConfig, "demo").data.root) == DEMO_DATA


def test_fetch_targets_with_their_root(tmp_path, monkeypatch):
    monkeypatch.setenv("TLVR_DATA", str(tmp_path / "cache"))
    cache = tmp_path / "cache"
    assert command_for(cache / "videomme" / "videomme" / "test-00000-of-00001.parquet") == "tlvr data fetch videomme"
    assert command_for(cache / "train" / "nextqa_0-30s.jsonl") == "tlvr data fetch nextqa"
    assert command_for(cache / "models" / "TinyLLaVA-Video-R1") == "tlvr data fetch r1"
    # a root elsewhere: the outermost place the target's folders appear
    assert command_for(Path("/data/videomme/videomme/x.parquet")) == "tlvr data fetch videomme --root /data"
    assert command_for(Path("/d/mvbench/json")) == "tlvr data fetch mvbench --root /d"
    assert fetch_target_of_repo("Zhang199/TinyLLaVA-Video-Coldstart_NextQA_16") == "coldstart"
    assert fetch_target_of_repo("someone/else") is None


def test_the_synthetic_set_and_the_demos_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("TLVR_DATA", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    assert command_for(tmp_path / "cache" / "synthetic" / "eval.jsonl") == "tlvr data synth"
    assert command_for(Path("runs/demo-data/coldstart.json")) == "tlvr data synth --root runs/demo-data"
    assert command_for(Path("my folder/eval.jsonl")) == "tlvr data synth --root 'my folder'"
    assert command_for(Path("/somewhere/else.json")) is None
    assert missing_hint(Path("/somewhere/else.json"), "--data-dir") == ""
    (tmp_path / "runs" / "demo-data").mkdir(parents=True)
    (tmp_path / "runs" / "demo-data" / "eval.jsonl").write_text("")
    assert missing_hint(tmp_path / "cache" / "synthetic" / "eval.jsonl", "--data-dir") == (
        " (write it with `tlvr data synth` or use the demo's with --data-dir runs/demo-data)")
    assert missing_hint(Path("x/eval.jsonl"), "--set data.root=").endswith("--set data.root=runs/demo-data)")
    assert missing_hint(Path("runs/demo-data/eval.jsonl"), "--data-dir") == (
        " (write it with `tlvr data synth --root runs/demo-data`)")  # the demo's own copy is not offered for itself
