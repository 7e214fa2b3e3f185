"""The fake-score engine and its methods (DMD2, SiD, SiDA, f-distill): their generator losses on exact Gaussian data,
f-distill's weights against the f-divergences' second derivatives, and the methods' options and errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from fewstep.errors import CheckpointError, ConfigError
from fewstep.methods import DMD2, METHODS, BatchNoise, EDMTeacher, FDistill, SiD, SiDA
from fewstep.methods.dmd2 import distribution_matching_grad, distribution_matching_loss
from fewstep.methods.fake_score import FakeScoreDistillation
from fewstep.methods.fdistill import DIVERGENCES, divergence_weights
from fewstep.methods.sid import denoising_normaliser, score_identity_loss
from fewstep.samplers.grids import karras_warp

from helpers import SHAPE, UNET, randomize, student, teacher

# -- exact Gaussian data -------------------------------------------------------------------------------------------
# Data N(MU, S^2 I) in DIM dimensions; a linear generator G(z) = m + c z has the law N(m, c^2 I). Both laws' exact
# denoisers and their noised densities are closed-form, so each method's generator loss can be evaluated with the
# exact teacher, the exact fake denoiser of the generator's current law and the exact density ratio (the GAN head's
# optimum) in place of networks.
DIM, MU, S = 4, 0.3, 0.5
LOSSES = ("dmd", "sid", "sida", *(f"fdistill_{name}" for name in DIVERGENCES))
RANGES = {"sid": (0.2, 1.0), "sida": (0.2, 1.0)}  # the generator loss's noise levels: SiD's, else DMD2's


def gaussian_denoiser(x, sigma, mean, std):
    return mean + std**2 / (std**2 + sigma**2) * (x - mean)


def gaussian_log_density(x, mean, variance):
    return (-0.5 * (x - mean) ** 2 / variance - 0.5 * torch.log(2 * math.pi * variance)).sum(1)


def generator_loss(name: str, m: torch.Tensor, c: torch.Tensor, generator: torch.Generator, n: int = 256):
    """``name``'s generator loss for G(z) = m + c z with the exact teacher, fake denoiser and density ratio."""
    z = torch.randn(n, DIM, generator=generator, dtype=torch.float64)
    x0 = m + c * z
    low, high = RANGES.get(name, (0.02, 0.98))
    sigma = karras_warp(low + (high - low) * torch.rand(n, 1, generator=generator, dtype=torch.float64))
    xt = x0 + sigma * torch.randn(n, DIM, generator=generator, dtype=torch.float64)
    m_, c_ = m.detach(), c.detach()  # the fake denoiser and the discriminator are frozen in the generator's step
    real, fake = gaussian_denoiser(xt, sigma, MU, S), gaussian_denoiser(xt, sigma, m_, c_)
    log_ratio = gaussian_log_density(xt, MU, S**2 + sigma**2) - gaussian_log_density(xt, m_, c_**2 + sigma**2)
    if name in ("sid", "sida"):
        loss = score_identity_loss(x0, real, fake, 1.2)
        if name == "sida":  # SiDA's adversarial term with the optimal discriminator, whose logit is log r
            loss = loss + F.softplus(-log_ratio.clamp(-10, 10)).mean() * (1 / denoising_normaliser(x0, real)).mean()
        return loss
    grad = distribution_matching_grad(x0, real.detach(), fake.detach())
    if name.startswith("fdistill_"):
        grad = grad * divergence_weights(name.removeprefix("fdistill_"), log_ratio, torch.mean).view(-1, 1)
    return distribution_matching_loss(x0, grad)


@pytest.mark.parametrize("name", LOSSES)
def test_the_generator_gradient_vanishes_when_the_generator_s_law_is_the_data_s(name):
    m = torch.tensor(MU, dtype=torch.float64, requires_grad=True)
    c = torch.tensor(S, dtype=torch.float64, requires_grad=True)
    grads = torch.autograd.grad(generator_loss(name, m, c, torch.Generator().manual_seed(0)), [m, c])
    assert max(g.abs().item() for g in grads) < 1e-12


