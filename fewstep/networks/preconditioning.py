"""EDM preconditioning (Karras et al. 2022, Table 1), kept apart from the architecture.

D(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma)), with
c_skip = sd^2/(sigma^2+sd^2), c_out = sigma sd/sqrt(sigma^2+sd^2), c_in = 1/sqrt(sigma^2+sd^2),
c_noise = ln(sigma)/4, sd = sigma_data.

fewstep's own architectures (UNet, MLP) are raw networks F that get these coefficients here. Networks that
carry their own preconditioning (EDM's VP/VE/iDDPM/EDM wrappers, a diffusers VP model) subclass
``PreconditionedDenoiser`` and are called as they are: ``edm_denoise`` and ``shifted_edm_denoise`` take both.
"""

from __future__ import annotations

import torch
from torch import nn


class PreconditionedDenoiser(nn.Module):
    """A network that is a denoiser itself: ``forward(x, sigma, class_labels=None) -> D(x; sigma)`` in EDM's sigma
    space, class labels integers (index ``num classes`` = no label) or one-hot.

    Subclasses name the modules whose outputs are their encoder's features (``feature_modules``, the bottleneck
    last), which the GAN heads of GDD's and DMD2's discriminators read.
    """

    def feature_modules(self) -> list[nn.Module]:
        raise NotImplementedError

    def encoder_features(self, x: torch.Tensor, sigma, class_labels=None) -> list[torch.Tensor]:
        """The outputs of ``feature_modules`` during D(x; sigma), the bottleneck last (hooks on one forward pass)."""
        outputs: dict[int, torch.Tensor] = {}
        modules = self.feature_modules()
        hooks = [
            module.register_forward_hook(lambda _, __, output, i=i: outputs.__setitem__(i, first_tensor(output)))
            for i, module in enumerate(modules)
        ]
        try:
            self(x, sigma, class_labels)
        finally:
            for hook in hooks:
                hook.remove()
        return [outputs[i] for i in range(len(modules))]


def first_tensor(output):
    """A module's output tensor (some blocks return a tuple whose first entry is the hidden state)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def edm_coefficients(sigma: torch.Tensor, sigma_data: float) -> tuple[torch.Tensor, ...]:
    """(c_skip, c_out, c_in, c_noise) for noise levels ``sigma``."""
    total = sigma**2 + sigma_data**2
    c_skip = sigma_data**2 / total
    c_out = sigma * sigma_data / total.sqrt()
    c_in = 1 / total.sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def edm_denoise(
    net: nn.Module, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None, sigma_data: float
) -> torch.Tensor:
    """D(x, sigma) from a raw network ``net(x, c_noise, class_labels)``, or from a PreconditionedDenoiser as it is;
    sigma is a float or [batch] tensor."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).expand(x.shape[0])
    if isinstance(net, PreconditionedDenoiser):
        return net(x, sigma, class_labels).to(x.dtype)
    c_skip, c_out, c_in, c_noise = edm_coefficients(sigma, sigma_data)
    shape = (-1,) + (1,) * (x.ndim - 1)
    f = net(c_in.view(shape) * x, c_noise, class_labels)
    return c_skip.view(shape) * x + c_out.view(shape) * f.to(x.dtype)


def shifted_edm_coefficients(sigma: torch.Tensor, sigma_data: float, eps: float) -> tuple[torch.Tensor, ...]:
    """EDM's (c_skip, c_out, c_in, c_noise) with c_skip/c_out shifted by ``eps`` so that D(x, eps) = x.

    c_skip = sd^2 / ((sigma - eps)^2 + sd^2), c_out = (sigma - eps) sd / sqrt(sigma^2 + sd^2) (the consistency-
    model boundary form); c_in = 1 / sqrt(sigma^2 + sd^2) and c_noise = ln(sigma) / 4 are EDM's. eps = 0 is EDM.
    """
    total = sigma**2 + sigma_data**2
    shifted = sigma - eps
    c_skip = sigma_data**2 / (shifted**2 + sigma_data**2)
    c_out = shifted * sigma_data / total.sqrt()
    return c_skip, c_out, 1 / total.sqrt(), sigma.log() / 4


def shifted_edm_denoise(
    net: nn.Module, x: torch.Tensor, sigma, class_labels: torch.Tensor | None, sigma_data: float, eps: float, **net_kwargs
) -> torch.Tensor:
    """D(x, sigma) = c_skip x + c_out F(c_in x, c_noise) with the shifted coefficients; sigma a float or [batch].

    ``net_kwargs`` (e.g. ``guidance=w``) go to the network. A PreconditionedDenoiser's D is written in the same
    form, F = (D - c_skip x) / c_out with EDM's coefficients, so f = c_skip' x + (c_out' / c_out)(D - c_skip x):
    for an EDM-preconditioned network exactly the above, and f(x, eps) = x for any network.
    """
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).expand(x.shape[0])
    c_skip, c_out, c_in, c_noise = shifted_edm_coefficients(sigma, sigma_data, eps)
    shape = (-1,) + (1,) * (x.ndim - 1)
    if isinstance(net, PreconditionedDenoiser):
        edm_skip, edm_out, _, _ = edm_coefficients(sigma, sigma_data)
        ratio = (c_out / edm_out).view(shape)
        return c_skip.view(shape) * x + ratio * (net(x, sigma, class_labels, **net_kwargs).to(x.dtype) - edm_skip.view(shape) * x)
    f = net(c_in.view(shape) * x, c_noise, class_labels, **net_kwargs)
    return c_skip.view(shape) * x + c_out.view(shape) * f.to(x.dtype)


def denoiser_features(net: nn.Module, x: torch.Tensor, sigma, class_labels, sigma_data: float) -> list[torch.Tensor]:
    """The encoder features of a denoiser network at noisy input x and level sigma, the bottleneck last.

    fewstep's UNet/MLP run their encoder on c_in x; a PreconditionedDenoiser reports its own (one forward pass).
    """
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).expand(x.shape[0])
    if isinstance(net, PreconditionedDenoiser):
        return net.encoder_features(x, sigma, class_labels)
    _, _, c_in, c_noise = edm_coefficients(sigma, sigma_data)
    return net.encoder_features(c_in.view((-1,) + (1,) * (x.ndim - 1)).to(x.dtype) * x, c_noise, class_labels)
