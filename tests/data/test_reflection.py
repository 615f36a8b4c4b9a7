"""The reflection-marker counter on tricky strings, its lengths and aggregates, and its worst case."""

from __future__ import annotations

import time

import pytest

from tlvr_cli.data.reflection import completion_reflection, find_markers, reflection_summary

CASES = [
    ("Wait, the square is red.", ["wait"]),
    ("WAIT. HOWEVER, it moved.", ["wait", "however"]),
    ("I await the answer while waiting.", []),  # inside words: no marker
    ("The factually correct one.", []),
    ("Let me re-check the colour.", ["let me re-"]),  # "re-check" overlaps it: one reflection
    ("let me re-count the frames", ["let me re-"]),  # the trailing hyphen matches any continuation
    ("I should recheck, then double-check.", ["recheck", "double-check"]),
    ("a pre-check is not a re-check", ["re-check"]),  # "pre-check" holds "re-check" after a letter
    ("On second\n  thought it is B.", ["on second thought"]),  # whitespace runs are one space
    ("Actually... actually_not", ["actually"]),  # "_" is a word character
    ("wait wait", ["wait", "wait"]),
    ("hmmm", []),
    ("", []),
    ("Réflexion: wait", ["wait"]),
]


@pytest.mark.parametrize("text,expected", CASES)
def test_markers_on_tricky_strings(text, expected):
    assert find_markers(text) == expected


def test_custom_phrases_and_empty_phrases():
    assert find_markers("Let me verify that", ["let me verify", ""]) == ["let me verify"]
    assert find_markers("Wait", ["hold on"]) == []


def test_markers_only_in_the_think_block_and_lengths():
    text = "<think> Red. Wait, it is blue. </think> <answer> B </answer> wait"
    r = completion_reflection(text)
    assert r.markers == ["wait"] and r.reflects
    assert r.think_length == len("Red. Wait, it is blue.") and r.answer_length == 1
    assert completion_reflection("<answer>Wait</answer>").markers == []  # no think block, no marker


def test_lengths_in_tokens_with_a_tokenizer(tiny_tokenizer):
    text = "<think>the square moves left</think> <answer>A</answer>"
    r = completion_reflection(text, tokenizer=tiny_tokenizer)
    assert r.think_length == len(tiny_tokenizer("the square moves left", add_special_tokens=False).input_ids)


def test_summary_splits_accuracy_by_reflection():
    texts = ["<think>wait</think><answer>A</answer>", "<think>no</think><answer>A</answer>",
             "<think>however</think><answer>B</answer>", "<think>x</think><answer>B</answer>"]
    stats = [completion_reflection(t) for t in texts]
    s = reflection_summary(stats, [1, 1, 0, 1])
    assert s["rate"] == 0.5 and s["n_with"] == 2 and s["markers"] == 0.5
    assert s["acc_with"] == 0.5 and s["acc_without"] == 1.0
    assert reflection_summary(stats[1:2], [1])["acc_with"] is None


def test_counter_is_linear_on_adversarial_input():
    floods = ["wai" * 40_000, "let me re" * 12_000, " " * 100_000, "w" * 100_000, "wait" * 25_000]
    for text in floods:
        t = time.perf_counter()
        completion_reflection(f"<think>{text}</think>")
        assert time.perf_counter() - t < 0.5, text[:20]
