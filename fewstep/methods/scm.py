"""sCM: continuous-time consistency models on TrigFlow (Lu & Song, Simplifying, Stabilizing and Scaling
Continuous-Time Consistency Models, arXiv 2410.11081), trained from data (sCT) or distilled from a teacher (sCD)."""

from __future__ import annotations

import math

import torch
from torch import nn

from fewstep.constructors import plain
from fewstep.errors import ConfigError
from fewstep.jvp import METHODS as JVP_METHODS
from fewstep.jvp import jvp
from fewstep.methods.base import DenoiserMethod, GenerativeMethod
from fewstep.methods.teacher import GuidedTeacher
from fewstep.networks.preconditioning import PreconditionedDenoiser
from fewstep.processes import trigflow
from fewstep.samplers import SOLVERS, check_solver
from fewstep.samplers.grids import GRIDS

MODES = ("sct", "scd")
TIME_INPUTS = ("edm", "trigflow")
PROPOSALS = {"sct": (-1.0, 1.4), "scd": (-0.8, 1.6)}  # the paper's (P_mean, P_std) of each mode


# fewstep's networks with Fourier features of c_noise; with c_noise = t (trigflow) their default scale, 16, makes the
# tangent too rough to train (the paper's warning about large Fourier scales), so sct builds them with scale 1
FOURIER_NETWORKS = ("fewstep.networks.UNet", "fewstep.networks.unet.UNet", "fewstep.networks.MLP", "fewstep.networks.mlp.MLP")
TRIGFLOW_FOURIER_SCALE = 1.0


def with_time_scale(net: dict) -> dict:
    """A fewstep UNet/MLP config with Fourier features of scale 1 for c_noise = t, unless it sets its own scale."""
    if net.get("_target_") in FOURIER_NETWORKS and "fourier_scale" not in net:
        return {**net, "fourier_scale": TRIGFLOW_FOURIER_SCALE}
    return net


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.reshape((-1,) + (1,) * (like.ndim - 1))