@pytest.mark.parametrize("name", LOSSES)
def test_the_expected_generator_gradient_points_to_the_data_s_mean_and_scale(name):
    generator = torch.Generator().manual_seed(1)
    for m0, c0 in ((MU + 1.0, S), (MU, 0.25 * S), (MU, 2.0 * S)):
        m = torch.tensor(m0, dtype=torch.float64, requires_grad=True)
        c = torch.tensor(c0, dtype=torch.float64, requires_grad=True)
        gm, gc = torch.autograd.grad(generator_loss(name, m, c, generator, n=20_000), [m, c])
        # a descent step moves each wrong parameter toward the truth
        assert gm.item() * (m0 - MU) >= 0 and gc.item() * (c0 - S) >= 0
        wrong = (gm, m0 - MU) if m0 != MU else (gc, c0 - S)
        assert wrong[0].item() * wrong[1] > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", LOSSES)
def test_a_linear_generator_learns_the_data_s_mean_and_scale(name):
    generator = torch.Generator().manual_seed(2)
    m = torch.tensor(MU + 1.0, dtype=torch.float64, requires_grad=True)
    c = torch.tensor(0.25 * S, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([m, c], lr=0.01)
    for _ in range(400):
        optimizer.zero_grad()
        generator_loss(name, m, c, generator).backward()
        optimizer.step()
    assert abs(m.item() - MU) < 0.03 and abs(c.item() - S) < 0.03, (m.item(), c.item())


# -- f-distill -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_each_divergence_weight_is_r_squared_times_f_second_derivative(name):
    f, h = DIVERGENCES[name]
    r = torch.logspace(-3, 3, 41, dtype=torch.float64, requires_grad=True)
    (first,) = torch.autograd.grad(f(r).sum(), r, create_graph=True)
    (second,) = torch.autograd.grad(first.sum(), r)
    torch.testing.assert_close(h(r.detach().log()), r.detach() ** 2 * second, rtol=1e-9, atol=1e-12)
    assert f(torch.ones(1, dtype=torch.float64)).abs().item() < 1e-12  # f(1) = 0: a divergence


def test_the_divergence_weights_have_mean_one_over_the_batch():
    log_ratio = torch.linspace(-4, 4, 9)
    for name in DIVERGENCES:
        weights = divergence_weights(name, log_ratio, torch.mean)
        assert abs(weights.mean().item() - 1) < 1e-6 and (weights > 0).all()
    assert torch.equal(divergence_weights("reverse_kl", log_ratio, torch.mean), torch.ones(9))
    assert divergence_weights("forward_kl", torch.tensor([0.0, 1e4]), torch.mean).isfinite().all()  # clamped log r


def test_fdistill_with_reverse_kl_gives_dmd2_s_generator_gradient_on_the_same_batch():
    tutor = teacher(seed=3)
    methods = [student(cls, tutor, **options) for cls, options in
               ((DMD2, {}), (FDistill, {"divergence": "reverse_kl"}))]
    methods[1].load_state_dict(methods[0].state_dict())
    x = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(0)) * 80
    grads = []
    for method in methods:
        randomize(method.fake_net, seed=4, scale=0.05)  # a fake score unlike the teacher: a nonzero gradient
        fake = method.student_x0(x, torch.full((4,), 80.0))
        loss = method.generator_loss(fake, None, BatchNoise.fixed(7, 4, "cpu"))["loss"]
        grads.append(torch.autograd.grad(loss, list(method.net.parameters())))
    assert max(g.abs().max().item() for g in grads[0]) > 0
    for ours, theirs in zip(grads[1], grads[0]):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-9)


