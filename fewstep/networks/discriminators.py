"""Discriminators for GAN-based distillation (GDD, Zheng & Yang arXiv 2405.20750).

Every discriminator is called as ``disc(x, class_labels=None) -> logits [batch]`` on data-space
inputs (images in [-1, 1], as the data modules give them), and has ``initialize(teacher_net)``, which
loads its frozen backbone (the teacher's weights, or a weights file) before training. Construction never
reads a file, so a method rebuilt from a checkpoint (whose state_dict holds the backbone) needs neither
the teacher nor the weights file.

Kinds (``build_discriminator({"kind": ..., **options}, ...)``):

- ``teacher_encoder`` (default, offline): the frozen teacher network's encoder (UNet: ``conv_in``, the
  down levels and the middle; MLP: ``fc_in`` and the blocks), evaluated at a fixed noise level ``sigma``
  with the teacher's EDM input scaling c_in(sigma) and c_noise(sigma); a small trainable head on each
  level's features (Projected-GAN style), logits summed. Gradients flow through the frozen encoder.
- ``timm``: a timm backbone (``features_only``) with weights from a file the user names, frozen, in eval
  mode, with trainable heads on each feature level; grey images are repeated to 3 channels, images are
  mapped from [-1, 1] to the backbone's mean/std and upsampled to ``min_size`` when smaller.
- ``conv``: a small convolutional discriminator trained from scratch.

Class-conditional discriminators (``num_classes`` > 0) add a projection term <embed(y), h> to each head
(Miyato & Koyama 2018); index ``num_classes`` is the "no label" class, as in the generator.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from fewstep.constructors import build, resolve
from fewstep.errors import ConfigError, one_line
from fewstep.networks.mlp import MLP
from fewstep.networks.preconditioning import PreconditionedDenoiser, denoiser_features
from fewstep.networks.unet import UNet


class Head(nn.Module):
    """Small trainable head: features [B, C, H, W] (or [B, C]) -> logits [B], with optional projection."""

    def __init__(self, channels: int, hidden: int = 64, num_classes: int = 0, spatial: bool = True):
        super().__init__()
        if spatial:
            self.body = nn.Sequential(
                nn.Conv2d(channels, hidden, 3, padding=1), nn.LeakyReLU(0.2), nn.Conv2d(hidden, hidden, 1), nn.LeakyReLU(0.2)
            )
        else:
            self.body = nn.Sequential(nn.Linear(channels, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, hidden), nn.LeakyReLU(0.2))
        self.out = nn.Linear(hidden, 1)
        self.num_classes = num_classes
        self.embed = nn.Embedding(num_classes + 1, hidden) if num_classes else None

    def forward(self, features: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        h = self.body(features)
        if h.ndim == 4:
            h = h.mean(dim=(2, 3))
        logits = self.out(h).squeeze(1)
        if self.embed is not None:
            if class_labels is None:
                class_labels = torch.full((h.shape[0],), self.num_classes, dtype=torch.long, device=h.device)
            logits = logits + (self.embed(class_labels.long()) * h).sum(1) / math.sqrt(h.shape[1])
        return logits


class _FrozenBackbone(nn.Module):
    """A discriminator whose ``backbone`` is frozen and always in eval mode (no dropout, fixed BN stats)."""

    backbone: nn.Module

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()
        return self

    def freeze_backbone(self) -> None:
        self.backbone.requires_grad_(False)
        self.backbone.eval()

    def make_heads(self, data_shape: Sequence[int], num_classes: int, hidden: int) -> nn.ModuleList:
        """One head per feature level, sized by a dry run on zeros."""
        with torch.no_grad():
            features = self.features(torch.zeros(1, *data_shape), None)
        return nn.ModuleList(Head(f.shape[1], hidden, num_classes, spatial=f.ndim == 4) for f in features)

    def features(self, x: torch.Tensor, class_labels: torch.Tensor | None) -> list[torch.Tensor]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        features = self.features(x, class_labels)
        return sum(head(f, class_labels) for head, f in zip(self.heads, features))


class TeacherEncoderDiscriminator(_FrozenBackbone):
    """The teacher's own encoder at noise level ``sigma``, frozen, with a trainable head per level.

    ``net`` is the teacher's model config (the generator's), so the backbone has the teacher's layout;
    ``initialize(teacher_net)`` copies the teacher's weights into it. ``add_noise`` evaluates it on
    x + sigma n (instance noise) instead of x itself.
    """

    def __init__(
        self, net: dict, data_shape: Sequence[int], num_classes: int = 0, sigma: float = 0.5, sigma_data: float = 0.5,
        add_noise: bool = False, head_channels: int = 64,
    ):
        super().__init__()
        if not sigma > 0:
            raise ConfigError(f"discriminator.sigma={sigma}: the teacher encoder needs a noise level > 0 (e.g. 0.5)")
        backbone = build(net, data_shape=list(data_shape), num_classes=num_classes)
        if isinstance(backbone, (UNet, MLP)):
            backbone.drop_decoder()  # the encoder's features are all it reads
        elif not isinstance(backbone, PreconditionedDenoiser):  # those run whole, their encoder's outputs hooked
            raise ConfigError(
                f"the teacher_encoder discriminator reads a UNet, MLP or preconditioned (EDM, diffusers) teacher, not a "
                f"{type(backbone).__name__}: "
                "use method.discriminator.kind=conv"
            )
        self.backbone = backbone
        self.freeze_backbone()
        self.sigma, self.sigma_data, self.add_noise = float(sigma), float(sigma_data), add_noise
        self.heads = self.make_heads(data_shape, num_classes, head_channels)

    def initialize(self, teacher_net: nn.Module | None = None) -> None:
        """Copy the teacher network's encoder weights into the frozen backbone."""
        if teacher_net is None:
            raise ConfigError("the teacher_encoder discriminator needs the teacher network: attach a teacher first")
        ours = self.backbone.state_dict()
        theirs = {k: v for k, v in teacher_net.state_dict().items() if k in ours}
        self.backbone.load_state_dict(theirs)  # strict: every encoder tensor comes from the teacher
        self.freeze_backbone()

    def features(self, x: torch.Tensor, class_labels: torch.Tensor | None) -> list[torch.Tensor]:
        sigma = torch.full((x.shape[0],), self.sigma, device=x.device, dtype=torch.float32)
        if self.add_noise:
            x = x + self.sigma * torch.randn_like(x)
        return denoiser_features(self.backbone, x, sigma, class_labels, self.sigma_data)


