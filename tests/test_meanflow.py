"""MeanFlow: the identity's target at its fixed point on analytic data, the networks' second time input, sampling at
any NFE, training from the command line and the guarantees every method gives (resume, one-line errors)."""


import pytest
import torch
from torch import nn

from fewstep.checkpoints import load_method
from fewstep.data.gmm import GaussianMixture
from fewstep.errors import ConfigError
from fewstep.generate import generate
from fewstep.jvp import jvp
from fewstep.methods import BatchNoise, MeanFlow
from fewstep.methods.meanflow import adaptive_loss, interval_times, meanflow_target
from fewstep.metrics import sliced_wasserstein2
from fewstep.networks import MLP, UNet
from fewstep.networks.edm import DhariwalUNet, SongUNet
from fewstep.train import train

from helpers import MLP as MLP_CONFIG
from helpers import SHAPE, TINY, UNET, exact_flow_euler_samples, fit_to_mixture, randomize

# ---------------------------------------------------------------------------------------------------------------
# The identity at its fixed point: exact average velocities of the linear interpolant z_t = (1 - t) x + t e


def gaussian_average_velocity(mu: torch.Tensor, s: float):
    """u(z, r, t) for data N(mu, s^2 I): the flow keeps (z - m_t) / sigma_t (m_t = (1 - t) mu, sigma_t^2 = (1 - t)^2 s^2
    + t^2), so z_r = m_r + sigma_r / sigma_t (z - m_t) and u = (z - z_r) / (t - r) = -mu + rate (z - m_t) with
    rate = (1 - sigma_r / sigma_t) / (t - r), d log sigma_t / dt at r = t."""

    def sigma(t):
        return ((1 - t) ** 2 * s**2 + t**2).sqrt()

    def u(z, r, t):
        r, t = r[:, None], t[:, None]
        same = t == r
        apart = (1 - sigma(r) / sigma(t)) / torch.where(same, torch.ones_like(t), t - r)
        rate = torch.where(same, (t - (1 - t) * s**2) / sigma(t) ** 2, apart)
        return -mu + rate * (z - (1 - t) * mu)

    return u


def mixture_velocity(mixture: GaussianMixture):
    """The marginal velocity v(z, t) = E[e - x | z_t = z] = (z - E[x | z_t]) / t; E[x | z_t] is the mixture's
    denoiser at z / (1 - t), sigma = t / (1 - t)."""

    def v(z, t):
        t = t[:, None]
        return (z - mixture.denoiser(z / (1 - t), (t / (1 - t)).flatten())) / t

    return v


def mixture_average_velocity(mixture: GaussianMixture, steps: int = 400):
    """u(z, r, t) = (z - z_r) / (t - r), z_r by integrating the exact velocity from t to r (RK4, ``steps`` steps)."""
    v = mixture_velocity(mixture)

    def u(z, r, t):
        h = ((r - t) / steps)[:, None]
        x, s = z, t
        for _ in range(steps):
            k1 = v(x, s)
            k2 = v(x + h / 2 * k1, s + h[:, 0] / 2)
            k3 = v(x + h / 2 * k2, s + h[:, 0] / 2)
            k4 = v(x + h * k3, s + h[:, 0])
            x, s = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4), s + h[:, 0]
        same = (t == r)[:, None]
        return torch.where(same, v(z, t), (z - x) / torch.where(same, torch.ones_like(same, dtype=z.dtype), (t - r)[:, None]))

    return u, v


