"""sCM (sCT and sCD on TrigFlow): the exact consistency function is the objective's fixed point, sCD starts at its
teacher, every fewstep guarantee holds (debug runs, two ranks, resume), bad input is one line, and on a 2-D mixture
one-step sCT samples beat a teacher's few-step Euler samples."""

import math

import pytest
import torch

from fewstep.data.gmm import GaussianMixture
from fewstep.errors import CheckpointError, ConfigError
from fewstep.methods import SCM, BatchNoise, EDMTeacher
from fewstep.methods.scm import normalise_tangent, scm_tangent
from fewstep.processes import trigflow

from helpers import MLP, SHAPE, TINY, UNET, exact_flow_euler_samples, fit_to_mixture, randomize, teacher

SD = 0.5
MU, S = 0.3, 0.2  # Gaussian data N(MU, S^2 I)


# -- exact consistency functions --------------------------------------------------------------------------------------
def gaussian_consistency(x_t, t):
    """The PF-ODE of Gaussian data keeps (x_t - cos t MU) / std_t: its endpoint is MU + S (x_t - cos t MU) / std_t."""
    t = t.view(-1, *[1] * (x_t.ndim - 1))
    std = torch.sqrt(torch.cos(t) ** 2 * S**2 + torch.sin(t) ** 2 * SD**2)
    return MU + S * (x_t - torch.cos(t) * MU) / std


def mixture_consistency(mixture, steps=150, sigma_end=1e-3):
    """The endpoint at sigma_end of the mixture's exact PF-ODE from (x_t, t), by RK4 in lambda = ln sigma, where
    dx_t/dlambda = cos(t) (cos(t) x_t - D) is bounded: a function of (x_t, t) constant along every trajectory."""

    def f(x_t, t):
        start, end = torch.log(SD * torch.tan(t)), math.log(sigma_end)
        h = ((end - start) / steps).view(-1, 1)

        def drift(x, lam):
            sigma = lam.exp()
            cos = (1 / torch.sqrt(1 + (sigma / SD) ** 2)).view(-1, 1)
            return cos * (cos * x - mixture.denoiser(x / cos, sigma))

        x, lam = x_t, start
        for _ in range(steps):
            k1 = drift(x, lam)
            k2 = drift(x + h / 2 * k1, lam + h.view(-1) / 2)
            k3 = drift(x + h / 2 * k2, lam + h.view(-1) / 2)
            k4 = drift(x + h * k3, lam + h.view(-1))
            x, lam = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4), lam + h.view(-1)
        return x * math.sqrt(1 + (sigma_end / SD) ** 2)  # x_t / cos(t_end): EDM's x at sigma_end

    return f


def consistency_velocity(f):
    """The network output F(x_t / sigma_d, t) whose consistency function cos t x_t - sigma_d sin t F is f."""

    def velocity(x_scaled, t):
        x_t = SD * x_scaled
        return trigflow.velocity_from_denoised(x_t, f(x_t, t), t, SD)

    return velocity


def gaussian():
    return GaussianMixture(torch.full((1, 2), MU, dtype=torch.float64), torch.tensor([S], dtype=torch.float64))


def mixture():
    return GaussianMixture.benchmark(dim=2, modes=8, std=0.1)