class TimmDiscriminator(_FrozenBackbone):
    """A frozen timm backbone (weights from the file ``weights``) with a trainable head per feature level."""

    def __init__(
        self, name: str, data_shape: Sequence[int], weights: str | None = None, num_classes: int = 0, min_size: int = 32,
        head_channels: int = 64, out_indices: Sequence[int] | None = None,
    ):
        super().__init__()
        self.name, self.weights = name, weights
        if not weights:
            raise ConfigError(self._fix(f"the timm discriminator '{name}' has no weights"))
        if len(data_shape) != 3 or data_shape[0] not in (1, 3):
            raise ConfigError(
                f"the timm discriminator reads 1- or 3-channel images, not data of shape {list(data_shape)}: "
                "use method.discriminator.kind=teacher_encoder"
            )
        import timm

        options = {} if out_indices is None else {"out_indices": tuple(out_indices)}
        try:
            self.backbone = timm.create_model(name, pretrained=False, features_only=True, **options)
        except RuntimeError as error:  # unknown model name
            raise ConfigError(f"timm cannot build '{name}' ({one_line(error)}): name a model of timm.list_models()") from None
        self.freeze_backbone()
        cfg = getattr(self.backbone, "pretrained_cfg", None) or {}
        mean, std = cfg.get("mean", (0.485, 0.456, 0.406)), cfg.get("std", (0.229, 0.224, 0.225))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.min_size = int(min_size)
        self.heads = self.make_heads(data_shape, num_classes, head_channels)

    def _fix(self, what: str) -> str:
        return (
            f"{what}: pass method.discriminator.weights=PATH to a state_dict of timm model {self.name} "
            f"(torch.save(timm.create_model('{self.name}').state_dict(), PATH) where it can be downloaded), "
            "or use method.discriminator.kind=teacher_encoder"
        )

    def initialize(self, teacher_net: nn.Module | None = None) -> None:
        """Load the backbone weights from the file ``weights`` (a full-model state_dict; the classifier is ignored)."""
        path = Path(str(self.weights)).expanduser()
        if not path.is_file():
            raise ConfigError(self._fix(f"timm weights file '{path}' not found"))
        from fewstep.torch_files import check_torch_archive

        check_torch_archive(path, legacy=True)  # no zip member that declares more than the file holds
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ConfigError(self._fix(f"cannot read timm weights '{path}' ({type(error).__name__})")) from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise ConfigError(self._fix(f"'{path}' holds no state_dict"))
        ours = self.backbone.state_dict()
        missing = [k for k in ours if k not in state or state[k].shape != ours[k].shape]
        if missing:
            raise ConfigError(self._fix(f"'{path}' does not fit timm model {self.name} (e.g. tensor '{missing[0]}')"))
        self.backbone.load_state_dict({k: state[k] for k in ours})
        self.freeze_backbone()

    def features(self, x: torch.Tensor, class_labels: torch.Tensor | None) -> list[torch.Tensor]:
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        x = ((x + 1) / 2 - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        short = min(x.shape[-2:])
        if short < self.min_size:
            scale = self.min_size / short
            size = (round(x.shape[-2] * scale), round(x.shape[-1] * scale))
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return list(self.backbone(x))


class ConvDiscriminator(nn.Module):
    """A small conv net trained from scratch: a 3x3 stem, then stride-2 stages of ``channels``, then a head."""

    def __init__(self, data_shape: Sequence[int], num_classes: int = 0, channels: Sequence[int] = (32, 64, 128)):
        super().__init__()
        if len(data_shape) != 3:
            raise ConfigError(
                f"the conv discriminator reads images, not data of shape {list(data_shape)}: "
                "use method.discriminator.kind=teacher_encoder"
            )
        channels = list(channels)
        if not channels:
            raise ConfigError("discriminator.channels is empty: give the width of each stage, e.g. [32, 64, 128]")
        layers: list[nn.Module] = [nn.Conv2d(data_shape[0], channels[0], 3, padding=1), nn.LeakyReLU(0.2)]
        for c_in, c_out in zip(channels, channels[1:]):
            layers += [
                nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
                nn.Conv2d(c_out, c_out, 3, padding=1), nn.LeakyReLU(0.2),
            ]
        self.body = nn.Sequential(*layers)
        self.head = Head(channels[-1], channels[-1], num_classes)

    def initialize(self, teacher_net: nn.Module | None = None) -> None:
        """Nothing to load: trained from scratch."""

    def forward(self, x: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.body(x), class_labels)


DISCRIMINATORS = {
    "teacher_encoder": TeacherEncoderDiscriminator,
    "timm": TimmDiscriminator,
    "conv": ConvDiscriminator,
}


def build_discriminator(
    config: dict | None, *, net: dict, data_shape: Sequence[int], num_classes: int = 0, sigma_data: float = 0.5
) -> nn.Module:
    """The discriminator ``config`` names: ``{kind: teacher_encoder|timm|conv, **options}`` or ``{_target_: class, ...}``.

    The context (``net``, ``data_shape``, ``num_classes``, ``sigma_data``) goes to each class that takes it;
    an option the class does not take is a one-line ConfigError.
    """
    config = dict(config or {"kind": "teacher_encoder"})
    if "_target_" in config:
        cls, where = resolve(config.pop("_target_")), "discriminator._target_"
    else:
        kind = config.pop("kind", "teacher_encoder")
        if kind not in DISCRIMINATORS:
            raise ConfigError(f"unknown discriminator kind '{kind}': choose one of {', '.join(DISCRIMINATORS)}")
        cls, where = DISCRIMINATORS[kind], f"discriminator kind '{kind}'"
    context = {"net": net, "data_shape": list(data_shape), "num_classes": num_classes, "sigma_data": sigma_data}
    accepted = set(inspect.signature(cls).parameters)
    unknown = sorted(set(config) - (accepted - set(context)))
    if unknown:
        options = sorted(accepted - set(context))
        raise ConfigError(f"{where} takes no option '{unknown[0]}': its options are {', '.join(options) or 'none'}")
    return cls(**config, **{k: v for k, v in context.items() if k in accepted})