def test_the_exact_average_velocity_of_gaussian_data_is_the_fixed_point_of_the_target():
    generator = torch.Generator().manual_seed(0)
    mu, s, n = torch.tensor([0.7, -1.2, 0.3], dtype=torch.float64), 0.4, 64
    u = gaussian_average_velocity(mu, s)
    r, t = interval_times(n, generator, "cpu", -0.4, 1.0, share=0.5)
    r, t = r.double(), t.double()
    assert (r == t).any() and (r < t).any()
    x, e = mu + s * torch.randn(n, 3, generator=generator, dtype=torch.float64), torch.randn(n, 3, generator=generator, dtype=torch.float64)
    z = (1 - t[:, None]) * x + t[:, None] * e
    velocity = u(z, t, t)  # the marginal velocity E[e - x | z_t]
    for method in ("forward", "finite_difference"):
        prediction, target = meanflow_target(u, z, r, t, velocity, method, jvp_step=1e-5)
        torch.testing.assert_close(target, prediction, rtol=1e-6 if method == "forward" else 1e-5, atol=1e-8)
    assert adaptive_loss(prediction, target, power=1.0, constant=1e-3) < 1e-6
    # the closed form is the flow: u(z, r, t) (t - r) carries z_t to the z_r of the same x and e only on average, but
    # the exact flow map keeps the standardised position
    z_r = z - (t - r)[:, None] * u(z, r, t)
    sigma = lambda t_: ((1 - t_) ** 2 * s**2 + t_**2).sqrt()[:, None]  # noqa: E731
    torch.testing.assert_close((z_r - (1 - r[:, None]) * mu) / sigma(r), (z - (1 - t[:, None]) * mu) / sigma(t))
    # and a network-sized error moves the target off the prediction
    wrong = lambda z_, r_, t_: 1.01 * u(z_, r_, t_)  # noqa: E731
    prediction, target = meanflow_target(wrong, z, r, t, velocity)
    assert (prediction - target).abs().max() > 1e-3


def test_the_exact_average_velocity_of_a_gaussian_mixture_is_the_fixed_point_of_the_target():
    mixture = GaussianMixture.benchmark(dim=2, modes=4, std=0.3)
    u, v = mixture_average_velocity(mixture)
    generator = torch.Generator().manual_seed(1)
    n = 16
    t = 0.3 + 0.6 * torch.rand(n, generator=generator, dtype=torch.float64)
    r = torch.where(torch.arange(n) % 4 == 0, t, t * torch.rand(n, generator=generator, dtype=torch.float64).clamp(min=0.2))
    z = torch.randn(n, 2, generator=generator, dtype=torch.float64)
    prediction, target = meanflow_target(u, z, r, t, v(z, t))
    assert torch.isfinite(prediction).all()
    torch.testing.assert_close(target, prediction, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(prediction[r == t], v(z, t)[r == t])


def test_the_method_trains_on_its_target_with_the_conditional_velocity_whose_mean_is_the_marginal_one():
    # with v = e - x for one (x, e), the target is linear in v: its mean given z_t is the fixed point above
    mu, s = torch.tensor([0.5, -0.5], dtype=torch.float64), 0.5
    u = gaussian_average_velocity(mu, s)
    z = torch.tensor([[0.2, 0.1]], dtype=torch.float64).repeat(20000, 1)
    r, t = torch.full((20000,), 0.2, dtype=torch.float64), torch.full((20000,), 0.7, dtype=torch.float64)
    # x, e given z_t: x ~ N(m, c^2) with the Gaussian posterior, e = (z - (1 - t) x) / t
    generator = torch.Generator().manual_seed(2)
    var = (1 - 0.7) ** 2 * s**2 + 0.7**2
    mean = mu + (1 - 0.7) * s**2 / var * (z - 0.3 * mu)
    x = mean + (s**2 * 0.7**2 / var) ** 0.5 * torch.randn(20000, 2, generator=generator, dtype=torch.float64)
    e = (z - 0.3 * x) / 0.7
    prediction, target = meanflow_target(u, z, r, t, e - x)
    assert (target - prediction).abs().max() > 0.1  # one sample's target is not the prediction
    torch.testing.assert_close(target.mean(0), prediction[0], rtol=0, atol=0.02)


# ---------------------------------------------------------------------------------------------------------------
# The networks' second time input


def tiny_networks() -> dict:
    """Each network kind with a second time input, small, with attention."""
    return {
        "unet": lambda **kw: UNet([1, 8, 8], model_channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_levels=(1,), **kw),
        "mlp": lambda **kw: MLP([2], width=16, depth=1, **kw),
        "song_unet": lambda **kw: SongUNet(8, 1, 1, model_channels=16, channel_mult=(1, 2), num_blocks=1,
                                           attn_resolutions=(4,), dropout=0.0, **kw),
        "song_unet_fourier": lambda **kw: SongUNet(8, 1, 1, model_channels=16, channel_mult=(1, 2), num_blocks=1,
                                                   attn_resolutions=(4,), dropout=0.0, embedding_type="fourier",
                                                   channel_mult_noise=2, **kw),
        "dhariwal_unet": lambda **kw: DhariwalUNet(8, 1, 1, model_channels=64, channel_mult=(1,), num_blocks=1,
                                                   attn_resolutions=(8,), dropout=0.0, **kw),
    }


def inputs(name: str, dtype=torch.float32):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, *([2] if name == "mlp" else [1, 8, 8]), generator=generator, dtype=dtype)
    return x, torch.tensor([0.3, 0.8], dtype=dtype), torch.tensor([0.1, 0.5], dtype=dtype)


