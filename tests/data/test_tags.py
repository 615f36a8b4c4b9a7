"""The linear-time tag readers against the reference regexes: a seeded fuzz, hand-written cases, and
100,000-character adversarial inputs that the regexes take seconds (or hours) on."""

from __future__ import annotations

import random
import re
import sys
import time

import pytest

from tlvr_cli.data.tags import (
    answer_block,
    answer_block_one_line,
    answer_block_stripped,
    answer_block_stripped_one_line,
    each_tag_once,
    is_think_then_answer,
    think_block,
)
from tlvr_cli.eval.answer import parse_option_answer, parse_reason_answer
from tlvr_cli.train.rewards import accuracy_reward, format_reward

# The oracles: the reference's patterns, kept here only.
ORACLES = {
    think_block: re.compile(r"<think>(.*?)</think>", re.DOTALL),
    answer_block: re.compile(r"<answer>(.*?)</answer>", re.DOTALL),
    answer_block_one_line: re.compile(r"<answer>(.*?)</answer>"),
    answer_block_stripped_one_line: re.compile(r"<answer>\s*(.*?)\s*</answer>"),
    answer_block_stripped: re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL),
}
FORMAT_ORACLE = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)

# Tags, their fragments, every kind of whitespace (and look-alikes that are not), letters.
FRAGMENTS = ["<think>", "</think>", "<answer>", "</answer>", "<answer", "</answ", "<", ">", "/",
             " ", "  ", "\t", "\n", "\n\n", "\r", "\r\n", "\x0b", "\x0c", "\x1c", "\x85", "\xa0",
             "\u2028", "\u3000", "\u200b", "\ufeff", "A", "b", "xy", "(B)", "é"]


def oracle(fn, text: str):
    match = ORACLES[fn].search(text)
    return None if match is None else match.group(1)


SPACES = [f for f in FRAGMENTS if f.isspace()]


def random_text(rng: random.Random) -> str:
    def some(pool: list[str], most: int) -> list[str]:
        return [rng.choice(pool) for _ in range(rng.randint(0, most))]

    if rng.random() < 0.7:
        return "".join(some(FRAGMENTS, 14))
    # A think/answer shape, often damaged, so that the format rule's two outcomes are both common.
    parts = ["<think>", *some(FRAGMENTS, 4), "</think>", *some(SPACES, 3), "<answer>", *some(FRAGMENTS, 4), "</answer>"]
    for _ in range(rng.choice([0, 0, 1, 2])):
        at = rng.randrange(len(parts) + 1)
        if rng.random() < 0.5:
            parts.insert(at, rng.choice(FRAGMENTS))
        else:
            del parts[min(at, len(parts) - 1)]
    return "".join(parts)


def test_whitespace_premises_hold_for_every_code_point():
    space, dot = re.compile(r"\s"), re.compile(".")
    chars = [chr(i) for i in range(sys.maxunicode + 1)]
    assert [c for c in chars if (space.fullmatch(c) is not None) != c.isspace()] == []
    assert [c for c in chars if dot.fullmatch(c) is None] == ["\n"]


def test_fuzz_matches_the_reference_regexes():
    rng = random.Random(20240531)
    texts = [random_text(rng) for _ in range(60_000)]
    for fn in ORACLES:
        got = [fn(t) for t in texts]
        want = [oracle(fn, t) for t in texts]
        bad = [(t, g, w) for t, g, w in zip(texts, got, want) if g != w]
        assert bad[:3] == [], fn.__name__
        # The generator must exercise both outcomes, or the comparison proves little.
        assert 0.05 < sum(w is not None for w in want) / len(want) < 0.95, fn.__name__
    got = [is_think_then_answer(t) for t in texts]
    want = [FORMAT_ORACLE.fullmatch(t) is not None for t in texts]
    assert [t for t, g, w in zip(texts, got, want) if g != w][:3] == []
    assert 3000 < sum(want) < len(want) - 3000
    once = [t for t in texts if each_tag_once(t)]
    assert len(once) > 3000 and all(t.count("<answer>") == 1 == t.count("</think>") for t in once)


