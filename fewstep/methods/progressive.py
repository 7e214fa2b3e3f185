"""Progressive distillation (Salimans & Ho 2022, arXiv 2202.00512): rounds that halve the number of DDIM steps."""

from __future__ import annotations

import torch

from fewstep.errors import ConfigError
from fewstep.methods.student import DistilledStudent, ddim_step
from fewstep.methods.teacher import Staged
from fewstep.networks.lpips_loss import check_options

LOSSES = ("l2", "lpips")


def progressive_target(teacher_x0, x_t, sigma_t, sigma_mid, sigma_s) -> torch.Tensor:
    """The x0 target for which one student DDIM step t -> s lands where two teacher DDIM steps t -> mid -> s do.

    In EDM's sigma space (alpha = 1): x~ = (z_s - (sigma_s / sigma_t) z_t) / (1 - sigma_s / sigma_t), which is
    the teacher's end point z_s itself when sigma_s = 0. ``teacher_x0(x, sigma)`` is the teacher's denoiser.
    """
    x_mid = ddim_step(x_t, teacher_x0(x_t, sigma_t), sigma_t, sigma_mid)
    x_s = ddim_step(x_mid, teacher_x0(x_mid, sigma_mid), sigma_mid, sigma_s)
    shape = (-1,) + (1,) * (x_t.ndim - 1)
    ratio = (sigma_s / sigma_t).view(shape)
    return (x_s - ratio * x_t) / (1 - ratio)


class Progressive(Staged, DistilledStudent):
    """Progressive distillation (Salimans & Ho 2022), one round: an N-step DDIM student of a 2N-step DDIM teacher,
    both on nested Karras grids.

    A state x_t at the student's level t = sigma_k gets the target of ``progressive_target`` from the teacher's
    two steps t -> sigma_mid -> s (s = sigma_{k+1}, mid the teacher's level between them); the loss is the
    truncated-SNR-weighted x-space error max(SNR, 1) |D(x_t, t) - x~|^2, SNR = 1 / t^2 in EDM's space (``loss``
    l2), or the same weight on LPIPS(D(x_t, t), x~) (``loss`` lpips, ``fewstep.networks.lpips_loss``). The
    student samples with ``euler`` (= DDIM here) on the nested grid at N steps. ``python -m fewstep.train
    method=progressive`` runs the rounds ``start_steps`` -> ``end_steps``, each its own fit (``stages``).
    """

    student_sampler = "euler"
    pipeline_keys = ("start_steps", "end_steps", "steps_per_round", "ema_decay")

    def __init__(
        self, *args, student_steps: int = 1, loss: str = "l2", lpips_net: str = "vgg", lpips_backbone: str | None = None,
        lpips_resize: int | None = 224, **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.save_hyperparameters("student_steps")
        self.save_hyperparameters("loss", "lpips_net", "lpips_backbone", "lpips_resize")
        if loss not in LOSSES:
            raise ConfigError(f"unknown progressive loss '{loss}': choose one of {', '.join(LOSSES)}")
        if loss == "lpips":
            check_options(lpips_net, lpips_resize, self.hparams.data_shape)

    @property
    def teacher_steps(self) -> int:
        return 2 * self.hparams.student_steps

    # -- rounds (fewstep.methods.teacher.Staged) ---------------------------------------------------------------
    @classmethod
    def stage_steps(cls, options: dict) -> list[int]:
        return halving_stages(options.get("start_steps", 32), options.get("end_steps", 1))

    @classmethod
    def steps_per_stage(cls, options: dict) -> int:
        return int(options.get("steps_per_round", 300))

    @classmethod
    def stage_settings(cls, teacher, teacher_steps, steps, first_sampler) -> dict:
        """This round's student takes ``steps`` steps (its teacher twice as many). The first round learns the guided
        teacher; later rounds' teachers are students that already hold the guidance, so it is applied once only."""
        later = {} if first_sampler is not None else {"guidance": 0.0, "guide": None, "guidance_interval": None}
        return {"student_steps": steps, **later}

    def state_loss(self, x, k, class_labels, rng):
        student, teacher = self.student_sigmas, self.grid(self.teacher_steps)
        sigma_t, sigma_mid, sigma_s = student[k], teacher[2 * k + 1], student[k + 1]

        def teacher_x0(x_, sigma_):
            return self.teacher_denoise(x_, sigma_, class_labels)

        target = progressive_target(teacher_x0, x, sigma_t, sigma_mid, sigma_s)
        weight = (1 / sigma_t**2).clamp(min=1.0).view((-1,) + (1,) * (x.ndim - 1))
        if self.hparams.loss == "lpips":
            return (weight.flatten() * self.perceptual()(self.denoiser(x, sigma_t, class_labels), target)).mean()
        return (weight * (self.denoiser(x, sigma_t, class_labels) - target) ** 2).mean()


def halving_stages(start_steps: int, end_steps: int) -> list[int]:
    """[start, start/2, ..., end]: the teacher's steps, then each round's student's."""
    stages = [int(start_steps)]
    while stages[-1] > end_steps and stages[-1] % 2 == 0:
        stages.append(stages[-1] // 2)
    if start_steps != int(start_steps) or end_steps < 1 or stages[-1] != end_steps or len(stages) < 2:
        raise ConfigError(
            f"progressive rounds from {start_steps} to {end_steps} steps: end_steps must be start_steps halved one or "
            "more times (e.g. method.start_steps=32 method.end_steps=1)"
        )
    return stages