def call(net, x, c_noise, labels=None, **kwargs):
    return net(x, c_noise, labels, **kwargs)


@pytest.mark.parametrize("name", list(tiny_networks()))
def test_the_second_time_input_is_off_by_default_and_starts_as_the_network_without_it(name):
    build = tiny_networks()[name]
    torch.manual_seed(0)
    plain = build().eval()
    torch.manual_seed(0)
    assert set(plain.state_dict()) == set(build(second_time=False).state_dict())
    assert not any("second_time" in key for key in plain.state_dict())
    with_input = build(second_time=True).eval()
    extra = set(with_input.state_dict()) - set(plain.state_dict())
    assert extra and all("second_time" in key for key in extra)
    missing, unexpected = with_input.load_state_dict(plain.state_dict(), strict=False)
    assert set(missing) == extra and not unexpected
    x, c_noise, h = inputs(name)
    with torch.no_grad():  # zero-initialised: the network at initialisation ignores it
        torch.testing.assert_close(call(with_input, x, c_noise, second_time=h), call(plain, x, c_noise), rtol=0, atol=0)
        randomize(with_input)
        assert not torch.allclose(call(with_input, x, c_noise, second_time=h), call(with_input, x, c_noise, second_time=h + 0.3))
    with pytest.raises((ValueError, ConfigError), match="no second time input: build it with second_time=True") as error:
        call(plain, x, c_noise, second_time=h)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("name", ["song_unet", "dhariwal_unet"])
