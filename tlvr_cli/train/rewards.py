"""Verifiable rewards (spec §5.3) and their R1 combination (spec §5.2 step 7).

A reward function takes the decoded completions (stripped strings) and the row's columns as keyword
lists (``solution``, ``problem``, …, one entry per completion) and returns one float per completion.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence

from ..data.tags import answer_block_one_line, each_tag_once, is_think_then_answer, think_block
from ..errors import TlvrError

THINK_CHARS_FOR_FULL_BONUS = 1200

RewardFn = Callable[..., list[float]]


def _math_verify_equal(content: str, solution: str) -> bool:
    """math_verify's verdict when the optional package is installed (the reference's first test)."""
    try:
        from math_verify import parse, verify
    except ImportError:
        return False
    try:
        return float(verify(parse(content), parse(solution))) > 0
    except Exception:
        return False


def _answer_text(text: str) -> str:
    block = answer_block_one_line(text)  # no DOTALL, as the reference (spec §5.3)
    return block.strip() if block is not None else text.strip()


def accuracy_reward(completions: Sequence[str], solution: Sequence[str], **_: object) -> list[float]:
    """1.0 when the completion's answer matches the solution, else 0.0. Match: math_verify (when
    installed), else the ``<answer>`` contents (or the whole completion) equal the gold answer, or
    the gold answer equals their first character (gold "C" matches "C. pick up")."""
    out = []
    for content, sol in zip(completions, solution):
        if _math_verify_equal(content, sol):
            out.append(1.0)
            continue
        gt, stu = _answer_text(sol), _answer_text(content)
        out.append(1.0 if stu and (stu == gt or gt == stu[0]) else 0.0)
    return out


def format_reward(completions: Sequence[str], **_: object) -> list[float]:
    """0.5 + 0.5·min(len(think)/1200, 1) for exactly ``<think>…</think> <answer>…</answer>`` with one
    of each tag; else 0."""
    out = []
    for content in completions:
        text = content.strip()
        if not (each_tag_once(text) and is_think_then_answer(text)):
            out.append(0.0)
            continue
        think = think_block(text).strip()
        out.append(0.5 + 0.5 * min(len(think) / THINK_CHARS_FOR_FULL_BONUS, 1.0))
    return out


def combine_r1(acc: Sequence[float], fmt: Sequence[float], zero_value: float | None = -2.0) -> list[float]:
    """``acc + (2·acc − 1)·fmt``, with an exact 0 replaced by ``zero_value`` (spec §5.2 step 7)."""
    out = []
    for a, f in zip(acc, fmt):
        r = a + (2 * a - 1) * f
        out.append(zero_value if zero_value is not None and r == 0 else r)
    return out


def overlong_penalty(lengths: Sequence[int], max_tokens: int, buffer: int, factor: float = 1.0) -> list[float]:
    """DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13), an added reward term: 0 up to
    ``max_tokens − buffer`` tokens, then falling linearly to ``−factor`` at ``max_tokens``.

    >>> overlong_penalty([100, 412, 462, 512], max_tokens=512, buffer=100)
    [0.0, 0.0, -0.5, -1.0]
    """
    expected = max_tokens - buffer
    return [min(0.0, -(n - expected) / buffer * factor) if buffer > 0 else 0.0 for n in lengths]


def load_reward_fn(spec: str) -> RewardFn:
    """``'package.module:function'`` → the function, with a one-line error when it cannot be found."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise TlvrError(f"reward function {spec!r}: expected 'module:function'")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise TlvrError(f"reward function {spec!r}: {e}") from None
    if not callable(fn):
        raise TlvrError(f"reward function {spec!r} is not callable")
    return fn


def reward_name(spec: str) -> str:
    """The name a reward's values are logged under (``rewards/<name>``): the function part of ``module:function``."""
    return spec.partition(":")[2]


def score_completions(texts: Sequence[str], columns: dict[str, Sequence],
                      algo) -> tuple[list[float], dict[str, list[float]]]:
    """Combined rewards and each function's raw values (keyed by function name) for ``algo``'s
    reward list and combination."""
    components: dict[str, list[float]] = {}
    for spec in algo.rewards:
        values = [float(v) for v in load_reward_fn(spec.function)(list(texts), **columns)]
        if len(values) != len(texts):
            raise TlvrError(f"reward function {spec.function!r} returned {len(values)} values for "
                            f"{len(texts)} completions")
        components[reward_name(spec.function)] = values
    if algo.reward_combination == "r1":
        if len(algo.rewards) != 2:
            raise TlvrError("algo.reward_combination=r1 needs exactly two rewards (accuracy, format)")
        acc, fmt = (components[reward_name(s.function)] for s in algo.rewards)
        total = combine_r1(acc, fmt, algo.zero_reward_value)
    else:
        total = [sum(s.weight * components[reward_name(s.function)][i] for s in algo.rewards)
                 for i in range(len(texts))]
        if algo.zero_reward_value is not None:
            total = [algo.zero_reward_value if r == 0 else r for r in total]
    return total, components
