"""MeanFlow (Geng, Deng, Bai, Kolter & He, Mean Flows for One-step Generative Modeling, arXiv 2505.13447): a network
of the average velocity over [r, t], trained from data through the MeanFlow identity, sampled in one or a few steps."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from fewstep.constructors import plain
from fewstep.errors import ConfigError
from fewstep.jvp import METHODS as JVP_METHODS
from fewstep.jvp import jvp as forward_derivative
from fewstep.methods.base import GenerativeMethod
from fewstep.networks.edm import EDMPreconditioning
from fewstep.processes import flow
from fewstep.samplers import check_solver

# the model configs whose networks take the second time input (``second_time: true``, which meanflow sets)
SECOND_TIME_MODELS = (
    "fewstep.networks.UNet", "fewstep.networks.unet.UNet", "fewstep.networks.MLP", "fewstep.networks.mlp.MLP",
    "fewstep.networks.edm.edm_denoiser",
)


def interval_times(total: int, generator, device, mean: float, std: float, share: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(r, t) of the paper's sampler: two logit-normal times, t the larger, and r = t but for a ``share`` of samples."""
    first = flow.logit_normal_times(total, mean, std, generator, device)
    second = flow.logit_normal_times(total, mean, std, generator, device)
    distinct = torch.rand(total, generator=generator, device=device) < share
    t = torch.maximum(first, second)
    return torch.where(distinct, torch.minimum(first, second), t), t


