"""Answer parsing (spec §6, §3.3) and the report: accuracies, bootstrap CIs, comparisons."""

from __future__ import annotations

import json
import random

import pytest

from tlvr_cli.errors import TlvrError
from tlvr_cli.eval.answer import parse_option_answer, parse_reason_answer
from tlvr_cli.eval.report import (
    compare_answer_files,
    compare_answers,
    mcnemar_p,
    score_answers,
    score_answers_file,
    write_report,
)

ABCD = ["A", "B", "C", "D"]


# ----------------------------------------------------------------------------- reason mode


@pytest.mark.parametrize("output,letter,how", [
    ("<think>hmm</think><answer>B</answer>", "B", "answer_tag"),
    ("<answer> (C) cat</answer>", "C", "paren"),
    ("<answer>(c) cat</answer>", "C", "paren"),
    ("<answer>b</answer>", "B", "answer_tag"),
    ("<answer>a cat</answer>", "A", "answer_tag"),  # spec §7.16: the first character wins, any case
    ("<answer>D. The three kinds</answer>", "D", "answer_tag"),
    ("<answer>B, C</answer>", "B", "answer_tag"),  # several letters: the first character
    ("<answer>The (B) or (A)</answer>", "A", "paren"),  # first choice in letter order with "(X)"
    ("<answer>B</answer> then <answer>C</answer>", "B", "answer_tag"),  # first match only
    ("<answer>\nB\n</answer>", "B", "answer_tag"),  # \s* crosses newlines; the content cannot (no DOTALL)
    ("<answer>   </answer>", None, "empty"),
    ("<answer></answer>", None, "empty"),
])
def test_reason_parse(output, letter, how):
    parsed = parse_reason_answer(output, ABCD, None)
    assert (parsed.letter, parsed.how) == (letter, how)


def test_reason_empty_answer_is_wrong_even_in_paper_protocol():
    assert parse_reason_answer("<answer></answer>", ABCD, random.Random(0)).letter is None


@pytest.mark.parametrize("output", ["The answer is B", "<answer>B\nC</answer>", "<answer>E</answer>",
                                    "<answer>the cat</answer>", ""])
def test_reason_unparseable(output):
    assert parse_reason_answer(output, ABCD, None).how == "none"
    a = parse_reason_answer(output, ABCD, random.Random("0:item-7"))
    b = parse_reason_answer(output, ABCD, random.Random("0:item-7"))
    assert a.how == "random" and a.letter in ABCD and a == b


def test_reason_random_fallback_matches_rng_choice():
    assert parse_reason_answer("no tags", ABCD, random.Random(3)).letter == random.Random(3).choice(ABCD)


# ----------------------------------------------------------------------------- option mode

TEXTS = {"A": "apples", "B": "candles", "C": "berries", "D": "the same number"}


@pytest.mark.parametrize("output,letter,how", [
    ("B", "B", "leading_letter"),
    ("C.", "C", "leading_letter"),
    ("  'D'  ", "D", "leading_letter"),
    ("The answer is (C).", "C", "paren"),
    ("(A) or maybe (B)", "B", "paren"),  # "(" is not a choice; both "(A)" and "(B)" occur, the last wins
    ("I think (A), no wait, (D) is right", "D", "paren"),  # last occurrence wins
    ("I pick B here", "B", "spaced_letter"),
    ("the video clearly shows several candles on the table", "B", "option_text"),
    ("there are apples and then berries in the last shot", "C", "option_text"),
])
def test_option_parse(output, letter, how):
    parsed = parse_option_answer(output, ABCD, None, option_texts=TEXTS)
    assert (parsed.letter, parsed.how) == (letter, how)


def test_option_fallbacks():
    assert parse_option_answer("candles", ABCD, None, option_texts=TEXTS).how == "none"  # <= 5 words: no text match
    assert parse_option_answer("", ABCD, None).letter is None
    r = parse_option_answer("nothing useful at all here really", ABCD, random.Random(1))
    assert r.how == "random" and r.letter == random.Random(1).choice(ABCD)


# ----------------------------------------------------------------------------- report


def row(i, task, correct, **kw):
    return {"item_id": str(i), "task": task, "gold": "A", "parsed": "A" if correct else "B",
            "parse_how": "answer_tag", "correct": correct, **kw}


def test_three_of_four():
    rows = [row(0, "t", True), row(1, "t", True), row(2, "t", True), row(3, "t", False)]
    rep = score_answers(rows, "mmvu", n_boot=200, seed=0)
    assert rep.headline == 75.0 and rep.n == rep.n_scored == 4 and rep.n_skipped == 0
    assert rep.by_task["t"] == {"acc": 75.0, "n": 4, "ci95": list(rep.ci95)}


