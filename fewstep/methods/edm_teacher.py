"""EDM teacher (Karras et al. 2022): denoiser regression with EDM preconditioning and loss weighting."""

from __future__ import annotations

from fewstep.methods.base import DenoiserMethod
from fewstep.processes.gaussian import edm_loss_weight, edm_training_sigmas


class EDMTeacher(DenoiserMethod):
    """EDM (Karras et al. 2022): loss = lambda(sigma) |D(x0 + sigma n, sigma) - x0|^2, ln sigma ~ N(P_mean, P_std^2)."""

    def __init__(self, *args, sigma_data: float = 0.5, p_mean: float = -1.2, p_std: float = 1.2, **kwargs):
        super().__init__(*args, **kwargs)
        self.save_hyperparameters("sigma_data", "p_mean", "p_std")

    def loss(self, x0, class_labels, rng):
        hp = self.hparams
        sigma = rng.draw(lambda total, g: edm_training_sigmas(total, hp.p_mean, hp.p_std, g, x0.device))
        noise = rng.randn_like(x0)
        shape = (-1,) + (1,) * (x0.ndim - 1)
        denoised = self.denoiser(x0 + sigma.view(shape) * noise, sigma, class_labels)
        weight = edm_loss_weight(sigma, hp.sigma_data).view(shape)
        return (weight * (denoised - x0) ** 2).mean()