def meanflow_target(
    u: Callable[..., torch.Tensor], z: torch.Tensor, r: torch.Tensor, t: torch.Tensor, v: torch.Tensor,
    jvp: str = "forward", jvp_step: float = 1e-3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(u(z, r, t) with its graph, u_tgt = sg(v - (t - r) du/dt)): the total derivative du/dt = v . d_z u + d_t u
    from one JVP of ``u`` along the tangent (v, 0, 1) of (z, r, t) (eq. 8 and 10 of the paper)."""
    prediction, du_dt = forward_derivative(u, (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)), method=jvp, step=jvp_step)
    gap = (t - r).view((-1,) + (1,) * (z.ndim - 1))
    return prediction, (v - gap * du_dt).detach()


def adaptive_loss(prediction: torch.Tensor, target: torch.Tensor, power: float, constant: float) -> torch.Tensor:
    """The batch mean of sg(w) ||delta||^2 with w = 1 / (||delta||^2 + c)^p, ||.||^2 summed over a sample (Sec. 4.3)."""
    squared = (prediction - target).pow(2).flatten(1).sum(1)
    return ((squared.detach() + constant).pow(-power) * squared).mean()


def with_second_time(net: dict) -> dict:
    """The model config with the second time input on, for the networks that have one; one line for a config that
    turns it off."""
    if net.get("_target_") not in SECOND_TIME_MODELS:
        return net
    if net.get("second_time", True) is not True:
        raise ConfigError(f"model.second_time={net['second_time']}: meanflow conditions its network on (t, t - r), "
                          "through the second time input: remove the override")
    return {**net, "second_time": True}


class MeanFlow(GenerativeMethod):
    """MeanFlow (Geng et al. 2025): u_theta(z_t, r, t) is the average velocity (z_t - z_r) / (t - r) of the linear
    interpolant z_t = (1 - t) x + t e (v = e - x); the loss is sg(w) ||u_theta - u_tgt||^2 with the MeanFlow identity's
    target u_tgt = sg(v - (t - r)(v . d_z u + d_t u)), one JVP (``fewstep.jvp``), w = 1 / (||.||^2 + c)^p.
    The network sees (t, t - r): its second time input. Conditional models train classifier-free guidance in
    (Sec. 4.2, App. B.1): v~ = omega v + kappa u(z_t, t, t | c) + (1 - omega - kappa) u(z_t, t, t | null) on labelled
    samples with t in ``guidance_interval``, and are sampled unguided (guidance=0). sampler=euler is the paper's
    sampler, z_r = z_t - (t - r) u(z_t, r, t) on a uniform grid from t = 1 to 0, one call per step; the other
    samplers integrate the instantaneous velocity u(z, t, t) as a flow model.
    """

    sampled = "interval_velocity"

    def __init__(
        self, net: dict, *args, share: float = 0.25, t_mean: float = -0.4, t_std: float = 1.0, power: float = 1.0,
        constant: float = 1e-3, guidance: float = 1.0, guidance_mix: float = 0.0,
        guidance_interval: tuple[float, float] = (0.0, 1.0), jvp: str = "forward", jvp_step: float = 1e-3, **kwargs,
    ):
        super().__init__(with_second_time(plain(net)), *args, **kwargs)
        self.save_hyperparameters("share", "t_mean", "t_std", "power", "constant", "guidance", "guidance_mix",
                                  "guidance_interval", "jvp", "jvp_step")
        check_options(share, t_std, power, constant, guidance, guidance_mix, list(guidance_interval), jvp, jvp_step)
        self.hparams.guidance_interval = [float(v) for v in guidance_interval]
        if not self.num_classes and (guidance != 1 or guidance_mix != 0):
            raise ConfigError(f"method.guidance={guidance} and method.guidance_mix={guidance_mix} train classifier-free "
                              "guidance, which needs labels: set method.conditional=true, or guidance=1.0 and guidance_mix=0.0")
        self.check_second_time()

    def check_second_time(self) -> None:
        net = self.net.model if isinstance(self.net, EDMPreconditioning) else self.net
        if getattr(net, "map_second_time", None) is None and getattr(getattr(net, "embed", None), "second_time", None) is None:
            raise ConfigError(
                f"meanflow needs a network with a second time input (t - r) and {type(net).__name__} has none: use fewstep's "
                "UNet or MLP, or EDM's SongUNet or DhariwalUNet (model=unet_small, mlp, edm_ddpmpp_cifar, ...), which "
                "meanflow builds with model.second_time=true")

    # -- the model ---------------------------------------------------------------------------------------------
    def average_velocity(self, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor, class_labels=None) -> torch.Tensor:
        """u_theta(z, r, t), r and t of shape [batch]: the network at z with the times (t, t - r)."""
        if isinstance(self.net, EDMPreconditioning):  # its raw network: MeanFlow's output is a velocity, not D
            labels = self.net.label_vectors(class_labels, z.device)
            return self.net.model(z, t, labels, second_time=t - r)[:, : self.net.img_channels]
        return self.net(z, t, class_labels, second_time=t - r)

    def interval_velocity(self, z: torch.Tensor, times: torch.Tensor, class_labels=None) -> torch.Tensor:
        """u_theta(z, r, t) with ``times`` [batch, 2] holding (r, t): one tensor where samplers, NFE counting and
        guidance pass a noise level."""
        return self.average_velocity(z, times[:, 0], times[:, 1], class_labels)

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, class_labels=None) -> torch.Tensor:
        """The instantaneous velocity v(z_t, t) = u(z_t, t, t)."""
        return self.average_velocity(x_t, t, t, class_labels)

    def denoiser(self, x, sigma, class_labels=None):
        return flow.denoiser_from_velocity(self.velocity)(x, sigma, class_labels=class_labels)

    # -- training ----------------------------------------------------------------------------------------------
    @property
    def guided(self) -> bool:
        return bool(self.num_classes) and (self.hparams.guidance != 1 or self.hparams.guidance_mix != 0)

    @torch.no_grad()
    def guided_velocity(self, z: torch.Tensor, t: torch.Tensor, v: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        """v~ = omega v + kappa u(z, t, t | c) + (1 - omega - kappa) u(z, t, t | null) on the labelled samples with t in
        the guidance interval, v elsewhere; the network without dropout (eval), no gradient (eq. 13, 19-21)."""
        hp = self.hparams
        low, high = hp.guidance_interval
        inside = (class_labels != self.null_label) & (t >= low) & (t <= high)
        training = self.net.training
        self.net.eval()
        try:
            unconditional = self.velocity(z, t, torch.full_like(class_labels, self.null_label))
            guided = hp.guidance * v + (1 - hp.guidance - hp.guidance_mix) * unconditional
            if hp.guidance_mix:
                guided = guided + hp.guidance_mix * self.velocity(z, t, class_labels)
        finally:
            self.net.train(training)
        return torch.where(inside.view((-1,) + (1,) * (v.ndim - 1)), guided, v)

    def loss(self, x0, class_labels, rng):
        hp = self.hparams
        r, t = rng.draw(lambda total, g: interval_times(total, g, x0.device, hp.t_mean, hp.t_std, hp.share))
        r, t = r.to(x0.dtype), t.to(x0.dtype)
        noise = rng.randn_like(x0)
        z, v = flow.interpolate(x0, noise, t), flow.velocity_target(x0, noise)
        if class_labels is not None and self.guided:
            v = self.guided_velocity(z, t, v, class_labels)
        prediction, target = meanflow_target(
            lambda z_, r_, t_: self.average_velocity(z_, r_, t_, class_labels), z, r, t, v, hp.jvp, hp.jvp_step)
        return adaptive_loss(prediction, target, hp.power, hp.constant)

    # -- sampling ----------------------------------------------------------------------------------------------
    def draw(self, model, noise, sampler: str, nfe: int, grid: str | None, options: dict) -> torch.Tensor:
        """sampler=euler: MeanFlow's steps z_r = z_t - (t - r) u(z_t, r, t) on ``nfe`` uniform steps from t = 1 to 0.
        Any other diffusion sampler: that solver on the instantaneous velocity u(z, t, t) as an EDM denoiser."""
        if sampler != "euler":
            def velocity(x_t, t):
                return model(x_t, torch.stack([t, t], dim=1))

            return super().draw(flow.denoiser_from_velocity(velocity), noise, sampler, nfe, grid, options)
        check_solver(sampler, nfe, kac=False)
        if grid not in (None, "uniform"):
            raise ConfigError(f"grid '{grid}': MeanFlow's sampler (sampler=euler) steps uniformly in t from 1 to 0: use grid=null")
        if options:
            raise ConfigError(f"MeanFlow's sampler (sampler=euler) takes no options, got {', '.join(options)}: remove them")
        z = noise.randn(tuple(self.hparams.data_shape)).to(self.device)
        times = torch.linspace(1, 0, nfe + 1, dtype=torch.float64).tolist()
        for t, r in zip(times[:-1], times[1:]):
            interval = torch.tensor([r, t], dtype=z.dtype, device=z.device).expand(z.shape[0], 2)
            z = z - (t - r) * model(z, interval).to(z.dtype)
        return z


def check_options(share, t_std, power, constant, guidance, guidance_mix, interval: Sequence[float], jvp, jvp_step) -> None:
    """One line naming the first MeanFlow option out of its range."""
    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    checks = [
        ("share", share, number(share) and 0 <= share <= 1, "the share of samples with r != t, in [0, 1] (the paper: 0.25)"),
        ("t_std", t_std, number(t_std) and t_std > 0, "the logit-normal std of the times, > 0 (the paper: 1.0)"),
        ("power", power, number(power) and power >= 0, "the adaptive weight's power p >= 0 (0: plain squared L2; the paper: 1.0)"),
        ("constant", constant, number(constant) and constant > 0, "the adaptive weight's c > 0 (the paper: 1e-3)"),
        ("guidance", guidance, number(guidance) and guidance > 0, "the guidance scale omega > 0 (1.0: none)"),
        ("guidance_mix", guidance_mix, number(guidance_mix) and 0 <= guidance_mix < 1,
         "the guidance mixing scale kappa in [0, 1) (0.0: none)"),
        ("guidance_interval", list(interval), len(interval) == 2 and all(number(v) for v in interval)
         and 0 <= interval[0] < interval[1] <= 1, "[t_min, t_max] with 0 <= t_min < t_max <= 1, where guidance is trained"),
        ("jvp", jvp, jvp in JVP_METHODS, f"one of {', '.join(JVP_METHODS)}"),
        ("jvp_step", jvp_step, number(jvp_step) and jvp_step > 0, "the finite difference's step along the tangent, > 0"),
    ]
    for name, value, ok, fix in checks:
        if not ok:
            raise ConfigError(f"method.{name}={value}: use {fix}")


__all__ = ["MeanFlow", "adaptive_loss", "interval_times", "meanflow_target", "with_second_time"]
