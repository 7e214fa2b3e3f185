"""The GAN machinery that GDD and DMD2 share: the losses, lazy R1, and the alternating two-optimiser step.

- Losses on the discriminator's logits, by name (``LOSSES``): ``nonsaturating`` (Goodfellow et al. 2014),
  L_D = softplus(D(G(z))) + softplus(-D(x)), L_G = softplus(-D(G(z))); ``hinge`` (Lim & Ye 2017),
  L_D = relu(1 + D(G(z))) + relu(1 - D(x)), L_G = -D(G(z)). Batch means.
- ``LazyR1``: R1 = gamma/2 E|grad_x D(x)|^2 on reals (Mescheder et al. 2018), computed only at every
  ``interval``-th step and then weighted by ``interval`` (StyleGAN2's lazy regularisation, Karras et al. 2020).
- ``AdversarialTraining``: k discriminator (critic) updates, then one generator update with the discriminator's
  parameters frozen, under Lightning's manual optimisation; only the generator update counts as a global step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import ExitStack

import torch
from torch import nn
from torch.nn import functional as F

from fewstep.constructors import build
from fewstep.errors import ConfigError
from fewstep.networks.freezing import no_param_grads

LOSSES = ("nonsaturating", "hinge")
Losses = dict[str, torch.Tensor]  # what a loss callable returns: at least "loss", the value optimised


def check_loss(kind: str) -> None:
    if kind not in LOSSES:
        raise ValueError(f"unknown GAN loss '{kind}': choose one of {', '.join(LOSSES)}")


def discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor, kind: str = "nonsaturating") -> torch.Tensor:
    """Non-saturating: softplus(D(G(z))) + softplus(-D(x)); hinge: relu(1 + D(G(z))) + relu(1 - D(x)). Batch means."""
    check_loss(kind)
    if kind == "hinge":
        return F.relu(1 + logits_fake).mean() + F.relu(1 - logits_real).mean()
    return F.softplus(logits_fake).mean() + F.softplus(-logits_real).mean()


def generator_loss(logits_fake: torch.Tensor, kind: str = "nonsaturating") -> torch.Tensor:
    """Non-saturating: softplus(-D(G(z))); hinge: -D(G(z)). Batch means."""
    check_loss(kind)
    if kind == "hinge":
        return -logits_fake.mean()
    return F.softplus(-logits_fake).mean()


def r1_penalty(logits_real: torch.Tensor, x_real: torch.Tensor, gamma: float) -> torch.Tensor:
    """gamma / 2 E |grad_x D(x)|^2 on reals (``x_real`` must require grad and have produced ``logits_real``)."""
    (grad,) = torch.autograd.grad(logits_real.sum(), x_real, create_graph=True)
    return gamma / 2 * grad.square().flatten(1).sum(1).mean()


def double_backward_attention():
    """SDPA's flash / memory-efficient kernels have no double backward (R1 needs one): use the math kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


class LazyR1:
    """R1 on real data (Mescheder et al. 2018), applied lazily (Karras et al. 2020).

    ``due(step)``: whether the (0-based) step adds it (every ``interval``-th one; never when gamma is 0).
    ``penalty(discriminator, x_real)``: (D(x_real), R1) with R1 = gamma/2 E|grad_x D(x)|^2 unscaled.
    ``lazy(loss, r1)``: that step's loss with the lazily scaled penalty, loss + interval * R1.
    """

    def __init__(self, gamma: float, interval: int = 16):
        if not gamma >= 0 or int(interval) != interval or interval < 1:
            raise ValueError(f"R1 gamma={gamma}, interval={interval}: use gamma >= 0 and an integer interval >= 1")
        self.gamma, self.interval = float(gamma), int(interval)

    def due(self, step: int) -> bool:
        return self.gamma > 0 and step % self.interval == 0

    def penalty(self, discriminator: Callable[[torch.Tensor], torch.Tensor], x_real: torch.Tensor):
        """(D(x_real), gamma/2 E|grad_x D(x)|^2), on the math attention kernel (R1 is backpropagated through)."""
        x_real = x_real.detach().requires_grad_(True)
        with double_backward_attention():
            logits_real = discriminator(x_real)
            return logits_real, r1_penalty(logits_real, x_real, self.gamma)

    def lazy(self, loss: torch.Tensor, r1: torch.Tensor | None) -> torch.Tensor:
        """``loss`` + interval * R1 on a step that computed R1 (``r1`` None: ``loss`` unchanged)."""
        return loss if r1 is None else loss + self.interval * r1


