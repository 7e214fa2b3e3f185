"""What the EDM-space distillation students share (progressive, consistency, dmd2; DDIL on each): the frozen
teacher, its guided and reflected denoiser, the grid of training states, and DDIL's three sources of them.

Not a method itself: a base class, so that no method imports another.

Training states. Each student trains on states x at the noise levels of ``state_sigmas`` (its own grid, or
the teacher's for consistency distillation), labelled by their index k. Without DDIL they come from
``default_states`` (forward-diffused data x0 + sigma_k n; DMD2: the student's own backward simulation).
With DDIL (Garrepalli et al., arXiv 2410.11971) each state's source is drawn with weights
(b_fwd, b_teacher, b_student): forward-diffused data, or a state from the teacher's or the student's
rollouts, kept in the bounded buffers of ``fewstep.data.rollout.RolloutStates``, which the student
refreshes with new trajectories every ``refresh_every`` steps. DDIL's reflected diffusion clips the
teacher's and the student's x0 predictions to the data range [-1, 1] (``ddil.reflect``).
"""

from __future__ import annotations

import torch
from lightning.pytorch.utilities import rank_zero_info

from fewstep.data.rollout import SOURCES, RolloutStates, check_weights, draw_sources
from fewstep.errors import ConfigError
from fewstep.methods.base import DenoiserMethod, plain
from fewstep.methods.noise import BatchNoise
from fewstep.methods.teacher import GuidedTeacher
from fewstep.networks.lpips_loss import frozen_lpips
from fewstep.samplers import SOLVERS, SeededNoise
from fewstep.samplers.grids import nested_sigmas

DATA_RANGE = (-1.0, 1.0)
DDIL_KEYS = {"b_fwd", "b_teacher", "b_student", "buffer", "reflect"}


