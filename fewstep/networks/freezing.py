"""GDD-I layer freezing (Zheng & Yang, arXiv 2405.20750): train a one-step generator with most of its
convolutions frozen at the teacher's weights.

Levels (each includes the ones below it):

1. every 3x3 convolution of the UNet blocks: the residual blocks' ``conv1``/``conv2`` and, by default,
   the 3x3 ``downsample``/``upsample`` convolutions between levels (in the paper's EDM/DDPM++ UNet the
   resampling happens inside UNet blocks, whose 3x3 convolutions level 1 freezes; ``resampling=False``
   keeps ours trainable), and the attention output projections ``proj``;
2. adds the attention ``qkv`` projections;
3. adds the residual blocks' 1x1 ``skip`` convolutions.

The same levels apply to EDM's networks (``fewstep.networks.edm``, the paper's own UNets): each UNetBlock's 3x3
``conv0``/``conv1`` (which do its resampling) and attention ``proj`` at level 1, ``qkv`` at 2, ``skip`` at 3.

Norms, the noise/label embeddings (``embed`` and each block's ``emb`` affine layer), ``conv_in`` and
``conv_out`` always stay trainable. The paper reports about 84 / 86 / 90 % of the parameters frozen at
levels 1 / 2 / 3 on its CIFAR-10 UNet.

``ratio`` instead freezes whole level-3-eligible layers, largest first (ties in module order), until the
frozen fraction reaches the target (the last layer may overshoot it; if every eligible layer is frozen
before the target is reached, that is as far as it goes). Either way ``freeze`` returns the fraction of
the network's parameters actually frozen.
"""

from __future__ import annotations

import contextlib

from torch import nn

from fewstep.errors import ConfigError
from fewstep.networks.edm import UNetBlock as EDMBlock
from fewstep.networks.unet import AttentionBlock, ResBlock, UNet

LEVELS = (0, 1, 2, 3)


def freezable_layers(net: nn.Module, resampling: bool = True) -> dict[str, tuple[nn.Module, int]]:
    """{qualified name: (layer, the lowest level that freezes it)} over ``net``, in module order."""
    layers: dict[str, tuple[nn.Module, int]] = {}
    for name, module in net.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, ResBlock):
            layers[prefix + "conv1"] = (module.conv1, 1)
            layers[prefix + "conv2"] = (module.conv2, 1)
            if isinstance(module.skip, nn.Conv2d):
                layers[prefix + "skip"] = (module.skip, 3)
        elif isinstance(module, AttentionBlock):
            layers[prefix + "qkv"] = (module.qkv, 2)
            layers[prefix + "proj"] = (module.proj, 1)
        elif isinstance(module, EDMBlock):
            layers[prefix + "conv0"] = (module.conv0, 1)
            layers[prefix + "conv1"] = (module.conv1, 1)
            if module.num_heads:
                layers[prefix + "qkv"] = (module.qkv, 2)
                layers[prefix + "proj"] = (module.proj, 1)
            if module.skip is not None and any(True for _ in module.skip.parameters()):
                layers[prefix + "skip"] = (module.skip, 3)
        elif isinstance(module, UNet) and resampling:
            for group in ("downsample", "upsample"):
                for i, conv in enumerate(getattr(module, group)):
                    layers[f"{prefix}{group}.{i}"] = (conv, 1)
    order = {name: i for i, (name, _) in enumerate(net.named_modules())}
    return dict(sorted(layers.items(), key=lambda item: order[item[0]]))


def frozen_fraction(net: nn.Module) -> float:
    """The fraction of ``net``'s parameters (by count) that do not require gradients."""
    total = sum(p.numel() for p in net.parameters())
    frozen = sum(p.numel() for p in net.parameters() if not p.requires_grad)
    return frozen / total if total else 0.0


def check_freeze(level: int = 0, ratio: float | None = None) -> None:
    """A one-line ConfigError unless ``level`` is 0-3 and ``ratio`` is None or in [0, 1), not both given."""
    if isinstance(level, bool) or level not in LEVELS:
        raise ConfigError(f"freeze.level={level}: use 0 (nothing), 1 (3x3 convs + attention proj), 2 (+ qkv) or 3 (+ 1x1 skips)")
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
            raise ConfigError(f"freeze.ratio={ratio}: give a fraction of the parameters in [0, 1) (e.g. 0.8), or null")
        if level:
            raise ConfigError(f"freeze.level={level} and freeze.ratio={ratio} both given: set one, the other to 0 / null")


def freeze(net: nn.Module, level: int = 0, ratio: float | None = None, resampling: bool = True) -> float:
    """Freeze the GDD-I layers of ``level`` (or layers up to ``ratio`` of the parameters); returns the frozen fraction."""
    check_freeze(level, ratio)
    layers = freezable_layers(net, resampling)
    if (level or ratio) and not layers:
        raise ConfigError(
            f"freeze.level={level} freeze.ratio={ratio}: a {type(net).__name__} has no layers GDD-I can freeze "
            "(it is defined for fewstep's UNet and EDM's networks); use freeze.level=0 freeze.ratio=null"
        )
    if ratio is None:
        chosen = [layer for layer, lowest in layers.values() if lowest <= level]
    else:
        total = sum(p.numel() for p in net.parameters())
        frozen = total * frozen_fraction(net)
        by_size = sorted(layers.values(), key=lambda item: -sum(p.numel() for p in item[0].parameters()))
        chosen = []
        for layer, _ in by_size:
            if frozen >= ratio * total:
                break
            chosen.append(layer)
            frozen += sum(p.numel() for p in layer.parameters() if p.requires_grad)
    for layer in chosen:
        layer.requires_grad_(False)
    return frozen_fraction(net)


def frozen_names(net: nn.Module) -> set[str]:
    """Names of the parameters of ``net`` that are frozen."""
    return {name for name, p in net.named_parameters() if not p.requires_grad}


@contextlib.contextmanager
def no_param_grads(module: nn.Module):
    """Parameters of ``module`` that require grad stop doing so inside the block (inputs still get gradients)."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)