def noisy_states(law, n=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x0 = law.sample(n, generator)[0]
    t = torch.rand(n, generator=generator, dtype=torch.float64) * 1.4 + 0.1
    z = SD * torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    return x0, z, t


@pytest.mark.parametrize("law, f", [(gaussian, lambda _: gaussian_consistency), (mixture, mixture_consistency)],
                         ids=["gaussian", "mixture"])
def test_the_exact_consistency_function_is_the_fixed_point_of_the_objective(law, f):
    law_ = law()
    x0, z, t = noisy_states(law_)
    x_t = trigflow.interpolate(x0, z, t)
    dx_dt = SD * trigflow.trigflow_velocity(law_.denoiser, SD)(x_t, t)  # the exact PF-ODE (sCD's exact teacher)
    velocity = consistency_velocity(f(law_))
    out, g = scm_tangent(velocity, x_t, t, dx_dt, SD)
    scale = out.abs().max()
    assert g.abs().max() < 1e-7 * scale  # the target g = cos t df/dt vanishes: F - F^- - g = 0
    # a function that is not the consistency function is not a fixed point
    _, g_wrong = scm_tangent(lambda a, s: 1.1 * velocity(a, s), x_t, t, dx_dt, SD)
    assert g_wrong.abs().max() > 1e-2 * scale


def test_sct_targets_are_unbiased_given_the_state():
    # g is affine in dx_t/dt, so sCT's conditional velocities average to sCD's exact-teacher target: here 0
    law_ = gaussian()
    t = torch.full((20_000,), 0.8, dtype=torch.float64)
    x_t = torch.tensor([[0.5, -0.1]], dtype=torch.float64).expand(len(t), 2)
    cos, sin = math.cos(0.8), math.sin(0.8)
    variance = cos**2 * S**2 + sin**2 * SD**2
    generator = torch.Generator().manual_seed(4)
    x0 = MU + cos * S**2 / variance * (x_t - cos * MU)
    x0 = x0 + math.sqrt(S**2 - (cos * S**2) ** 2 / variance) * torch.randn(x_t.shape, generator=generator, dtype=torch.float64)
    z = (x_t - cos * x0) / sin
    _, g = scm_tangent(consistency_velocity(gaussian_consistency), x_t, t, trigflow.velocity_target(x0, z, t), SD)
    assert g.std(0).min() > 0.05  # each sample's target is noisy
    torch.testing.assert_close(g.mean(0), torch.zeros(2, dtype=torch.float64), rtol=0, atol=5e-3)
    del law_


def test_tangent_normalisation_bounds_each_samples_target():
    g = torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.03, 0.04]])
    normalised = normalise_tangent(g, 0.1)
    torch.testing.assert_close(normalised.norm(dim=1), torch.tensor([5 / 5.1, 0.0, 0.05 / 0.15]))
    assert normalise_tangent(g, None) is g


def exact_scd(law, **kwargs):
    """An scd method over 2-D data whose teacher is ``law``'s exact denoiser and whose network is replaced by the
    exact consistency function."""
    edm = EDMTeacher(net=MLP, data_shape=[2])
    edm.denoiser = lambda x, sigma, class_labels=None: law.denoiser(x.double(), sigma.double()).to(x.dtype)
    method = SCM(net=MLP, data_shape=[2], mode="scd", adaptive_weight=False, tangent_warmup=0, **kwargs)
    method.attach_teacher(edm)
    method.double()
    return method


def test_the_method_loss_of_the_exact_consistency_function_is_zero():
    law_ = gaussian()
    method = exact_scd(law_, tangent_c=None)
    method.velocity = lambda a, t, class_labels=None: consistency_velocity(gaussian_consistency)(a, t)
    x0 = law_.sample(64, torch.Generator().manual_seed(5))[0]
    assert float(method.loss(x0, None, BatchNoise(64, "cpu"))) < 1e-16
    method.velocity = lambda a, t, class_labels=None: 1.1 * consistency_velocity(gaussian_consistency)(a, t)
    assert float(method.loss(x0, None, BatchNoise(64, "cpu"))) > 1e-4


# -- the model ----------------------------------------------------------------------------------------------------
def test_an_scd_student_starts_as_its_teachers_denoiser():
    teacher_ = teacher(seed=3)
    method = SCM(net=UNET, data_shape=SHAPE, mode="scd")
    method.attach_teacher(teacher_)
    x = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(0))
    for sigma in (0.01, 0.7, 20.0):  # float32: the round trip through TrigFlow at sigma = 0.01 moves a pixel by up to 2e-5
        torch.testing.assert_close(method.denoiser(x, torch.full((4,), sigma)), teacher_.denoiser(x, sigma), rtol=1e-4, atol=5e-5)


def test_an_scd_students_teacher_is_autoguided_inside_its_interval_and_sct_takes_no_guide():
    guide = teacher(seed=1)
    method = SCM(net=UNET, data_shape=SHAPE, mode="scd", guidance=0.5, guidance_interval=[0.5, 5.0])
    method.attach_teacher(teacher(seed=3))
    method.attach_guide(guide, "weak.ckpt")
    x = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(0))
    for sigma, guided in ((2.0, True), (0.2, False), (20.0, False)):
        t = trigflow.sigma_to_t(torch.full((4,), sigma), SD)
        x_t = x * t.cos().view(-1, 1, 1, 1)  # TrigFlow's x_t of EDM's x at sigma = sigma_d tan(t)
        main, weak = method.teacher.denoiser(x, sigma), guide.denoiser(x, sigma)
        D = 1.5 * main - 0.5 * weak if guided else main
        expected = SD * trigflow.trigflow_velocity(lambda *_: D, SD)(x_t, t)  # the PF-ODE of the guided teacher
        torch.testing.assert_close(method.teacher_velocity(x_t, t), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="use them with method.mode=scd"):
        SCM(net=UNET, data_shape=SHAPE, guide="weak.ckpt")
    with pytest.raises(ConfigError, match="attach the teacher first"):
        SCM(net=UNET, data_shape=SHAPE, mode="scd").attach_guide(guide)