def ddim_step(x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """One DDIM (= Euler on the probability-flow ODE) step in EDM's sigma space: D + (sigma_next / sigma) (x - D)."""
    shape = (-1,) + (1,) * (x.ndim - 1)
    return denoised + (sigma_next / sigma).view(shape) * (x - denoised)


def reflect(x0: torch.Tensor) -> torch.Tensor:
    """DDIL's reflected diffusion: an x0 prediction thresholded to the data range."""
    return x0.clamp(*DATA_RANGE)


def level_index(sigma: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """The index of the nearest level (in log sigma) of each sigma."""
    return (sigma.log()[:, None] - levels.log()[None, :]).abs().argmin(1)


class DistilledStudent(GuidedTeacher, DenoiserMethod):
    """An EDM-space student of a frozen teacher denoiser (an edm_teacher run, an EDM pickle, a diffusers folder, or
    an earlier student), whose network it starts from (``fewstep.methods.teacher``).

    Subclasses define ``teacher_steps`` (the teacher's grid for its rollouts; it must contain
    ``state_sigmas``), ``student_sampler`` (the solver the student's grid is made for) and
    ``state_loss(x, k, labels, rng)``; by default the student is an EDM denoiser sampled on the nested
    grid of ``student_steps`` and trained at its levels (consistency distillation overrides those).
    """

    student_sampler = "euler"
    teacher_kind = DenoiserMethod
    teacher_hparams = ("sigma_data",)
    student_only = ("embed.guidance",)  # consistency's guidance embedding

    def __init__(
        self, *args, sigma_data: float = 0.5, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
        guidance: float = 0.0, teacher_ckpt: str | None = None, ddil: dict | None = None, guide: str | None = None,
        guidance_interval: list[float] | None = None, **kwargs,
    ):
        super().__init__(*args, **kwargs)
        ddil = plain(ddil) or None
        guidance_interval = plain(guidance_interval)
        self.save_hyperparameters(
            "sigma_data", "sigma_min", "sigma_max", "rho", "guidance", "teacher_ckpt", "ddil", "guide", "guidance_interval"
        )
        self.hparams.guidance_interval = guidance_interval  # Lightning collects the callers' unconverted ones too
        if not 0 < sigma_min < sigma_max:
            raise ConfigError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        self.check_guidance(guidance, guidance_interval)
        if ddil is not None:
            unknown = sorted(set(ddil) - DDIL_KEYS)
            if unknown:
                raise ConfigError(f"ddil takes {', '.join(sorted(DDIL_KEYS))}, not '{unknown[0]}'")
            check_weights([ddil.get(f"b_{source}", 0.0) for source in SOURCES])

    # -- the teacher -----------------------------------------------------------------------------------------
    @property
    def reflecting(self) -> bool:
        return bool((self.hparams.ddil or {}).get("reflect", False))

    def on_fit_start(self) -> None:
        super().on_fit_start()  # the teacher and its guide (GuidedTeacher)
        self.perceptual()  # LPIPS on this device (or its missing weights named) before the first step
        if self.hparams.ddil is not None and not isinstance(getattr(self.trainer, "datamodule", None), RolloutStates):
            raise ConfigError("a DDIL student needs its rollout buffers: fit it with datamodule=fewstep.data.rollout.RolloutStates(data)")

    @torch.no_grad()
    def teacher_denoise(self, x, sigma, class_labels=None, guidance=None) -> torch.Tensor:
        """The teacher's x0 prediction, with classifier-free guidance (1 + w) D(.|y) - w D(.|empty) when
        conditional (w a float or one per sample; default ``guidance``), or with autoguidance (1 + w) D - w D_guide
        when a guide is attached (``method.guide``; conditional or not), for sigma in ``guidance_interval`` only
        (null: at every sigma), reflected to the data range under DDIL."""
        return self.teacher_prediction(x, sigma, class_labels, guidance)

    def teacher_prediction(self, x, sigma, class_labels=None, guidance=None) -> torch.Tensor:
        """``teacher_denoise`` differentiable in ``x`` (the teacher's weights stay frozen): for losses whose gradient
        passes through the teacher's prediction at the generator's samples (SiD)."""
        denoised = self.guided_teacher(class_labels, guidance)(x, sigma)
        return reflect(denoised) if self.reflecting else denoised

    def perceptual(self):
        """``loss=lpips`` (consistency, progressive): the frozen LPIPS network, built on first use, outside the
        state_dict and EMA; else None."""
        hp = self.hparams
        if hp.get("loss") != "lpips":
            return None
        return frozen_lpips(self, hp.lpips_net, hp.lpips_backbone, hp.lpips_resize)

    # -- grids ------------------------------------------------------------------------------------------------
    def grid(self, steps: int) -> torch.Tensor:
        """The nested Karras grid of ``steps`` steps (ending at 0), on this module's device."""
        hp = self.hparams
        return nested_sigmas(steps, hp.sigma_min, hp.sigma_max, hp.rho).float().to(self.device)

    @property
    def student_sigmas(self) -> torch.Tensor:
        """The student's sampling grid: the nested grid of its ``student_steps``."""
        return self.grid(self.hparams.student_steps)

    @property
    def state_sigmas(self) -> torch.Tensor:
        """The levels of training states: the student's own, without the final 0."""
        return self.student_sigmas[:-1]

    @property
    def teacher_steps(self) -> int:
        raise NotImplementedError

    def sampler_defaults(self) -> dict:
        """The nested grid the student was trained on, over its own noise range."""
        hp = self.hparams
        return {"grid": "nested", "sigma_max": float(hp.sigma_max), "sigma_min": float(hp.sigma_min), "rho": float(hp.rho)}

    # -- training states --------------------------------------------------------------------------------------
    def default_states(self, x0, class_labels, rng: BatchNoise):
        """States without DDIL (x, k): forward-diffused data (``forward_states``) unless a subclass says otherwise."""
        return self.forward_states(x0, rng)

    def forward_states(self, x0, rng: BatchNoise):
        """x0 + sigma_k n at uniformly drawn levels k: (x, k)."""
        levels = self.state_sigmas
        k = rng.randint(len(levels))
        return x0 + levels[k].view((-1,) + (1,) * (x0.ndim - 1)) * rng.randn_like(x0), k

    def training_states(self, x0, class_labels, rng: BatchNoise):
        """(x, k, labels): the states of this batch, mixed from DDIL's three sources when it is on."""
        ddil = self.hparams.ddil
        if ddil is None:
            x, k = self.default_states(x0, class_labels, rng)
            return x, k, class_labels
        datamodule = self.trainer.datamodule
        datamodule.refresh(self.global_step, self.rollout)
        x, k = self.forward_states(x0, rng)
        labels = None if class_labels is None else class_labels.clone()
        weights = [ddil.get(f"b_{s}", 0.0) for s in SOURCES]
        sources = rng.draw(lambda total, generator: draw_sources(weights, total, generator)).to(x0.device)
        for code, source in enumerate(SOURCES[1:], start=1):
            index = (sources == code).nonzero().squeeze(1)
            if len(index):
                xs, sigma, ys = datamodule.draw(source, len(index))
                x[index] = xs.to(x)
                k[index] = level_index(sigma.to(x.device), self.state_sigmas)
                if labels is not None:
                    labels[index] = torch.where(ys >= 0, ys, self.null_label).to(labels)
        for code, source in enumerate(SOURCES):
            self.log(f"ddil/{source}_fraction", (sources == code).float().mean())
        return x, k, labels

    @property
    def sample_grid_nfe(self) -> int:
        """The validation sample grid shows the student at its own number of steps."""
        return len(self.student_sigmas) - 1

    def student_x0(self, x, sigma, class_labels=None):
        denoised = self.denoiser(x, sigma, class_labels)
        return reflect(denoised) if self.reflecting else denoised

    @torch.no_grad()
    def rollout(self, source: str, n: int):
        """States at ``state_sigmas`` along ``n`` new trajectories of the teacher (DDIM on its own grid) or of the
        current student (its own sampler and grid): (x, sigma, labels).

        Trajectory i of rank r at step s starts from, and (with a stochastic student sampler) is driven by, the
        per-trajectory noise of seed 2^62 + r 2^44 + s 2^20 + i (a ``SeededNoise``): seeds that never collide
        across trajectories (i < 2^20), steps (s < 2^24) and ranks, nor with the sampling seeds ``seed + i`` of
        ``fewstep.generate``, so rollouts are reproducible and each trajectory is its seed's alone.
        """
        if n > 1 << 20:
            raise ConfigError(f"a rollout of {n} trajectories: at most 2^20 per refresh, roll out fewer at a time")
        base = (1 << 62) + (self.global_rank << 44) + (self.global_step << 20)
        noise = SeededNoise(range(base, base + n), self.device)
        # the labels from a generator of their own per rank and step, so that ranks (and refreshes) differ
        generator = torch.Generator(self.device).manual_seed(1_000_003 * self.global_rank + self.global_step)
        labels = None
        if self.num_classes:
            labels = torch.randint(self.num_classes, (n,), generator=generator, device=self.device)
        if source == "teacher":
            sigmas, solver = self.grid(self.teacher_steps), SOLVERS["euler"].fn

            def denoiser(x, sigma):
                return self.teacher_denoise(x, sigma, labels)
        else:
            sigmas, solver = self.student_sigmas, SOLVERS[self.student_sampler].fn

            def denoiser(x, sigma):
                return self.student_x0(x, sigma, labels)

        x = sigmas[0] * noise.randn(self.hparams.data_shape)  # draw 0; the solver's noise, if any, from draw 1 on
        states = [(x, sigmas[0])]
        solver(denoiser, x, sigmas, noise=noise, callback=lambda info: states.append((info["x"], sigmas[info["i"] + 1])))
        levels = self.state_sigmas
        keep = [(xs, s) for xs, s in states if s > 0 and torch.isclose(levels, s, rtol=1e-4).any()]
        if not keep:
            raise ConfigError(f"the {source} rollout grid meets none of the training levels: use nested step counts")
        x = torch.cat([xs for xs, _ in keep])
        sigma = torch.cat([s.expand(n) for _, s in keep])
        labels = None if labels is None else labels.repeat(len(keep))
        return x, sigma, labels

    # -- Lightning --------------------------------------------------------------------------------------------
    def state_loss(self, x, k, class_labels, rng: BatchNoise) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, x0, class_labels, rng):
        self.require_teacher()
        if self.training:
            x, k, class_labels = self.training_states(x0, class_labels, rng)
        else:  # validation: forward-diffused states (fixed noise), comparable across steps
            x, k = self.forward_states(x0, rng)
        return self.state_loss(x, k, class_labels, rng)

    def on_train_start(self) -> None:
        super().on_train_start()
        if self.hparams.ddil is not None:
            ddil = self.hparams.ddil
            rank_zero_info(
                f"ddil: training states from forward diffusion / teacher / student rollouts with weights "
                f"{ddil.get('b_fwd', 0.0)} / {ddil.get('b_teacher', 0.0)} / {ddil.get('b_student', 0.0)}"
            )


__all__ = ["DistilledStudent", "ddim_step", "level_index", "reflect"]
