"""The ``groupresampler`` connector (spec §1.4): Linear(V→D), split into G groups, one shared
3-layer Perceiver with q = Q/G learned latents resamples each group, then a fixed sinusoidal
position encoding (rounded through fp16, as the reference) is added to the Q output tokens.

Module names follow the released checkpoints: ``connector._connector.{latents, linear, layers.i.0.*,
layers.i.1.{0,1,3}, norm}``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class PerceiverAttention(nn.Module):
    """Latents attend over [media; latents]; K and V are the two halves of one projection."""

    def __init__(self, dim: int, dim_head: int, heads: int) -> None:
        super().__init__()
        inner = dim_head * heads
        self.heads, self.dim_head = heads, dim_head
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        # media (B, n, D), latents (B, q, D) -> (B, q, D)
        media = self.norm_media(media)
        latents = self.norm_latents(latents)
        b, q, _ = latents.shape
        h, d = self.heads, self.dim_head
        queries = self.to_q(latents).view(b, q, h, d).transpose(1, 2)
        k, v = self.to_kv(torch.cat([media, latents], dim=1)).chunk(2, dim=-1)
        k = k.view(b, -1, h, d).transpose(1, 2)
        v = v.view(b, -1, h, d).transpose(1, 2)
        # softmax(q k^T / sqrt(d)) v; the reference's max-subtraction changes nothing mathematically
        out = F.scaled_dot_product_attention(queries, k, v, scale=d**-0.5)
        return self.to_out(out.transpose(1, 2).reshape(b, q, h * d))


def feed_forward(dim: int, mult: int = 4) -> nn.Sequential:
    """LN → Linear(D, 4D) → GELU (erf) → Linear(4D, D); indices 0, 1, 3 hold the weights."""
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(),
                         nn.Linear(dim * mult, dim, bias=False))


def sinusoidal_encoding(n: int, dim: int, dtype: torch.dtype, device: torch.device | str | None = None) -> torch.Tensor:
    """(n, dim) sin/cos table computed in fp32, rounded to fp16, then cast to ``dtype`` (spec §1.4)."""
    pos = torch.arange(n, dtype=torch.float32, device=device)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=device) * (-math.log(10000.0) / dim))
    pe = torch.zeros(n, dim, dtype=torch.float16, device=device)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div)
    return pe.to(dtype)


def group_bounds(n: int, groups: int) -> list[tuple[int, int]]:
    """Token ranges of the G chunks: the first ``n % G`` chunks get one extra token (spec §1.4 step 2)."""
    base, rem = divmod(n, groups)
    out, start = [], 0
    for g in range(groups):
        size = base + (1 if g < rem else 0)
        out.append((start, start + size))
        start += size
    return out


class PerceiverResampler(nn.Module):
    def __init__(self, vision_dim: int, dim: int, num_queries: int, groups: int, depth: int, heads: int,
                 dim_head: int) -> None:
        super().__init__()
        self.groups = groups
        self.num_queries = num_queries
        self.latents = nn.Parameter(torch.randn(num_queries // groups, dim))
        self.linear = nn.Linear(vision_dim, dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, dim_head, heads), feed_forward(dim)]) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self._pe: dict[tuple, torch.Tensor] = {}

    def resample(self, media: torch.Tensor) -> torch.Tensor:
        """Groups (B, n, D) → (B, q, D): the shared Perceiver over each group independently."""
        lat = self.latents[None].expand(media.shape[0], -1, -1)
        for attn, ff in self.layers:
            lat = attn(media, lat) + lat
            lat = ff(lat) + lat
        return self.norm(lat)

    def position_encoding(self, n: int, like: torch.Tensor) -> torch.Tensor:
        key = (n, like.dtype, like.device)
        if key not in self._pe:
            self._pe[key] = sinusoidal_encoding(n, like.shape[-1], like.dtype, like.device)
        return self._pe[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tower features (B, N, V) → visual tokens (B, Q, D)."""
        x = self.linear(x)
        b, n, d = x.shape
        if n % self.groups == 0:  # equal groups: all B·G groups in one batch
            out = self.resample(x.reshape(b * self.groups, n // self.groups, d)).reshape(b, -1, d)
        else:
            out = torch.cat([self.resample(x[:, s:e]) for s, e in group_bounds(n, self.groups)], dim=1)
        return out + self.position_encoding(out.shape[1], out)


class Connector(nn.Module):
    """Wrapper matching the checkpoint prefix ``connector._connector``."""

    def __init__(self, config) -> None:
        super().__init__()
        self._connector = PerceiverResampler(
            vision_dim=config.vision_hidden_size, dim=config.hidden_size, num_queries=config.num_queries,
            groups=config.group, depth=config.num_resampler_layers, heads=config.resampler_heads,
            dim_head=config.resampler_head_dim,
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self._connector(features)