def test_rewards_and_reason_parse_match_the_reference_formulation(monkeypatch):
    monkeypatch.setattr("tlvr_cli.train.rewards._math_verify_equal", lambda content, solution: False)
    import tlvr_cli.eval.answer as answer_module

    def ref_answer_text(text: str) -> str:
        block = oracle(answer_block_one_line, text)
        return block.strip() if block is not None else text.strip()

    def ref_accuracy(content: str, solution: str) -> float:
        stu, gt = ref_answer_text(content), ref_answer_text(solution)
        return 1.0 if stu and (stu == gt or gt == stu[0]) else 0.0

    def ref_format(text: str) -> float:
        text = text.strip()
        if not (all(text.count(t) == 1 for t in ("<think>", "</think>", "<answer>", "</answer>"))
                and FORMAT_ORACLE.fullmatch(text)):
            return 0.0
        return 0.5 + 0.5 * min(len(oracle(think_block, text).strip()) / 1200, 1.0)

    rng = random.Random(7)
    texts = [random_text(rng) for _ in range(20_000)]
    golds = [rng.choice(["<answer>A</answer>", "A", "<answer> b </answer>", t]) for t in texts]
    assert accuracy_reward(texts, golds) == [ref_accuracy(t, g) for t, g in zip(texts, golds)]
    assert format_reward(texts) == [ref_format(t) for t in texts]
    assert sum(format_reward(texts)) > 1000
    ours = [parse_reason_answer(t, ["A", "B", "C", "D"]) for t in texts]
    # The evaluators' reference: the regex's group, stripped, then the same letter rules.
    monkeypatch.setattr(answer_module, "answer_block_stripped_one_line",
                        lambda t: None if (b := oracle(answer_block_stripped_one_line, t)) is None else b.strip())
    assert ours == [parse_reason_answer(t, ["A", "B", "C", "D"]) for t in texts]


@pytest.mark.parametrize("fn,text,want", [
    (think_block, "a<think>x\ny</think>b", "x\ny"),
    (think_block, "<think><think>x</think></think>", "<think>x"),  # nested: the first close ends it
    (think_block, "<think>x", None),
    (think_block, "</think><think></think>", ""),
    (answer_block, "<answer>\nA\n</answer><answer>B</answer>", "\nA\n"),
    (answer_block, "<answer><answer>A</answer>", "<answer>A"),
    (answer_block_one_line, "<answer>\nC</answer>", None),  # the newline is inside the block
    (answer_block_one_line, "<answer>x\n<answer> C </answer>", " C "),  # a later opening tag
    (answer_block_one_line, "<answer>x<answer> C </answer>", "x<answer> C "),  # the first one wins
    (answer_block_one_line, "<answer>\r\x85\u2028</answer>", "\r\x85\u2028"),  # only \n breaks it
    (answer_block_one_line, "<answer></answer>", ""),
    (answer_block_one_line, "</answer><answer>", None),
    (answer_block_stripped_one_line, "<answer>\nB\n</answer>", "B"),  # padding may span lines
    (answer_block_stripped_one_line, "<answer>B\nC</answer>", None),  # content may not
    (answer_block_stripped_one_line, "<answer>B\nC</answer><answer> D </answer>", "D"),
    (answer_block_stripped_one_line, "<answer>X<answer>\nY</answer>", "Y"),  # skips to the 2nd tag
    (answer_block_stripped_one_line, "<answer>X<answer>\n  </answer>", "X<answer>"),
    (answer_block_stripped_one_line, "<answer> \u3000\xa0 </answer>", ""),
    (answer_block_stripped_one_line, "<answer>\u3000B\u200b\u3000</answer>", "B\u200b"),  # ZWSP is no space
    (answer_block_stripped_one_line, "<answer>" + " " * 50, None),
    (answer_block_stripped, "<answer>\n B\nC \n</answer>", "B\nC"),
    (answer_block_stripped, "<answer>  </answer>", ""),
    (answer_block_stripped, "<answer> A", None),
])
def test_tricky_cases(fn, text, want):
    assert fn(text) == want == oracle(fn, text)


