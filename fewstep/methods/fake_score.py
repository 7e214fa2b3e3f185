"""The fake-score engine of the distribution-matching distillers (DMD2, SiD, SiDA, f-distill), written once.

Each of them holds three denoisers: the generator G (started from the teacher), the frozen teacher D_real, and a
fake denoiser D_fake (also started from the teacher) that tracks the law of G's samples by denoising score matching
on them, detached. Training alternates ``critic_steps`` fake-denoiser updates with one generator update; an optional
GAN head on D_fake's bottleneck features (``fewstep.methods.gan``) makes it a discriminator too. A method subclasses
``FakeScoreDistillation`` and writes its ``generator_loss``: what it does with the generator's noised samples
(``noised``) and the two denoisers' predictions there.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fewstep.errors import ConfigError
from fewstep.methods.base import plain
from fewstep.methods.gan import AdversarialTraining
from fewstep.methods.gan import discriminator_loss as gan_discriminator_loss
from fewstep.methods.noise import BatchNoise
from fewstep.methods.student import DistilledStudent
from fewstep.networks.discriminators import Head
from fewstep.networks.preconditioning import denoiser_features, edm_denoise
from fewstep.processes.gaussian import edm_loss_weight, edm_training_sigmas
from fewstep.samplers.grids import karras_warp

Losses = dict[str, torch.Tensor]


def batch_view(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-sample tensor shaped to broadcast over the batch ``like``."""
    return sigma.view((-1,) + (1,) * (like.ndim - 1))


