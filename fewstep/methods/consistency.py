"""Consistency distillation in the latent-consistency (LCM) form (Song et al. 2023; Luo et al. 2023, arXiv 2310.04378)."""

from __future__ import annotations

import copy

import torch

from fewstep.errors import ConfigError
from fewstep.methods.student import DistilledStudent, ddim_step
from fewstep.networks.lpips_loss import check_options
from fewstep.networks.preconditioning import shifted_edm_denoise

LOSSES = ("l2", "huber", "lpips")


def consistency_distance(
    a: torch.Tensor, b: torch.Tensor, kind: str = "l2", c: float | None = None, lpips=None
) -> torch.Tensor:
    """Per-sample distance: mean squared error (l2), pseudo-Huber sqrt(|a - b|^2 + c^2) - c (Song & Dhariwal 2023),
    c = 0.00054 sqrt(d) by default, or LPIPS (the consistency-models paper's; ``lpips`` a
    ``fewstep.networks.lpips_loss.LPIPSLoss``)."""
    if kind == "lpips":
        if lpips is None:
            raise ConfigError("consistency_distance(kind='lpips') needs the LPIPS network: pass lpips=LPIPSLoss(...)")
        return lpips(a, b)
    diff = (a - b).flatten(1)
    if kind == "l2":
        return diff.square().mean(1)
    c = 0.00054 * diff.shape[1] ** 0.5 if c is None else c
    return (diff.square().sum(1) + c**2).sqrt() - c


class Consistency(DistilledStudent):
    """Consistency distillation (Song et al. 2023; LCM, Luo et al. 2023): f(x, sigma) = c_skip x + c_out F with
    c_skip/c_out shifted so that f(x, eps) = x (eps = sigma_min).

    The teacher's grid is the nested Karras grid of ``teacher_steps`` levels, its last one eps. A state x_i at
    level sigma_i is moved ``skip`` levels down by one teacher DDIM step (guided with w ~ U[w_min, w_max] per
    sample when conditional; w is fed to the student through a guidance embedding); the loss is
    d(f(x_i, sigma_i, w), f^-(x^_j, sigma_j, w)), f^- the EMA target network (decay ``target_decay``), and at
    the last level f^-(x, eps) = x. Multistep consistency sampling (sampler ``consistency``) at
    ``sample_steps`` steps (the nested grid, which lies inside the teacher's) gives the student's rollouts.
    """

    student_sampler = "consistency"

    def __init__(
        self, *args, teacher_steps: int = 32, skip: int = 2, sample_steps: int = 4, loss: str = "l2",
        huber_c: float | None = None, target_decay: float = 0.95, guidance_range: tuple[float, float] = (0.0, 0.0),
        lpips_net: str = "vgg", lpips_backbone: str | None = None, lpips_resize: int | None = 224,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.save_hyperparameters("teacher_steps", "skip", "sample_steps", "loss", "huber_c", "target_decay", "guidance_range")
        self.save_hyperparameters("lpips_net", "lpips_backbone", "lpips_resize")
        if loss not in LOSSES:
            raise ConfigError(f"unknown consistency loss '{loss}': choose one of {', '.join(LOSSES)}")
        if loss == "lpips":
            check_options(lpips_net, lpips_resize, self.hparams.data_shape)
        if not 1 <= skip < teacher_steps:
            raise ConfigError(f"method.skip={skip}: skip 1 .. teacher_steps - 1 ({teacher_steps - 1}) levels")
        if sample_steps < 1 or teacher_steps % sample_steps:
            raise ConfigError(
                f"method.sample_steps={sample_steps} must divide method.teacher_steps={teacher_steps}, so the student's "
                "grid lies inside the teacher's"
            )
        if not 0 <= target_decay < 1:
            raise ConfigError(f"method.target_decay={target_decay}: use a value in [0, 1)")
        w_min, w_max = (float(w) for w in guidance_range)
        if not 0 <= w_min <= w_max:
            raise ConfigError(f"method.guidance_range={list(guidance_range)}: need 0 <= w_min <= w_max")
        self.guided = bool(self.num_classes) and w_max > 0
        if self.guided:
            if not hasattr(getattr(self.net, "embed", None), "enable_guidance"):
                raise ConfigError(
                    f"method.guidance_range={list(guidance_range)} feeds w to the student through a guidance embedding, "
                    f"which fewstep's unet/mlp models have and a {type(self.net).__name__} has not: set "
                    "method.guidance_range=[0,0] and method.guidance=W (one guidance scale) for this network"
                )
            self.net.embed.enable_guidance()
        self.target_net = copy.deepcopy(self.net).requires_grad_(False)

    def teacher_attached(self, teacher) -> None:
        self.target_net.load_state_dict(self.net.state_dict())

    # -- grids ------------------------------------------------------------------------------------------------
    @property
    def teacher_steps(self) -> int:
        return self.hparams.teacher_steps

    @property
    def levels(self) -> torch.Tensor:
        """The teacher's levels sigma_0 > ... > sigma_N = eps."""
        sigmas = self.grid(self.hparams.teacher_steps).clone()
        sigmas[-1] = self.hparams.sigma_min
        return sigmas

    @property
    def state_sigmas(self) -> torch.Tensor:
        return self.levels[:-1]

    @property
    def student_sigmas(self) -> torch.Tensor:
        return self.grid(self.hparams.sample_steps)

    # -- the consistency function -----------------------------------------------------------------------------
    def consistency_fn(self, net, x, sigma, class_labels=None, w=None):
        hp = self.hparams
        kwargs = {"guidance": torch.zeros(x.shape[0], device=x.device) if w is None else w} if self.guided else {}
        return shifted_edm_denoise(net, x, sigma, class_labels, hp.sigma_data, hp.sigma_min, **kwargs)

    def denoiser(self, x, sigma, class_labels=None, w=None):
        return self.consistency_fn(self.net, x, sigma, class_labels, w)

    def sampling_model(self, class_labels, guidance: float, guide=None, interval=None):
        """A guided student takes the guidance scale w through its embedding: one call per step, no unconditional one."""
        if not self.guided or class_labels is None or guide is not None or interval is not None:
            return super().sampling_model(class_labels, guidance, guide, interval)
        w = torch.full((class_labels.shape[0],), float(guidance), device=class_labels.device)
        return lambda x, sigma: self.denoiser(x, sigma, class_labels, w)

    # -- training ---------------------------------------------------------------------------------------------
    def state_loss(self, x, k, class_labels, rng):
        hp = self.hparams
        levels = self.levels
        j = (k + hp.skip).clamp(max=len(levels) - 1)
        sigma_i, sigma_j = levels[k], levels[j]
        w = None
        if self.guided:
            w_min, w_max = (float(v) for v in hp.guidance_range)
            w = w_min + (w_max - w_min) * rng.rand()
        with torch.no_grad():
            x_j = ddim_step(x, self.teacher_denoise(x, sigma_i, class_labels, w), sigma_i, sigma_j)
            target = self.consistency_fn(self.target_net, x_j, sigma_j, class_labels, w)
        prediction = self.denoiser(x, sigma_i, class_labels, w)
        return consistency_distance(prediction, target, hp.loss, hp.huber_c, self.perceptual()).mean()

    @torch.no_grad()
    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        """theta^- <- mu theta^- + (1 - mu) theta after each optimiser step."""
        mu = self.hparams.target_decay
        for target, online in zip(self.target_net.parameters(), self.net.parameters()):
            target.lerp_(online.detach(), 1 - mu)
