"""``tlvr infer`` and ``answer_question`` on the tiny model: output, streaming, greedy determinism,
saved checkpoints, and one-line errors."""

from __future__ import annotations

import json

from tlvr_cli.cli import main
from tlvr_cli.config import load_config
from tlvr_cli.data.template import REASON_INSTRUCTION
from tlvr_cli.infer import answer_question, inference_prompt
from tlvr_cli.jobs import InferConfig
from tlvr_cli.model.checkpoint import save_model


def run_cli(argv, capsys):
    code = 0
    try:
        main(argv)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_inference_prompt_appends_the_instruction_after_a_newline():
    p = inference_prompt("What is shown?", reason=True)
    assert p.endswith(f"USER: <image>\nWhat is shown?\n{REASON_INSTRUCTION} ASSISTANT:")
    assert inference_prompt("Q", reason=False).endswith("USER: <image>\nQ ASSISTANT:")


def test_answer_question_streams_and_is_deterministic(make_video, tiny_model):
    video = make_video(n=24)
    cfg = load_config(InferConfig, "tiny", ["sampling.max_new_tokens=12"])
    pieces = []
    a = answer_question(cfg, video, "What color is the square?", model=tiny_model, on_text=pieces.append)
    b = answer_question(cfg, video, "What color is the square?", model=tiny_model)
    assert a.output == b.output and a.new_tokens == b.new_tokens <= 12
    assert "".join(pieces).strip() == a.output
    assert a.frame_indices == [0, 1, 3, 4, 6, 7, 9, 10, 12, 13, 15, 16, 18, 19, 21, 23]
    assert set(a.timings) >= {"load_s", "decode_s", "encode_s", "generate_s"}


def test_cli_infer_json_on_a_saved_checkpoint(make_video, tiny_model, tmp_path, capsys):
    ckpt = save_model(tiny_model, tmp_path / "ck")
    video = make_video()
    code, out, _ = run_cli(["infer", str(video), "Which direction?", "--model", str(ckpt), "--device", "cpu",
                            "--max-new-tokens", "6", "--json"], capsys)
    assert code == 0
    res = json.loads(out.strip().splitlines()[-1])
    assert set(res) >= {"output", "think", "answer", "frame_indices", "timings"} and res["new_tokens"] <= 6


def test_cli_infer_errors_are_one_line(make_video, tmp_path, capsys):
    code, _, err = run_cli(["infer", str(tmp_path / "missing.mp4"), "q", "--model", "tiny", "--device", "cpu"], capsys)
    assert code == 2 and "missing.mp4" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(["infer", str(make_video()), "q", "--model", str(tmp_path / "nockpt")], capsys)
    assert code == 2 and "nockpt" in err


def test_cli_infer_is_greedy_by_default(make_video, tiny_model, tmp_path, capsys):
    # the CLI passes a partial sampling section; it must keep InferConfig's greedy default (not T 1.0 / top-k 50)
    from tlvr_cli.cli import run_cli

    ckpt = save_model(tiny_model, tmp_path / "ck")
    video = make_video(n=24)
    base = ["infer", str(video), "What color?\nA. red\nB. blue", "--model", str(ckpt), "--device", "cpu",
            "--max-new-tokens", "10", "--json"]

    def output(*extra):
        assert run_cli([*base, *extra]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["output"]

    default = output("--seed", "1")
    assert default == output("--seed", "2") == output("--greedy")
    assert len({output("--temperature", "1.0", "--seed", str(s)) for s in range(4)}) > 1


def test_infer_says_when_fewer_distinct_frames_were_decoded(make_video, tiny_model, capsys):
    from tlvr_cli.cli import run_cli

    short = make_video("short.mp4", n=5)
    cfg = load_config(InferConfig, "tiny", ["sampling.max_new_tokens=2"])
    result = answer_question(cfg, short, "Q", model=tiny_model)
    assert result.warnings == [f"{short}: only 5 distinct frames of the 16 asked could be decoded (5 in the file); "
                               f"the answer sees repeated frames"]
    assert answer_question(cfg, make_video("long.mp4", n=24), "Q", model=tiny_model).warnings == []
    assert run_cli(["infer", str(short), "Q", "--preset", "tiny", "--max-new-tokens", "2"]) == 0
    assert "warning: " + result.warnings[0] in capsys.readouterr().err
