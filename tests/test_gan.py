"""The GAN machinery GDD and DMD2 share (fewstep.methods.gan): losses, lazy R1, the alternating step."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fewstep.methods.gan import LOSSES, AdversarialTraining, LazyR1, discriminator_loss, generator_loss, r1_penalty

# -- losses --------------------------------------------------------------------------------------------------


def softplus(v: float) -> float:
    return math.log1p(math.exp(v))


def test_nonsaturating_losses_are_their_softplus_forms():
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])
    expected_d = (softplus(0.5) + softplus(-3.0)) / 2 + (softplus(-2.0) + softplus(1.0)) / 2
    torch.testing.assert_close(discriminator_loss(real, fake), torch.tensor(expected_d))
    torch.testing.assert_close(discriminator_loss(real, fake, "nonsaturating"), torch.tensor(expected_d))
    torch.testing.assert_close(generator_loss(fake), torch.tensor((softplus(-0.5) + softplus(3.0)) / 2))
    # at D = 0 everywhere: 2 log 2 and log 2
    zeros = torch.zeros(3)
    torch.testing.assert_close(discriminator_loss(zeros, zeros), torch.tensor(2 * math.log(2)))
    torch.testing.assert_close(generator_loss(zeros), torch.tensor(math.log(2)))


def test_hinge_losses_are_their_relu_forms():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-3.0, 0.5])
    # relu(1 + fake) = [0, 1.5], relu(1 - real) = [0, 0.5]
    torch.testing.assert_close(discriminator_loss(real, fake, "hinge"), torch.tensor(0.75 + 0.25))
    torch.testing.assert_close(generator_loss(fake, "hinge"), torch.tensor(1.25))


def test_losses_are_selected_by_name():
    assert tuple(LOSSES) == ("nonsaturating", "hinge")
    with pytest.raises(ValueError, match="unknown GAN loss 'wasserstein'.*nonsaturating, hinge"):
        discriminator_loss(torch.zeros(1), torch.zeros(1), "wasserstein")
    with pytest.raises(ValueError, match="unknown GAN loss"):
        generator_loss(torch.zeros(1), "wasserstein")


# -- R1 ------------------------------------------------------------------------------------------------------


class Linear(nn.Module):
    """D(x) = w . x over all coordinates: grad_x D = w, so R1 = gamma / 2 |w|^2."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(w.clone())

    def forward(self, x):
        return (x.flatten(1) * self.w.flatten()).sum(1)


def test_r1_is_gamma_over_two_times_the_squared_gradient_norm():
    torch.manual_seed(0)
    w = torch.randn(2, 3, 3)
    discriminator = Linear(w)
    x = torch.randn(5, 2, 3, 3)
    logits, r1 = LazyR1(gamma=0.3, interval=4).penalty(discriminator, x)
    torch.testing.assert_close(logits, discriminator(x))
    torch.testing.assert_close(r1, 0.3 / 2 * w.square().sum())
    assert not x.requires_grad  # the caller's tensor is left alone
    # it is backpropagated into the discriminator: d R1 / dw = gamma w
    r1.backward()
    torch.testing.assert_close(discriminator.w.grad, 0.3 * w)
    # the bare function, on an input that requires grad
    x = x.requires_grad_(True)
    torch.testing.assert_close(r1_penalty(discriminator(x), x, 2.0), w.square().sum())


def test_lazy_r1_is_due_every_interval_steps_and_then_scaled_by_the_interval():
    r1 = LazyR1(gamma=0.1, interval=4)
    assert [r1.due(step) for step in range(9)] == [True, False, False, False, True, False, False, False, True]
    assert not LazyR1(gamma=0.0, interval=4).due(0)
    assert all(LazyR1(gamma=0.1, interval=1).due(step) for step in range(3))
    discriminator, x = Linear(torch.full((4,), 0.5)), torch.randn(3, 4)  # |w|^2 = 1
    loss = torch.tensor(0.7)
    for step in range(6):
        penalty = r1.penalty(discriminator, x)[1] if r1.due(step) else None
        total = r1.lazy(loss, penalty)
        expected = 0.7 + 4 * 0.1 / 2 * 1.0 if step % 4 == 0 else 0.7
        torch.testing.assert_close(total, torch.tensor(expected))
    for gamma, interval in [(-1.0, 4), (0.1, 0), (0.1, 2.5)]:
        with pytest.raises(ValueError, match="interval"):
            LazyR1(gamma, interval)


