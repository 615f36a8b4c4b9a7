"""Turn a model's text into an option letter.

Reason mode (spec §6, identical in the four R1 evaluators): take the first
``<answer>\\s*(.*?)\\s*</answer>`` match (no DOTALL, so an answer spanning a newline does not match;
read in linear time by ``data.tags``, as the regex is cubic on an unclosed tag and spaces);
its first character if it is a choice letter in either case (spec §7.16: "a cat" reads as A), else
the first choice X with "(X)" or "(x)" in the content. An empty ``<answer></answer>`` is wrong.
Anything else falls back to a random choice in the paper protocol (seeded here; unseeded in the
reference) and to "no answer" (counted wrong) in the deterministic protocol.

Option mode (spec §3.3, the TV evaluators' MMMU-style rule): strip punctuation, the leading
character if it is a choice letter, then "(X)", then " X ", then (for responses of more than 5
words) a case-insensitive substring match on the option texts; the last occurrence wins among
several candidates, and a random choice is the final fallback.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..data.tags import answer_block_stripped_one_line

_OPTION_PUNCT = ",.!?;:'"


@dataclass
class ParsedAnswer:
    """The parsed letter (None: no answer, counted wrong) and which rule produced it."""

    letter: str | None
    how: str  # answer_tag | paren | empty | leading_letter | spaced_letter | option_text | random | none


def _fallback(choices: list[str], rng: random.Random | None) -> ParsedAnswer:
    if rng is not None and choices:
        return ParsedAnswer(rng.choice(choices), "random")
    return ParsedAnswer(None, "none")


def parse_reason_answer(output: str, choices: list[str], rng: random.Random | None = None) -> ParsedAnswer:
    """Letter from a ``<think>…</think><answer>…</answer>`` response (spec §6)."""
    content = answer_block_stripped_one_line(output)
    if content is None:
        return _fallback(choices, rng)
    if not content:
        return ParsedAnswer(None, "empty")  # spec §6: the reference returns None here, never random
    first = content[0]
    if first.upper() in choices:
        return ParsedAnswer(first.upper(), "answer_tag")
    for letter in choices:
        if f"({letter})" in content or f"({letter.lower()})" in content:
            return ParsedAnswer(letter, "paren")
    return _fallback(choices, rng)


def parse_option_answer(output: str, choices: list[str], rng: random.Random | None = None,
                        option_texts: dict[str, str] | None = None) -> ParsedAnswer:
    """Letter from a direct-answer response, MMMU style (spec §3.3); ``option_texts`` maps letter → text."""
    response = output.strip()
    for char in _OPTION_PUNCT:
        response = response.strip(char)
    if response and response[0] in choices:
        return ParsedAnswer(response[0], "leading_letter")
    padded = f" {response} "

    found = [c for c in choices if f"({c})" in padded]
    if found:
        return ParsedAnswer(max(found, key=lambda c: padded.rfind(f"({c})")), "paren")
    found = [c for c in choices if f" {c} " in padded]
    if found:
        return ParsedAnswer(max(found, key=lambda c: padded.rfind(f" {c} ")), "spaced_letter")
    if option_texts and len(padded.split()) > 5:
        low = padded.lower()
        found = [c for c in choices if c in option_texts and option_texts[c].lower() in low]
        if found:
            return ParsedAnswer(max(found, key=lambda c: low.rfind(option_texts[c].lower())), "option_text")
    return _fallback(choices, rng)