class AdversarialTraining:
    """Mixin for a LightningModule trained as a GAN under manual optimisation, the generator's network ``net``.

    ``configure_optimizers`` gives [the generator's optimiser, the critic's]: built from the hyperparameters named by
    ``optimizer_keys``, each ``adam`` (the method's default) where unset, over ``generator_parameters()`` and the
    trainable parameters of ``critic_modules()``. No scheduler: the method steps its two optimisers itself.
    ``adversarial_step`` makes ``steps`` critic updates (each ``discriminator_loss()``, backward, step), then one
    generator update (``generator_loss()`` with the critic's parameters frozen, backward, step). Each loss callable
    returns a dict whose ``loss`` is optimised; every loss is checked finite (``check_finite``, whose hint names the
    two learning rates). The critic steps go through the strategy's optimizer_step uncounted, so only the generator
    step advances ``trainer.global_step`` (max_steps, val_check_interval and the EMA count batches).
    """

    adam: dict  # the method's default optimiser config, for either side
    optimizer_keys = ("optimizer_g", "optimizer_d")  # the hyperparameters of the generator's and the critic's
    ddp_unused_parameters = True  # each update's graph leaves out the other side's parameters (fewstep.train)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.hparams.get("scheduler"):
            name = type(self).__name__.lower()
            raise ConfigError(f"{name} steps its two optimisers itself and takes no scheduler: set method.scheduler=null")
        self.automatic_optimization = False

    def generator_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.net.parameters() if p.requires_grad]

    def critic_modules(self) -> list[nn.Module]:
        """The discriminator's (critic's) modules: its optimiser's parameters, frozen for the generator's loss."""
        raise NotImplementedError

    def optimizer_config(self, key: str) -> dict:
        return self.hparams.get(key) or self.adam

    def configure_optimizers(self):
        generator_key, critic_key = self.optimizer_keys
        critic = [p for module in self.critic_modules() for p in module.parameters() if p.requires_grad]
        return [
            build(self.optimizer_config(generator_key))(self.generator_parameters()),
            build(self.optimizer_config(critic_key))(critic),
        ]

    def check_finite(self, value: torch.Tensor, what: str = "training", hint: str | None = None) -> None:
        if hint is None:
            rates = " / ".join(str(self.optimizer_config(key).get("lr")) for key in self.optimizer_keys)
            hint = f"lower method.{self.optimizer_keys[0]}.lr / method.{self.optimizer_keys[1]}.lr (now {rates})"
            if "r1_gamma" in self.hparams:
                hint += f" or raise method.r1_gamma (now {self.hparams.r1_gamma})"
        super().check_finite(value, what, hint)

    def adversarial_step(
        self, generator_loss: Callable[[], Losses], discriminator_loss: Callable[[], Losses],
        discriminator: nn.Module | Iterable[nn.Module] | None = None, steps: int = 1,
        names: tuple[str, str] = ("generator", "discriminator"), clip_value: float | None = None,
        hold_generator: bool = False,
    ) -> tuple[Losses, Losses]:
        """``steps`` discriminator steps, then one generator step; returns the generator's and the last
        discriminator's loss dicts. ``discriminator``: the module(s) frozen for the generator's loss
        (``critic_modules()`` when None); ``clip_value``: the discriminator's gradients clipped to [-c, c];
        ``hold_generator``: the generator's loss is computed but its weights stay (the step still counts)."""
        if int(steps) != steps or steps < 1:
            raise ValueError(f"steps={steps}: use an integer >= 1")
        opt_g, opt_d = self.optimizers()
        for _ in range(int(steps)):  # not counted in global_step
            d = discriminator_loss()
            self.check_finite(d["loss"], names[1])
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(d["loss"])
            if clip_value is not None:
                self.clip_gradients(opt_d, gradient_clip_val=clip_value, gradient_clip_algorithm="value")
            self.trainer.strategy.optimizer_step(opt_d.optimizer, closure=lambda: None)

        if discriminator is None:
            discriminator = self.critic_modules()
        modules = [discriminator] if isinstance(discriminator, nn.Module) else list(discriminator)
        with ExitStack() as frozen:
            for module in modules:
                frozen.enter_context(no_param_grads(module))
            g = generator_loss()
        self.check_finite(g["loss"], names[0])
        opt_g.zero_grad(set_to_none=True)
        if not hold_generator:
            self.manual_backward(g["loss"])
        opt_g.step()  # counted: one global step per call (parameters without gradients stay, and so do their moments)
        return g, d


__all__ = [
    "LOSSES", "AdversarialTraining", "LazyR1", "discriminator_loss", "double_backward_attention", "generator_loss",
    "r1_penalty",
]
