"""Reflection ("aha moment") markers in the ``<think>`` text: the behaviour the paper credits RL with,
measured the same way in training (per step) and in evaluation reports (per task and overall).

A marker is a phrase of a configurable list found case-insensitively and word-bounded: the
character before a match is not a letter, digit or underscore, and neither is the one after it when
the phrase ends in one ("wait" is found in "Wait," but not in "await" or "waiting"; "let me re-"
ends in a hyphen, so it is found in "let me re-count"). Runs of whitespace in the text and in the
phrases count as one space, so "on second\\nthought" is a match. Overlapping matches of different
phrases ("let me re-check" holds "let me re-" and "re-check") count once. Matching is ``str.find``
over the text, one pass per phrase: linear in the text for a fixed list, no regex to backtrack.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .tags import answer_block, think_block

DEFAULT_REFLECTION_PHRASES = (
    "wait", "however", "let me re-", "re-check", "recheck", "double-check", "double check", "on second thought",
    "actually", "reconsider", "re-examine", "re-evaluate", "let me check", "hmm",
)


def _is_word_char(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


def find_markers(text: str, phrases: Sequence[str] = DEFAULT_REFLECTION_PHRASES) -> list[str]:
    """The reflection phrases found in ``text``, one entry per non-overlapping match, in text order
    (each entry is the phrase as given)."""
    hay = _normalise(text)
    spans: list[tuple[int, int, str]] = []
    for phrase in phrases:
        needle = _normalise(phrase)
        if not needle:
            continue
        bounded_end = _is_word_char(needle[-1])
        bounded_start = _is_word_char(needle[0])
        start = hay.find(needle)
        while start >= 0:
            end = start + len(needle)
            if ((not bounded_start or start == 0 or not _is_word_char(hay[start - 1]))
                    and (not bounded_end or end == len(hay) or not _is_word_char(hay[end]))):
                spans.append((start, end, phrase))
            start = hay.find(needle, start + 1)
    spans.sort()
    found, last_end = [], -1
    for start, end, phrase in spans:
        if start >= last_end:  # a match inside an earlier one is the same reflection
            found.append(phrase)
            last_end = end
        else:
            last_end = max(last_end, end)
    return found


@dataclass
class CompletionReflection:
    """One completion's thinking: its length, its answer's length and the markers in it. Lengths
    are in tokens when a tokenizer measured them, else in characters."""

    think_length: int
    answer_length: int
    markers: list[str] = field(default_factory=list)

    @property
    def reflects(self) -> bool:
        return bool(self.markers)


def completion_reflection(text: str, phrases: Sequence[str] = DEFAULT_REFLECTION_PHRASES,
                          tokenizer=None) -> CompletionReflection:
    """Markers in the first ``<think>`` block (none without one) and the lengths of that block and of
    the first ``<answer>`` block, stripped; in tokens of ``tokenizer`` when given, else characters."""
    think = (think_block(text) or "").strip()
    answer = (answer_block(text) or "").strip()

    def length(s: str) -> int:
        if not s:
            return 0
        return len(tokenizer(s, add_special_tokens=False).input_ids) if tokenizer is not None else len(s)

    return CompletionReflection(length(think), length(answer), find_markers(think, phrases) if think else [])


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def reflection_summary(stats: Sequence[CompletionReflection], correct: Sequence[float] | None = None) -> dict:
    """Aggregates of a set of completions, as fractions and means: ``n``, ``rate`` (with at least one
    marker), ``markers`` (per completion), ``think_length``, ``answer_length``, ``n_with``; with
    ``correct`` (1/0 per completion) the accuracy of those with (``acc_with``) and without
    (``acc_without``) a marker, None when that side is empty."""
    out: dict = {"n": len(stats), "rate": _mean([float(s.reflects) for s in stats]) or 0.0,
                 "markers": _mean([len(s.markers) for s in stats]) or 0.0,
                 "think_length": _mean([s.think_length for s in stats]) or 0.0,
                 "answer_length": _mean([s.answer_length for s in stats]) or 0.0,
                 "n_with": sum(s.reflects for s in stats)}
    if correct is not None:
        out["acc_with"] = _mean([float(c) for s, c in zip(stats, correct) if s.reflects])
        out["acc_without"] = _mean([float(c) for s, c in zip(stats, correct) if not s.reflects])
    return out