# -- SiD -------------------------------------------------------------------------------------------------------------
def test_sid_s_generator_is_the_denoiser_at_sigma_init_and_samples_in_one_step():
    from fewstep.generate import generate
    from fewstep.samplers import SeededNoise

    method = student(SiD, sigma_init=2.5)
    torch.testing.assert_close(method.student_sigmas, torch.tensor([2.5, 0.0]))
    samples, _, nfe = generate(method, 3, "consistency", 1, seed=5)
    z = SeededNoise(range(5, 8), "cpu").randn(tuple(SHAPE))  # the seeds' x_T / sigma_max
    assert nfe == 1
    with torch.no_grad():
        torch.testing.assert_close(samples, method.denoiser(2.5 * z, torch.full((3,), 2.5)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", [SiD, SiDA])
def test_sid_s_generator_gradient_vanishes_while_its_fake_score_equals_the_teacher(cls):
    method = student(cls)  # the fake score starts as the teacher: D_fake = D_real as functions
    x = 2.5 * torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(0))

    def largest_gradient():
        fake = method.student_x0(x, torch.full((4,), 2.5))
        loss = method.generator_loss(fake, None, BatchNoise.fixed(1, 4, "cpu"))["dm"]
        grads = torch.autograd.grad(loss, list(method.net.parameters()), allow_unused=True)
        return max(g.abs().max().item() for g in grads if g is not None)

    at_the_teacher = largest_gradient()
    randomize(method.fake_net, seed=4, scale=0.05)
    assert at_the_teacher < 1e-6 * largest_gradient()  # zero but for float32 rounding


# -- the engine: one place, every method on it -----------------------------------------------------------------------
def test_every_distribution_matching_method_runs_on_the_engine():
    assert {name for name, (cls, _) in METHODS.items() if issubclass(cls, FakeScoreDistillation)} == {
        "dmd2", "sid", "sida", "fdistill"}
    for cls in (SiD, SiDA, FDistill):
        method = student(cls, head_channels=4)
        modules = method.critic_modules()
        assert modules[0] is method.fake_net and (len(modules) == 2) == method.gan
        for fake, real in zip(method.fake_net.state_dict().values(), method.teacher.net.state_dict().values()):
            assert torch.equal(fake, real)  # the fake denoiser starts as the teacher


# -- bad input, in one line -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls, options, match", [
    (FDistill, {"divergence": "kl"}, "unknown method.divergence 'kl': choose one of reverse_kl, forward_kl, js"),
    (FDistill, {"divergence": "js", "gan_weight": 0.0, "critic_gan_weight": 0.0}, "set method.critic_gan_weight > 0"),
    (SiD, {"alpha": 2.0}, r"method.alpha=2.0: use 0.0 <= alpha <= 1.5"),
    (SiD, {"alpha": -0.5}, r"method.alpha=-0.5"),
    (SiD, {"alpha": float("nan")}, r"method.alpha=nan"),
    (SiD, {"sigma_init": 0.0}, "method.sigma_init=0.0"),
    (SiDA, {"gan_weight": 0.0}, "sida needs its adversarial term"),
])
def test_bad_options_are_refused_in_one_line(cls, options, match):
    with pytest.raises(ConfigError, match=match) as error:
        cls(net=UNET, data_shape=SHAPE, **options)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("cls", [SiD, SiDA, FDistill])
def test_a_teacher_of_another_shape_is_refused_in_one_line(cls):
    method = cls(net=UNET, data_shape=SHAPE)
    wide = EDMTeacher(net=UNET, data_shape=[1, 16, 16])
    with pytest.raises(CheckpointError, match=r"makes images of shape \[1, 16, 16\] and this data set has \[1, 8, 8\]"):
        method.attach_teacher(wide)


def test_sida_starts_from_a_sid_run_and_refuses_another_method_s(tmp_path):
    import lightning as L

    from fewstep.checkpoints import load_method

    sid = student(SiD)
    randomize(sid.net, seed=9)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    for method, name in ((sid, "sid.ckpt"), (student(DMD2), "dmd2.ckpt")):
        trainer.strategy.connect(method)
        trainer.save_checkpoint(tmp_path / name)
    sida = student(SiDA, sid_ckpt=str(tmp_path / "sid.ckpt"))
    assert sida.generator_start() == str(tmp_path / "sid.ckpt") and student(SiD).generator_start() is None
    sida.start_generator(load_method(tmp_path / "sid.ckpt"), tmp_path / "sid.ckpt")
    for ours, theirs in zip(sida.net.state_dict().values(), sid.net.state_dict().values()):
        assert torch.equal(ours, theirs)
    with pytest.raises(CheckpointError, match="holds a DMD2 model, not a method=sid run's"):
        sida.start_generator(load_method(tmp_path / "dmd2.ckpt"), tmp_path / "dmd2.ckpt")
    with pytest.raises(CheckpointError, match="another network, data shape, class count or sigma_init"):
        student(SiDA, sigma_init=2.0).start_generator(load_method(tmp_path / "sid.ckpt"), tmp_path / "sid.ckpt")


