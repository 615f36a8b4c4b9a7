"""NextQA-format readers, the synthetic set, the video check, and the ``tlvr data synth/check`` commands."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tlvr_cli.data.check import check_videos, load_skip_set, videos_for_target, write_report
from tlvr_cli.data.records import problem_options, read_coldstart_records, read_grpo_rows, resolve_under_root
from tlvr_cli.data.template import REASON_INSTRUCTION
from tlvr_cli.errors import TlvrError
from tlvr_cli.files import data_root
from tlvr_cli.jobs import SynthConfig
from tlvr_cli.synth import COLORS, write_synthetic_dataset

SMALL = dict(train=12, eval=6, coldstart=4, size=32)
REPO = Path(__file__).resolve().parents[2]


def _row(**kw) -> dict:
    row = {"problem_id": 0, "problem": "Q?\nA. a\nB. b\nC. c\nD. d\nE. e", "data_type": "video",
           "problem_type": "multiple choice", "solution": "<answer>B</answer>",
           "video_filename": "./NextQA/NExTVideo/1150/6233408665.mp4"}
    row.update(kw)
    return row


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    return write_synthetic_dataset(SynthConfig(root=str(tmp_path_factory.mktemp("synth") / "a"), **SMALL),
                                   progress=False)


# ----------------------------------------------------------------------------- readers


def test_grpo_rows_resolve_and_filter(tmp_path):
    f = _write_jsonl(tmp_path / "rows.jsonl", [_row(), "", _row(problem_id=1, data_type="image"),
                                                _row(problem_id=2, video_filename="/abs/v.mp4")])
    rows = read_grpo_rows(f, tmp_path / "root")
    assert [r.extra["problem_id"] for r in rows] == [0, 2]  # the image row is dropped
    assert [r.index for r in rows] == [0, 1]
    assert rows[0].video_path == tmp_path / "root" / "NextQA/NExTVideo/1150/6233408665.mp4"
    assert rows[0].solution == "<answer>B</answer>" and rows[0].extra["problem_type"] == "multiple choice"
    assert rows[1].video_path == Path("/abs/v.mp4")
    assert list(problem_options(rows[0].problem)) == list("ABCDE")


def test_grpo_rows_errors_name_file_line_and_field(tmp_path):
    f = _write_jsonl(tmp_path / "bad.jsonl", [_row(), '{"problem": "x",'])
    with pytest.raises(TlvrError, match=re.escape(f"{f}:2: malformed JSON")):
        read_grpo_rows(f, tmp_path)
    g = _write_jsonl(tmp_path / "nofield.jsonl", [_row(), {k: v for k, v in _row().items() if k != "solution"}])
    with pytest.raises(TlvrError, match=re.escape(f"{g}:2: missing field 'solution'")):
        read_grpo_rows(g, tmp_path)
    h = _write_jsonl(tmp_path / "escape.jsonl", [_row(video_filename="./../../etc/passwd")])
    with pytest.raises(TlvrError, match=r"escape\.jsonl:1: field 'video_filename'.*escapes the data root"):
        read_grpo_rows(h, tmp_path)
    with pytest.raises(TlvrError, match="not found"):
        read_grpo_rows(tmp_path / "absent.jsonl", tmp_path)
    with pytest.raises(TlvrError) as info:
        read_grpo_rows(f, tmp_path)
    assert "\n" not in str(info.value)


def test_resolve_under_root_and_data_root(tmp_path, monkeypatch):
    assert resolve_under_root(tmp_path, "./a/b.mp4") == tmp_path / "a" / "b.mp4"
    assert resolve_under_root(tmp_path, "a/../b.mp4") == tmp_path / "b.mp4"
    with pytest.raises(TlvrError):
        resolve_under_root(tmp_path, "../x.mp4")
    monkeypatch.setenv("TLVR_DATA", str(tmp_path))
    assert data_root() == tmp_path
    monkeypatch.delenv("TLVR_DATA")
    assert data_root() == Path.home() / ".cache" / "tlvr"


def test_coldstart_records(tmp_path):
    good = [{"id": "x", "video": "NextQA/NExTVideo/1/2.mp4", "conversations": [
        {"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "<think>t</think>\n<answer>A</answer>"}]}]
    f = tmp_path / "cs.json"
    f.write_text(json.dumps(good))
    recs = read_coldstart_records(f, tmp_path)
    assert recs[0].video_path == tmp_path / "NextQA/NExTVideo/1/2.mp4" and recs[0].extra == {"id": "x"}
    for bad, pattern in [
        ([{**good[0], "conversations": [{"from": "gpt", "value": "a"}]}], "must be from 'human'"),
        ([{**good[0], "conversations": [{"from": "human"}]}], r"conversations\[0\] needs a string field 'value'"),
        ([{"conversations": good[0]["conversations"]}], "missing string field 'video'"),
        ({"video": "x"}, "expected a JSON list"),
    ]:
        f.write_text(json.dumps(bad))
        with pytest.raises(TlvrError, match=pattern):
            read_coldstart_records(f, tmp_path)
    f.write_text('[\n{"video": }\n]')
    with pytest.raises(TlvrError, match=re.escape(f"{f}:2: malformed JSON")):
        read_coldstart_records(f, tmp_path)


# ----------------------------------------------------------------------------- synthetic set


def test_synth_counts_format_and_split(synth_root):
    train = read_grpo_rows(synth_root / "nextqa_0-30s.jsonl", synth_root)
    evals = read_grpo_rows(synth_root / "eval.jsonl", synth_root)
    cold = read_coldstart_records(synth_root / "coldstart.json", synth_root)
    assert (len(train), len(evals), len(cold)) == (12, 6, 4)
    for r in train + evals:
        assert list(problem_options(r.problem)) == list("ABCDE")
        assert re.fullmatch(r"<answer>[A-E]</answer>", r.solution)
        assert r.video_filename.startswith("./NextQA/NExTVideo/") and r.video_path.is_file()
        assert re.fullmatch(r"\./NextQA/NExTVideo/\d{4}/\d+\.mp4", r.video_filename)
        assert r.extra["data_type"] == "video" and r.extra["problem_type"] == "multiple choice"
    assert {r.video_path for r in train}.isdisjoint({r.video_path for r in evals})
    golds = [r.solution[8] for r in train]
    assert max(golds.count(c) for c in "ABCDE") - min(golds.count(c) for c in "ABCDE") <= 1  # balanced letters
    for rec in cold:
        human, gpt = rec.conversations
        assert human["value"].startswith("<image>\n") and human["value"].endswith(" " + REASON_INSTRUCTION)
        assert re.fullmatch(r"<think>.+</think>\n<answer>[A-E]</answer>", gpt["value"], flags=re.DOTALL)
        assert rec.video_path.is_file()


def test_synth_kinds_and_fixed_option_order(tmp_path):
    from tlvr_cli.synth import COLORS

    cfg = SynthConfig(root=str(tmp_path / "k"), **{**SMALL, "kinds": ["square"], "coldstart_kinds": ["background"],
                                                  "option_order": "fixed"})
    root = write_synthetic_dataset(cfg, progress=False)
    pool = "\n".join(f"{letter}. {c}" for letter, c in zip("ABCDE", COLORS))
    for r in read_grpo_rows(root / "nextqa_0-30s.jsonl", root) + read_grpo_rows(root / "eval.jsonl", root):
        assert r.problem == "What color is the square?\n" + pool  # fixed order: the pool as listed
    for rec in read_coldstart_records(root / "coldstart.json", root):
        human, gpt = rec.conversations
        assert "What color is the background?" in human["value"]
        # the reasoning describes the whole scene whatever is asked, and names the letter it answers
        think = re.search(r"<think>(.+)</think>\n<answer>([A-E])</answer>", gpt["value"], flags=re.DOTALL)
        assert "square on a" in think.group(1) and think.group(1).endswith(f"so the answer is {think.group(2)}.")
    for bad, msg in [({"kinds": ["size"]}, "kinds="), ({"coldstart_kinds": []}, "coldstart_kinds="),
                     ({"option_order": "sorted"}, "option_order=")]:
        with pytest.raises(TlvrError, match=msg):
            write_synthetic_dataset(SynthConfig(root=str(tmp_path / "bad"), **{**SMALL, **bad}), progress=False)


def test_synth_lanes_one_video_per_kind_and_asked_reasoning(tmp_path):
    from tlvr_cli.synth import SynthVideo, render_frames

    cfg = SynthConfig(root=str(tmp_path / "l"), **{**SMALL, "kinds": ["background"], "coldstart_kinds": ["background"],
                                                  "option_order": "fixed", "coldstart_option_order": "fixed",
                                                  "lanes": 3, "reasoning": "asked"})
    root = write_synthetic_dataset(cfg, progress=False)
    train = read_grpo_rows(root / "nextqa_0-30s.jsonl", root)
    evals = read_grpo_rows(root / "eval.jsonl", root)
    # one question kind: every question has a video of its own, so no two eval items are the same prompt
    assert (len({r.video_path for r in train}) == len(train) == 12
            and len({r.video_path for r in evals}) == len(evals) == 6)
    for rec in read_coldstart_records(root / "coldstart.json", root):
        gpt = rec.conversations[1]["value"]
        m = re.fullmatch(r"<think>The question asks for the background color\. The background is (\w+)\. "
                         r"The option \1 is ([A-E]), so the answer is \2\.</think>\n<answer>\2</answer>", gpt)
        assert m and list(COLORS).index(m.group(1)) == "ABCDE".index(m.group(2))
    # lanes move the square's path across the frame; one lane is the middle, as without lanes
    video = SynthVideo("red", "blue", "right", "x.mp4")
    paths = [render_frames(SynthVideo("red", "blue", "right", "x.mp4", lane), 4, 32, 3) for lane in range(3)]
    rows_hit = [set(np.nonzero((p[0] == COLORS["blue"]).all(-1))[0]) for p in paths]
    assert rows_hit[0] and max(rows_hit[0]) < min(rows_hit[1]) and max(rows_hit[1]) < min(rows_hit[2])
    assert np.array_equal(render_frames(video, 4, 32), paths[1])
    for bad, msg in [({"lanes": 0}, "lanes="), ({"reasoning": "long"}, "reasoning=")]:
        with pytest.raises(TlvrError, match=msg):
            write_synthetic_dataset(SynthConfig(root=str(tmp_path / "bad"), **{**SMALL, **bad}), progress=False)


def _nearest_color(rgb: np.ndarray) -> str:
    return min(COLORS, key=lambda c: float(np.sum((np.asarray(COLORS[c], dtype=float) - rgb) ** 2)))


def test_synth_answers_match_the_pixels(synth_root):
    from tlvr_cli.video.decode import read_frames

    rows = read_grpo_rows(synth_root / "nextqa_0-30s.jsonl", synth_root)
    checked = {"background": 0, "square": 0, "direction": 0}
    for r in rows:
        letter = r.solution[8]
        answer = dict(line.split(". ", 1) for line in r.problem.splitlines()[1:])[letter]
        frames = read_frames(r.video_path, 16).frames.astype(float)
        assert frames.shape == (16, 32, 32, 3)
        colors = {_nearest_color(px) for px in frames.reshape(-1, 3)[::7]}
        if r.problem.startswith("What color is the background?"):
            assert _nearest_color(frames[:, 0, 0].mean(0)) == answer  # a corner the square never reaches
            checked["background"] += 1
        elif r.problem.startswith("What color is the square?"):
            assert answer in colors and _nearest_color(frames[:, 0, 0].mean(0)) != answer
            checked["square"] += 1
        else:
            bg = frames[:, 0, 0].mean(0)
            centers = []
            for t in (0, -1):  # centroid of the square's pixels in the first and last frame
                ys, xs = np.nonzero(np.abs(frames[t] - bg).sum(-1) > 120)
                centers.append((xs.mean(), ys.mean()))
            dx, dy = centers[1][0] - centers[0][0], centers[1][1] - centers[0][1]
            moved = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
            assert answer == (moved if max(abs(dx), abs(dy)) > 4 else "nowhere")
            checked["direction"] += 1
    assert all(checked.values()), checked


def test_synth_is_deterministic_and_idempotent(synth_root, tmp_path):
    other = write_synthetic_dataset(SynthConfig(root=str(tmp_path / "b"), **SMALL), progress=False)
    for name in ("nextqa_0-30s.jsonl", "eval.jsonl", "coldstart.json"):
        assert (synth_root / name).read_bytes() == (other / name).read_bytes()
    stamp = {p: p.stat().st_mtime_ns for p in other.rglob("*") if p.is_file()}
    write_synthetic_dataset(SynthConfig(root=str(other), **SMALL), progress=False)
    assert stamp == {p: p.stat().st_mtime_ns for p in other.rglob("*") if p.is_file()}
    reseeded = write_synthetic_dataset(SynthConfig(root=str(tmp_path / "c"), seed=1, **SMALL), progress=False)
    assert (reseeded / "nextqa_0-30s.jsonl").read_bytes() != (other / "nextqa_0-30s.jsonl").read_bytes()
    with pytest.raises(TlvrError, match="root"):
        write_synthetic_dataset(SynthConfig(root=""))


def test_synth_videos_are_byte_identical_whatever_the_heap(tmp_path):
    # Two processes write the same 160 distinct 64 px videos side by side, glibc filling fresh heap memory
    # with a different byte in each: an encoder reading uninitialised memory shows up as differing files
    # (with x264's macroblock tree on, 14 of these 160 differed).
    sets = ["--set", "train=120", "--set", "eval=40", "--set", "coldstart=4", "--set", "lanes=8", "--set", "seed=3",
            "--set", "kinds=[background]", "--set", "coldstart_kinds=[background]"]
    fills = ("85", "170")
    procs = [subprocess.Popen([sys.executable, "-m", "tlvr_cli", "data", "synth", *sets,
                               "--root", str(tmp_path / fill)],
                              cwd=REPO, env={**os.environ, "MALLOC_PERTURB_": fill},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for fill in fills]
    for proc in procs:
        errors = proc.communicate(timeout=120)[1]
        assert proc.returncode == 0, errors
    digests = [{str(p.relative_to(tmp_path / fill)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted((tmp_path / fill).rglob("*")) if p.is_file()} for fill in fills]
    assert sum(name.endswith(".mp4") for name in digests[0]) == 160
    assert len(set(digests[0].values())) == len(digests[0])  # every video distinct
    assert digests[0] == digests[1], [name for name in digests[0] if digests[0][name] != digests[1].get(name)]


# ----------------------------------------------------------------------------- check


def test_check_kinds_and_report_round_trip(synth_root, tmp_path):
    good = read_grpo_rows(synth_root / "eval.jsonl", synth_root)[0].video_path
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"this is not a video" * 50)
    missing = tmp_path / "missing.mp4"
    results = check_videos([good, missing, garbage, good], 8, workers=2, progress=False)
    assert [(r.path, r.kind) for r in results] == [(good, "ok"), (missing, "missing"), (garbage, "unreadable")]
    assert results[0].ok and results[0].frames == 16 and not results[1].ok
    short = check_videos([good], 8, min_frames=100, progress=False)[0]
    assert short.kind == "too_short"

    report = write_report(results, tmp_path / "r" / "check.json", "mixed")
    assert report["counts"] == {"ok": 1, "missing": 1, "unreadable": 1}
    assert json.loads((tmp_path / "r" / "check.json").read_text()) == report
    skip = load_skip_set(tmp_path / "r" / "check.json")
    assert str(missing) in skip and str(garbage) in skip and str(good) not in skip
    with pytest.raises(TlvrError, match="not found"):
        load_skip_set(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("[1, 2")
    with pytest.raises(TlvrError, match="not a readable check report"):
        load_skip_set(tmp_path / "bad.json")


def test_videos_for_target(synth_root):
    named = videos_for_target("synthetic", synth_root)
    on_disk = videos_for_target(str(synth_root / "NextQA"), None)
    assert len(named) == len(set(named)) and set(named) == set(on_disk)
    assert set(videos_for_target(str(synth_root / "eval.jsonl"))) < set(named)
    assert set(videos_for_target(str(synth_root / "coldstart.json"))) < set(named)
    with pytest.raises(TlvrError, match="unknown check target"):
        videos_for_target("no-such-target", synth_root)
    with pytest.raises(TlvrError, match="not found"):
        videos_for_target("nextqa", synth_root / "NextQA")


# ----------------------------------------------------------------------------- CLI


def test_cli_synth_and_check(tmp_path):
    import typer
    from typer.testing import CliRunner

    from tlvr_cli.cli.data import data_app

    app = typer.Typer()
    app.add_typer(data_app, name="data")
    runner = CliRunner()
    root = tmp_path / "s"
    res = runner.invoke(app, ["data", "synth", "--root", str(root), "--set", "train=6", "--set", "eval=3",
                              "--set", "coldstart=2", "--set", "size=32"])
    assert res.exit_code == 0, res.output
    assert "6 train rows" in res.output and (root / ".synth-complete").is_file()

    res = runner.invoke(app, ["data", "check", "synthetic", "--root", str(root), "--workers", "2"])
    assert res.exit_code == 0, res.output
    report = json.loads((root / "check-synthetic.json").read_text())
    assert report["bad"] == [] and report["counts"]["ok"] > 0

    (root / "NextQA" / "broken.mp4").write_bytes(b"junk")
    out = tmp_path / "rep.json"
    res = runner.invoke(app, ["data", "check", str(root / "NextQA"), "--report", str(out)])
    assert res.exit_code == 1, res.output
    assert load_skip_set(out) >= {str(root / "NextQA" / "broken.mp4")}

    res = runner.invoke(app, ["data", "synth", "--set", "size=31", "--root", str(tmp_path / "odd")])
    assert isinstance(res.exception, TlvrError) and "size=31" in str(res.exception)


def test_cli_errors_are_one_line(tmp_path, capsys):
    from tlvr_cli.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["data", "check", str(tmp_path / "nothing.jsonl")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "nothing.jsonl: not found" in err and len(err.strip().splitlines()) == 1
