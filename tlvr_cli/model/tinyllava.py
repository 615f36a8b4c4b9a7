"""TinyLLaVA-Video: vision tower → connector → visual tokens spliced into Qwen2 (spec §1).

Module tree (and so the checkpoint keys) as released: ``language_model`` (Qwen2ForCausalLM),
``vision_tower._vision_tower.vision_model``, ``connector._connector``; the tokenizer is an attribute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import Qwen2ForCausalLM

from ..data.template import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from ..runtime import host_to_device
from .config import TinyLlavaConfig
from .connector import Connector
from .vision import VisionTower


@dataclass
class SplicedBatch:
    """LLM inputs after the splice: right-padded with zero embeddings (spec §1.5 step 6)."""

    inputs_embeds: torch.Tensor  # (B, L, D)
    attention_mask: torch.Tensor  # (B, L) long
    position_ids: torch.Tensor  # (B, L)
    labels: torch.Tensor | None  # (B, L), IGNORE_INDEX on visual positions and padding
    lengths: list[int]  # true length of each sequence


@dataclass
class ModelOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor | None


class TinyLlava(nn.Module):
    def __init__(self, config: TinyLlavaConfig, tokenizer=None, *, attn_implementation: str = "sdpa") -> None:
        super().__init__()
        self.config = config
        tcfg = config.text_config
        tcfg._attn_implementation = attn_implementation
        self.language_model = Qwen2ForCausalLM(tcfg)
        self.vision_tower = VisionTower(config, attn_implementation)
        self.connector = Connector(config)
        self.tokenizer = tokenizer
        # sampling settings read from and written to generation_config.json (checkpoint.py)
        self.generation_settings: dict[str, Any] = {}

    # ------------------------------------------------------------------ vision

    def tower_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Videos (B, T, 3, S, S) → frozen-tower features (B, T·P, V), frames of a video batched together."""
        b, t = pixels.shape[:2]
        feats = self.vision_tower(pixels.flatten(0, 1))
        return feats.reshape(b, t * feats.shape[1], feats.shape[2])

    def encode_videos(self, pixels: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """Videos → visual tokens (B, Q, D). A list allows different frame counts per video."""
        if isinstance(pixels, (list, tuple)):
            return torch.cat([self.connector(self.tower_features(p[None])) for p in pixels])
        return self.connector(self.tower_features(pixels))

    # ------------------------------------------------------------------ splice

    def embed_inputs(self, input_ids: list[list[int]], visual: torch.Tensor | None,
                     labels: list[list[int]] | None = None, pad_to_multiple: int = 1) -> SplicedBatch:
        """Replace each ``IMAGE_TOKEN_INDEX`` by the 512 visual tokens of its sample; truncate to
        ``tokenizer_model_max_length``; right-pad with zero embeddings (spec §1.5), to the longest
        sequence rounded up to ``pad_to_multiple`` (masked padding changes no real position)."""
        embed = self.language_model.get_input_embeddings()
        device = embed.weight.device
        max_len = self.config.tokenizer_model_max_length
        seqs, labs = [], []
        for i, ids in enumerate(input_ids):
            # built on the host and copied asynchronously: splicing never waits for the GPU
            ids_t = host_to_device(torch.tensor(ids, dtype=torch.long), device)
            lab = host_to_device(torch.tensor(labels[i], dtype=torch.long), device) if labels is not None else None
            where = [j for j, t in enumerate(ids) if t == IMAGE_TOKEN_INDEX]
            text = embed(ids_t.clamp(min=0))
            parts, lparts, start = [], [], 0
            for pos in where:
                parts += [text[start:pos], visual[i].to(text.dtype)]
                if lab is not None:
                    lparts += [lab[start:pos],
                               torch.full((visual.shape[1],), IGNORE_INDEX, dtype=torch.long, device=device)]
                start = pos + 1
            parts.append(text[start:])
            if lab is not None:
                lparts.append(lab[start:])
            if not where and visual is not None and i < len(visual):
                parts.append(visual[i, :0].to(text.dtype))  # keeps the connector in the graph
            seqs.append(torch.cat(parts)[:max_len])
            if lab is not None:
                labs.append(torch.cat(lparts)[:max_len])
        lengths = [s.shape[0] for s in seqs]
        width = -(-max(lengths) // pad_to_multiple) * pad_to_multiple
        b, d = len(seqs), seqs[0].shape[1]
        embeds = seqs[0].new_zeros(b, width, d)
        mask = torch.zeros(b, width, dtype=torch.long, device=device)
        out_labels = (torch.full((b, width), IGNORE_INDEX, dtype=torch.long, device=device)
                      if labels is not None else None)
        for i, s in enumerate(seqs):
            embeds[i, : s.shape[0]] = s
            mask[i, : s.shape[0]] = 1
            if out_labels is not None:
                out_labels[i, : s.shape[0]] = labs[i]
        positions = torch.arange(width, device=device)[None].expand(b, -1)
        return SplicedBatch(embeds, mask, positions, out_labels, lengths)

    def prompt_embeddings(self, input_ids: list[list[int]], visual: torch.Tensor) -> list[torch.Tensor]:
        """Per-prompt spliced embeddings (L_i, D), unpadded: the generation engine's input."""
        batch = self.embed_inputs(input_ids, visual)
        return [batch.inputs_embeds[i, :n] for i, n in enumerate(batch.lengths)]

    @staticmethod
    def shared_prefix_length(input_ids: list[list[int]], visual_tokens: int, lengths: list[int]) -> int:
        """How many leading positions the spliced prompts of ``input_ids`` (of ``lengths`` positions, as
        ``prompt_embeddings`` gives them for one video's questions: the same ``visual_tokens`` in each)
        have in common: the common leading tokens, an image token counting as the visual tokens it
        stands for; at most the shortest prompt less one position (0 for fewer than two prompts)."""
        if len(input_ids) < 2:
            return 0
        common = 0
        for column in zip(*input_ids):
            if any(t != column[0] for t in column):
                break
            common += visual_tokens if column[0] == IMAGE_TOKEN_INDEX else 1
        return max(0, min(common, min(lengths) - 1))

    # ------------------------------------------------------------------ forward

    def forward(self, input_ids: list[list[int]], labels: list[list[int]] | None = None,
                videos: torch.Tensor | list[torch.Tensor] | None = None) -> ModelOutput:
        """Teacher-forced forward; with ``labels`` the loss is the mean shifted cross-entropy over
        supervised tokens (Qwen2ForCausalLM's, spec §4)."""
        visual = self.encode_videos(self._cast(videos)) if videos is not None else None
        batch = self.embed_inputs(input_ids, visual, labels)
        out = self.language_model(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
                                  position_ids=batch.position_ids, labels=batch.labels, use_cache=False)
        return ModelOutput(out.loss, out.logits)

    def _cast(self, videos):
        p = next(self.vision_tower.parameters())
        if isinstance(videos, (list, tuple)):
            return [v.to(device=p.device, dtype=p.dtype) for v in videos]
        return videos.to(device=p.device, dtype=p.dtype)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device
