"""Noise-level and class-label embeddings shared by the networks."""

from __future__ import annotations

import math

import torch
from torch import nn


class FourierEmbedding(nn.Module):
    """Random Fourier features of a scalar noise level (NCSN++/EDM style), fixed at init."""

    def __init__(self, num_channels: int, scale: float = 16.0):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        c_noise = c_noise.to(torch.promote_types(c_noise.dtype, self.freqs.dtype))  # float32, or float64 if either is
        angles = c_noise[:, None] * self.freqs[None, :].to(c_noise.dtype) * (2 * math.pi)
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class ConditionEmbedding(nn.Module):
    """Maps (c_noise, class label) to one conditioning vector.

    Class index ``num_classes`` is the learned "no label" token used for label dropout and
    classifier-free guidance; ``class_labels=None`` means unconditional. ``second_time`` adds Fourier features of a
    second scalar (MeanFlow's t - r), mapped by a zero-initialised layer into the noise features before the MLP, so
    that the network starts as it would without it; off, the module and its state_dict are unchanged.
    """

    def __init__(self, num_channels: int, emb_channels: int, num_classes: int = 0, fourier_scale: float = 16.0,
                 second_time: bool = False):
        super().__init__()
        self.num_classes = num_classes
        self.noise = FourierEmbedding(num_channels, scale=fourier_scale)
        self.mlp = nn.Sequential(
            nn.Linear(num_channels, emb_channels), nn.SiLU(), nn.Linear(emb_channels, emb_channels)
        )
        self.label = nn.Embedding(num_classes + 1, emb_channels) if num_classes > 0 else None
        self.guidance = None
        self.second_time = None
        if second_time:
            self.second_time = nn.Sequential(FourierEmbedding(num_channels, scale=fourier_scale),
                                             nn.Linear(num_channels, num_channels))
            nn.init.zeros_(self.second_time[1].weight)
            nn.init.zeros_(self.second_time[1].bias)

    def enable_guidance(self, scale: float = 1.0) -> None:
        """Add a guidance-scale embedding (LCM's w-conditioning), zero at initialisation so the network is unchanged."""
        num_channels, emb_channels = self.mlp[0].in_features, self.mlp[-1].out_features
        self.guidance = nn.Sequential(FourierEmbedding(num_channels, scale=scale), nn.Linear(num_channels, emb_channels))
        nn.init.zeros_(self.guidance[1].weight)
        nn.init.zeros_(self.guidance[1].bias)

    def forward(
        self, c_noise: torch.Tensor, class_labels: torch.Tensor | None = None, guidance: torch.Tensor | None = None,
        second_time: torch.Tensor | None = None,
    ) -> torch.Tensor:
        features = self.noise(c_noise)
        if second_time is not None:
            if self.second_time is None:
                raise ValueError("this network has no second time input: build it with second_time=True "
                                 "(model.second_time=true)")
            features = features + self.second_time(torch.as_tensor(second_time, device=c_noise.device).expand(c_noise.shape[0]))
        emb = self.mlp(features)
        if guidance is not None:
            if self.guidance is None:
                raise ValueError("this network has no guidance embedding: call net.embed.enable_guidance() first")
            emb = emb + self.guidance(guidance.to(c_noise.device).float().expand(c_noise.shape[0]))
        if self.label is not None:
            if class_labels is None:
                class_labels = torch.full_like(c_noise, self.num_classes, dtype=torch.long)
            emb = emb + self.label(class_labels.long())
        return emb
