"""Kac-flow teacher (Duong et al. 2025, Telegrapher's Generative Model via Kac Flows): velocity regression."""

from __future__ import annotations

import torch

from fewstep.errors import ConfigError
from fewstep.methods.base import GenerativeMethod
from fewstep.processes.kac import KacPath, KacProcess
from fewstep.samplers import sample_kac
from fewstep.samplers.kac import check_denoise
from fewstep.samplers.noise import kac_prior

KAC_HPARAMS = ("a", "c", "T", "f", "g")  # what a Kac model's process is; a teacher and its student share them
# Final denoising jumps (fractions of T) after the ODE: see fewstep.samplers.kac.denoise_tail
DENOISE = (0.2, 0.1, 0.05)


class KacTeacher(GenerativeMethod):
    """Kac flows (Duong et al. 2025): loss = |u(x_t, t) - u*|^2, x_t = f(t) x0 + K_{g(t)}, K a Kac process,
    u* = f'(t) x0 + g'(t) v_K(K_{g(t)}, g(t)), t ~ U(t_min T, T).

    Sampling integrates dx/dt = u(x, t) from the Kac prior at t = T to t = 0 (kac_euler, kac_heun, kac_ab2);
    class-conditional models take velocity-space guidance u_w = (1 + w) u(x, t | y) - w u(x, t | empty).
    ``denoise`` (fractions of T, default 0.2, 0.1, 0.05) are the final denoising jumps x <- x - t_d u(x, t_d)
    after the ODE, one NFE each out of the budget, at most half of it (``fewstep.samplers.kac.denoise_tail``:
    they clear faint noise on black backgrounds); [] for none.
    """

    kind_name = "a Kac model"  # what DistillKac's teacher must be (fewstep.methods.teacher)
    teacher_source = "a method=kac_teacher run"
    sampled = "velocity"

    def __init__(
        self, *args, a: float = 9.0, c: float = 3.0, T: float = 1.0, f: str = "linear", g: str = "linear",
        t_min: float = 1e-3, denoise=DENOISE, **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.save_hyperparameters(*KAC_HPARAMS, "t_min", "denoise")
        if not 0 <= t_min < 1:
            raise ConfigError(f"t_min={t_min}: the smallest training time is a fraction of T, use 0 <= t_min < 1")
        self.path = KacPath(KacProcess(a, c), T, f, g)
        self.denoise_times = check_denoise([d * T for d in (denoise or ())], T)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """u_theta(x, t), t a [batch] tensor in [0, T]; the network sees t / T."""
        return self.net(x, t / self.hparams.T, class_labels)

    def denoiser(self, x, sigma, class_labels=None):
        raise ConfigError("a Kac model has no Gaussian denoiser: sample it with sampler=kac_euler, kac_heun or kac_ab2")

    def training_times(self, n: int, generator, device) -> torch.Tensor:
        t_min, T = self.hparams.t_min, self.hparams.T
        return T * (t_min + (1 - t_min) * torch.rand(n, generator=generator, device=device))

    def loss(self, x0, class_labels, rng):
        def times_and_displacements(total, generator):
            t = self.training_times(total, generator, x0.device)
            return t, self.path.displacement(t, (total, *x0.shape[1:]), generator, x0.dtype, x0.device)

        t, k = rng.draw(times_and_displacements)
        x_t = self.path.at(x0, t, k)
        target = self.path.target(x0, k, t)
        return ((self.velocity(x_t, t, class_labels) - target) ** 2).mean()

    def prior(self, noise) -> torch.Tensor:
        """x_T = K_{g(T)} for each seed of ``noise`` (a SeededNoise): sample i depends on its own seed only.

        Drawn exactly from the counter-based uniforms of ``noise`` (``fewstep.samplers.noise.kac_prior``).
        """
        shape = tuple(self.hparams.data_shape)
        return kac_prior(noise, self.path.process, self.path.prior_time(), shape).to(self.device)

    def draw(self, model, noise, sampler, nfe, grid, options) -> torch.Tensor:
        """A Kac sampler on the velocity ``model`` from the Kac prior, then the final denoising jumps."""
        if grid not in (None, "uniform"):
            raise ConfigError(f"grid '{grid}' is a diffusion noise grid: a Kac model steps uniformly in t, use grid=null")
        denoise = self.denoise_times
        if "denoise" in options:  # sampler option: fractions of T, [] for none
            denoise = check_denoise([d * self.hparams.T for d in (options.pop("denoise") or ())], self.hparams.T)
        if options:
            raise ConfigError(f"Kac samplers take no options but denoise, got {', '.join(options)}: remove them")
        return sample_kac(model, self.prior(noise), sampler, nfe, self.hparams.T, denoise=denoise)
