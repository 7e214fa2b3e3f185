"""A configurable UNet for images: residual blocks, optional self-attention, label embedding.

Layer names are part of the interface: GDD-I freezing selects the 3x3 convolutions of the
blocks (``conv1``/``conv2``), the attention projections (``qkv``/``proj``) and the 1x1 skips
(``skip``) by name.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from fewstep.networks.embeddings import ConditionEmbedding


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups of at least 4 channels, dividing ``channels`` exactly."""
    groups = min(32, max(1, channels // 4))
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResBlock(nn.Module):
    """Pre-activation residual block with adaptive scale/shift from the conditioning vector."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb = nn.Linear(emb_channels, 2 * out_channels)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(self.norm2(h) * (1 + scale) + shift)
        h = self.conv2(self.dropout(h))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over pixels with a zero-initialised output projection."""

    def __init__(self, channels: int, channels_per_head: int = 32):
        super().__init__()
        self.num_heads = max(1, channels // channels_per_head)
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Level(nn.Module):
    """Residual blocks at one resolution, each followed by attention or identity."""

    def __init__(self, blocks: list[ResBlock], attns: list[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attns = nn.ModuleList(attns)

    def forward(self, h: torch.Tensor, emb: torch.Tensor, skips: list[torch.Tensor] | None = None):
        """Encoder (skips=None): collects outputs. Decoder: pops and concatenates skips."""
        outputs = []
        for block, attn in zip(self.blocks, self.attns):
            if skips is not None:
                h = torch.cat([h, skips.pop()], dim=1)
            h = attn(block(h, emb))
            outputs.append(h)
        return h, outputs


class UNet(nn.Module):
    """UNet on [B, C, H, W] images, called as ``net(x, c_noise, class_labels)``.

    ``channel_mult`` gives one resolution level each (halving H and W between levels);
    ``attn_levels`` lists the level indices (0 = full resolution) that get self-attention,
    so a preset works for any input size. ``second_time`` adds a second scalar input, ``net(x, c_noise, class_labels,
    second_time=h)`` (MeanFlow's t - r; ``fewstep.networks.embeddings.ConditionEmbedding``).
    """

    def __init__(
        self,
        data_shape: Sequence[int],
        num_classes: int = 0,
        model_channels: int = 64,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 2,
        attn_levels: Sequence[int] = (),
        dropout: float = 0.0,
        fourier_scale: float = 16.0,
        second_time: bool = False,
    ):
        super().__init__()
        in_channels, height, width = data_shape
        emb_channels = 4 * model_channels
        self.embed = ConditionEmbedding(model_channels, emb_channels, num_classes, fourier_scale, second_time)
        self.conv_in = nn.Conv2d(in_channels, model_channels, 3, padding=1)

        widths = [model_channels * m for m in channel_mult]
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skip_channels = [model_channels]
        c = model_channels
        for level, width_l in enumerate(widths):
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(c, width_l, emb_channels, dropout))
                attns.append(AttentionBlock(width_l) if level in attn_levels else nn.Identity())
                c = width_l
            self.down.append(Level(blocks, attns))
            skip_channels += [c] * num_res_blocks
            if level < len(widths) - 1:
                self.downsample.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skip_channels.append(c)

        self.mid = nn.ModuleList([ResBlock(c, c, emb_channels, dropout), ResBlock(c, c, emb_channels, dropout)])
        self.mid_attn = AttentionBlock(c)

        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for level in reversed(range(len(widths))):
            blocks, attns = [], []
            for _ in range(num_res_blocks + 1):
                c_skip = skip_channels.pop()
                blocks.append(ResBlock(c + c_skip, widths[level], emb_channels, dropout))
                attns.append(AttentionBlock(widths[level]) if level in attn_levels else nn.Identity())
                c = widths[level]
            self.up.append(Level(blocks, attns))
            if level > 0:
                self.upsample.append(nn.Conv2d(c, c, 3, padding=1))

        self.norm_out = group_norm(c)
        self.conv_out = nn.Conv2d(c, in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(
        self, x: torch.Tensor, c_noise: torch.Tensor, class_labels: torch.Tensor | None = None, guidance: torch.Tensor | None = None,
        second_time: torch.Tensor | None = None,
    ) -> torch.Tensor:
        emb = self.embed(c_noise, class_labels, guidance, second_time)
        h = self.conv_in(x)
        skips = [h]
        for i, level in enumerate(self.down):
            h, outputs = level(h, emb)
            skips += outputs
            if i < len(self.downsample):
                h = self.downsample[i](h)
                skips.append(h)
        h = self.mid_attn(self.mid[0](h, emb))
        h = self.mid[1](h, emb)
        for i, level in enumerate(self.up):
            h, _ = level(h, emb, skips)
            if i < len(self.upsample):
                # Upsample to the skip's size, so odd sizes (28 -> 14 -> 7) round-trip.
                h = self.upsample[i](F.interpolate(h, size=skips[-1].shape[-2:], mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))

    def encoder_features(self, x: torch.Tensor, c_noise: torch.Tensor, class_labels: torch.Tensor | None = None
                         ) -> list[torch.Tensor]:
        """Each down level's output, then the middle's (the bottleneck, last), on the (c_in-scaled) input ``x``."""
        emb = self.embed(c_noise, class_labels)
        h, features = self.conv_in(x), []
        for i, level in enumerate(self.down):
            h, _ = level(h, emb)
            features.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        h = self.mid_attn(self.mid[0](h, emb))
        features.append(self.mid[1](h, emb))
        return features

    def drop_decoder(self) -> None:
        """Delete the layers that only ``forward`` uses, for a frozen encoder (``encoder_features``) that never needs them."""
        del self.up, self.upsample, self.norm_out, self.conv_out
