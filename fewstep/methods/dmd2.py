"""DMD2: improved distribution matching distillation (Yin et al. 2024, arXiv 2405.14867)."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from fewstep.methods.fake_score import FakeScoreDistillation
from fewstep.methods.gan import generator_loss as gan_generator_loss


def distribution_matching_grad(x0: torch.Tensor, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """DMD's gradient ((x - D_real) - (x - D_fake)) / mean|x - D_real| = (D_fake - D_real) / mean|x0 - D_real|.

    ``x0`` is the generator's output, ``real``/``fake`` the two denoisers' predictions at its noised version;
    the normaliser is per sample, over all its coordinates.
    """
    normaliser = (x0 - real).abs().flatten(1).mean(1).clamp(min=1e-8).view((-1,) + (1,) * (x0.ndim - 1))
    return (fake - real) / normaliser


def distribution_matching_loss(x0: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """L_DM = 0.5 |x - sg(x - grad)|^2 (mean), whose gradient in x is ``grad``."""
    return 0.5 * F.mse_loss(x0, (x0 - grad).detach())


class DMD2(FakeScoreDistillation):
    """DMD2 (Yin et al. 2024): a 1- or K-step generator, started from the teacher, trained by distribution matching
    against the frozen teacher (the real score) and the fake denoiser (``fewstep.methods.fake_score``), with the GAN
    head on the fake denoiser (``gan_weight``); no regression loss.
    """

    def generator_loss(self, fake: torch.Tensor, class_labels, rng):
        """L_DM at sigma(u), plus gan_weight * softplus(-D(G)) on the fake denoiser's head."""
        noisy, sigma = self.noised(fake, rng)
        with torch.no_grad():
            real = self.teacher_denoise(noisy, sigma, class_labels)
            fake_x0 = self.fake_denoiser(noisy, sigma, class_labels)
            grad = torch.nan_to_num(distribution_matching_grad(fake, real, fake_x0))
        out = {"dm": distribution_matching_loss(fake, grad)}
        out["loss"] = out["dm"]
        if self.gan_term_on(fake):  # in training the head is frozen here (adversarial_step)
            out["gan"] = gan_generator_loss(self.gan_logits(noisy, sigma, class_labels), "nonsaturating")
            out["loss"] = out["loss"] + self.hparams.gan_weight * out["gan"]
        return out
