"""Reflection metrics in eval reports (results.json/.md, `tlvr eval score`) and in `tlvr eval compare`."""

from __future__ import annotations

import json

import pytest

from tlvr_cli.eval.report import compare_answer_files, compare_answers, score_answers, score_answers_file


def row(i, task, correct, think):
    output = f"<think>{think}</think> <answer>{'A' if correct else 'B'}</answer>"
    return {"item_id": str(i), "task": task, "gold": "A", "parsed": "A" if correct else "B",
            "parse_how": "answer_tag", "correct": correct, "output": output}


ROWS = [row(0, "x", True, "Red. Wait, it is blue."), row(1, "x", False, "It is red."),
        row(2, "y", True, "Up. However, it moved down. Actually left."), row(3, "y", True, "Left.")]


def test_report_has_reflection_per_task_and_overall():
    rep = score_answers(ROWS, "mvbench", n_boot=0)
    overall, x, y = rep.reflection["overall"], rep.reflection["by_task"]["x"], rep.reflection["by_task"]["y"]
    assert (overall["n"], overall["n_with"], overall["rate"]) == (4, 2, 50.0)
    assert overall["markers"] == pytest.approx(3 / 4)  # wait; however + actually; none; none
    assert overall["acc_with"] == 100.0 and overall["acc_without"] == 50.0
    lengths = [len("Red. Wait, it is blue."), len("It is red."), len("Up. However, it moved down. Actually left."),
               len("Left.")]
    assert overall["think_chars"] == pytest.approx(sum(lengths) / 4)
    assert x["rate"] == 50.0 and x["acc_with"] == 100.0 and x["acc_without"] == 0.0
    assert y["acc_with"] == 100.0 and y["acc_without"] == 100.0
    md = rep.markdown()
    assert "| **overall** | 4 | 50.0 | 0.75 |" in md and "| x | 2 | 50.0 | 0.50 |" in md
    assert json.loads(json.dumps(rep.to_json()))["reflection"]["overall"]["rate"] == 50.0


def test_option_mode_answers_have_no_reflection_section():
    rows = [{**r, "output": "A"} for r in ROWS]
    rep = score_answers(rows, "mvbench", n_boot=0)
    assert rep.reflection == {} and "Reflection" not in rep.markdown()


def test_score_file_uses_the_run_phrases(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "config.yaml").write_text("benchmark: mvbench\nreflection:\n  phrases: [red]\n")
    rep = score_answers_file(path, n_boot=0, write=True)
    assert rep.reflection["overall"]["n_with"] == 2  # "Red." and "It is red."
    assert "Reflection markers" in (tmp_path / "results.md").read_text()


def test_compare_shows_the_change(tmp_path):
    b = [row(0, "x", True, "Wait. Hmm, recheck."), row(1, "x", True, "Wait."), row(2, "y", True, "However."),
         row(3, "y", True, "Left, actually.")]
    cmp = compare_answers(ROWS, b, "mvbench", n_boot=0)
    a_all, b_all = cmp.reflection["a"]["overall"], cmp.reflection["b"]["overall"]
    assert (a_all["rate"], b_all["rate"]) == (50.0, 100.0)
    md = cmp.markdown()
    assert "| reflecting % | 50.0 | 100.0 | +50.0 |" in md
    assert "| reflecting %: x | 50.0 | 100.0 | +50.0 |" in md and "| acc without reflection % | 50.0 | – | – |" in md
    pa, pb = tmp_path / "a" / "answers.jsonl", tmp_path / "b" / "answers.jsonl"
    for p, rows in ((pa, ROWS), (pb, b)):
        p.parent.mkdir()
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (pa.parent / "config.yaml").write_text("benchmark: mvbench\n")
    assert compare_answer_files(pa, pb, n_boot=0) == cmp