def scm_tangent(velocity, x_t, t, dx_dt, sigma_data: float, warmup: float = 1.0, jvp_method: str = "forward",
                jvp_step: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """(F(x_t / sigma_d, t) with its graph, g): Algorithm 1's target g = cos(t) df^-/dt,

    g = -cos^2(t) (sigma_d F^- - dx_t/dt) - r cos(t) sin(t) (x_t + sigma_d dF^-/dt),

    with the tangent sigma_d cos(t) sin(t) dF^-/dt from one JVP of ``velocity(x_t / sigma_d, t)`` along
    (cos(t) sin(t) dx_t/dt, sigma_d cos(t) sin(t)) (the paper's scaling, bounded at both ends of t); r the warm-up.
    """
    cos, sin = torch.cos(t), torch.sin(t)
    scale = cos * sin
    out, tangent = jvp(velocity, (x_t / sigma_data, t), (_per_sample(scale, x_t) * dx_dt, sigma_data * scale),
                       method=jvp_method, step=jvp_step)
    cos, scale = _per_sample(cos, x_t), _per_sample(scale, x_t)
    g = -cos.square() * (sigma_data * out.detach() - dx_dt) - warmup * (scale * x_t + tangent)
    return out, g


def normalise_tangent(g: torch.Tensor, c: float | None) -> torch.Tensor:
    """g / (||g|| + c) per sample (tangent normalisation); c None: g as it is."""
    if c is None:
        return g
    return g / (_per_sample(g.flatten(1).norm(dim=1), g) + c)


class AdaptiveWeight(nn.Module):
    """w_phi(t): a linear layer on fixed Fourier features cos(k t), sin(k t), k = 0 .. channels/2 - 1; zero at
    initialisation, so that every time starts with weight e^0 = 1."""

    def __init__(self, channels: int = 64):
        super().__init__()
        self.register_buffer("frequencies", torch.arange(channels // 2, dtype=torch.float32), persistent=False)
        self.linear = nn.Linear(channels, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = t.float()[:, None] * self.frequencies[None, :]
        return self.linear(torch.cat([angles.cos(), angles.sin()], dim=1)).squeeze(1)


class SCM(GuidedTeacher, GenerativeMethod):
    """sCM (Lu & Song 2024): the consistency function f(x_t, t) = cos(t) x_t - sin(t) sigma_d F_theta(x_t / sigma_d,
    c_noise(t)) on TrigFlow, trained with the continuous-time objective of Algorithm 1:

    loss = e^w(t) / D ||F_theta - F_theta^- - g / (||g|| + c)||^2 - w(t), t = arctan(e^tau / sigma_d),
    tau ~ N(P_mean, P_std^2), g from ``scm_tangent`` with dx_t/dt = cos(t) z - sin(t) x0 (``mode=sct``, from data)
    or sigma_d F_teacher (``mode=scd``, the teacher's PF-ODE, guided by ``guidance``: classifier-free, or autoguidance
    by ``guide``).

    F_theta^- is F_theta's own output detached: one JVP pass gives both, so a dropout mask is the same in the
    tangent and in the trained output. In EDM's sigma space f is ``denoiser(x, sigma)``; with EDM's preconditioning
    and ``time_input=edm`` it is exactly EDM's D, so an sCD student starts at its teacher. Sampling is consistency
    sampling on the paper's grid: t_max = arctan(sigma_max / sigma_d), then ``sample_t_mid`` for two steps.
    """

    teacher_kind = DenoiserMethod
    teacher_hparams = ("sigma_data",)
    sample_grid_nfe = 2  # a distillation run's sample grid: the paper's two steps

    def __init__(
        self, net: dict, *args, mode: str = "sct", sigma_data: float = 0.5, p_mean: float | None = None, p_std: float | None = None,
        sigma_min: float = 0.002, sigma_max: float = 80.0, time_input: str | None = None, tangent_warmup: int = 10000,
        tangent_c: float | None = 0.1, adaptive_weight: bool = True, weight_channels: int = 64,
        prior_weighting: bool = False, jvp_method: str = "forward", jvp_step: float = 1e-3, guidance: float = 0.0,
        sample_t_mid: float = 1.1, teacher_ckpt: str | None = None, guide: str | None = None,
        guidance_interval: list[float] | None = None, **kwargs,
    ):
        if mode == "sct" and time_input in (None, "trigflow"):
            net = with_time_scale(plain(net))
        super().__init__(net, *args, **kwargs)
        if mode not in MODES:
            raise ConfigError(f"unknown method.mode={mode}: use sct (training from data) or scd (distillation from a teacher)")
        default_mean, default_std = PROPOSALS[mode]
        p_mean = default_mean if p_mean is None else p_mean
        p_std = default_std if p_std is None else p_std
        self.save_hyperparameters(
            "mode", "sigma_data", "sigma_min", "sigma_max", "time_input", "tangent_warmup", "tangent_c", "adaptive_weight",
            "weight_channels", "prior_weighting", "jvp_method", "jvp_step", "guidance", "sample_t_mid", "teacher_ckpt",
            "guide", "guidance_interval",
        )
        self.hparams.guidance_interval = plain(guidance_interval)
        if time_input is None:  # the paper's TrigFlow time for a network trained from scratch; a teacher's own otherwise
            time_input = "trigflow" if mode == "sct" and not isinstance(self.net, PreconditionedDenoiser) else "edm"
        self.hparams.update(p_mean=float(p_mean), p_std=float(p_std), time_input=time_input)
        if time_input not in TIME_INPUTS:
            raise ConfigError(f"unknown method.time_input={time_input}: use edm (c_noise = ln(sigma)/4) or trigflow (c_noise = t)")
        if time_input == "trigflow" and isinstance(self.net, PreconditionedDenoiser):
            raise ConfigError(
                f"method.time_input=trigflow feeds t to the network, and a {type(self.net).__name__} applies its own c_noise(sigma): "
                "use method.time_input=edm with this model"
            )
        if not 0 < sigma_min < sigma_max:
            raise ConfigError(f"need 0 < sigma_min < sigma_max, got method.sigma_min={sigma_min}, method.sigma_max={sigma_max}")
        if p_std <= 0 or tangent_warmup < 0 or (tangent_c is not None and tangent_c <= 0):
            raise ConfigError(
                f"method.p_std={p_std}, tangent_warmup={tangent_warmup}, tangent_c={tangent_c}: need p_std > 0, "
                "tangent_warmup >= 0 and tangent_c > 0 (or null for no tangent normalisation)"
            )
        if jvp_method not in JVP_METHODS:
            raise ConfigError(f"unknown method.jvp_method={jvp_method}: use one of {', '.join(JVP_METHODS)}")
        self.check_guidance(guidance, self.hparams.guidance_interval)
        if mode == "sct" and (guide or guidance_interval):
            raise ConfigError("method.guide and method.guidance_interval guide a teacher: use them with method.mode=scd")
        if not 0 < sample_t_mid < self.t_max:
            raise ConfigError(f"method.sample_t_mid={sample_t_mid}: use a time in (0, {self.t_max:.4f}) (the paper's is 1.1)")
        self.weight_head = AdaptiveWeight(weight_channels) if adaptive_weight else None

    # -- TrigFlow times -----------------------------------------------------------------------------------------
    @property
    def t_min(self) -> float:
        return math.atan(self.hparams.sigma_min / self.hparams.sigma_data)

    @property
    def t_max(self) -> float:
        return math.atan(self.hparams.sigma_max / self.hparams.sigma_data)  # 1.5645 for 80 and 0.5

    def c_noise(self, t: torch.Tensor) -> torch.Tensor:
        """The network's time input: EDM's ln(sigma_d tan t) / 4 (``time_input=edm``, a teacher's own) or t."""
        if self.hparams.time_input == "trigflow":
            return t
        return torch.log(self.hparams.sigma_data * torch.tan(t)) / 4

    # -- the model ----------------------------------------------------------------------------------------------
    def velocity(self, x_scaled: torch.Tensor, t: torch.Tensor, class_labels=None) -> torch.Tensor:
        """F_theta(x_t / sigma_d, t): minus a raw network's output (EDM's preconditioning), or the TrigFlow velocity
        of a network that is a denoiser itself (EDM's, diffusers')."""
        if isinstance(self.net, PreconditionedDenoiser):
            x_t = self.hparams.sigma_data * x_scaled
            return trigflow.trigflow_velocity(self.net, self.hparams.sigma_data)(x_t, t, class_labels=class_labels)
        return -self.net(x_scaled, self.c_noise(t), class_labels).to(x_scaled.dtype)

    def denoiser(self, x, sigma, class_labels=None):
        """The consistency function f in EDM's sigma space: f(cos(t) x, t) at t = arctan(sigma / sigma_d)."""
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])
        if isinstance(self.net, PreconditionedDenoiser):  # f = cos t x_t - sigma_d sin t F is its D exactly
            return self.net(x, sigma, class_labels).to(x.dtype)
        sd = self.hparams.sigma_data
        t = trigflow.sigma_to_t(sigma, sd)
        x_t = _per_sample(torch.cos(t), x) * x
        return trigflow.denoised_from_velocity(x_t, self.velocity(x_t / sd, t, class_labels), t, sd)

    # -- the teacher --------------------------------------------------------------------------------------------
    @classmethod
    def taught(cls, options: dict) -> bool:
        return options.get("mode", "sct") == "scd"

    def attach_teacher(self, teacher, path=None, init_student: bool = True) -> None:
        if self.hparams.mode == "sct":
            raise ConfigError("method.mode=sct trains from data without a teacher: attach none, or use method.mode=scd")
        super().attach_teacher(teacher, path, init_student)

    def require_teacher(self) -> None:
        if self.hparams.mode == "sct" or self.has_teacher:
            return
        raise ConfigError(
            "scm in scd mode distils a teacher and has none: call attach_teacher(teacher) before fitting "
            "(python -m fewstep.train method=scm method.mode=scd finds or trains one; teacher.ckpt=PATH picks it)"
        )

    @torch.no_grad()
    def teacher_velocity(self, x_t, t, class_labels=None) -> torch.Tensor:
        """dx_t/dt = sigma_d F_teacher(x_t, t), the teacher guided as ``guided_teacher`` says."""
        denoise = self.guided_teacher(class_labels)
        return self.hparams.sigma_data * trigflow.trigflow_velocity(denoise, self.hparams.sigma_data)(x_t, t)

    # -- training -----------------------------------------------------------------------------------------------
    @property
    def warmup(self) -> float:
        """r = min(1, step / tangent_warmup)."""
        steps = self.hparams.tangent_warmup
        return 1.0 if steps == 0 else min(1.0, self.global_step / steps)

    def loss(self, x0, class_labels, rng):
        self.require_teacher()
        hp = self.hparams
        t = rng.draw(lambda total, g: trigflow.proposal_times(total, hp.p_mean, hp.p_std, hp.sigma_data, g, x0.device))
        t = t.clamp(self.t_min, self.t_max).to(x0.dtype)
        z = hp.sigma_data * rng.randn_like(x0)
        x_t = trigflow.interpolate(x0, z, t)
        dx_dt = self.teacher_velocity(x_t, t, class_labels) if hp.mode == "scd" else trigflow.velocity_target(x0, z, t)
        return self.consistency_loss(x_t, t, dx_dt, class_labels).mean()

    def consistency_loss(self, x_t, t, dx_dt, class_labels=None) -> torch.Tensor:
        """The per-sample loss of Algorithm 1 at states x_t, times t and velocities dx_t/dt."""
        hp = self.hparams
        out, g = scm_tangent(lambda x, s: self.velocity(x, s, class_labels), x_t, t, dx_dt, hp.sigma_data, self.warmup,
                             hp.jvp_method, hp.jvp_step)
        g = normalise_tangent(g, hp.tangent_c)
        distance = (out - out.detach() - g).flatten(1).square().mean(1)  # ||.||^2 / D
        if hp.prior_weighting:
            distance = distance / (hp.sigma_data * torch.tan(t))
        if self.weight_head is None:
            return distance
        w = self.weight_head(t)
        if self._trainer is not None and self.training:
            self.log("train/adaptive_weight", w.mean().detach())
        return torch.exp(w) * distance - w

    # -- sampling -----------------------------------------------------------------------------------------------
    def sampling_sigmas(self, steps: int, grid: str | None = None) -> torch.Tensor:
        """The consistency sampler's levels: the paper's grid (t_max, then ``sample_t_mid`` and times evenly below it
        for more steps) unless ``grid`` names one of fewstep's, then sigma = 0."""
        hp = self.hparams
        if grid is not None:
            if grid not in GRIDS:
                raise ConfigError(f"unknown time grid '{grid}': leave grid=null (sCM's) or choose one of {', '.join(sorted(GRIDS))}")
            extra = (7.0,) if grid in ("karras", "nested") else ()
            return GRIDS[grid](steps, hp.sigma_min, hp.sigma_max, *extra).float()
        times = [self.t_max] + [hp.sample_t_mid * (steps - 1 - k) / (steps - 1) for k in range(steps - 1)]
        sigmas = [hp.sigma_data * math.tan(t) for t in times]
        sigmas[0] = float(hp.sigma_max)
        return torch.tensor([*sigmas, 0.0], dtype=torch.float32)

    def draw(self, model, noise, sampler, nfe, grid, options) -> torch.Tensor:
        """Consistency sampling at ``nfe`` steps whatever diffusion sampler is named (a consistency model is sampled
        no other way): x = f(x, sigma_i), renoised to sigma_{i+1}, from sigma_max z."""
        check_solver(sampler, nfe, kac=False)
        sigmas = self.sampling_sigmas(nfe, grid or options.get("grid")).to(self.device)
        x = sigmas[0] * noise.randn(tuple(self.hparams.data_shape))
        return SOLVERS["consistency"].fn(model, x, sigmas.to(x.dtype), noise=noise)

    def sampler_defaults(self) -> dict:
        return {}


__all__ = ["MODES", "SCM", "AdaptiveWeight", "normalise_tangent", "scm_tangent"]
