"""Ask one question about one video (``tlvr infer``), through the shared engine."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .data.tags import answer_block, think_block
from .data.template import REASON_INSTRUCTION, build_prompt, tokenize_with_image, video_question
from .errors import TlvrError
from .jobs import InferConfig

STREAM_SYNC_EVERY = 4  # decode steps between streamed chunks: small enough to read as it is written
# packages transformers imports whenever they are installed that answering a question never uses:
# scikit-learn (assisted generation's heuristics: transformers 5.17 imports it, and scipy and pandas
# under it, with every model) and scipy (the object-detection losses). On the H200 host scikit-learn's
# import tree was 1.8 s of a one-question run
UNUSED_PACKAGES = ("sklearn", "scipy")


def skip_unused_imports(names: tuple[str, ...] = UNUSED_PACKAGES) -> None:
    """Make the packages ``names`` look absent to this process unless it has imported them already
    (``sys.modules[name] = None``: ``importlib.util.find_spec`` answers None, so transformers' checks say
    unavailable, and an import raises ImportError). For a process that only answers questions, as
    ``tlvr infer``'s; the library itself never calls it."""
    for name in names:
        sys.modules.setdefault(name, None)


@dataclass
class InferResult:
    output: str
    think: str | None
    answer: str | None
    frame_indices: list[int]
    # wall-clock parts in order: import_s, load_s, preprocess_s, encode_s, generate_s; decode_s ran on
    # its own thread during import_s
    timings: dict[str, float] = field(default_factory=dict)
    new_tokens: int = 0
    warnings: list[str] = field(default_factory=list)  # e.g. fewer distinct frames than asked

    def to_json(self) -> dict:
        return {"output": self.output, "think": self.think, "answer": self.answer, "frame_indices": self.frame_indices,
                "new_tokens": self.new_tokens, "timings": self.timings, "warnings": self.warnings}


def inference_prompt(question: str, reason: bool) -> str:
    """The §3.1 prompt for a question; ``reason`` appends the §3.3 instruction after a newline (as the evaluators)."""
    return build_prompt(video_question(question.strip(), REASON_INSTRUCTION if reason else None))


def answer_question(cfg: InferConfig, video: str | Path, question: str, *, model=None,
                    on_text: Callable[[str], None] | None = None) -> InferResult:
    """Decode ``video``, load the model, build the prompt, generate; ``on_text`` receives the answer as it streams."""
    # the inputs are checked before torch is even imported: a missing file or an empty question fails
    # in a fraction of a second; a broken file right after torch's import, before anything loads
    if not question.strip():
        raise TlvrError("the question is empty")
    from .video.decode import check_exists, read_frames

    check_exists(video)
    timings: dict[str, float] = {}

    def decode():
        start = time.perf_counter()
        out = read_frames(video, **cfg.video.frame_args(), backend=cfg.video.backend)
        timings["decode_s"] = time.perf_counter() - start  # on its own thread, during the import
        return out

    # the frames decode on a thread while torch is imported (the decoders run outside the GIL), and are
    # resized for the tower there while transformers is imported (so is PIL's resize)
    t = time.perf_counter()
    with ThreadPoolExecutor(1, thread_name_prefix="tlvr-video") as pool:
        decoding = pool.submit(decode)
        import torch

        frames = decoding.result()

        from .model.checkpoint import frame_size, load_model, read_weights_ahead
        from .runtime import host_to_device
        from .video.preprocess import normalize_frames, resize_frames

        # the weights are read onto the device on a thread while transformers is imported (a few seconds
        # either way, and neither needs the other): most of the load is hidden behind the import
        weights = read_weights_ahead(cfg.model) if model is None else None
        size = model.config.vision_config.image_size if model is not None else frame_size(cfg.model.path)
        resizing = pool.submit(resize_frames, frames.frames, size)
        from .engine.generate import Engine
        from .engine.sampling import SamplingParams

        # torch and transformers, a fixed cost of every command, with the video decoded and resized and the
        # weights read meanwhile (what those took beyond the imports included)
        resized = resizing.result()
    timings["import_s"] = time.perf_counter() - t
    t = time.perf_counter()
    if model is None:
        model = load_model(cfg.model, weights=weights)
    model.eval()
    timings["load_s"] = time.perf_counter() - t
    device = model.device
    dtype = next(model.vision_tower.parameters()).dtype

    t = time.perf_counter()
    pixels = normalize_frames(host_to_device(resized, device), dtype)
    timings["preprocess_s"] = time.perf_counter() - t  # the resized frames normalized where the tower runs
    warnings = []
    if frames.distinct < len(frames.indices):  # a short or cut video: some frames repeat
        warnings.append(f"{video}: only {frames.distinct} distinct frames of the {len(frames.indices)} asked could be "
                        f"decoded ({frames.total} in the file); the answer sees repeated frames")

    tok = model.tokenizer
    ids = tokenize_with_image(tok, inference_prompt(question, cfg.reason))
    t = time.perf_counter()
    with torch.no_grad():
        feats = model.encode_videos(pixels[None])
        prompt = model.prompt_embeddings([ids], feats)
    timings["encode_s"] = time.perf_counter() - t

    # one row: CUDA graphs alone remove the per-kernel launch cost that bounds a single stream, and
    # capture in well under a second; torch.compile would add more seconds than a whole answer takes.
    # SDPA's attention, not the split-KV kernels: one stream decodes as fast with it (126-132 tok/s with
    # the kernels, 129-140 without, H200) and a first run would spend ~2 s compiling them
    engine = Engine(model.language_model, max_batch=1, max_seq_len=prompt[0].shape[0] + cfg.sampling.max_new_tokens,
                    cuda_graphs=cfg.cuda_graphs, split_kv=False)
    params = SamplingParams(temperature=cfg.sampling.temperature, top_k=cfg.sampling.top_k, top_p=cfg.sampling.top_p)
    streamed: list[int] = []
    shown = [""]

    def on_token(row: int, token: int) -> None:
        if on_text is None or token == tok.eos_token_id:
            return
        streamed.append(token)
        text = tok.decode(streamed, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for a whole UTF-8 character
            on_text(text[len(shown[0]):])
            shown[0] = text

    t = time.perf_counter()
    out = engine.generate(prompt, params, cfg.sampling.max_new_tokens, tok.eos_token_id, seed=cfg.seed,
                          on_token=on_token, sync_every=STREAM_SYNC_EVERY)[0]
    timings["generate_s"] = time.perf_counter() - t
    text = tok.decode(out.tokens, skip_special_tokens=True).strip()
    think, answer = think_block(text), answer_block(text)
    return InferResult(text, think.strip() if think is not None else None,
                       answer.strip() if answer is not None else None, list(frames.indices), timings, len(out.tokens),
                       warnings)