class FakeScoreDistillation(AdversarialTraining, DistilledStudent):
    """A generator distilled against the frozen teacher and a fake denoiser trained on the generator's samples.

    Options shared by every method on the engine: ``student_steps`` (K > 1: the generator trains on its own backward
    simulation and samples with ``consistency``), ``critic_steps`` (fake-denoiser updates per generator update),
    ``gan_weight`` / ``critic_gan_weight`` (the GAN head's weight in the generator's and the fake denoiser's loss; both
    0: no head), ``dm_range`` (the generator loss's noise levels sigma(u), u ~ U[dm_range] on the Karras warp from
    sigma_max to sigma_min), ``p_mean`` / ``p_std`` (the fake denoiser's EDM noise levels), ``optimizer_critic``; and a
    schedule (SiDA's authors'): ``hold_images`` (the generator's weights held while the fake denoiser warms up on this
    many images), ``gan_start_images`` (the generator's GAN term from this many images on) and ``critic_clip`` (the
    fake denoiser's and the head's gradient values clipped to [-c, c]); images counted over this run's global batch.
    """

    student_sampler = "consistency"
    adam = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 5e-5, "betas": [0.0, 0.99]}
    optimizer_keys = ("optimizer", "optimizer_critic")
    critic_name = "critic"  # how logs and errors call the fake denoiser

    def __init__(
        self, *args, student_steps: int = 1, critic_steps: int = 5, gan_weight: float = 3e-3, critic_gan_weight: float = 1e-2,
        dm_range: tuple[float, float] = (0.02, 0.98), p_mean: float = -1.2, p_std: float = 1.2,
        optimizer_critic: dict | None = None, head_channels: int = 64, hold_images: int = 0, gan_start_images: int = 0,
        critic_clip: float | None = None, **kwargs,
    ):
        super().__init__(*args, **kwargs)
        optimizer_critic = plain(optimizer_critic)
        self.save_hyperparameters(
            "student_steps", "critic_steps", "gan_weight", "critic_gan_weight", "dm_range", "p_mean", "p_std",
            "optimizer_critic", "head_channels", "hold_images", "gan_start_images", "critic_clip",
        )
        if min(hold_images, gan_start_images) < 0 or (critic_clip is not None and not critic_clip > 0):
            raise ConfigError(f"method.hold_images={hold_images}, gan_start_images={gan_start_images}, critic_clip="
                              f"{critic_clip}: need images >= 0 and a clip value > 0 (or null for none)")
        if int(student_steps) != student_steps or student_steps < 1:
            raise ConfigError(f"method.student_steps={student_steps}: use an integer >= 1")
        if int(critic_steps) != critic_steps or critic_steps < 1:
            raise ConfigError(f"method.critic_steps={critic_steps}: use an integer >= 1 (DMD2 uses 5, SiD 1)")
        if gan_weight < 0 or critic_gan_weight < 0:
            raise ConfigError("method.gan_weight and method.critic_gan_weight must be >= 0 (0 turns the GAN head off)")
        lo, hi = (float(u) for u in dm_range)
        if not 0 <= lo < hi <= 1:
            raise ConfigError(f"method.dm_range={list(dm_range)}: need 0 <= low < high <= 1 (fractions of the noise range)")
        self.fake_net = copy.deepcopy(self.net)  # restarted from the teacher in teacher_attached
        self.gan = gan_weight > 0 or critic_gan_weight > 0
        if self.gan:
            with torch.no_grad():
                features = self.critic_features(torch.zeros(1, *self.hparams.data_shape), torch.ones(1), None)
            self.head = Head(features.shape[1], head_channels, self.num_classes, spatial=features.ndim == 4)

    def teacher_attached(self, teacher) -> None:
        self.fake_net.load_state_dict(teacher.net.state_dict(), strict=False)

    @property
    def teacher_steps(self) -> int:
        """The teacher's rollout grid: the smallest multiple of the student's steps from 32 up (it contains theirs)."""
        steps = self.hparams.student_steps
        return steps * -(-32 // steps)

    # -- the two other denoisers ------------------------------------------------------------------------------
    def fake_denoiser(self, x, sigma, class_labels=None):
        return edm_denoise(self.fake_net, x, sigma, class_labels, self.hparams.sigma_data)

    def critic_features(self, x_noisy, sigma, class_labels):
        """The fake denoiser's bottleneck features at x_noisy (noise level ``sigma``), for the GAN head."""
        return denoiser_features(self.fake_net, x_noisy, sigma, class_labels, self.hparams.sigma_data)[-1]

    def gan_logits(self, x_noisy, sigma, class_labels):
        return self.head(self.critic_features(x_noisy, sigma, class_labels), class_labels)

    def critic_modules(self) -> list[nn.Module]:
        """The fake denoiser's modules (its network and, with ``gan``, the GAN head): frozen for the generator's loss."""
        return [self.fake_net, self.head] if self.gan else [self.fake_net]

    # -- the generator's states and samples -------------------------------------------------------------------
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

    def dm_sigmas(self, rng: BatchNoise) -> torch.Tensor:
        """sigma(u), u ~ U[dm_range] on the Karras warp from sigma_max to sigma_min, one per sample."""
        hp = self.hparams
        lo, hi = (float(u) for u in hp.dm_range)
        return karras_warp(lo + (hi - lo) * rng.rand(), hp.sigma_min, hp.sigma_max, hp.rho)

    def noised(self, x0: torch.Tensor, rng: BatchNoise) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0 + sigma n, sigma) at the generator loss's noise levels (``dm_sigmas``)."""
        sigma = self.dm_sigmas(rng)
        return x0 + batch_view(sigma, x0) * rng.randn_like(x0), sigma

    def global_mean(self, values: torch.Tensor) -> torch.Tensor:
        """The mean over the global batch of per-sample values (detached), the same on every rank."""
        values = values.detach()
        if self._trainer is None or self.trainer.world_size == 1:
            return values.mean()
        return self.all_gather(values).mean()

    def images_seen(self, batch: torch.Tensor) -> int:
        """Training images seen before this step, over the global batch (0 outside a fit)."""
        if self._trainer is None:
            return 0
        return self.global_step * batch.shape[0] * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def gan_term_on(self, batch: torch.Tensor) -> bool:
        """Whether the generator's loss takes the GAN head's term at this step (``gan_weight`` > 0, from
        ``gan_start_images`` on)."""
        return self.gan and self.hparams.gan_weight > 0 and self.images_seen(batch) >= self.hparams.get("gan_start_images", 0)

    # -- the fake denoiser's loss -----------------------------------------------------------------------------
    def critic_loss(self, fake: torch.Tensor, x_real: torch.Tensor, class_labels, rng: BatchNoise) -> Losses:
        """Denoising score matching of the fake denoiser on the generator's samples (EDM's noise levels and
        weighting) [+ critic_gan_weight times the GAN head's loss]."""
        hp = self.hparams
        sigma = rng.draw(lambda total, generator: edm_training_sigmas(total, hp.p_mean, hp.p_std, generator, fake.device))
        noise = rng.randn_like(fake)
        noisy = fake + batch_view(sigma, fake) * noise
        weight = batch_view(edm_loss_weight(sigma, hp.sigma_data), fake)
        out = {"denoise": (weight * (self.fake_denoiser(noisy, sigma, class_labels) - fake) ** 2).mean()}
        out["loss"] = out["denoise"]
        if self.gan and hp.critic_gan_weight > 0:
            out["gan"] = self.discriminator_loss(fake, x_real, class_labels, rng, sigma, noise)
            out["loss"] = out["loss"] + hp.critic_gan_weight * out["gan"]
        return out

    def discriminator_loss(self, fake, x_real, class_labels, rng: BatchNoise, sigma, noise) -> torch.Tensor:
        """The GAN head's non-saturating loss, real data against generator samples, each noised anew at ``dm_sigmas``
        (DMD2's; ``sigma`` and ``noise`` are the denoising loss's, for methods that reuse them)."""
        sigma = self.dm_sigmas(rng)
        logits_fake = self.gan_logits(fake + batch_view(sigma, fake) * rng.randn_like(fake), sigma, class_labels)
        logits_real = self.gan_logits(x_real + batch_view(sigma, x_real) * rng.randn_like(x_real), sigma, class_labels)
        return gan_discriminator_loss(logits_real, logits_fake, "nonsaturating")

    # -- the generator's loss ---------------------------------------------------------------------------------
    def generator_loss(self, fake: torch.Tensor, class_labels, rng: BatchNoise) -> Losses:
        """The method's generator loss at the generator's samples ``fake`` (with gradient); ``loss`` is optimised and
        ``dm`` is the distillation term that validation reports."""
        raise NotImplementedError

    # -- Lightning --------------------------------------------------------------------------------------------
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

        hp = self.hparams
        g, c = self.adversarial_step(generator_step, critic_step, steps=hp.critic_steps, names=("generator", self.critic_name),
                                     clip_value=hp.get("critic_clip"),
                                     hold_generator=self.images_seen(x_real) < hp.get("hold_images", 0))
        self.log("train/loss", g["loss"].detach(), prog_bar=True)
        self.log("train/loss_critic", c["denoise"].detach(), prog_bar=True)
        for key, value in g.items():
            if key != "loss":
                self.log(f"train/loss_{'gan_g' if key == 'gan' else key}", value.detach())
        if "gan" in c:
            self.log("train/loss_gan_critic", c["gan"].detach())

    def state_loss(self, x, k, class_labels, rng):
        """Validation: the generator's distillation term at these states."""
        fake = self.student_x0(x, self.state_sigmas[k], class_labels)
        return self.generator_loss(fake, class_labels, rng)["dm"].detach()


__all__ = ["FakeScoreDistillation", "batch_view"]
