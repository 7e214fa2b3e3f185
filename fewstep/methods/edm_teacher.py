"""EDM teacher (Karras et al. 2022): denoiser regression with EDM preconditioning and loss weighting; optionally
EDM2's learned uncertainty weighting over noise levels (Karras et al. 2024)."""

from __future__ import annotations

import inspect

from fewstep.errors import ConfigError
from fewstep.methods.base import DenoiserMethod
from fewstep.processes.gaussian import edm_loss_weight, edm_training_sigmas, uncertainty_weighted_loss

LOSS_WEIGHTINGS = ("edm", "uncertainty")


class EDMTeacher(DenoiserMethod):
    """EDM (Karras et al. 2022): loss = lambda(sigma) |D(x0 + sigma n, sigma) - x0|^2, ln sigma ~ N(P_mean, P_std^2).

    ``loss_weighting``: ``edm``, that loss averaged over batch and coordinates; ``uncertainty``, EDM2's
    lambda(sigma) / exp(u(sigma)) |D - x0|^2 + u(sigma) with u from the network's log-variance head (EDM2's networks),
    summed over the coordinates and averaged over the batch as EDM2 does.
    """

    def __init__(self, *args, sigma_data: float = 0.5, p_mean: float = -1.2, p_std: float = 1.2,
                 loss_weighting: str = "edm", **kwargs):
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise ConfigError(f"method.loss_weighting={loss_weighting}: use one of {', '.join(LOSS_WEIGHTINGS)}")
        super().__init__(*args, **kwargs)
        self.save_hyperparameters("sigma_data", "p_mean", "p_std", "loss_weighting")
        if loss_weighting == "uncertainty" and "return_logvar" not in inspect.signature(self.net.forward).parameters:
            raise ConfigError(
                f"method.loss_weighting=uncertainty learns u(sigma) with the network's log-variance head, which "
                f"{type(self.net).__name__} has not: use one of EDM2's networks (model=edm2_img64_s|m|l|xl) or "
                f"method.loss_weighting=edm")

    def loss(self, x0, class_labels, rng):
        hp = self.hparams
        sigma = rng.draw(lambda total, g: edm_training_sigmas(total, hp.p_mean, hp.p_std, g, x0.device))
        noise = rng.randn_like(x0)
        shape = (-1,) + (1,) * (x0.ndim - 1)
        if hp.loss_weighting == "uncertainty":
            denoised, logvar = self.net(x0 + sigma.view(shape) * noise, sigma, class_labels, return_logvar=True)
            weight = edm_loss_weight(sigma, hp.sigma_data).view(shape)
            return uncertainty_weighted_loss(denoised, x0, weight, logvar.view(shape))
        denoised = self.denoiser(x0 + sigma.view(shape) * noise, sigma, class_labels)
        weight = edm_loss_weight(sigma, hp.sigma_data).view(shape)
        return (weight * (denoised - x0) ** 2).mean()