def test_an_edm_network_with_the_second_time_input_draws_every_other_initial_weight_as_without_it(name):
    build = tiny_networks()[name]
    torch.manual_seed(0)
    plain = build().state_dict()
    torch.manual_seed(0)
    with_input = build(second_time=True).state_dict()
    for key, value in plain.items():
        torch.testing.assert_close(with_input[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("name", list(tiny_networks()))
def test_the_jvp_through_each_network_with_the_second_time_input_agrees_with_central_differences_in_float64(name):
    torch.manual_seed(0)
    net = randomize(tiny_networks()[name](second_time=True)).double().eval()
    x, c_noise, h = inputs(name, torch.float64)
    generator = torch.Generator().manual_seed(4)
    tangents = (torch.randn(x.shape, generator=generator, dtype=torch.float64), torch.tensor([1.0, 0.5], dtype=torch.float64),
                torch.tensor([-0.7, 1.0], dtype=torch.float64))

    def fn(x_, c_, h_):
        return call(net, x_, c_, second_time=h_)

    _, tangent = jvp(fn, (x, c_noise, h), tangents)
    step = 1e-5
    with torch.no_grad():
        plus = fn(*(p + step * d for p, d in zip((x, c_noise, h), tangents)))
        minus = fn(*(p - step * d for p, d in zip((x, c_noise, h), tangents)))
    central = (plus - minus) / (2 * step)
    assert tangent.abs().max() > 1e-3
    assert ((tangent - central).norm() / central.norm()).item() < 1e-4
    # and the second time contributes to it
    _, without = jvp(fn, (x, c_noise, h), (*tangents[:2], torch.zeros_like(h)))
    assert not torch.allclose(without, tangent)


# ---------------------------------------------------------------------------------------------------------------
# The method: options, the network it builds, sampling


def meanflow(**kwargs) -> MeanFlow:
    return MeanFlow(net=UNET, data_shape=SHAPE, **kwargs)


def test_meanflow_builds_its_network_with_the_second_time_input_and_rebuilds_it_from_its_hyperparameters():
    method = meanflow()
    assert method.hparams.net["second_time"] is True and method.net.embed.second_time is not None
    again = MeanFlow(**{k: v for k, v in method.hparams.items()})
    assert set(again.state_dict()) == set(method.state_dict())


def test_an_edm_meanflow_calls_the_raw_network_with_the_second_time_and_its_hyperparameters_pass_the_file_checks():
    from fewstep.schema import check_hyperparameters

    edm = {"_target_": "fewstep.networks.edm.edm_denoiser", "model_type": "SongUNet", "model_channels": 16,
           "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [4], "dropout": 0.0}
    method = randomize(MeanFlow(net=edm, data_shape=[1, 8, 8], num_classes=2, conditional=True))
    assert method.hparams.net["second_time"] is True
    check_hyperparameters(MeanFlow, dict(method.hparams))  # what a checkpoint records reads back
    z, r, t = torch.randn(2, 1, 8, 8), torch.tensor([0.1, 0.4]), torch.tensor([0.6, 0.9])
    labels = torch.tensor([1, 2])  # 2: no label, EDM's zero vector
    expected = method.net.model(z, t, method.net.label_vectors(labels, "cpu"), second_time=t - r)
    torch.testing.assert_close(method.average_velocity(z, r, t, labels), expected)


class PlainNetwork(nn.Module):
    """A network without a second time input."""

    def __init__(self, data_shape, num_classes=0):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x, c_noise, class_labels=None):
        return self.scale * x


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"net": {**UNET, "second_time": False}}, r"model.second_time=False: meanflow conditions its network on \(t, t - r\)"),
    ({"net": {"_target_": "test_meanflow.PlainNetwork"}},
     "meanflow needs a network with a second time input .* PlainNetwork has none: .* model.second_time=true"),
    ({"share": 1.5}, r"method.share=1.5: use the share of samples with r != t, in \[0, 1\]"),
    ({"t_std": 0.0}, "method.t_std=0.0: use the logit-normal std"),
    ({"power": -1.0}, "method.power=-1.0: use the adaptive weight's power"),
    ({"constant": 0.0}, "method.constant=0.0: use the adaptive weight's c > 0"),
    ({"guidance": 0.0, "conditional": True, "num_classes": 3}, "method.guidance=0.0: use the guidance scale omega > 0"),
    ({"guidance_mix": 1.0, "conditional": True, "num_classes": 3}, r"method.guidance_mix=1.0: use .* in \[0, 1\)"),
    ({"guidance_interval": [0.8, 0.2]}, r"method.guidance_interval=\[0.8, 0.2\]: use \[t_min, t_max\]"),
    ({"jvp": "reverse"}, "method.jvp=reverse: use one of forward, finite_difference"),
    ({"jvp_step": 0.0}, "method.jvp_step=0.0: use the finite difference's step"),
    ({"guidance": 2.0}, "train classifier-free guidance, which needs labels: set method.conditional=true"),
])
def test_bad_options_and_networks_are_refused_in_one_line(kwargs, message):
    kwargs = {"net": UNET, **kwargs}
    with pytest.raises(ConfigError, match=message) as error:
        MeanFlow(data_shape=SHAPE, **kwargs)
    assert "\n" not in str(error.value)


