"""Flow-matching teacher (Lipman et al. 2023; Liu et al. 2023): velocity regression on the linear interpolant."""

from __future__ import annotations

from fewstep.methods.base import GenerativeMethod
from fewstep.processes import flow


class FlowTeacher(GenerativeMethod):
    """Flow matching (Lipman et al. 2023): loss = |u(x_t, t) - (n - x0)|^2, x_t = (1 - t) x0 + t n, t ~ logit-normal."""

    def __init__(self, *args, t_mean: float = 0.0, t_std: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.save_hyperparameters("t_mean", "t_std")

    def velocity(self, x_t, t, class_labels=None):
        return self.net(x_t, t, class_labels)

    def denoiser(self, x, sigma, class_labels=None):
        return flow.denoiser_from_velocity(self.velocity)(x, sigma, class_labels=class_labels)

    def loss(self, x0, class_labels, rng):
        hp = self.hparams
        t = rng.draw(lambda total, g: flow.logit_normal_times(total, hp.t_mean, hp.t_std, g, x0.device))
        noise = rng.randn_like(x0)
        predicted = self.velocity(flow.interpolate(x0, noise, t), t, class_labels)
        return ((predicted - flow.velocity_target(x0, noise)) ** 2).mean()
