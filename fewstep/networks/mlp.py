"""A residual MLP for vector data (the analytic GMM benchmark)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from fewstep.networks.embeddings import ConditionEmbedding


class MLPBlock(nn.Module):
    def __init__(self, width: int, emb_channels: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.emb = nn.Linear(emb_channels, 2 * width)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        self.dropout = nn.Dropout(dropout)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.emb(emb).chunk(2, dim=1)
        z = F.silu(self.norm(h) * (1 + scale) + shift)
        return h + self.fc2(self.dropout(F.silu(self.fc1(z))))


class MLP(nn.Module):
    """MLP on [B, d] vectors, called as ``net(x, c_noise, class_labels)`` like the UNet (``second_time`` as there)."""

    def __init__(
        self,
        data_shape: Sequence[int],
        num_classes: int = 0,
        width: int = 256,
        depth: int = 3,
        dropout: float = 0.0,
        fourier_scale: float = 16.0,
        second_time: bool = False,
    ):
        super().__init__()
        (dim,) = data_shape
        self.embed = ConditionEmbedding(width, width, num_classes, fourier_scale, second_time)
        self.fc_in = nn.Linear(dim, width)
        self.blocks = nn.ModuleList(MLPBlock(width, width, dropout) for _ in range(depth))
        self.norm_out = nn.LayerNorm(width)
        self.fc_out = nn.Linear(width, dim)
        nn.init.zeros_(self.fc_out.weight)
        nn.init.zeros_(self.fc_out.bias)

    def forward(
        self, x: torch.Tensor, c_noise: torch.Tensor, class_labels: torch.Tensor | None = None, guidance: torch.Tensor | None = None,
        second_time: torch.Tensor | None = None,
    ) -> torch.Tensor:
        emb = self.embed(c_noise, class_labels, guidance, second_time)
        h = self.fc_in(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.fc_out(F.silu(self.norm_out(h)))

    def encoder_features(self, x: torch.Tensor, c_noise: torch.Tensor, class_labels: torch.Tensor | None = None
                         ) -> list[torch.Tensor]:
        """Each block's output on the (c_in-scaled) input ``x``; the last is the bottleneck."""
        emb = self.embed(c_noise, class_labels)
        h, features = self.fc_in(x), []
        for block in self.blocks:
            h = block(h, emb)
            features.append(h)
        return features

    def drop_decoder(self) -> None:
        """Delete the output layers, which ``encoder_features`` does not use."""
        del self.norm_out, self.fc_out