def test_consistency_sampling_uses_the_papers_grids_at_any_nfe():
    method = SCM(net=UNET, data_shape=SHAPE)
    torch.testing.assert_close(method.sampling_sigmas(1), torch.tensor([80.0, 0.0]))
    torch.testing.assert_close(method.sampling_sigmas(2), torch.tensor([80.0, SD * math.tan(1.1), 0.0]))
    times = trigflow.sigma_to_t(method.sampling_sigmas(4)[1:-1].double(), SD)
    torch.testing.assert_close(times, torch.tensor([1.1, 1.1 * 2 / 3, 1.1 / 3], dtype=torch.float64))
    assert method.sampling_sigmas(3, "karras")[0] == 80.0
    from fewstep.generate import generate

    for sampler, nfe in (("heun", 1), ("consistency", 2), ("euler", 3)):  # any name: consistency sampling
        samples, _, used = generate(method, 3, sampler, nfe)
        assert used == nfe and samples.shape == (3, *SHAPE)
    # stochastic steps draw from the seeds: a sample depends on its seed alone
    a, _, _ = generate(method, 4, "consistency", 2, seed=0, batch_size=4)
    b, _, _ = generate(method, 2, "consistency", 2, seed=2, batch_size=1)
    torch.testing.assert_close(a[2:], b)


# -- runs ---------------------------------------------------------------------------------------------------------
def test_sct_and_scd_debug_runs_finish_from_an_empty_directory(compose_cfg, tmp_path):
    from fewstep.train import train

    for extra in ([], ["method.mode=scd"]):
        cfg = compose_cfg("train", ["method=scm", "data=digits", *TINY, f"paths.root={tmp_path}/outputs", *extra])
        metrics = train(cfg)
        assert math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["val/loss"])
    assert list((tmp_path / "outputs" / "edm_teacher").glob("digits/*/checkpoints/last.ckpt"))  # scd's debug teacher