@pytest.mark.parametrize("text,want", [
    ("<think></think><answer></answer>", True),
    ("<think>a</think> \n\u3000<answer>b</answer>", True),
    ("<think>a</think>x<answer>b</answer>", False),  # only whitespace between the blocks
    ("<think>a</think>x</think> <answer>b</answer>", True),  # a later </think> may close it
    ("<think>a</think><answer>b</answer> ", False),  # fullmatch: nothing after the last tag
    (" <think>a</think><answer>b</answer>", False),
    ("<think></think><answer></answer></answer>", True),
    ("<think></think><answer>", False),
    ("<think></answer>", False),
    ("<think><answer></think></answer>", False),
])
def test_format_cases(text, want):
    assert is_think_then_answer(text) is want is (FORMAT_ORACLE.fullmatch(text) is not None)


def test_each_tag_once():
    assert each_tag_once("<think>a</think><answer>b</answer>")
    assert not each_tag_once("<think>a</think><answer>b</answer></answer>")
    assert not each_tag_once("<think>a</think>")


N = 100_000


def _rep(unit: str) -> str:
    return (unit * (N // len(unit) + 1))[:N]


ADVERSARIAL = {
    "answer then spaces": "<answer>" + " " * N,
    "answer then newlines": "<answer>" + "\n" * N,
    "answer then mixed whitespace": "<answer>" + _rep(" \n\t\u3000"),
    "answer, spaces, letter": "<answer>" + " " * N + "x",
    "answer, spaces, newline in content": "<answer>" + " " * (N // 2) + "x\ny" + " " * (N // 2) + "</answer>",
    "repeated answer": _rep("<answer>"),
    "repeated answer space": _rep("<answer> "),
    "repeated answer newline": _rep("<answer>\n"),
    "answer letter newline, one close": _rep("<answer>x\n") + "</answer>",
    "answer emoji, one newline, one close": _rep("<answer>\U0001f600") + "\ny</answer>",
    "repeated close": _rep("</answer>"),
    "alternating": _rep("<answer></answer>"),
    "alternating over lines": _rep("<answer>\n</answer>"),
    "think close answer": _rep("<think></think><answer>"),
    "think flood": _rep("<think>"),
    "think close flood": "<think>" + _rep("</think> ") + "</answer>",
    "think close then spaces": "<think>" + _rep("</think>" + " " * 50),
    "format-like flood": "<think>" + _rep("</think>\n<answer>") + "</answer>",
    "unclosed over lines": _rep("<answer> x </answer\n"),
}
PARSERS = {
    **{fn.__name__: fn for fn in ORACLES},
    "is_think_then_answer": is_think_then_answer,
    "accuracy_reward": lambda t: accuracy_reward([t], ["<answer>C</answer>"]),
    "format_reward": lambda t: format_reward([t]),
    "parse_reason_answer": lambda t: parse_reason_answer(t, ["A", "B", "C", "D"]),
    "parse_option_answer": lambda t: parse_option_answer(t, ["A", "B", "C", "D"], None,
                                                         {"A": "answer", "B": "think", "C": "</answer", "D": "x"}),
}


def _best_of_three(fn, text: str) -> float:
    times = []
    for _ in range(3):  # the best of three, so that a busy machine does not fail a linear scan
        start = time.perf_counter()
        fn(text)
        times.append(time.perf_counter() - start)
    return min(times)


@pytest.mark.parametrize("name", list(PARSERS))
def test_adversarial_inputs_parse_in_linear_time(name, monkeypatch):
    # math_verify's own cost on these inputs is not the tag rules' (measured separately).
    monkeypatch.setattr("tlvr_cli.train.rewards._math_verify_equal", lambda content, solution: False)
    slow = {case: t for case, text in ADVERSARIAL.items() if (t := _best_of_three(PARSERS[name], text)) > 0.05}
    assert slow == {}
