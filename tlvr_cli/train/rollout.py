"""GRPO inputs and rollouts: prompt ids, video decoding (prefetched), prompt draws from the data
cursor, tower features, and the engine's completions as tensors."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from ..data.records import GRPORow
from ..data.template import build_prompt, tokenize_with_image, video_question
from ..engine.generate import Completion
from ..errors import TlvrError
from ..video.decode import read_frames
from ..video.preprocess import preprocess_frames
from .run_dir import DataCursor

Features = list[torch.Tensor]  # the frozen tower's (N_i, V) per prompt; N_i differs between videos in fps mode


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


def check_prompts_fit(rows: Sequence[GRPORow], lengths: Sequence[int], max_new_tokens: int, context: int) -> None:
    """A one-line error for the first row whose spliced prompt (visual tokens included) and completion
    do not fit the model's context: the splice would cut it silently (spec §1.5), so it is refused."""
    for row, n in zip(rows, lengths):
        if n + max_new_tokens > context:
            raise TlvrError(f"row {row.index} ({row.video_path.name}): its prompt is {n} tokens with the visual "
                            f"tokens; with rollout.max_new_tokens={max_new_tokens} it passes the model's context of "
                            f"{context} (tokenizer_model_max_length in its config.json): shorten the problem or "
                            "data.question_template, or lower rollout.max_new_tokens")


def _decode(row: GRPORow, frame_args: dict, backend: str, image_size: int) -> torch.Tensor:
    frames = read_frames(row.video_path, **frame_args, backend=backend)
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

    def __init__(self, tokenizer, question_template: str, frame_args: dict, backend: str, image_size: int,
                 workers: int, cache: FeatureCache | None = None) -> None:
        self.tokenizer, self.template = tokenizer, question_template
        self.frame_args, self.backend, self.image_size = frame_args, backend, image_size
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers))
        self.cache = cache
        self.pending: dict[tuple[int, ...], list[Future]] = {}

    def _submit(self, rows: list[GRPORow]) -> list[Future]:
        out = []
        for r in rows:
            if self.cache is not None and self.cache.get(str(r.video_path)) is not None:
                out.append(None)
            else:
                out.append(self.pool.submit(_decode, r, self.frame_args, self.backend, self.image_size))
        return out

    def prefetch(self, rows: list[GRPORow]) -> None:
        key = tuple(r.index for r in rows)
        if key not in self.pending:
            self.pending[key] = self._submit(rows)

    def load(self, rows: list[GRPORow]) -> PromptBatch:
        key = tuple(r.index for r in rows)
        futures = self.pending.pop(key, None) or self._submit(rows)
        for stale in self.pending.values():  # a prefetch the draws did not take (their sizes changed)
            for fut in stale:
                if fut is not None:
                    fut.cancel()
        self.pending.clear()
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


class PromptDraws:
    """The prompts of one step, drawn from the data cursor: each draw takes the next ``size`` dataset
    indices of the seeded epoch order (the global batch) and this rank decodes every world_size-th.
    ``cursor`` ends after the last draw, so a checkpoint saved after the step resumes exactly."""

    def __init__(self, rows: Sequence[GRPORow], loader: PromptLoader, cursor: DataCursor, seed: int, rank: int,
                 world_size: int) -> None:
        self.rows, self.loader, self.cursor, self.seed = rows, loader, cursor, seed
        self.rank, self.world_size = rank, world_size

    def peek(self, size: int) -> tuple[list[GRPORow], DataCursor]:
        """This rank's rows of the next draw of ``size`` and the cursor after it, without drawing."""
        indices, after = self.cursor.take(len(self.rows), size, self.seed)
        return [self.rows[i] for i in indices[self.rank::self.world_size]], after

    def draw(self, size: int) -> PromptBatch:
        mine, self.cursor = self.peek(size)
        batch = self.loader.load(mine)
        # decode what most likely comes next (the next draw of this size) while this one rolls out
        self.loader.prefetch(self.peek(size)[0])
        return batch