@pytest.mark.parametrize("cls", [SiD, SiDA, FDistill])
def test_a_conditional_student_follows_its_teacher_s_guided_score(cls):
    tutor = teacher(seed=5, conditional=True, num_classes=3)
    method = student(cls, tutor, conditional=True, num_classes=3, guidance=1.5, head_channels=4)
    randomize(method.fake_net, seed=6, scale=0.05)
    labels = torch.tensor([0, 1, 2, 3])  # 3: the "no label" class of classifier-free guidance
    x = method.state_sigmas[0] * torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(0))
    fake = method.student_x0(x, method.state_sigmas[0].expand(4), labels)
    losses = [method.generator_loss(fake, labels, BatchNoise.fixed(2, 4, "cpu"))["dm"] for _ in range(2)]
    assert torch.isfinite(losses[0]) and torch.equal(losses[0], losses[1])
    unguided = student(cls, tutor, conditional=True, num_classes=3, guidance=0.0, head_channels=4)
    unguided.load_state_dict(method.state_dict())
    assert not torch.equal(unguided.generator_loss(fake, labels, BatchNoise.fixed(2, 4, "cpu"))["dm"], losses[0])


# -- SiDA's schedule: a held generator, a late GAN term, clipped fake-score gradients ----------------------------------
def fit_steps(method, steps: int, batch: int = 4) -> None:
    """``steps`` training steps of ``method`` on fixed random images, ``batch`` a step."""
    import warnings

    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    x = torch.rand(batch * steps, *SHAPE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    data = DataLoader(TensorDataset(x, torch.zeros(len(x), dtype=torch.long)), batch_size=batch)
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on workers and validation
        trainer.fit(method, train_dataloaders=data)


def test_a_held_generator_keeps_its_weights_while_the_fake_score_trains_and_the_steps_count():
    method = student(SiDA, hold_images=8)  # two steps of 4 images held, the third trains
    before = {k: v.clone() for k, v in method.net.state_dict().items()}
    fake_before = {k: v.clone() for k, v in method.fake_net.state_dict().items()}
    fit_steps(method, 2)
    assert method.global_step == 2
    assert all(torch.equal(before[k], v) for k, v in method.net.state_dict().items())
    assert any(not torch.equal(fake_before[k], v) for k, v in method.fake_net.state_dict().items())
    method = student(SiDA, hold_images=8)
    fit_steps(method, 3)
    assert any(not torch.equal(before[k], v) for k, v in method.net.state_dict().items())


def test_the_gan_term_joins_the_generator_loss_from_gan_start_images_on(monkeypatch):
    seen = []
    original = SiDA.adversarial_loss
    monkeypatch.setattr(SiDA, "adversarial_loss", lambda self, *a: seen.append(self.global_step) or original(self, *a))
    fit_steps(student(SiDA, gan_start_images=8), 4)
    assert seen == [2, 3]  # steps 0 and 1 saw 0 and 4 images: SiD's loss alone


def test_critic_clip_bounds_every_fake_score_gradient_value(monkeypatch):
    clipped = []
    original = SiDA.clip_gradients

    def record(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        original(self, optimizer, gradient_clip_val=gradient_clip_val, gradient_clip_algorithm=gradient_clip_algorithm)
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        clipped.append(max(g.abs().max().item() for g in grads))

    monkeypatch.setattr(SiDA, "clip_gradients", record)
    fit_steps(student(SiDA, critic_clip=1e-4), 2)
    assert len(clipped) == 2 and max(clipped) <= 1e-4
    with pytest.raises(ConfigError, match="need images >= 0 and a clip value > 0"):
        student(SiDA, critic_clip=0.0)