def test_interval_times_follow_the_share_and_order_r_before_t():
    r, t = interval_times(20000, torch.Generator().manual_seed(0), "cpu", -0.4, 1.0, share=0.25)
    assert (r <= t).all() and ((r >= 0) & (t <= 1)).all()
    assert abs((r < t).float().mean().item() - 0.25) < 0.02
    assert abs(torch.logit(t).median().item() - (-0.4 + 0.545)) < 0.05  # the larger of two N(-0.4, 1): median + 0.545


@pytest.mark.parametrize("nfe", [1, 2, 5])
def test_sampling_counts_its_nfe_and_takes_the_paper_s_steps(nfe):
    method = randomize(meanflow()).eval()
    samples, _, used = generate(method, 3, "euler", nfe, seed=4)
    assert used == nfe and samples.shape == (3, *SHAPE) and torch.isfinite(samples).all()
    # z_r = z_t - (t - r) u(z_t, r, t) on the uniform grid from the seeds' noise
    from fewstep.samplers import SeededNoise

    z = SeededNoise(range(4, 7), "cpu").randn(tuple(SHAPE))
    grid = torch.linspace(1, 0, nfe + 1, dtype=torch.float64).tolist()
    with torch.no_grad():
        for t, r in zip(grid[:-1], grid[1:]):
            z = z - (t - r) * method.average_velocity(z, torch.full((3,), r), torch.full((3,), t))
    torch.testing.assert_close(samples, z)
    # any other sampler integrates the instantaneous velocity u(z, t, t) as a flow model
    _, _, used = generate(method, 2, "heun", 5)
    assert used == 5


def test_conditional_sampling_with_guidance_and_the_denoiser():
    method = randomize(meanflow(num_classes=3, conditional=True, guidance=0.5, guidance_mix=0.2)).eval()
    samples, labels, used = generate(method, 4, "euler", 2, guidance=1.0)
    assert used == 2 and torch.isfinite(samples).all() and labels.tolist() == [0, 1, 2, 0]
    x, sigma = torch.randn(2, *SHAPE), torch.tensor([0.5, 3.0])
    t = sigma / (1 + sigma)  # D(x, sigma) = z - t u(z, t, t) at z = x / (1 + sigma)
    z = x / (1 + sigma).view(-1, 1, 1, 1)
    expected = z - t.view(-1, 1, 1, 1) * method.average_velocity(z, t, t)
    torch.testing.assert_close(method.denoiser(x, sigma), expected, rtol=1e-4, atol=1e-4)


def test_meanflow_s_sampler_refuses_grids_and_options_in_one_line():
    method = meanflow().eval()
    with pytest.raises(ConfigError, match="steps uniformly in t from 1 to 0: use grid=null"):
        generate(method, 1, "euler", 2, grid="karras")
    with pytest.raises(ConfigError, match="takes no options, got sigma_max: remove them"):
        generate(method, 1, "euler", 2, sigma_max=10.0)


def test_guided_training_mixes_the_model_s_unconditional_velocity_into_the_target():
    method = randomize(meanflow(num_classes=3, conditional=True, guidance=0.4, guidance_mix=0.3, guidance_interval=[0.0, 0.6]))
    z, v = torch.randn(4, *SHAPE), torch.randn(4, *SHAPE)
    t = torch.tensor([0.2, 0.5, 0.9, 0.3])
    labels = torch.tensor([0, 1, 2, 3])  # 3: the null label
    guided = method.guided_velocity(z, t, v, labels)
    with torch.no_grad():
        null = method.velocity(z, t, torch.full_like(labels, 3))
        cond = method.velocity(z, t, labels)
    expected = 0.4 * v + 0.3 * cond + 0.3 * null
    torch.testing.assert_close(guided[:2], expected[:2])
    torch.testing.assert_close(guided[2:], v[2:])  # t outside [0, 0.6], and a sample without label
    assert method.net.training


