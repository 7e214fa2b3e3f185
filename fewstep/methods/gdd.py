"""GDD: a diffusion model is an innate one-step generator (Zheng & Yang, arXiv 2405.20750; revised as D2O).

The generator is the teacher's own denoiser taken in one step from sigma_max,
G(z) = D_theta(sigma_max z; sigma_max), z ~ N(0, I), initialised from the teacher's weights, and
trained only by a GAN loss against real data (the "exclusive distributional loss": no teacher
regression target). GDD-I (``freeze``) keeps most convolutions frozen at the teacher's weights.
"""

from __future__ import annotations

import torch
from lightning.pytorch.utilities import rank_zero_info

from fewstep.errors import ConfigError
from fewstep.methods.base import DenoiserMethod, plain
from fewstep.methods.gan import LOSSES, AdversarialTraining, LazyR1, discriminator_loss, generator_loss
from fewstep.methods.noise import BatchNoise
from fewstep.methods.teacher import TaughtMethod
from fewstep.networks.discriminators import build_discriminator
from fewstep.networks.freezing import freeze as freeze_layers
from fewstep.networks.preconditioning import shifted_edm_denoise
from fewstep.samplers import check_solver


def moment_gap(fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Mean over coordinates of (mean_fake - mean_real)^2 + (std_fake - std_real)^2, moments over the batch."""
    mean = (fake.mean(0) - real.mean(0)).square().mean()
    std = (fake.std(0, correction=0) - real.std(0, correction=0)).square().mean()
    return mean + std


class GDD(AdversarialTraining, TaughtMethod, DenoiserMethod):
    """GDD (Zheng & Yang 2024): the one-step generator G(z) = D_theta(sigma_max z; sigma_max), started from an
    EDM-space teacher and trained only by a GAN against real data, with lazy R1 on the reals; GDD-I (``freeze``)
    keeps most of its layers at the teacher's weights. The discriminator: ``fewstep.networks.discriminators``
    (by default the frozen teacher's encoder with trainable heads). A checkpoint rebuilds it without the teacher.
    """

    sample_grid_nfe = 1  # the validation sample grid shows G(z), not the multi-step diagnostic
    teacher_kind = DenoiserMethod
    teacher_hparams = ("sigma_data",)
    keeps_teacher = False  # the generator starts from it; nothing else needs it
    adam = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-4, "betas": [0.0, 0.99]}

    def __init__(
        self, *args, sigma_max: float = 80.0, eps: float = 2e-3, sigma_data: float = 0.5, loss: str = "nonsaturating",
        r1_gamma: float = 1e-4, r1_interval: int = 16, freeze: dict | None = None, discriminator: dict | None = None,
        optimizer_g: dict | None = None, optimizer_d: dict | None = None, teacher_ckpt: str | None = None, **kwargs,
    ):
        super().__init__(*args, **kwargs)
        freeze = {"level": 0, "ratio": None, **(plain(freeze) or {})}
        discriminator = plain(discriminator) or {"kind": "teacher_encoder"}
        optimizer_g, optimizer_d = plain(optimizer_g), plain(optimizer_d)
        self.save_hyperparameters(
            "sigma_max", "eps", "sigma_data", "loss", "r1_gamma", "r1_interval", "freeze", "discriminator",
            "optimizer_g", "optimizer_d", "teacher_ckpt",
        )
        if loss not in LOSSES:
            raise ConfigError(f"unknown GAN loss '{loss}': choose one of {', '.join(LOSSES)}")
        if not 0 < eps < sigma_max:
            raise ConfigError(f"need 0 < eps < sigma_max, got eps={eps}, sigma_max={sigma_max}")
        if not r1_gamma >= 0 or int(r1_interval) != r1_interval or r1_interval < 1:
            raise ConfigError(f"r1_gamma={r1_gamma}, r1_interval={r1_interval}: use r1_gamma >= 0 and an integer r1_interval >= 1")
        unknown = sorted(set(freeze) - {"level", "ratio", "resampling"})
        if unknown:
            raise ConfigError(f"method.freeze takes level, ratio and resampling, not '{unknown[0]}'")
        self.frozen_fraction = freeze_layers(self.net, **freeze)
        if not self.generator_parameters():
            raise ConfigError("gdd: every generator parameter is frozen: lower method.freeze.level / method.freeze.ratio")
        self.discriminator = build_discriminator(
            discriminator, net=self.hparams.net, data_shape=self.hparams.data_shape, num_classes=self.num_classes,
            sigma_data=sigma_data,
        )

    # -- the teacher -----------------------------------------------------------------------------------
    def teacher_attached(self, teacher) -> None:
        """The generator starts from the teacher (TaughtMethod copies its weights); the discriminator's backbone too."""
        self.discriminator.initialize(teacher.net)

    def on_fit_start(self) -> None:
        super().on_fit_start()  # the teacher, unless resuming (TaughtMethod)
        rank_zero_info(
            f"gdd: GDD-I freeze {self.hparams.freeze}: {self.frozen_fraction:.1%} of the generator's parameters frozen"
        )

    # -- the generator -----------------------------------------------------------------------------------
    def denoiser(self, x, sigma, class_labels=None):
        hp = self.hparams
        return shifted_edm_denoise(self.net, x, sigma, class_labels, hp.sigma_data, hp.eps)

    def one_step(self, z: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """G(z) = D_theta(sigma_max z; sigma_max)."""
        sigma_max = float(self.hparams.sigma_max)
        return self.denoiser(sigma_max * z, sigma_max, class_labels)

    def sampler_defaults(self) -> dict:
        return {**super().sampler_defaults(), "sigma_max": float(self.hparams.sigma_max), "sigma_min": float(self.hparams.eps)}

    def draw(self, model, noise, sampler, nfe, grid, options) -> torch.Tensor:
        """nfe=1 (any diffusion sampler name): G(z) for the seeds' z, one network call. nfe>1: that sampler on the
        denoiser from sigma_max to eps, a diagnostic only (the GAN trains the network at sigma_max alone)."""
        check_solver(sampler, nfe, kac=False)
        if nfe > 1:
            return super().draw(model, noise, sampler, nfe, grid, options)
        z = noise.randn(tuple(self.hparams.data_shape))
        sigma_max = float(self.hparams.sigma_max)
        return model(sigma_max * z, torch.full((z.shape[0],), sigma_max, device=z.device))

    # -- training ----------------------------------------------------------------------------------------
    @property
    def r1(self) -> LazyR1:
        return LazyR1(self.hparams.r1_gamma, self.hparams.r1_interval)

    def r1_due(self, step: int) -> bool:
        """Whether the discriminator step at (0-based) ``step`` adds the lazy R1 penalty."""
        return self.r1.due(step)

    def discriminator_losses(self, x_real, fake, class_labels, apply_r1: bool) -> dict[str, torch.Tensor]:
        """{loss (L_D [+ r1_interval * R1]), d_real, d_fake[, r1]} for one discriminator step."""
        out = {}
        if apply_r1:
            logits_real, out["r1"] = self.r1.penalty(lambda x: self.discriminator(x, class_labels), x_real)
        else:
            logits_real = self.discriminator(x_real, class_labels)
        logits_fake = self.discriminator(fake.detach(), class_labels)
        out["loss_d"] = discriminator_loss(logits_real, logits_fake, self.hparams.loss)
        out["loss"] = self.r1.lazy(out["loss_d"], out.get("r1"))
        out["loss_d"] = out["loss_d"].detach()
        out["d_real"], out["d_fake"] = logits_real.detach().mean(), logits_fake.detach().mean()
        return out

    def training_step(self, batch, batch_idx):
        x_real, y = batch
        rng = self.step_rng(x_real.shape[0], x_real.device, batch_idx)
        labels = self.training_labels(y, rng)
        apply_r1 = self.r1_due(self.global_step)

        def discriminator_step():  # on G(z) detached and the reals
            with torch.no_grad():
                fake = self.one_step(rng.randn_like(x_real), labels)
            return self.discriminator_losses(x_real, fake, labels, apply_r1)

        def generator_step():
            fake = self.one_step(rng.randn_like(x_real), labels)
            return {"loss": generator_loss(self.discriminator(fake, labels), self.hparams.loss)}

        # one discriminator step (lazy R1 added every r1_interval-th step), then one generator step: one global step
        g, d = self.adversarial_step(generator_step, discriminator_step)
        self.log("train/loss_g", g["loss"].detach(), prog_bar=True)
        self.log("train/loss_d", d["loss_d"], prog_bar=True)
        self.log("train/d_real", d["d_real"])
        self.log("train/d_fake", d["d_fake"])
        if apply_r1:
            self.log("train/r1", d["r1"].detach())
        self.log("train/frozen_fraction", float(self.frozen_fraction))

    def validation_step(self, batch, batch_idx):
        # val/loss: the pixel-moment gap of G(z) (fixed z) to the reals, which does not depend on the discriminator and
        # so compares across steps and runs (crude: the SamplerBenchmark callback gives the FID)
        x_real, y = batch
        z = BatchNoise.fixed(batch_idx, x_real.shape[0], x_real.device).randn_like(x_real)
        labels = y if self.num_classes else None
        fake = self.one_step(z, labels)
        gap = moment_gap(fake, x_real)
        self.log("val/loss", gap, prog_bar=True, sync_dist=True)
        self.log("val/d_real", self.discriminator(x_real, labels).mean(), sync_dist=True)
        self.log("val/d_fake", self.discriminator(fake, labels).mean(), sync_dist=True)
        return gap

    def critic_modules(self) -> list:
        return [self.discriminator]  # EMAWeightAveraging averages it too; sampling uses only net

    def loss(self, x0, class_labels, rng):
        raise NotImplementedError("gdd trains by a GAN in training_step; it has no single regression loss")


__all__ = ["GDD", "moment_gap"]
