"""The frozen SigLIP tower (spec §1.2): hidden state of layer ``vision_feature_layer`` (−2) before the
post-LayerNorm; strategy ``patch`` drops token 0 (SigLIP has no CLS, so this is the top-left patch)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import SiglipVisionModel


class _Holder(nn.Module):
    """Keeps the checkpoint prefix ``_vision_tower.vision_model.*`` whatever the transformers version
    nests inside ``SiglipVisionModel``."""

    def __init__(self, vision_model: nn.Module) -> None:
        super().__init__()
        self.vision_model = vision_model


class VisionTower(nn.Module):
    def __init__(self, config, attn_implementation: str = "sdpa") -> None:
        super().__init__()
        vcfg = config.vision_config
        vcfg._attn_implementation = "sdpa" if attn_implementation == "flash_attention_2" else attn_implementation
        model = SiglipVisionModel(vcfg)
        self._vision_tower = _Holder(getattr(model, "vision_model", model))
        self.feature_layer = config.vision_feature_layer
        self.strategy = config.vision_feature_select_strategy

    @property
    def vision_model(self) -> nn.Module:
        return self._vision_tower.vision_model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Frames (F, 3, S, S) → features (F, P, V) with P = patches (−1 for ``patch``)."""
        vm = self.vision_model
        layers = vm.encoder.layers
        # hidden_states[k] is the output after k layers (k = 0: embeddings); run only what is needed
        stop = self.feature_layer % (len(layers) + 1)
        # HF's patch embedding is a transposed view (each channel strided by the patch count): made
        # contiguous once here, the layers' residual adds and norm inputs are no longer strided copies
        # (the same values; on an H200 a GRPO step's 128 frames take 190 instead of 248 ms)
        x = vm.embeddings(pixels).contiguous()
        for layer in layers[:stop]:
            out = layer(x, None)
            x = out[0] if isinstance(out, tuple) else out
        return x[:, 1:] if self.strategy == "patch" else x
