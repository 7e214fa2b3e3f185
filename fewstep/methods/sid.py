"""SiD: Score identity Distillation (Zhou et al. 2024, arXiv 2404.04057) and its adversarial form SiDA (Zhou et al.
2025, arXiv 2410.14919)."""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from fewstep.errors import CheckpointError, ConfigError
from fewstep.methods.fake_score import FakeScoreDistillation, batch_view
from fewstep.processes.gaussian import edm_loss_weight
from fewstep.samplers.grids import nested_sigmas

ALPHA_RANGE = (0.0, 1.5)


def denoising_normaliser(x0: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """mean |x0 - D_real| per sample, over its coordinates, detached (DMD's and SiD's normaliser), shaped like x0."""
    with torch.no_grad():
        return batch_view(((x0 - real).abs().flatten(1).mean(1)).clamp(min=1e-5), x0)


def score_identity_loss(x0: torch.Tensor, real: torch.Tensor, fake: torch.Tensor, alpha: float) -> torch.Tensor:
    """SiD's generator loss, (D_real - D_fake) . ((D_real - x0) - alpha (D_real - D_fake)) / mean|x0 - D_real|
    (mean over the batch and coordinates) = (1 - alpha) |D_real - D_fake|^2 + (D_real - D_fake) . (D_fake - x0),
    normalised; its gradient flows through x0 and, at x_t = x0 + sigma n, through both denoisers' predictions."""
    difference = real - fake
    return (difference * ((real - x0) - alpha * difference) / denoising_normaliser(x0, real)).mean()


class SiD(FakeScoreDistillation):
    """SiD (Zhou et al. 2024): a one-step generator G(z) = D_theta(sigma_init z, sigma_init), started from the teacher,
    trained with ``score_identity_loss`` at x_t = G(z) + sigma n against the frozen teacher and the fake denoiser,
    which is updated once per generator step (``critic_steps``) by denoising score matching on G's samples.
    ``alpha`` weights the two terms (the paper's 1.2); the generator loss's noise levels are the paper's t ~ U[0,
    tmax/1000], tmax = 800, on the Karras warp from sigma_min (``dm_range`` [0.2, 1]).
    """

    critic_name = "fake score"

    def __init__(self, *args, alpha: float = 1.2, sigma_init: float = 2.5, gan_weight: float = 0.0,
                 critic_gan_weight: float = 0.0, critic_steps: int = 1, dm_range=(0.2, 1.0), **kwargs):
        super().__init__(*args, gan_weight=gan_weight, critic_gan_weight=critic_gan_weight, critic_steps=critic_steps,
                         dm_range=dm_range, **kwargs)
        self.save_hyperparameters("alpha", "sigma_init")
        low, high = ALPHA_RANGE
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and low <= alpha <= high):
            raise ConfigError(f"method.alpha={alpha}: use {low} <= alpha <= {high} (SiD's default is 1.2)")
        if not 0 < sigma_init <= self.hparams.sigma_max:
            raise ConfigError(f"method.sigma_init={sigma_init}: the generator's input noise level must be in (0, "
                              f"sigma_max = {self.hparams.sigma_max}] (SiD's default is 2.5)")

    @property
    def student_sigmas(self) -> torch.Tensor:
        """The generator's grid: from its input noise level sigma_init (one step: [sigma_init, 0])."""
        hp = self.hparams
        return nested_sigmas(hp.student_steps, hp.sigma_min, hp.sigma_init, hp.rho).float().to(self.device)

    def sampler_defaults(self) -> dict:
        return {**super().sampler_defaults(), "sigma_max": float(self.hparams.sigma_init)}

    def generator_loss(self, fake: torch.Tensor, class_labels, rng):
        noisy, sigma = self.noised(fake, rng)
        real = self.teacher_prediction(noisy, sigma, class_labels)
        out = {"dm": score_identity_loss(fake, real, self.fake_denoiser(noisy, sigma, class_labels), self.hparams.alpha)}
        out["loss"] = out["dm"]
        if self.gan_term_on(fake):
            out["gan"] = self.adversarial_loss(fake, noisy, sigma, real, class_labels)
            out["loss"] = out["loss"] + self.hparams.gan_weight * out["gan"]
        return out

    def adversarial_loss(self, fake, noisy, sigma, real, class_labels) -> torch.Tensor:
        raise NotImplementedError  # SiDA's


