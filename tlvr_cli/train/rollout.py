"""GRPO inputs and rollouts: prompt ids, video decoding (prefetched), tower features, engine sampling."""

from __future__ import annotations

from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from ..data.records import GRPORow
from ..data.template import build_prompt, tokenize_with_image, video_question
from ..errors import TlvrError
from ..video.decode import read_frames
from ..video.preprocess import preprocess_frames


@dataclass
class PromptBatch:
    """The prompts of one step on this rank, after dropping rows whose video failed."""

    rows: list[GRPORow]
    input_ids: list[list[int]]
    pixels: list[torch.Tensor | None]  # (T,3,S,S) per row; None when served from the feature cache
    errors: list[str] = field(default_factory=list)


def prompt_ids(tokenizer, row: GRPORow, question_template: str) -> list[int]:
    """spec §5.2 step 1: the filled template after the video, one human turn, the inference prompt
    ending in "ASSISTANT:" (the reference writes "<image>" + text; the template puts the image first)."""
    return tokenize_with_image(tokenizer, build_prompt(video_question(question_template.format(Question=row.problem))))


def _decode(row: GRPORow, num_frames: int, backend: str, image_size: int) -> torch.Tensor:
    frames = read_frames(row.video_path, num_frames, backend=backend)
    return preprocess_frames(frames.frames, size=image_size)


class FeatureCache:
    """LRU cache of the frozen tower's features per video (CPU), bounded in bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.bytes = 0

    def get(self, key: str) -> torch.Tensor | None:
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        return None

    def put(self, key: str, value: torch.Tensor) -> None:
        value = value.detach().to("cpu")
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return
        self.items[key] = value
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self.items.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()


class PromptLoader:
    """Builds each step's prompts; decodes the next step's videos in threads while this step trains."""

    def __init__(self, tokenizer, question_template: str, num_frames: int, backend: str, image_size: int,
                 workers: int, cache: FeatureCache | None = None) -> None:
        self.tokenizer, self.template = tokenizer, question_template
        self.num_frames, self.backend, self.image_size = num_frames, backend, image_size
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers))
        self.cache = cache
        self.pending: dict[tuple[int, ...], list[Future]] = {}

    def _submit(self, rows: list[GRPORow]) -> list[Future]:
        out = []
        for r in rows:
            if self.cache is not None and self.cache.get(str(r.video_path)) is not None:
                out.append(None)
            else:
                out.append(self.pool.submit(_decode, r, self.num_frames, self.backend, self.image_size))
        return out

    def prefetch(self, rows: list[GRPORow]) -> None:
        key = tuple(r.index for r in rows)
        if key not in self.pending:
            self.pending[key] = self._submit(rows)

    def load(self, rows: list[GRPORow]) -> PromptBatch:
        key = tuple(r.index for r in rows)
        futures = self.pending.pop(key, None) or self._submit(rows)
        batch = PromptBatch([], [], [])
        for row, fut in zip(rows, futures):
            try:
                pixels = None if fut is None else fut.result()
            except TlvrError as e:
                batch.errors.append(f"row {row.index}: {e}")
                continue
            except Exception as e:  # a decoder crash on a corrupt file must not stop training
                batch.errors.append(f"row {row.index}: {row.video_path}: {type(e).__name__}: {e}")
                continue
            batch.rows.append(row)
            batch.input_ids.append(prompt_ids(self.tokenizer, row, self.template))
            batch.pixels.append(pixels)
        return batch

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


@torch.no_grad()
def tower_features(model, batch: PromptBatch, device: torch.device, cache: FeatureCache | None) -> torch.Tensor:
    """Frozen-tower features (B, N, V) for the batch's videos, run once per video per step."""
    feats: list[torch.Tensor | None] = [None] * len(batch.rows)
    todo = []
    for i, (row, px) in enumerate(zip(batch.rows, batch.pixels)):
        hit = cache.get(str(row.video_path)) if cache is not None else None
        if hit is not None:
            feats[i] = hit.to(device)
        else:
            todo.append(i)
    if todo:
        dtype = next(model.vision_tower.parameters()).dtype
        pixels = torch.stack([batch.pixels[i] for i in todo]).to(device=device, dtype=dtype)
        out = model.tower_features(pixels)
        for j, i in enumerate(todo):
            feats[i] = out[j]
            if cache is not None:
                cache.put(str(batch.rows[i].video_path), out[j])
    return torch.stack(feats)  # type: ignore[arg-type]


def pad_completions(tokens: list[list[int]], pad_id: int, device: torch.device) -> torch.Tensor:
    """Right-pad completions with pad (== eos for Qwen2.5) to (N, Lc), as the reference (§5.2 step 3)."""
    width = max(1, max(len(t) for t in tokens))
    out = torch.full((len(tokens), width), pad_id, dtype=torch.long)
    for i, t in enumerate(tokens):
        if t:
            out[i, : len(t)] = torch.tensor(t, dtype=torch.long)
    return out.to(device)