def test_micro_vs_macro():
    # task x: 1/1 right; task y: 1/3 right -> micro 50.0, macro (100 + 33.3) / 2 = 66.7
    rows = [row(0, "x", True), row(1, "y", True), row(2, "y", False), row(3, "y", False)]
    mv = score_answers(rows, "mvbench", n_boot=100)
    ml = score_answers(rows, "mlvu", n_boot=100)
    assert mv.headline == 50.0
    assert ml.headline == pytest.approx(200 / 3)
    assert mv.extra["macro"] == pytest.approx(200 / 3) and ml.extra["micro"] == 50.0


def test_skipped_and_unparseable():
    rows = [row(0, "t", True), row(1, "t", False, parsed=None, parse_how="none"),
            {"item_id": "2", "task": "t", "gold": "A", "skipped": True, "error": "broken"},
            row(3, "t", True, parse_how="random")]
    rep = score_answers(rows, "mmvu", n_boot=100)
    assert rep.n == 4 and rep.n_scored == 3 and rep.n_skipped == 1
    assert rep.headline == pytest.approx(200 / 3)
    assert rep.extra["acc_skipped_as_wrong"] == 50.0
    assert rep.n_unparseable == 2 and rep.extra["n_random_fallback"] == 1


def test_bootstrap_deterministic_and_contains_point():
    rows = [row(i, f"t{i % 3}", i % 4 != 0) for i in range(60)]
    a = score_answers(rows, "mlvu", n_boot=300, seed=7)
    b = score_answers(rows, "mlvu", n_boot=300, seed=7)
    c = score_answers(rows, "mlvu", n_boot=300, seed=8)
    assert a.ci95 == b.ci95 and a.by_task == b.by_task
    assert a.ci95 != c.ci95
    assert a.ci95[0] <= a.headline <= a.ci95[1]
    for t in a.by_task.values():
        assert t["ci95"][0] <= t["acc"] <= t["ci95"][1]


def test_videomme_by_duration():
    rows = [row("short/1", "Counting", True), row("short/2", "OCR", False), row("long/1", "OCR", True)]
    rep = score_answers(rows, "videomme", n_boot=50)
    assert rep.extra["by_duration"]["short"]["acc"] == 50.0 and rep.extra["by_duration"]["long"]["n"] == 1
    assert "duration: short" in rep.markdown()


def test_write_and_score_file(tmp_path):
    rows = [row(0, "t", True), row(1, "t", False)]
    path = tmp_path / "answers.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"item_id": "torn')
    (tmp_path / "config.yaml").write_text("benchmark: mmvu\nseed: 0\n")
    rep = score_answers_file(path, n_boot=100)
    assert rep.benchmark == "mmvu" and rep.headline == 50.0
    write_report(rep, tmp_path)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["headline"] == 50.0 and data["by_task"]["t"]["n"] == 2
    assert "| t | 2 | 50.0 |" in (tmp_path / "results.md").read_text()
    assert not list(tmp_path.glob("*.tmp"))
    (tmp_path / "config.yaml").unlink()
    with pytest.raises(TlvrError, match="benchmark"):
        score_answers_file(path)


def test_compare_mcnemar(tmp_path):
    a = [row(0, "x", True), row(1, "x", True), row(2, "x", False), row(3, "y", False), row(4, "y", True)]
    b = [row(0, "x", False), row(1, "x", True), row(2, "x", True), row(3, "y", True), row(5, "y", True)]
    cmp = compare_answers(a, b, "mvbench", n_boot=200, seed=0)
    assert cmp.n_common == 4 and cmp.n_only_a == 1 and cmp.n_only_b == 1
    assert cmp.mcnemar["a_right_b_wrong"] == 1 and cmp.mcnemar["a_wrong_b_right"] == 2
    assert cmp.mcnemar["both_right"] == 1 and cmp.mcnemar["both_wrong"] == 0
    assert cmp.headline_a == 50.0 and cmp.headline_b == 75.0 and cmp.diff == 25.0
    assert cmp.diff_ci95[0] <= cmp.diff <= cmp.diff_ci95[1]
    assert cmp.by_task["y"]["diff"] == 100.0
    assert "A right / B wrong 1" in cmp.markdown()
    pa, pb = tmp_path / "a" / "answers.jsonl", tmp_path / "b" / "answers.jsonl"
    for p, rows in ((pa, a), (pb, b)):
        p.parent.mkdir()
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (pa.parent / "config.yaml").write_text("benchmark: mvbench\n")
    assert compare_answer_files(pa, pb, n_boot=200, seed=0) == cmp


def test_mcnemar_p():
    assert mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(0, 6) == pytest.approx(2 / 64)
    assert mcnemar_p(3, 3) == 1.0
