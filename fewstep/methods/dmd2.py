"""DMD2: improved distribution matching distillation (Yin et al. 2024, arXiv 2405.14867)."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

from fewstep.errors import ConfigError
from fewstep.methods.base import plain
from fewstep.methods.gan import AdversarialTraining
from fewstep.methods.gan import discriminator_loss as gan_discriminator_loss
from fewstep.methods.gan import generator_loss as gan_generator_loss
from fewstep.methods.student import DistilledStudent
from fewstep.networks.discriminators import Head
from fewstep.networks.preconditioning import denoiser_features, edm_denoise
from fewstep.processes.gaussian import edm_loss_weight, edm_training_sigmas
from fewstep.samplers.grids import karras_warp


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


class DMD2(AdversarialTraining, DistilledStudent):
    """DMD2 (Yin et al. 2024): a 1- or K-step generator, started from the teacher, trained by distribution matching
    against the frozen teacher (the real score) and a fake-score critic that denoises the generator's outputs
    (``critic_steps`` updates per generator step), with an optional GAN head on the critic (``gan_weight``); no
    regression loss. A K-step generator trains on its own backward simulation and samples with ``consistency``.
    """

    student_sampler = "consistency"
    adam = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 5e-5, "betas": [0.0, 0.99]}
    optimizer_keys = ("optimizer", "optimizer_critic")

    def __init__(
        self, *args, student_steps: int = 1, critic_steps: int = 5, gan_weight: float = 3e-3, critic_gan_weight: float = 1e-2,
        dm_range: tuple[float, float] = (0.02, 0.98), p_mean: float = -1.2, p_std: float = 1.2,
        optimizer_critic: dict | None = None, head_channels: int = 64, **kwargs,
    ):
        super().__init__(*args, **kwargs)
        optimizer_critic = plain(optimizer_critic)
        self.save_hyperparameters(
            "student_steps", "critic_steps", "gan_weight", "critic_gan_weight", "dm_range", "p_mean", "p_std",
            "optimizer_critic", "head_channels",
        )
        if int(student_steps) != student_steps or student_steps < 1:
            raise ConfigError(f"method.student_steps={student_steps}: use an integer >= 1")
        if int(critic_steps) != critic_steps or critic_steps < 1:
            raise ConfigError(f"method.critic_steps={critic_steps}: use an integer >= 1 (DMD2 uses 5)")
        if gan_weight < 0 or critic_gan_weight < 0:
            raise ConfigError("method.gan_weight and method.critic_gan_weight must be >= 0 (0 turns the GAN head off)")
        lo, hi = (float(u) for u in dm_range)
        if not 0 <= lo < hi <= 1:
            raise ConfigError(f"method.dm_range={list(dm_range)}: need 0 <= low < high <= 1 (fractions of the noise range)")
        self.fake_net = copy.deepcopy(self.net)  # the fake-score critic, restarted from the teacher in attach_teacher
        self.gan = gan_weight > 0 or critic_gan_weight > 0
        if self.gan:
            with torch.no_grad():
                features = self.critic_features(torch.zeros(1, *self.hparams.data_shape), torch.ones(1), None)
            self.head = Head(features.shape[1], head_channels, self.num_classes, spatial=features.ndim == 4)

    def teacher_attached(self, teacher) -> None:
        self.fake_net.load_state_dict(teacher.net.state_dict(), strict=False)

    # -- grids ------------------------------------------------------------------------------------------------
    @property
    def teacher_steps(self) -> int:
        """The teacher's rollout grid: the smallest multiple of the student's steps from 32 up (it contains theirs)."""
        steps = self.hparams.student_steps
        return steps * -(-32 // steps)

    # -- networks ---------------------------------------------------------------------------------------------
    def fake_denoiser(self, x, sigma, class_labels=None):
        return edm_denoise(self.fake_net, x, sigma, class_labels, self.hparams.sigma_data)

    def critic_features(self, x_noisy, sigma, class_labels):
        """The critic's bottleneck features at x_noisy (noise level ``sigma``), for the GAN head."""
        return denoiser_features(self.fake_net, x_noisy, sigma, class_labels, self.hparams.sigma_data)[-1]

    def gan_logits(self, x_noisy, sigma, class_labels):
        return self.head(self.critic_features(x_noisy, sigma, class_labels), class_labels)

    # -- training states: backward simulation -----------------------------------------------------------------
    @torch.no_grad()
    def default_states(self, x0, class_labels, rng):
        """The generator's own backward simulation: from sigma_0 z, k steps of x0 = G(x), x = x0 + sigma_{i+1} z."""
        levels = self.state_sigmas
        n = x0.shape[0]
        k = rng.randint(len(levels))
        x = levels[0] * rng.randn_like(x0)
        states = x.clone()
        for i in range(1, len(levels)):  # every level, whatever this rank's k: each rank makes the same draws
            x = self.denoiser(x, levels[i - 1].expand(n), class_labels) + levels[i] * rng.randn_like(x0)
            states[k == i] = x[k == i]
        return states, k

    def dm_sigmas(self, rng) -> torch.Tensor:
        # sigma(u), u ~ U[dm_range] on the Karras warp from sigma_max to sigma_min: DMD2's t ~ U[0.02, 0.98] T
        hp = self.hparams
        lo, hi = (float(u) for u in hp.dm_range)
        return karras_warp(lo + (hi - lo) * rng.rand(), hp.sigma_min, hp.sigma_max, hp.rho)

    # -- losses -----------------------------------------------------------------------------------------------
    def critic_loss(self, fake: torch.Tensor, x_real: torch.Tensor, class_labels, rng) -> dict[str, torch.Tensor]:
        """Denoising loss of the fake score on generator outputs (EDM weighting) [+ the GAN head's loss]."""
        hp = self.hparams
        shape = (-1,) + (1,) * (fake.ndim - 1)
        sigma = rng.draw(lambda total, generator: edm_training_sigmas(total, hp.p_mean, hp.p_std, generator, fake.device))
        noisy = fake + sigma.view(shape) * rng.randn_like(fake)
        weight = edm_loss_weight(sigma, hp.sigma_data).view(shape)
        out = {"denoise": (weight * (self.fake_denoiser(noisy, sigma, class_labels) - fake) ** 2).mean()}
        out["loss"] = out["denoise"]
        if self.gan and hp.critic_gan_weight > 0:
            sigma = self.dm_sigmas(rng)
            logits_fake = self.gan_logits(fake + sigma.view(shape) * rng.randn_like(fake), sigma, class_labels)
            logits_real = self.gan_logits(x_real + sigma.view(shape) * rng.randn_like(x_real), sigma, class_labels)
            out["gan"] = gan_discriminator_loss(logits_real, logits_fake, "nonsaturating")
            out["loss"] = out["loss"] + hp.critic_gan_weight * out["gan"]
        return out

    def generator_loss(self, fake: torch.Tensor, class_labels, rng) -> dict[str, torch.Tensor]:
        """L_DM at sigma(u), plus gan_weight * softplus(-D(G)) on the critic's head."""
        hp = self.hparams
        shape = (-1,) + (1,) * (fake.ndim - 1)
        sigma = self.dm_sigmas(rng)
        noisy = fake + sigma.view(shape) * rng.randn_like(fake)
        with torch.no_grad():
            real = self.teacher_denoise(noisy, sigma, class_labels)
            fake_x0 = self.fake_denoiser(noisy, sigma, class_labels)
            grad = torch.nan_to_num(distribution_matching_grad(fake, real, fake_x0))
        out = {"dm": distribution_matching_loss(fake, grad)}
        out["loss"] = out["dm"]
        if self.gan and hp.gan_weight > 0:  # in training the critic is frozen here (adversarial_step)
            out["gan"] = gan_generator_loss(self.gan_logits(noisy, sigma, class_labels), "nonsaturating")
            out["loss"] = out["loss"] + hp.gan_weight * out["gan"]
        return out

    def critic_modules(self) -> list[nn.Module]:
        """The fake-score critic's modules: its network and, with ``gan``, the GAN head."""
        return [self.fake_net, self.head] if self.gan else [self.fake_net]

    def training_step(self, batch, batch_idx):
        x_real, y = batch
        rng = self.step_rng(x_real.shape[0], x_real.device, batch_idx)
        labels = self.training_labels(y, rng)
        x, k, labels = self.training_states(x_real, labels, rng)
        sigma = self.state_sigmas[k]

        def critic_step():
            with torch.no_grad():
                fake = self.student_x0(x, sigma, labels)
            return self.critic_loss(fake, x_real, labels, rng)

        def generator_step():
            return self.generator_loss(self.student_x0(x, sigma, labels), labels, rng)

        g, c = self.adversarial_step(generator_step, critic_step, steps=self.hparams.critic_steps, names=("generator", "critic"))
        self.log("train/loss", g["loss"].detach(), prog_bar=True)
        self.log("train/loss_dm", g["dm"].detach())
        self.log("train/loss_critic", c["denoise"].detach(), prog_bar=True)
        if "gan" in g:
            self.log("train/loss_gan_g", g["gan"].detach())
        if "gan" in c:
            self.log("train/loss_gan_critic", c["gan"].detach())

    def state_loss(self, x, k, class_labels, rng):
        """Validation: the distribution-matching loss of the generator's outputs at these states."""
        fake = self.student_x0(x, self.state_sigmas[k], class_labels)
        return self.generator_loss(fake, class_labels, rng)["dm"].detach()
