"""The ``<think>``/``<answer>`` tags and every rule that reads them, in linear time.

Each reader returns exactly what ``re.search(PATTERN, text).group(1)`` returns for the pattern in
its docstring (None when there is no match), but scans with ``str.find`` and cached positions, so
its cost is O(len(text)). The regexes themselves backtrack: ``<answer>\\s*(.*?)\\s*</answer>`` is
cubic on ``<answer>`` followed by spaces and no closing tag, and every lazy pattern is quadratic
on a flood of opening tags, which is what a model degenerating into whitespace or repetition emits.

Two facts make the scans exact. ``\\s`` in a str pattern is ``str.isspace`` (the same Unicode
table), and ``.`` without DOTALL excludes only ``"\\n"`` (not ``"\\r"``, ``"\\x85"`` or
``"\\u2028"``). No tag contains whitespace or starts inside another tag's text, so a tag is never
part of a whitespace run, and in the searches a match's closing tag is always the first one after
its opening tag.
"""

from __future__ import annotations

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
ANSWER_OPEN = "<answer>"
ANSWER_CLOSE = "</answer>"
TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)


def _first_block(text: str, open_tag: str, close_tag: str) -> str | None:
    # DOTALL lazy block: the first opening tag wins; if no closing tag follows it, none follows a
    # later one either.
    start = text.find(open_tag)
    if start < 0:
        return None
    start += len(open_tag)
    end = text.find(close_tag, start)
    return None if end < 0 else text[start:end]


def think_block(text: str) -> str | None:
    """``<think>(.*?)</think>`` with DOTALL: the format reward's thinking text (spec §5.3)."""
    return _first_block(text, THINK_OPEN, THINK_CLOSE)


def answer_block(text: str) -> str | None:
    """``<answer>(.*?)</answer>`` with DOTALL: the answer shown by ``tlvr infer``."""
    return _first_block(text, ANSWER_OPEN, ANSWER_CLOSE)


# The reference reads answers with two rules that differ on purpose; both are kept (spec §5.3, §6):
# - the GRPO accuracy reward, ``<answer>(.*?)</answer>`` without DOTALL: no newline anywhere
#   between the tags, so "<answer>\nC</answer>" is no answer block (the whole completion is used);
# - the four evaluators, ``<answer>\s*(.*?)\s*</answer>`` without DOTALL: ``\s*`` crosses
#   newlines, so only the stripped content must be one line and "<answer>\nC\n</answer>" reads C.
# Both are searches: an opening tag whose block fails the rule is skipped and a later one tried.


def answer_block_one_line(text: str) -> str | None:
    """``<answer>(.*?)</answer>`` without DOTALL: the first opening tag whose next closing tag
    follows with no newline in between; the text between them (spec §5.3, accuracy reward)."""
    close = newline = -1  # cached next positions: each only moves forward, so the scan is linear
    start = text.find(ANSWER_OPEN)
    while start >= 0:
        body = start + len(ANSWER_OPEN)
        if close < body:
            close = text.find(ANSWER_CLOSE, body)
            if close < 0:
                return None
        if newline < body:
            newline = text.find("\n", body)
            if newline < 0:
                newline = len(text)
        if close < newline:
            return text[body:close]
        # A tag holds no newline, so the next candidate opening tag starts after this newline.
        start = text.find(ANSWER_OPEN, newline + 1)
    return None


def answer_block_stripped_one_line(text: str) -> str | None:
    """``<answer>\\s*(.*?)\\s*</answer>`` without DOTALL: the first opening tag whose block up to
    the next closing tag has no newline once stripped; that stripped block (spec §6, evaluators)."""
    close = newline = -1
    close_ws_start = -1  # where the whitespace run ending at ``close`` starts
    n = len(text)
    start = text.find(ANSWER_OPEN)
    while start >= 0:
        body = start + len(ANSWER_OPEN)
        # The first \s* takes the whole run (backing off only makes the content start with
        # whitespace that the rest must still cover), so the content starts at the first non-space.
        # Runs after distinct opening tags are disjoint, so these skips add up to O(n).
        first = body
        while first < n and text[first].isspace():
            first += 1
        if close < first:
            close = text.find(ANSWER_CLOSE, first)
            if close < 0:
                return None
            close_ws_start = close
            while close_ws_start > 0 and text[close_ws_start - 1].isspace():
                close_ws_start -= 1
        last = max(close_ws_start, first)
        if newline < first:
            newline = text.find("\n", first)
            if newline < 0:
                newline = n
        if newline >= last:
            return text[first:last]
        start = text.find(ANSWER_OPEN, start + len(ANSWER_OPEN))
    return None


def answer_block_stripped(text: str) -> str | None:
    """``<answer>\\s*(.*?)\\s*</answer>`` with DOTALL: the first opening tag's block up to the next
    closing tag, stripped (our own gold files' ``solution``)."""
    block = _first_block(text, ANSWER_OPEN, ANSWER_CLOSE)
    return None if block is None else block.strip()


def is_think_then_answer(text: str) -> bool:
    """Whether ``re.fullmatch(r"<think>.*?</think>\\s*<answer>.*?</answer>", text, re.DOTALL)``
    matches: the text opens with ``<think>``, ends with ``</answer>``, and some ``</think>`` is
    followed by only whitespace and then an ``<answer>`` before that final tag (spec §5.3)."""
    if not (text.startswith(THINK_OPEN) and text.endswith(ANSWER_CLOSE)):
        return False
    n = len(text)
    final = n - len(ANSWER_CLOSE)
    close = text.find(THINK_CLOSE, len(THINK_OPEN))
    while close >= 0:
        after = close + len(THINK_CLOSE)
        while after < n and text[after].isspace():
            after += 1
        if text.startswith(ANSWER_OPEN, after) and after + len(ANSWER_OPEN) <= final:
            return True
        # The whitespace run cannot hold a tag, so the next closing tag starts after it.
        close = text.find(THINK_CLOSE, after)
    return False


def each_tag_once(text: str) -> bool:
    """Exactly one of each of the four tags (the reference's ``recheck_format``, spec §5.3)."""
    return all(text.count(tag) == 1 for tag in TAGS)
