"""The evaluation runner end to end on the synthetic split (4 videos x 3 questions) with tiny models:
resume keyed by what produced the answers, torn lines, per-item sampling seeds, shared video features."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tlvr_cli.config import deep_merge, load_config
from tlvr_cli.errors import TlvrError
from tlvr_cli.eval import runner
from tlvr_cli.eval.benchmarks import load_eval_items
from tlvr_cli.eval.decode_ahead import DecodePool, decode_video, video_jobs
from tlvr_cli.eval.runner import run_eval
from tlvr_cli.jobs import EvalConfig, SynthConfig, VideoConfig
from tlvr_cli.model.checkpoint import load_model, save_model
from tlvr_cli.model.tiny import build_tiny_model
from tlvr_cli.synth import write_synthetic_dataset

PAPER = {"protocol": "paper"}
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("evalrun")
    write_synthetic_dataset(SynthConfig(root=str(root / "synth"), train=0, eval=12, coldstart=0, size=32, seed=1),
                            progress=False)
    save_model(build_tiny_model(seed=1), root / "coldstart" / "final")  # stands in for the demo's cold-start model
    return root


def config(data: Path, out: Path | str, model: str | Path = "tiny", **extra) -> EvalConfig:
    base = {"model": {"path": str(model), "device": "cpu", "dtype": "float32"}, "benchmark": "synthetic",
            "data_dir": str(data / "synth"), "sampling": {"max_new_tokens": 6}, "bootstrap": 20, "output_dir": str(out),
            "decode_workers": 0}
    return load_config(EvalConfig, None, extra=deep_merge(base, extra))


def answers(out: Path) -> dict[str, dict]:
    rows = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert len({r["item_id"] for r in rows}) == len(rows)
    return {r["item_id"]: {k: v for k, v in r.items() if k != "seconds"} for r in rows}


def test_another_model_into_the_same_dir_is_refused(data, tmp_path, capsys):
    # the reported case: the demo's cold-start model, then `--model tiny` into the same directory
    from tlvr_cli.cli import main

    out = tmp_path / "eval"
    argv = ["eval", "synthetic", "--data-dir", str(data / "synth"), "--device", "cpu", "--max-new-tokens", "4",
            "-o", str(out), "--set", "decode_workers=0", "--set", "bootstrap=20"]
    main([*argv, "--model", str(data / "coldstart" / "final")])
    kept = {name: (out / name).read_bytes() for name in ("answers.jsonl", "results.json", "config.yaml")}
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--model", "tiny"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"{out} holds answers of another evaluation (model: {(data / 'coldstart' / 'final').resolve()} -> tiny; " \
           "weights: " in err
    assert len(err.strip().splitlines()) == 1
    assert {name: (out / name).read_bytes() for name in kept} == kept  # nothing rewritten, config.yaml included
    # the other way round: the checkpoint's weights are being read ahead when its run is refused
    argv = [str(tmp_path / "eval-tiny") if a == str(out) else a for a in argv]
    main([*argv, "--model", "tiny"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--model", str(data / "coldstart" / "final")])
    assert exit_.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1


def test_default_dirs_are_per_model_and_settings(data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cold = run_eval(config(data, "", data / "coldstart" / "final"), show_progress=False)
    tiny = run_eval(config(data, ""), show_progress=False)
    dirs = sorted((tmp_path / "runs" / "eval" / "synthetic").iterdir())
    assert [d.name.rsplit("-", 1)[0] for d in dirs] == ["coldstart-final-reason-greedy", "tiny-reason-greedy"]
    assert cold.n == tiny.n == 12
    keys = [json.loads((d / "provenance.json").read_text())["key"] for d in dirs]
    assert keys[0]["weights"] != keys[1]["weights"] and keys[1]["model"] == "tiny"
    # the same model and settings again: the same directory, resumed with nothing left to do
    monkeypatch.setattr(runner, "load_model", lambda *a, **k: pytest.fail("nothing to generate, nothing to load"))
    before = (dirs[1] / "answers.jsonl").read_bytes()
    assert run_eval(config(data, ""), show_progress=False).headline == tiny.headline
    assert (dirs[1] / "answers.jsonl").read_bytes() == before
    # other settings: another directory
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    run_eval(config(data, "", sampling={"max_new_tokens": 3}, limit=2), show_progress=False)
    assert len(list((tmp_path / "runs" / "eval" / "synthetic").iterdir())) == 3


def test_resume_key_in_an_explicit_dir(data, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(data / "coldstart" / "final", model)
    out = tmp_path / "e"
    run_eval(config(data, out, model, limit=4), show_progress=False)
    # settings that cannot change an answer may change on resume: the rest is appended
    run_eval(config(data, out, model, limit=6, engine={"max_batch": 2}), show_progress=False)
    assert len(answers(out)) == 6
    for extra, diff in (({"sampling": {"max_new_tokens": 5}}, "max_new_tokens: 6 -> 5"),
                        (PAPER, "protocol: greedy -> paper; seed: unset -> 0; temperature: unset -> 1.0"),
                        ({"video": {"num_frames": 8}}, "frames: 16 -> 8"),
                        ({"mode": "option"}, "mode: reason -> option")):
        with pytest.raises(TlvrError, match=f"holds answers of another evaluation \\({diff}"):
            run_eval(config(data, out, model, **extra), show_progress=False)
    # the same weights written again (new mtime): hashed again, equal, accepted
    save_model(load_model(str(model), device="cpu", dtype="float32"), model)
    run_eval(config(data, out, model, limit=6), show_progress=False)
    # other weights at the same path are refused, naming the fingerprint
    save_model(build_tiny_model(seed=2), model)
    with pytest.raises(TlvrError, match=r"\(weights: [0-9a-f]{12} -> [0-9a-f]{12}\)"):
        run_eval(config(data, out, model), show_progress=False)
    # overwrite_stale starts afresh with the new model
    stale = answers(out)
    report = run_eval(config(data, out, model, overwrite_stale=True), show_progress=False)
    assert report.n == 12 and answers(out).keys() >= stale.keys()
    # answers with no record of what wrote them are refused
    (out / "provenance.json").unlink()
    with pytest.raises(TlvrError, match="no provenance.json, so what produced them is unknown"):
        run_eval(config(data, out, model), show_progress=False)


def test_torn_last_line_is_cut_before_appending(data, tmp_path):
    full = tmp_path / "full"
    run_eval(config(data, full), show_progress=False)
    out = tmp_path / "killed"
    run_eval(config(data, out, limit=5), show_progress=False)
    lines = (full / "answers.jsonl").read_text().splitlines()
    with (out / "answers.jsonl").open("a") as f:
        f.write(lines[5][: len(lines[5]) // 2])  # the 6th row, cut short by a kill
    report = run_eval(config(data, out), show_progress=False)
    text = (out / "answers.jsonl").read_text()
    assert text.endswith("\n") and all(json.loads(line) for line in text.splitlines())
    assert report.n == 12 and answers(out) == answers(full)


def test_each_run_records_its_speed_beside_the_answers(data, tmp_path, capsys):
    out = tmp_path / "speed"
    run_eval(config(data, out, limit=5, engine={"max_batch": 3}), show_progress=True)
    speed = json.loads((out / "speed.json").read_text())
    rows = answers(out)
    assert speed["questions"] == 5 and speed["already_answered"] == 0 and speed["skipped"] == 0
    assert speed["generated_tokens"] == sum(r["new_tokens"] for r in rows.values()) > 0
    assert speed["engine_max_batch"] == 3 and speed["device"] == "cpu"
    assert 0 < speed["first_answer_s"] <= speed["generate_s"] < speed["wall_s"] and speed["load_s"] >= 0
    assert speed["tokens_per_s"] == pytest.approx(speed["generated_tokens"] / speed["generate_s"], rel=0.01)
    # 5 questions on 2 videos: each video's shared prompt part prefilled once, as the line says
    assert 0 < speed["prefilled_positions"] < speed["prompt_positions"]
    err = capsys.readouterr().err
    assert "5 questions in" in err
    assert f"prefilled {speed['prefilled_positions']:,} of {speed['prompt_positions']:,} prompt positions" in err
    # a resumed run records its own part; a run with nothing left to answer leaves the record as it was
    run_eval(config(data, out), show_progress=False)
    speed = json.loads((out / "speed.json").read_text())
    assert (speed["questions"], speed["already_answered"]) == (7, 5)
    run_eval(config(data, out), show_progress=False)
    assert json.loads((out / "speed.json").read_text()) == speed
    # answers of another evaluation cleared by overwrite_stale take their speed record with them
    (out / "speed.rank1.json").write_text("{}")
    run_eval(config(data, out, limit=2, sampling={"max_new_tokens": 5}, overwrite_stale=True), show_progress=False)
    assert json.loads((out / "speed.json").read_text())["questions"] == 2 and not (out / "speed.rank1.json").exists()


def test_paper_answers_do_not_depend_on_batch_or_resume(data, tmp_path):
    runs = {}
    for name, batch in (("one", 1), ("eight", 8)):
        run_eval(config(data, tmp_path / name, engine={"max_batch": batch}, **PAPER), show_progress=False)
        runs[name] = answers(tmp_path / name)
    resumed = tmp_path / "resumed"  # stopped after 5 items (not a batch boundary), resumed at another batch size
    run_eval(config(data, resumed, limit=5, engine={"max_batch": 3}, **PAPER), show_progress=False)
    run_eval(config(data, resumed, engine={"max_batch": 8}, **PAPER), show_progress=False)
    runs["resumed"] = answers(resumed)
    assert runs["one"] == runs["eight"] == runs["resumed"]
    assert len({r["output"] for r in runs["one"].values()}) > 6  # sampled answers differ by item: not vacuous


def test_a_run_resumes_what_a_run_of_another_process_count_answered(data, tmp_path):
    whole = run_eval(config(data, tmp_path / "whole", **PAPER), show_progress=False)
    out = tmp_path / "resumed"
    cfg = config(data, out, **PAPER)
    runner.prepare_output(cfg)  # as the sharded run does: once, then each process its share
    run_eval(cfg, show_progress=False, rank=1, world_size=3, prepared=True)  # one process of three finished
    shard = json.loads((out / "speed.rank1.json").read_text())["questions"]
    assert (out / "answers.rank1.jsonl").is_file() and not (out / "answers.jsonl").exists() and 0 < shard < 12
    resumed = run_eval(config(data, out, **PAPER), show_progress=False)  # then one process for the rest
    assert json.loads((out / "speed.json").read_text())["already_answered"] == shard
    assert answers(out) == answers(tmp_path / "whole")  # all 12, in benchmark order, as answered in one run
    assert list(answers(out)) == list(answers(tmp_path / "whole"))
    assert resumed.to_json() == whole.to_json()


def test_feature_sharing_changes_nothing_but_the_work(data, tmp_path):
    model = build_tiny_model().eval()
    encode = model.encode_videos
    calls = []
    model.encode_videos = lambda pixels: calls.append(len(pixels)) or encode(pixels)
    results = []
    for share, workers in ((True, 2), (False, 0)):  # the shared run also decodes in worker processes
        calls.clear()
        out = tmp_path / f"share-{share}"
        run_eval(config(data, out, share_features=share, decode_workers=workers, **PAPER), model=model,
                 show_progress=False)
        results.append((len(calls), answers(out), json.loads((out / "results.json").read_text())))
    (n_shared, rows_shared, res_shared), (n_each, rows_each, res_each) = results
    assert (n_shared, n_each) == (4, 12)  # the tower ran once per video, or once per question
    assert rows_shared == rows_each and res_shared == res_each
    # the engine's inputs themselves are bitwise equal
    cfg = config(data, tmp_path / "x")
    items = load_eval_items(cfg)
    prompts = []
    for share in (True, False):
        decoded = DecodePool(0).decode(video_jobs(items, share),
                                       lambda v, s: decode_video(v, s, VideoConfig(num_frames=16), 32))
        prompts.append({r.tag[0].item_id: r.prompt for r in runner._requests(model, decoded, pytest.fail)})
    assert prompts[0].keys() == prompts[1].keys() and len(prompts[0]) == 12
    assert all(torch.equal(prompts[0][k], prompts[1][k]) for k in prompts[0])


def test_prefix_sharing_changes_nothing_but_the_work(data, tmp_path, monkeypatch):
    from tlvr_cli.engine.generate import Engine

    forward = Engine._prefill_forward
    positions = []

    def counted(self, x, lens, *rest):
        positions.append(sum(lens))
        return forward(self, x, lens, *rest)

    monkeypatch.setattr(Engine, "_prefill_forward", counted)
    model = build_tiny_model().eval()
    results = []
    for share in (True, False):
        positions.clear()
        out = tmp_path / f"prefix-{share}"
        run_eval(config(data, out, share_prefix=share, **PAPER), model=model, show_progress=False)
        results.append((sum(positions), answers(out), json.loads((out / "results.json").read_text())))
    (shared, rows_shared, res_shared), (whole, rows_whole, res_whole) = results
    assert rows_shared == rows_whole and res_shared == res_whole
    speeds = [json.loads((tmp_path / f"prefix-{share}" / "speed.json").read_text()) for share in (True, False)]
    assert [s["prefilled_positions"] for s in speeds] == [shared, whole]  # the record says what was computed
    assert speeds[0]["prompt_positions"] == speeds[1]["prompt_positions"] == whole
    assert len({r["output"] for r in rows_whole.values()}) > 6  # sampled answers differ by item: not vacuous
    # 4 videos x 3 questions: each video's system prompt and visual tokens prefilled once, not 3 times
    assert whole - shared > 4 * 2 * model.config.num_queries


def test_shared_prefix_length_counts_an_image_token_as_its_visual_tokens():
    from tlvr_cli.data.template import IMAGE_TOKEN_INDEX as IMG
    from tlvr_cli.model.tinyllava import TinyLlava

    common = TinyLlava.shared_prefix_length
    assert common([[1, 2, IMG, 5, 6], [1, 2, IMG, 5, 7, 8]], 10, [14, 15]) == 2 + 10 + 1
    assert common([[1, 2, IMG, 5], [1, 3, IMG, 5]], 10, [13, 13]) == 1
    assert common([[1, 2, IMG], [1, 2, IMG]], 10, [12, 12]) == 11  # identical prompts keep one position each
    assert common([[1, 2, IMG, 5]], 10, [13]) == 0  # one question: nothing shared


def test_workers_hand_over_resized_uint8_frames_the_tower_sees_normalized(data, tmp_path):
    from tlvr_cli.video.decode import read_video
    from tlvr_cli.video.preprocess import preprocess_frames

    item = load_eval_items(config(data, tmp_path / "x"))[0]
    video = VideoConfig(num_frames=16)
    frames, indices = decode_video(item.video, item.frame_spec, video, 32)
    assert frames.dtype == torch.uint8 and frames.shape == (16, 32, 32, 3)
    read = read_video(item.video, item.frame_spec, backend=video.backend, **video.frame_args(item.frame_spec))
    assert indices == list(read.indices)
    seen = []
    model = build_tiny_model()
    model.encode_videos = lambda pixels: seen.append(pixels) or torch.zeros(1, 512, model.config.hidden_size)
    model.prompt_embeddings = lambda ids, visual: [torch.zeros(3, model.config.hidden_size) for _ in ids]
    next(runner._requests(model, iter([(video_jobs([item], True)[0], (frames, indices))]), pytest.fail))
    assert torch.equal(seen[0][0], preprocess_frames(read.frames, size=32))


def test_a_broken_video_skips_all_its_questions(data, tmp_path):
    synth = tmp_path / "synth"
    shutil.copytree(data / "synth", synth)
    broken = load_eval_items(config(data, tmp_path / "x"))[0].video
    (synth / broken.relative_to(data / "synth")).write_bytes(b"not a video")
    report = run_eval(config(data, tmp_path / "out", data_dir=str(synth)), show_progress=False)
    rows = answers(tmp_path / "out")
    skipped = [r for r in rows.values() if r.get("skipped")]
    assert report.n_skipped == len(skipped) == 3
    assert {r["video"] for r in skipped} == {str(synth / broken.relative_to(data / "synth"))}


@pytest.mark.parametrize("waits_in", ["load_model", "prepare_output"])
def test_videos_decode_while_the_model_loads_and_is_fingerprinted(data, tmp_path, monkeypatch, waits_in):
    # the decode workers have the first videos done before the model is loaded, and before the checkpoint's
    # fingerprint (a new checkpoint is read whole) is taken: a step that waits for them finishes, one that ran
    # before any decode was submitted would wait forever
    import time

    real = getattr(runner, waits_in)
    marks = tmp_path / "marks"
    marks.mkdir()

    def waiting(*args, **kwargs):
        deadline = time.monotonic() + 60
        while len(list(marks.iterdir())) < 2:
            assert time.monotonic() < deadline, f"no video was decoded before {waits_in}"
            time.sleep(0.05)
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, waits_in, waiting)
    monkeypatch.setattr(runner, "decode_video", _marking_decode(marks))
    report = run_eval(config(data, tmp_path / "out", data / "coldstart" / "final", decode_workers=2),
                      show_progress=False)
    assert report.n == 12 and len(list(marks.iterdir())) == 4  # once per video


def test_the_weights_are_read_while_the_checkpoint_is_fingerprinted(data, tmp_path, monkeypatch):
    calls = []
    read, prepare, load = runner.read_weights_ahead, runner.prepare_output, runner.load_model
    monkeypatch.setattr(runner, "read_weights_ahead", lambda spec: calls.append("read") or read(spec))
    monkeypatch.setattr(runner, "prepare_output", lambda *a: calls.append("fingerprint") or prepare(*a))
    monkeypatch.setattr(runner, "load_model", lambda spec, weights: calls.append(type(weights).__name__)
                        or load(spec, weights=weights))
    cfg = config(data, tmp_path / "out", data / "coldstart" / "final")
    assert run_eval(cfg, show_progress=False).n == 12
    assert calls == ["read", "fingerprint", "PendingWeights"]
    calls.clear()
    run_eval(cfg, show_progress=False)  # nothing left to answer: nothing read, nothing loaded
    assert calls == ["fingerprint"]


class _marking_decode:
    """``decode_video`` that leaves a file per decoded video (picklable, for the worker processes)."""

    def __init__(self, marks: Path) -> None:
        self.marks = marks

    def __call__(self, path, spec, **kw):
        (self.marks / Path(path).name).touch()
        return decode_video(path, spec, **kw)