# ---------------------------------------------------------------------------------------------------------------
# From the command line


def test_trainer_debug_trains_meanflow_from_an_empty_directory(compose_cfg):
    cfg = compose_cfg("train", ["method=meanflow", *TINY, "data=digits"])
    assert cfg.sampler.name == "euler"  # the validation grid samples with MeanFlow's own steps
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["val/loss"]))


def test_a_meanflow_checkpoint_samples_at_one_and_two_steps(compose_cfg, tmp_path):
    train(compose_cfg("train", [*RUN, "trainer.max_steps=2", "trainer.val_check_interval=2"]))
    method = load_method(tmp_path / "checkpoints" / "last.ckpt")
    assert isinstance(method, MeanFlow) and method.hparams.net["second_time"] is True
    for nfe in (1, 2):
        samples, _, used = generate(method, 2, "euler", nfe)
        assert used == nfe and torch.isfinite(samples).all()
    # python -m fewstep.sample ckpt=PATH sampler=euler nfe=1, in-process
    from fewstep.sample import sample_checkpoint

    result = sample_checkpoint(compose_cfg("sample", [f"ckpt={tmp_path / 'checkpoints' / 'last.ckpt'}", "sampler=euler",
                                                      "nfe=1", "n=2", "device=cpu"]))
    assert result["nfe"] == 1 and (tmp_path / "samples.npz").is_file()


def test_the_training_loss_draws_its_noise_from_the_step_s_batch_noise():
    method = randomize(meanflow(power=0.0))  # the plain squared error: the adaptive weight's loss is near 1 at any noise
    x0 = torch.rand(4, *SHAPE) * 2 - 1
    first = method.loss(x0, None, BatchNoise.for_step(0, 3, 4, "cpu"))
    torch.testing.assert_close(method.loss(x0, None, BatchNoise.for_step(0, 3, 4, "cpu")), first, rtol=0, atol=0)
    assert not torch.allclose(method.loss(x0, None, BatchNoise.for_step(0, 4, 4, "cpu")), first)
    first.backward()
    assert all(p.grad is not None for name, p in method.net.named_parameters() if "second_time" in name)


# A tiny MeanFlow run with a checkpoint every 2 steps (tests/test_resume.py kills and resumes one).
RUN = [
    "method=meanflow", "data=digits", "model=unet_tiny", "data.batch_size=8", "data.limit=64", "data.val_size=16",
    "trainer.max_steps=8", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
    "callbacks.sample_grid.n=4", "callbacks.sample_grid.nfe=2", "logger=csv", "seed=3",
]


# ---------------------------------------------------------------------------------------------------------------
# One step on the 2-D mixture


@pytest.mark.slow
def test_one_and_two_step_meanflow_samples_of_a_mixture_beat_a_perfect_flow_teacher_s_euler_samples():
    torch.manual_seed(0)
    mixture = GaussianMixture.benchmark(dim=2, modes=8, std=0.1)
    # the paper's CIFAR-10 share of r != t (its ImageNet default, 0.25, learns the long intervals more slowly)
    method = MeanFlow(net={**MLP_CONFIG, "width": 128, "depth": 3}, data_shape=[2], share=0.75, t_mean=-0.4, t_std=1.0)
    fit_to_mixture(method, mixture, steps=1000)
    n = 4000
    truth = mixture.sample(n, torch.Generator().manual_seed(5))[0].float()
    for nfe in (1, 2):
        ours = sliced_wasserstein2(generate(method, n, "euler", nfe, seed=100)[0], truth).item()
        teacher = sliced_wasserstein2(exact_flow_euler_samples(mixture, nfe, n), truth).item()
        print(f"sliced W2^2 at {nfe} NFE: meanflow {ours:.4g}, exact flow with Euler {teacher:.4g} ({teacher / ours:.1f}x)")
        assert ours * 5 < teacher