# -- the alternating step ------------------------------------------------------------------------------------


class ToyGAN(AdversarialTraining, pl.LightningModule):
    """G(z) = A z, D(x) = w . x; records what each loss callable sees."""

    def __init__(self, steps: int = 3):
        super().__init__()
        self.generator, self.discriminator = nn.Linear(2, 2, bias=False), nn.Linear(2, 1, bias=False)
        self.steps, self.automatic_optimization = steps, False
        self.events, self.d_params, self.g_params, self.d_grads, self.d_requires_grad = [], [], [], [], []

    def snapshot(self, module):
        return [p.detach().clone() for p in module.parameters()]

    def check_finite(self, value, what="training", hint=None):
        if not torch.isfinite(value).all():
            raise FloatingPointError(f"the {what} loss is not finite")

    def training_step(self, batch, batch_idx):
        (z,) = batch

        def discriminator_loss_fn():
            self.events.append("d")
            self.d_params.append(self.snapshot(self.discriminator))
            self.g_params.append(self.snapshot(self.generator))
            fake = self.generator(z).detach()
            return {"loss": discriminator_loss(self.discriminator(z + 1), self.discriminator(fake)).squeeze()}

        def generator_loss_fn():
            self.events.append("g")
            self.d_params.append(self.snapshot(self.discriminator))
            self.g_params.append(self.snapshot(self.generator))
            self.d_grads.append([p.grad.clone() for p in self.discriminator.parameters()])
            self.d_requires_grad.append([p.requires_grad for p in self.discriminator.parameters()])
            return {"loss": generator_loss(self.discriminator(self.generator(z)))}

        self.adversarial_step(generator_loss_fn, discriminator_loss_fn, self.discriminator, steps=self.steps)
        self.events.append("end")
        self.d_params.append(self.snapshot(self.discriminator))
        self.g_params.append(self.snapshot(self.generator))
        self.d_grads.append([p.grad.clone() for p in self.discriminator.parameters()])

    def configure_optimizers(self):
        sgd = [torch.optim.SGD(module.parameters(), lr=0.1) for module in (self.generator, self.discriminator)]
        return sgd


def fit(module, max_steps):
    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(16, 2)), batch_size=4)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    trainer.fit(module, data)
    return trainer


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_alternating_step_updates_the_discriminator_k_times_then_the_generator_once_with_the_discriminator_frozen():
    module = ToyGAN(steps=3)
    trainer = fit(module, max_steps=2)
    assert trainer.global_step == 2  # only the generator steps count
    assert module.events == ["d", "d", "d", "g", "end"] * 2
    for call in range(2):
        snaps = slice(5 * call, 5 * call + 5)
        d, g = module.d_params[snaps], module.g_params[snaps]
        # the discriminator changes at each of its 3 steps and not at the generator's
        assert not same(d[0], d[1]) and not same(d[1], d[2]) and not same(d[2], d[3])
        assert same(d[3], d[4])
        # the generator changes only at its own step
        assert same(g[0], g[1]) and same(g[1], g[2]) and same(g[2], g[3])
        assert not same(g[3], g[4])
        # frozen during the generator's loss: no requires_grad, no gradient added to the discriminator's
        assert module.d_requires_grad[call] == [False]
        assert same(module.d_grads[2 * call], module.d_grads[2 * call + 1])
    assert all(p.requires_grad for p in module.discriminator.parameters())  # unfrozen afterwards


@pytest.mark.parametrize("steps", [1, 2])
def test_alternating_step_counts_one_global_step_per_call(steps):
    module = ToyGAN(steps=steps)
    trainer = fit(module, max_steps=3)
    assert trainer.global_step == 3
    assert module.events.count("d") == 3 * steps and module.events.count("g") == 3


def test_alternating_step_checks_each_loss_and_names_it():
    class Diverging(ToyGAN):
        def training_step(self, batch, batch_idx):
            self.adversarial_step(
                lambda: {"loss": torch.tensor(0.0, requires_grad=True)}, lambda: {"loss": torch.tensor(float("nan"))},
                self.discriminator, names=("generator", "critic"),
            )

    with pytest.raises(FloatingPointError, match="the critic loss"):
        fit(Diverging(), max_steps=1)
