"""DistillKac endpoint-only distillation (Han et al. 2025, arXiv 2509.21513): one stage, M student steps."""

from __future__ import annotations

import torch

from fewstep.errors import ConfigError
from fewstep.methods.kac_teacher import KAC_HPARAMS, KacTeacher
from fewstep.methods.teacher import Staged, TaughtMethod
from fewstep.samplers.kac import KAC_SOLVERS, denoise_tail


class KacEndpoint(Staged, TaughtMethod, KacTeacher):
    """DistillKac's endpoint distillation (Han et al. 2025): one student Euler step of size D = T / M matches the
    endpoint of the frozen Kac teacher's N = teacher_steps / M sub-steps, loss |x_S - x_T|^2 on the endpoint only.

    The student is a Kac model like its teacher and samples with kac_euler at M steps, without final denoising jumps.
    ``rollout_share`` of the samples on the last interval start from the student's own state there instead (DDIL's
    student rollouts, Garrepalli et al. 2024).
    """

    teacher_kind = KacTeacher
    teacher_hparams = KAC_HPARAMS
    pipeline_keys = ("stages", "steps_per_stage", "ema_decay")

    def __init__(
        self, *args, student_steps: int = 1, teacher_steps: int = 100, teacher_sampler: str = "kac_euler",
        teacher_ckpt: str | None = None, denoise=(), teacher_denoise: bool = True, rollout_share: float = 0.0, **kwargs,
    ):
        super().__init__(*args, denoise=denoise, **kwargs)
        self.save_hyperparameters(
            "student_steps", "teacher_steps", "teacher_sampler", "teacher_ckpt", "teacher_denoise", "rollout_share"
        )
        check_stages([teacher_steps, student_steps])
        if not 0 <= rollout_share <= 1:
            raise ConfigError(f"rollout_share={rollout_share}: the share of student rollouts is in [0, 1] (1 all, 0 none)")
        if teacher_sampler not in KAC_SOLVERS:
            raise ConfigError(
                f"teacher sampler '{teacher_sampler}' cannot integrate a Kac flow: use one of {', '.join(sorted(KAC_SOLVERS))}"
            )

    # -- stages (fewstep.methods.teacher.Staged) ---------------------------------------------------------------
    @classmethod
    def stage_steps(cls, options: dict) -> list[int]:
        stages = [int(s) for s in options.get("stages") or [100, 20, 4, 2, 1]]
        check_stages(stages)
        return stages

    @classmethod
    def steps_per_stage(cls, options: dict) -> int | list[int]:
        return options.get("steps_per_stage", [200, 400, 500, 700])

    @classmethod
    def stage_settings(cls, teacher, teacher_steps, steps, first_sampler) -> dict:
        """The teacher's Kac process and this stage's steps. The first teacher is a Kac-flow model integrated with any
        solver (``first_sampler``); later ones (None) are students, made for Euler."""
        return {
            **{key: teacher.hparams[key] for key in KAC_HPARAMS},
            "t_min": float(teacher.hparams.get("t_min", 1e-3)),
            "student_steps": steps, "teacher_steps": teacher_steps, "teacher_sampler": first_sampler or "kac_euler",
        }

    def teacher_endpoint(self, x: torch.Tensor, t: torch.Tensor, class_labels) -> torch.Tensor:
        """The teacher's N sub-steps from each sample's own t down to t - D.

        Where t - D = 0 the endpoint is the teacher's sample, so it takes the teacher's final denoising jumps
        (its ``denoise_times``; a student teacher has none) unless ``teacher_denoise`` is false: the student
        learns the denoised endpoint and samples without extra NFE."""
        n_sub = self.hparams.teacher_steps // self.hparams.student_steps
        step = self.hparams.T / self.hparams.student_steps / n_sub
        ts = t[None, :] - step * torch.arange(n_sub + 1, device=t.device, dtype=t.dtype)[:, None]
        # intervals that end at t = 0 (the teacher's sample, denoised below): t = T - k D is rounded in floating
        # point (1 - 19 * 0.05 - 0.05 = 1.5e-8 in float32), so they are found to half a sub-step and end at 0 exactly
        last = ts[-1] < step / 2
        ts[-1] = torch.where(last, torch.zeros_like(ts[-1]), ts[-1])

        def velocity(x_, t_):
            return self.teacher.velocity(x_, t_, class_labels)

        x_end = KAC_SOLVERS[self.hparams.teacher_sampler].fn(velocity, x, ts)
        times = getattr(self.teacher, "denoise_times", ()) if self.hparams.get("teacher_denoise", True) else ()
        if times and bool(last.any()):
            labels = None if class_labels is None else class_labels[last]

            def velocity_last(x_, t_):
                return self.teacher.velocity(x_, t_, labels)

            x_end = x_end.clone()
            x_end[last] = denoise_tail(velocity_last, x_end[last], times)
        return x_end

    def loss(self, x0, class_labels, rng):
        self.require_teacher()
        steps, T = self.hparams.student_steps, self.hparams.T
        D = T / steps

        def starts_and_displacements(total, generator):
            k = torch.randint(0, steps, (total,), generator=generator, device=x0.device)
            t = T - k.to(x0.dtype) * D  # the start of each sample's student interval
            return t, self.path.displacement(t, (total, *x0.shape[1:]), generator, x0.dtype, x0.device)

        t, k = rng.draw(starts_and_displacements)
        x_t = self.path.at(x0, t, k)  # a draw of the forward path at the grid time t
        if self.hparams.get("rollout_share", 0.0) > 0:
            x_t = self.with_rollouts(x_t, t, class_labels, rng)
        with torch.no_grad():
            x_teacher = self.teacher_endpoint(x_t, t, class_labels)
        x_student = x_t - D * self.velocity(x_t, t, class_labels)  # one Euler step over the teacher's interval
        # the endpoint only: the paper's stability theorem carries endpoint closeness to the whole path
        return ((x_student - x_teacher) ** 2).mean()

    @torch.no_grad()
    def with_rollouts(self, x_t, t, class_labels, rng) -> torch.Tensor:
        """x_t, where a ``rollout_share`` of the samples on the last interval (t = D) take the student's own state
        there instead: its M - 1 Euler steps from the prior. The mix of intervals is unchanged."""
        shape, M = x_t.shape[1:], self.hparams.student_steps
        D = self.hparams.T / M
        last = t < 1.5 * D
        rolled = last & (rng.draw(lambda total, g: torch.rand(total, generator=g, device=x_t.device)) < self.hparams.rollout_share)
        prior = rng.draw(lambda total, g: self.path.prior((total, *shape), g, x_t.dtype, x_t.device))
        x, labels = prior[rolled], None if class_labels is None else class_labels[rolled]
        for j in range(M - 1):
            now = torch.full((len(x),), self.hparams.T - j * D, dtype=x_t.dtype, device=x_t.device)
            x = x - D * self.velocity(x, now, labels)
        x_t = x_t.clone()
        x_t[rolled] = x
        return x_t


def check_stages(stages: list[int]) -> None:
    """Steps per stage, teacher first: positive, decreasing, each dividing the one before (100, 20, 4, 2, 1)."""
    if len(stages) < 2 or any(int(s) != s or s < 1 for s in stages):
        raise ConfigError(f"stages {list(stages)}: give the teacher's steps then each student's, all >= 1 (e.g. 100,20,4,2,1)")
    for teacher, student in zip(stages, stages[1:]):
        if student >= teacher or teacher % student:
            raise ConfigError(
                f"stages {list(stages)}: {student} student steps do not divide the {teacher} teacher steps; "
                "use steps that each divide the one before (e.g. 100,20,4,2,1)"
            )
