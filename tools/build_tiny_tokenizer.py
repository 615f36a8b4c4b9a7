"""Rebuild the byte-level BPE tokenizer shipped with the embedded tiny model.

    python tools/build_tiny_tokenizer.py   # writes tlvr_cli/model/tiny_tokenizer/tokenizer.json

Deterministic: the corpus below is fixed and BPE training on it is order-stable.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

OUT = Path(__file__).resolve().parents[1] / "tlvr_cli" / "model" / "tiny_tokenizer" / "tokenizer.json"
EOS = "<|endoftext|>"
VOCAB = 1024

COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black", "gray", "cyan", "pink", "brown"]
DIRECTIONS = ["left", "right", "up", "down", "nowhere"]
SHAPES = ["square", "circle", "ball", "box", "object"]


def corpus() -> list[str]:
    system = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
              "detailed, and polite answers to the user's questions.")
    instr = "Output the thinking process in <think> </think> and final answer (option) in <answer> </answer> tags."
    opt = "Answer with the option's letter from the given choices directly."
    lines = [system, instr, opt, "USER: <image>\n", " ASSISTANT: ", "ASSISTANT:", "Options:", "Question:",
             "Best option: ("]
    for letter in "ABCDEFGH":
        lines += [f"<answer>{letter}</answer>", f"({letter})", f"\n{letter}. ", f" {letter}."]
    for c in COLORS:
        for s in SHAPES:
            lines.append(f"What color is the {s}? The {s} is {c}. The background is {c}.")
        for d in DIRECTIONS:
            lines.append(f"Which direction does the {c} square move? It moves {d}. The square moves to the {d}.")
    for letter, c in zip("ABCDE", COLORS):
        lines.append(f"The square is {c}.\n{letter}. {c} no\n{letter}. {c} yes\nSo the answer is {letter}.")
    lines += [
        "<think>I look at the frames. In the first frame the square is on the left, in the last frame it is on the "
        "right, so it moves right. The answer is the option with that word.</think>\n<answer>B</answer>",
        "<think>The background color stays the same in every frame of the video.</think> <answer>C</answer>",
        "What did the man do after he picked up the cup? What is the woman holding at the beginning of the video?",
        "Why did the boy run? How many people are in the video? Where are the people? When does the dog jump?",
    ]
    words = ["the", "a", "an", "of", "to", "in", "on", "and", "is", "it", "this", "that", "with", "for", "from", "as",
             "at", "by", "be", "are", "was", "were", "what", "which", "who", "why", "how", "first", "last", "then",
             "after", "before", "while", "during", "frame", "frames", "video", "clip", "scene", "person", "man",
             "woman", "boy", "girl", "child", "dog", "cat", "car", "table", "cup", "hand", "hold", "holding", "pick",
             "picked", "walk", "run", "jump", "sit", "stand", "look", "looks", "see", "seen", "shows", "moving",
             "moves", "move", "stays", "same", "color", "background", "answer", "option", "question", "think", "reason",
             "because", "so", "yes", "no", "starts", "ends", "bottom", "top", "middle", "every"]
    lines.append(" ".join(words))
    return lines * 4


def build() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    return tok


if __name__ == "__main__":
    OUT.parent.mkdir(parents=True, exist_ok=True)
    build().save(str(OUT))
    print(f"wrote {OUT}")