@torch.no_grad()
def tower_features(model, batch: PromptBatch, device: torch.device, cache: FeatureCache | None) -> Features:
    """Frozen-tower features (N_i, V) of each of the batch's videos, run once per video per step
    (videos with the same frame count in one batch)."""
    feats: list[torch.Tensor | None] = [None] * len(batch.rows)
    todo = []
    for i, (row, px) in enumerate(zip(batch.rows, batch.pixels)):
        hit = cache.get(str(row.video_path)) if cache is not None else None
        if hit is not None:
            feats[i] = hit.to(device)
        else:
            todo.append(i)
    dtype = next(model.vision_tower.parameters()).dtype
    by_shape: dict[tuple, list[int]] = {}
    for i in todo:
        by_shape.setdefault(tuple(batch.pixels[i].shape), []).append(i)
    for same in by_shape.values():
        # stacked straight into pinned memory: the copy to the GPU then runs at full speed, asynchronously
        # (~10x a pageable copy of the step's 0.2 GB of float32 pixels)
        first = batch.pixels[same[0]]
        pinned = device.type == "cuda" and first.device.type == "cpu"
        pixels = torch.stack([batch.pixels[i] for i in same],
                             out=torch.empty((len(same), *first.shape), dtype=first.dtype, device=first.device,
                                             pin_memory=pinned))
        out = model.tower_features(pixels.to(device, non_blocking=pinned).to(dtype))
        for j, i in enumerate(same):
            feats[i] = out[j]
            if cache is not None:
                cache.put(str(batch.rows[i].video_path), out[j])
    return feats  # type: ignore[return-value]


@dataclass
class Rollouts:
    """Prompts rolled out and scored on this rank: G completions per prompt, prompt-major."""

    rows: list[GRPORow]
    input_ids: list[list[int]]
    feats: Features
    completions: torch.Tensor  # (B·G, Lc); a finished completion ends with its eos
    finished: torch.Tensor  # (B·G,) bool: stopped on eos (else cut at max_new_tokens)
    texts: list[str]  # decoded without special tokens, stripped
    rewards: list[float]  # the combined reward (with any added term)
    components: dict[str, list[float]]  # each reward function's raw values, and added terms

    def select(self, groups: Sequence[int], group_size: int) -> Rollouts:
        """The rollouts of the prompts ``groups`` (indices into ``rows``), in that order."""
        seqs = [g * group_size + j for g in groups for j in range(group_size)]
        return Rollouts([self.rows[g] for g in groups], [self.input_ids[g] for g in groups],
                        [self.feats[g] for g in groups], self.completions[seqs], self.finished[seqs],
                        [self.texts[i] for i in seqs], [self.rewards[i] for i in seqs],
                        {k: [v[i] for i in seqs] for k, v in self.components.items()})


def concat_rollouts(parts: Sequence[Rollouts], pad_id: int) -> Rollouts:
    """The rollouts of several draws as one batch (completions re-padded to the widest)."""
    width = max(p.completions.shape[1] for p in parts)
    comps = torch.cat([torch.nn.functional.pad(p.completions, (0, width - p.completions.shape[1]), value=pad_id)
                       for p in parts])
    keys = parts[0].components
    return Rollouts([r for p in parts for r in p.rows], [i for p in parts for i in p.input_ids],
                    [f for p in parts for f in p.feats], comps, torch.cat([p.finished for p in parts]),
                    [t for p in parts for t in p.texts], [r for p in parts for r in p.rewards],
                    {k: [v for p in parts for v in p.components[k]] for k in keys})


def completions_tensor(outs: Sequence[Completion], eos_id: int, pad_id: int,
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The engine's completions as the reference's tensor (spec §5.2 step 3) and their finished flags.

    HF ``generate`` returns a finished completion with its eos as the last token; the engine leaves
    eos out, so it is put back here: the mask then takes in every finished row's eos, the longest
    row's too, and ``completion_length`` counts it as the reference does. A row cut at max_new_tokens
    has no eos."""
    tokens = [list(o.tokens) + [eos_id] if o.finished else list(o.tokens) for o in outs]
    finished = torch.tensor([bool(o.finished) for o in outs], dtype=torch.bool, device=device)
    return pad_completions(tokens, pad_id, device), finished


def pad_completions(tokens: list[list[int]], pad_id: int, device: torch.device) -> torch.Tensor:
    """Right-pad token lists with pad (== eos for Qwen2.5) to (N, Lc), as the reference (§5.2 step 3)."""
    width = max(1, max(len(t) for t in tokens))
    out = torch.full((len(tokens), width), pad_id, dtype=torch.long)
    for i, t in enumerate(tokens):
        if t:
            out[i, : len(t)] = torch.tensor(t, dtype=torch.long)
    return out.to(device)
