"""The ``qwen2_base`` conversation template, the reasoning instructions, ``<image>`` tokenization and
SFT label masking (spec §3.1–3.3). Every prompt tlvr builds is assembled here."""

from __future__ import annotations

from dataclasses import dataclass, field

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")
IMAGE = "<image>"
EOS = "<|endoftext|>"  # Qwen2.5 base: eos and pad (spec §1.1)
SEP = " ASSISTANT: "
IMAGE_TOKEN_INDEX = -200  # the id "<image>" takes in input_ids; the splice replaces it by the visual tokens (spec §1.5)
IGNORE_INDEX = -100  # label of tokens without loss

# spec §3.3: the GRPO prompt suffix (after a space); the evaluators append the instruction after a newline instead
REASON_INSTRUCTION = ("Output the thinking process in <think> </think> and final answer (option) in "
                      "<answer> </answer> tags.")
OPTION_INSTRUCTION = "Answer with the option's letter from the given choices directly."
GRPO_QUESTION_TEMPLATE = "{Question} " + REASON_INSTRUCTION

__all__ = [
    "EOS",
    "GRPO_QUESTION_TEMPLATE",
    "IGNORE_INDEX",
    "IMAGE",
    "IMAGE_TOKEN_INDEX",
    "OPTION_INSTRUCTION",
    "REASON_INSTRUCTION",
    "SYSTEM",
    "SFTExample",
    "build_conversation",
    "build_prompt",
    "build_sft_example",
    "tokenize_with_image",
    "video_question",
]


def video_question(question: str, instruction: str | None = None) -> str:
    """The user message about a video: the ``<image>`` placeholder, the question and, after a newline,
    the instruction (as the evaluators write it, spec §3.3)."""
    return IMAGE + "\n" + question + ("\n" + instruction if instruction else "")


def _user(text: str) -> str:
    # the image always goes first in the user turn, whatever its position in the text
    if IMAGE in text:
        text = IMAGE + "\n" + text.replace(IMAGE, "").strip()
    return f"USER: {text.strip()} "


def build_prompt(user_text: str, answer: str | None = None) -> str:
    """One round: ``{system} USER: <image>\\n{q} ASSISTANT:`` (inference) or with ``' {answer}<|endoftext|>'``."""
    return f"{SYSTEM} " + _user(user_text) + (f"ASSISTANT: {answer}{EOS}" if answer is not None else "ASSISTANT:")


def build_conversation(conversations: list[dict]) -> str:
    """A LLaVA-style ``[{'from': 'human'|'gpt', 'value': ...}, ...]`` list as one training string."""
    turns = list(conversations)
    if turns and turns[0].get("from") != "human":
        turns = turns[1:]
    if len(turns) % 2:
        raise ValueError("conversation turns do not pair up (human, gpt, human, gpt, ...)")
    out = f"{SYSTEM} "
    for q, a in zip(turns[::2], turns[1::2]):
        if q.get("from") != "human" or a.get("from") != "gpt":
            raise ValueError("conversation turns must alternate human/gpt")
        out += _user(q["value"]) + f"ASSISTANT: {a['value']}{EOS}"
    return out


def tokenize_with_image(tokenizer, text: str) -> list[int]:
    """Tokenize the pieces between ``<image>`` markers separately and join them with ``IMAGE_TOKEN_INDEX``."""
    ids: list[int] = []
    for i, chunk in enumerate(text.split(IMAGE)):
        if i:
            ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(tokenizer(chunk, add_special_tokens=False).input_ids)
    return ids


@dataclass
class SFTExample:
    ok: bool
    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    reason: str = ""
    truncated: bool = False
    text: str = ""


def build_sft_example(tokenizer, conversations: list[dict], max_length: int, visual_tokens: int = 1) -> SFTExample:
    """Token ids and labels of one record. Loss covers each answer and its ``<|endoftext|>``; the
    system text, user turns and ``ASSISTANT:`` are masked, with the reference's round arithmetic
    (instruction length −1 for the trailing space that merges into the answer's first token).
    A record whose mask does not line up is returned with ``ok=False`` (the reference trained on it
    fully masked after a 5 s pause). Sequences longer than ``max_length`` once each ``<image>`` becomes
    ``visual_tokens`` embeddings are cut to fit, with ``truncated=True`` so the caller can warn."""
    try:
        text = build_conversation(conversations)
    except (ValueError, KeyError, TypeError) as e:
        return SFTExample(False, reason=str(e))
    ids = tokenize_with_image(tokenizer, text)
    labels = list(ids)
    eos_len = len(tokenizer(EOS, add_special_tokens=False).input_ids)
    cur = 0
    for rnd in text.split(EOS):
        if not rnd:
            break
        parts = rnd.split(SEP)
        if len(parts) != 2:
            break
        instruction = len(tokenize_with_image(tokenizer, parts[0] + SEP)) - 1
        labels[cur:cur + instruction] = [IGNORE_INDEX] * max(0, min(instruction, len(labels) - cur))
        cur += len(tokenize_with_image(tokenizer, rnd)) + eos_len
    labels[cur:] = [IGNORE_INDEX] * max(0, len(labels) - cur)
    labels = [IGNORE_INDEX if t == IMAGE_TOKEN_INDEX else label for t, label in zip(ids, labels)]
    if cur != len(ids):
        return SFTExample(False, reason=f"label mask covers {cur} tokens but the sample has {len(ids)}", text=text)
    if all(label == IGNORE_INDEX for label in labels):
        return SFTExample(False, reason="no supervised tokens", text=text)
    limit = max_length - (visual_tokens - 1) * ids.count(IMAGE_TOKEN_INDEX)
    truncated = len(ids) > limit
    if truncated:
        ids, labels = ids[:limit], labels[:limit]
        if all(label == IGNORE_INDEX for label in labels):
            return SFTExample(False, reason=f"nothing supervised is left after truncation to {max_length} tokens",
                              text=text)
    return SFTExample(True, ids, labels, truncated=truncated, text=text)