class SiDA(SiD):
    """SiDA (Zhou et al. 2025): SiD plus an adversarial term, the fake denoiser's encoder (with the GAN head) the
    discriminator. The generator adds ``gan_weight`` times the non-saturating loss of its noised samples, averaged
    over the batch and then weighted per sample by SiD's normaliser (the batch-averaged "fakeness" joins every
    sample's loss); the fake denoiser adds ``critic_gan_weight`` times the discriminator's loss on real and generated
    images noised with its own denoising loss's sigma and noise, weighted by EDM's lambda(sigma) and divided by the
    coordinates of an image (the authors' code sums the denoising loss over coordinates, the discriminator's not), so
    that both weights are the authors' (gan_weight = 0.01 / 100, critic_gan_weight = 1) at any image size; alpha 1,
    theirs for SiDA. ``sid_ckpt`` starts the generator from a trained SiD run.
    """

    critic_name = "fake score and discriminator"

    def __init__(self, *args, alpha: float = 1.0, gan_weight: float = 1e-4, critic_gan_weight: float = 1.0,
                 sid_ckpt: str | None = None, **kwargs):
        super().__init__(*args, alpha=alpha, gan_weight=gan_weight, critic_gan_weight=critic_gan_weight, **kwargs)
        self.save_hyperparameters("sid_ckpt")
        if not (gan_weight > 0 and critic_gan_weight > 0):
            raise ConfigError("sida needs its adversarial term: method.gan_weight and method.critic_gan_weight must be "
                              "> 0 (for SiD without it use method=sid)")

    def generator_start(self) -> str | None:
        return self.hparams.sid_ckpt

    def start_generator(self, sid, path) -> None:
        """Start the generator from ``sid``, the SiD run read from ``path`` (its EMA weights)."""
        if type(sid) is not SiD:
            raise CheckpointError(f"method.sid_ckpt='{path}' holds a {type(sid).__name__} model, not a method=sid run's: "
                                  "give a SiD checkpoint or leave sid_ckpt null")
        hp = self.hparams
        if (sid.hparams.net != hp.net or list(sid.hparams.data_shape) != list(hp.data_shape)
                or sid.num_classes != self.num_classes or sid.hparams.sigma_init != hp.sigma_init):
            raise CheckpointError(f"method.sid_ckpt='{path}' has another network, data shape, class count or sigma_init "
                                  "than this run: use the SiD run's model, data and method.sigma_init")
        self.net.load_state_dict(sid.net.state_dict())

    def adversarial_loss(self, fake, noisy, sigma, real, class_labels) -> torch.Tensor:
        """mean_i softplus(-D(x_t,i)) * mean_i 1 / mean|x0_i - D_real,i| over the global batch: SiDA's batch-averaged
        adversarial loss, weighted by each sample's normaliser, written so that DDP ranks sum to one process."""
        logits = self.gan_logits(noisy, sigma, class_labels).clamp(-10, 10)
        inverse = 1 / denoising_normaliser(fake, real).flatten()
        return F.softplus(-logits).mean() * self.global_mean(inverse)

    def discriminator_loss(self, fake, x_real, class_labels, rng, sigma, noise) -> torch.Tensor:
        """(BCE(D(x_real + sigma n), 1) + BCE(D(G + sigma n), 0)) / 2, batch means, times the batch mean of
        lambda(sigma), per coordinate of an image: the denoising loss's sigma and noise for both."""
        shaped = batch_view(sigma, fake)
        logits_fake = self.gan_logits(fake + shaped * noise, sigma, class_labels)
        logits_real = self.gan_logits(x_real + shaped * noise, sigma, class_labels)
        bce = (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean()) / 2
        return bce * self.global_mean(edm_loss_weight(sigma, self.hparams.sigma_data)) / fake[0].numel()


__all__ = ["SiD", "SiDA", "score_identity_loss"]