def test_one_process_and_two_ranks_give_one_loss_in_both_modes():
    def ranks(step):
        return BatchNoise.for_step(0, step, 8, "cpu"), *(BatchNoise.for_step(0, step, 4, "cpu", rank, 2) for rank in (0, 1))

    conditional = teacher(num_classes=3, conditional=True, label_dropout=0.5)
    for method in (randomize(SCM(net=UNET, data_shape=SHAPE, tangent_warmup=0)),
                   SCM(net=UNET, data_shape=SHAPE, mode="scd", num_classes=3, conditional=True, guidance=1.5)):
        if method.hparams.mode == "scd":
            method.attach_teacher(conditional)
            randomize(method.net, seed=1)
        method.train()
        generator = torch.Generator().manual_seed(11)
        x0, y = torch.rand(8, *SHAPE, generator=generator) * 2 - 1, torch.randint(3, (8,), generator=generator)

        def loss(rows, rng):
            return method.loss(x0[rows], method.training_labels(y[rows], rng), rng)

        one, r0, r1 = ranks(3)
        whole = loss(slice(None), one)
        torch.testing.assert_close((loss(slice(0, 4), r0) + loss(slice(4, None), r1)) / 2, whole, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(loss(slice(None), ranks(4)[0]), whole)


# -- bad input ----------------------------------------------------------------------------------------------------
def one_line(error) -> str:
    message = str(error.value if error.value.__cause__ is None else error.value.__cause__)
    assert "\n" not in message
    return message


def test_bad_settings_are_refused_in_one_line():
    for options, match in (({"mode": "sctd"}, "unknown method.mode=sctd: use sct"),
                           ({"time_input": "fourier"}, "unknown method.time_input=fourier"),
                           ({"jvp_method": "reverse"}, "unknown method.jvp_method=reverse"),
                           ({"sample_t_mid": 1.6}, "sample_t_mid=1.6: use a time in"),
                           ({"tangent_c": 0.0}, "tangent_c > 0")):
        with pytest.raises(ConfigError, match=match) as error:
            SCM(net=UNET, data_shape=SHAPE, **options)
        one_line(error)


def test_scd_without_a_teacher_and_sct_with_one_are_refused_in_one_line(compose_cfg, tmp_path):
    from fewstep.train import train

    scd = SCM(net=UNET, data_shape=SHAPE, mode="scd")
    with pytest.raises(ConfigError, match=r"scd mode distils a teacher and has none") as error:
        scd.loss(torch.zeros(2, *SHAPE), None, BatchNoise(2, "cpu"))
    one_line(error)
    with pytest.raises(ConfigError, match="trains from data without a teacher; drop teacher.ckpt") as error:
        train(compose_cfg("train", ["method=scm", "teacher.ckpt=x.ckpt", "data=digits", *TINY, f"paths.root={tmp_path}"]))
    one_line(error)
    with pytest.raises(ConfigError, match="method.mode=sct trains from data without a teacher") as error:
        SCM(net=UNET, data_shape=SHAPE).attach_teacher(teacher())
    one_line(error)


def test_a_teacher_of_another_sigma_data_or_shape_is_refused_in_one_line():
    with pytest.raises(CheckpointError, match="its sigma_data is 0.5, the student's is 1.0") as error:
        SCM(net=UNET, data_shape=SHAPE, mode="scd", sigma_data=1.0).attach_teacher(teacher())
    one_line(error)
    with pytest.raises(CheckpointError, match=r"makes images of shape \[1, 8, 8\] and this data set has \[1, 16, 16\]") as error:
        SCM(net=UNET, data_shape=[1, 16, 16], mode="scd").attach_teacher(teacher())
    one_line(error)


@pytest.mark.parametrize("mode", ["sct", "scd"])
def test_ddil_is_refused_in_one_line(compose_cfg, tmp_path, mode):
    from fewstep.train import train

    extra = ["method.mode=scd"] if mode == "scd" else []
    cfg = compose_cfg("train", ["method=scm", "ddil=default", "data=digits", *TINY, f"paths.root={tmp_path}", *extra])
    with pytest.raises(ConfigError, match="use ddil=none") as error:
        train(cfg)
    one_line(error)


# -- slow: resume, and one step on a 2-D mixture ---------------------------------------------------------------------
@pytest.mark.slow
def test_one_and_two_step_sct_samples_of_a_mixture_beat_a_perfect_flow_teachers_euler_samples():
    from fewstep.generate import generate
    from fewstep.metrics import sliced_wasserstein2

    torch.manual_seed(0)
    law = mixture()
    # the paper's c_noise = t at a small Fourier scale (16 makes the tangent's time derivative blow up)
    method = SCM(net={**MLP, "width": 128, "depth": 3, "fourier_scale": 1.0}, data_shape=[2], tangent_warmup=0)
    fit_to_mixture(method, law, steps=400, betas=(0.9, 0.99))
    n = 4000
    truth = law.sample(n, torch.Generator().manual_seed(5))[0].float()
    for nfe in (1, 2):
        ours = sliced_wasserstein2(generate(method, n, "consistency", nfe, seed=100)[0], truth).item()
        teacher_ = sliced_wasserstein2(exact_flow_euler_samples(law, nfe, n), truth).item()
        print(f"sliced W2^2 at {nfe} NFE: sCT {ours:.4g}, exact flow with Euler {teacher_:.4g} ({teacher_ / ours:.1f}x)")
        assert ours * 5 < teacher_


def test_sct_builds_fewsteps_networks_with_small_fourier_features_unless_told_otherwise():
    assert SCM(net=UNET, data_shape=SHAPE).hparams.net["fourier_scale"] == 1.0
    assert SCM(net={**UNET, "fourier_scale": 4.0}, data_shape=SHAPE).hparams.net["fourier_scale"] == 4.0
    assert "fourier_scale" not in SCM(net=UNET, data_shape=SHAPE, mode="scd").hparams.net  # the teacher's network
    assert "fourier_scale" not in SCM(net=UNET, data_shape=SHAPE, time_input="edm").hparams.net
