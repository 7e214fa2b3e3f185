"""Autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself") and guidance intervals
(Kynkaanniemi et al. 2024) on exact Gaussian denoisers, in the samplers, the students' teacher and the entry points.

The toy analysis: with D the exact denoiser of N(0, s^2) and D_guide that of N(0, s'^2), the guided denoiser
(1 + w) D - w D_guide = c(sigma) x is linear in x, so the probability-flow ODE dx/dsigma = (x - D) / sigma scales
x by exp(-int (1 - c) / sigma dsigma), where (1 - c) / sigma = (1 + w) sigma / (s^2 + sigma^2) - w sigma / (s'^2 + sigma^2).
From sigma_max to sigma_min the samples' std is sigma_max exp(-that integral), which tends to s (s / s')^w: guided
by a broader model (s' > s) the samples narrow, the log std extrapolating from log s' through log s by the paper's
w (1 + w here).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from fewstep.errors import CheckpointError, ConfigError, FewstepError
from fewstep.generate import generate, load_guide
from fewstep.methods.base import DenoiserMethod
from fewstep.samplers import SeededNoise, sample
from fewstep.samplers.guidance import autoguided_denoiser, check_guide, check_interval, guided_denoiser

from helpers import MLP, kac_model, run_module, student, teacher

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


class ExactGaussian(DenoiserMethod):
    """The exact denoiser of N(mu_y, s^2 I) (mu_y = y / 2 per class y; 0 unconditional) as a fewstep method."""

    def __init__(self, s: float, dim: int = 2, num_classes: int = 0, sigma_data: float = 0.5):
        super().__init__(net=MLP, data_shape=[dim], num_classes=num_classes, conditional=num_classes > 0)
        self.save_hyperparameters({"sigma_data": sigma_data})
        self.s, self.calls = s, 0

    def mean(self, x, class_labels):
        if class_labels is None:
            return torch.zeros_like(x)
        return (class_labels.to(x.dtype) / 2).view(-1, *[1] * (x.ndim - 1)).expand_as(x)

    def denoiser(self, x, sigma, class_labels=None):
        self.calls += 1
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, *[1] * (x.ndim - 1))
        mu = self.mean(x, class_labels)
        return mu + self.s**2 / (self.s**2 + sigma**2) * (x - mu)


def log_ratio(a: float, lo: float, hi: float) -> float:
    """(1/2) log((a^2 + hi^2) / (a^2 + lo^2)) = int_lo^hi sigma / (a^2 + sigma^2) dsigma."""
    return 0.5 * math.log((a * a + hi * hi) / (a * a + lo * lo))


def guided_std(s: float, s_guide: float, w: float, interval=None) -> float:
    """The std of the guided probability-flow ODE's samples from N(0, SIGMA_MAX^2), integrated to SIGMA_MIN and then
    denoised (the samplers' last step onto sigma = 0), guidance for sigma in ``interval`` only (None: everywhere)."""
    lo, hi = interval or (SIGMA_MIN, SIGMA_MAX)
    lo, hi = max(lo, SIGMA_MIN), min(hi, SIGMA_MAX)
    exponent = -log_ratio(s, SIGMA_MIN, SIGMA_MAX) - w * (log_ratio(s, lo, hi) - log_ratio(s_guide, lo, hi))
    w_last = w if interval is None or interval[0] < SIGMA_MIN <= interval[1] else 0.0
    last = (1 + w_last) * s**2 / (s**2 + SIGMA_MIN**2) - w_last * s_guide**2 / (s_guide**2 + SIGMA_MIN**2)
    return SIGMA_MAX * math.exp(exponent) * last


# ---------------------------------------------------------------- the guided denoiser


def test_autoguided_denoiser_is_the_formula_with_the_same_labels_for_both():
    main, weak = ExactGaussian(0.5, num_classes=3), ExactGaussian(0.9, num_classes=3)
    x = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.1, 0.7, 2.0, 30.0], dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 1])
    for w in (0.5, 2.0, torch.tensor([0.0, 0.5, 1.0, 3.0])):
        w_ = torch.as_tensor(w, dtype=torch.float64).reshape(-1, 1)
        a, b = 0.25 / (0.25 + sigma**2), 0.81 / (0.81 + sigma**2)  # D = mu + a (x - mu), D_guide = mu + b (x - mu)
        mu = (labels / 2).to(torch.float64).view(-1, 1)
        expected = mu + ((1 + w_) * a.view(-1, 1) - w_ * b.view(-1, 1)) * (x - mu)
        guided = autoguided_denoiser(main.denoiser, weak.denoiser, w, labels)(x, sigma)
        torch.testing.assert_close(guided, expected, rtol=1e-12, atol=1e-12)
        # the same as D + w (D - D_guide), the fewstep convention, and as the paper's w' D + (1 - w') D_guide, w' = 1 + w
        paper_w = 1 + w_
        torch.testing.assert_close(guided, paper_w * main.denoiser(x, sigma, labels) + (1 - paper_w) * weak.denoiser(x, sigma, labels))
    # w = 0 is the model alone: the guide is never called
    weak.calls = 0
    torch.testing.assert_close(autoguided_denoiser(main.denoiser, weak.denoiser, 0.0, labels)(x, sigma), main.denoiser(x, sigma, labels))
    assert weak.calls == 0


def test_autoguidance_works_unconditionally():
    main, weak = ExactGaussian(0.5), ExactGaussian(1.0)
    x, sigma = torch.ones(3, 2), torch.full((3,), 1.0)
    guided = autoguided_denoiser(main.denoiser, weak.denoiser, 1.0)(x, sigma)
    torch.testing.assert_close(guided, (2 * 0.25 / 1.25 - 1 * 1.0 / 2.0) * x)


@pytest.mark.parametrize("kind", ["autoguidance", "cfg"])
def test_the_interval_leaves_the_denoiser_unchanged_outside_it(kind):
    main, weak = ExactGaussian(0.5, num_classes=3), ExactGaussian(1.0, num_classes=3)
    labels = torch.tensor([1, 2, 0, 1, 2])
    if kind == "autoguidance":
        def make(w, interval=None):
            return autoguided_denoiser(main.denoiser, weak.denoiser, w, labels, interval)
    else:
        def make(w, interval=None):
            return guided_denoiser(main.denoiser, w, labels, null_label=3, interval=interval)
    x = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.1, 0.5, 1.0, 3.0, 10.0], dtype=torch.float64)
    inside = torch.tensor([False, False, True, True, False])  # sigma_lo < sigma <= sigma_hi: 0.5 is out, 3 is in
    interval = [0.5, 3.0]
    restricted, everywhere, plain = make(1.5, interval)(x, sigma), make(1.5)(x, sigma), main.denoiser(x, sigma, labels)
    torch.testing.assert_close(restricted[inside], everywhere[inside])
    torch.testing.assert_close(restricted[~inside], plain[~inside])
    assert not torch.allclose(everywhere[inside], plain[inside])  # guidance changes D where it applies
    # a call with every sigma outside evaluates the model alone (one call), never the guide or the unconditional model
    main.calls = weak.calls = 0
    outside = torch.full((5,), 10.0, dtype=torch.float64)
    torch.testing.assert_close(make(1.5, interval)(x, outside), main.denoiser(x, outside, labels))
    assert (main.calls, weak.calls) == (2, 0)


def test_cfg_is_unchanged_without_an_interval():
    def denoiser(x, sigma, class_labels=None):
        return x * 0 + class_labels.view(-1, 1).float()

    labels, x, sigma = torch.tensor([1, 2]), torch.zeros(2, 3), torch.ones(2)
    torch.testing.assert_close(guided_denoiser(denoiser, 2.0, labels, null_label=0)(x, sigma), 3 * denoiser(x, sigma, labels))


# ---------------------------------------------------------------- the toy analysis: the samples' variance


@pytest.mark.parametrize("s_guide", [1.0, 0.3])
def test_guided_ode_variance_moves_as_the_closed_form_says(s_guide):
    s = 0.5
    stds = []
    for w in (0.0, 0.5, 1.0, 2.0):
        main, weak = ExactGaussian(s, dim=1), ExactGaussian(s_guide, dim=1)
        z = torch.ones(1, 1, dtype=torch.float64)  # the ODE is linear: the std of the samples is their gain
        out = sample(autoguided_denoiser(main.denoiser, weak.denoiser, w), z, "heun", 799).item()
        assert out == pytest.approx(guided_std(s, s_guide, w), rel=5e-4), w
        assert guided_std(s, s_guide, w) == pytest.approx(s * (s / s_guide) ** w, rel=1e-3)  # sigma_min -> 0, sigma_max -> inf
        stds.append(out)
    assert stds[0] == pytest.approx(s, rel=1e-3)  # unguided: the model's own law
    if s_guide > s:  # a broader guide narrows the samples below s, more with every w
        assert stds[0] > stds[1] > stds[2] > stds[3]
    else:  # a narrower one widens them
        assert stds[0] < stds[1] < stds[2] < stds[3]


def test_an_interval_moves_the_variance_by_its_share_of_the_integral():
    s, s_guide, w, interval = 0.5, 1.0, 1.0, (0.3, 3.0)
    main, weak = ExactGaussian(s, dim=1), ExactGaussian(s_guide, dim=1)
    z = torch.ones(1, 1, dtype=torch.float64)
    out = sample(autoguided_denoiser(main.denoiser, weak.denoiser, w, interval=interval), z, "heun", 3999).item()
    expected = guided_std(s, s_guide, w, interval)
    assert out == pytest.approx(expected, rel=2e-3)  # first order at the interval's ends: a fine grid
    assert guided_std(s, s_guide, w) < expected < s  # between everywhere-guided and unguided


def test_generate_with_a_guide_samples_the_guided_law_and_counts_one_nfe_per_guided_call():
    s, s_guide, w = 0.5, 1.0, 1.0
    main, weak = ExactGaussian(s, dim=1), ExactGaussian(s_guide, dim=1)
    samples, labels, nfe = generate(main, 16, "heun", 399, seed=3, guidance=w, guide=weak)
    x_T = SeededNoise(range(3, 19)).randn((1,))
    torch.testing.assert_close(samples, x_T * guided_std(s, s_guide, w), rtol=2e-3, atol=1e-6)
    assert labels is None and nfe == 399
    assert (main.calls, weak.calls) == (399, 399)  # one NFE: the model and its guide once each
    # an interval: guidance (and the guide's call) only where sigma lies inside it; the NFE count is the same
    main.calls = weak.calls = 0
    _, _, nfe = generate(main, 4, "euler", 20, guidance=w, guide=weak, guidance_interval=[0.5, 5.0])
    assert nfe == 20 and main.calls == 20 and 0 < weak.calls < 20
    # without a guide, guidance_interval restricts classifier-free guidance through the same path
    conditional = ExactGaussian(s, dim=1, num_classes=2)
    _, labels, nfe = generate(conditional, 4, "euler", 5, guidance=2.0, guidance_interval=[0.5, 5.0])
    assert nfe == 5 and labels.tolist() == [0, 1, 0, 1]


# ---------------------------------------------------------------- bad input, in one line


def one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message and isinstance(error.value, FewstepError)
    return message


def test_a_guide_that_does_not_fit_is_refused_in_one_line():
    main = ExactGaussian(0.5, dim=2, num_classes=3)
    with pytest.raises(CheckpointError) as error:
        check_guide(main, ExactGaussian(1.0, dim=3, num_classes=3))
    assert "makes samples of shape [3] and the model [2]" in one_line(error)
    with pytest.raises(CheckpointError) as error:
        check_guide(main, ExactGaussian(1.0, dim=2, num_classes=0))
    assert "conditioned on 0 classes and the model on 3" in one_line(error)
    with pytest.raises(CheckpointError) as error:
        check_guide(main, ExactGaussian(1.0, dim=2, num_classes=3, sigma_data=1.0))
    assert "sigma_data=1.0 and the model with sigma_data=0.5" in one_line(error)
    with pytest.raises(CheckpointError) as error:  # a Kac flow is no EDM-space denoiser
        check_guide(ExactGaussian(0.5), kac_model())
    assert "KacTeacher, sampled through its velocity and not an EDM-space denoiser" in one_line(error)
    with pytest.raises(ConfigError) as error:  # nor can one be guided
        kac_model().sampling_model(None, 1.0, ExactGaussian(0.5))
    assert "the model is a KacTeacher" in one_line(error)
    with pytest.raises(ConfigError) as error:  # an interval is in sigma, which a Kac flow has not
        generate(kac_model(), 2, "kac_euler", 2, guidance_interval=[0.1, 1.0])
    assert "use guidance_interval=null" in one_line(error)


@pytest.mark.parametrize(
    "interval,expected",
    [
        ([1.0, 1.0], "guidance_interval=[1, 1]: give guidance_interval=[sigma_lo,sigma_hi] with 0 <= sigma_lo < sigma_hi"),
        ([2.0, 1.0], "guidance_interval=[2, 1]"),
        ([-0.1, 1.0], "guidance_interval=[-0.1, 1]"),
        ([1.0], "guidance_interval=[1.0] is not two noise levels"),
        ("0.3", "is not two noise levels"),
        ([0.1, "high"], "holds a value that is not a number"),
    ],
)
def test_a_bad_interval_is_refused_in_one_line(interval, expected):
    with pytest.raises(ConfigError) as error:
        check_interval(interval)
    assert expected in one_line(error)
    main = ExactGaussian(0.5)
    with pytest.raises(ConfigError):
        load_guide(main, None, 0.0, interval)


def test_bad_guidance_is_refused_in_one_line():
    main, weak = ExactGaussian(0.5), ExactGaussian(1.0)
    with pytest.raises(ConfigError) as error:
        autoguided_denoiser(main.denoiser, weak.denoiser, -0.5)
    assert "guidance scale w=-0.5 is negative: use w >= 0" in one_line(error)
    with pytest.raises(ConfigError) as error:  # CFG needs labels; autoguidance does not
        load_guide(main, None, 1.0)
    assert "guidance needs a class-conditional model (trained with method.conditional=true) or a guide" in one_line(error)
    assert check_interval(None) is None and check_interval([0.28, math.inf]) == (0.28, math.inf)
    with pytest.raises(CheckpointError) as error:
        load_guide(main, "/nonexistent/weak.ckpt", 1.0)
    assert one_line(error).startswith("guide=/nonexistent/weak.ckpt: checkpoint '/nonexistent/weak.ckpt' not found")


# ---------------------------------------------------------------- the students' teacher


def test_a_students_teacher_is_autoguided_inside_its_interval():
    from fewstep.methods import Progressive

    guide = teacher(seed=1)
    method = student(Progressive, guidance=0.5, guidance_interval=[0.5, 5.0])
    method.attach_guide(guide, "weak.ckpt")
    assert method.hparams.guide == "weak.ckpt" and "guide" not in {name.split(".")[0] for name in method.state_dict()}
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for level, guided in ((2.0, True), (0.2, False), (20.0, False)):
            sigma = torch.full((3,), level)
            main, weak = method.teacher.denoiser(x, sigma), guide.denoiser(x, sigma)
            expected = 1.5 * main - 0.5 * weak if guided else main
            torch.testing.assert_close(method.teacher_denoise(x, sigma), expected)
        assert not torch.allclose(method.teacher_denoise(x, torch.full((3,), 2.0)), method.teacher.denoiser(x, torch.full((3,), 2.0)))


def test_method_guide_is_attached_before_the_fit_starts(monkeypatch):
    import fewstep.distill
    from fewstep.methods import Progressive

    guide, read = teacher(seed=1), []
    monkeypatch.setattr(fewstep.distill, "load_method", lambda path, **_: read.append(path) or guide)
    method = student(Progressive, guidance=1.0, guide="weak.ckpt")
    assert method.guide is None
    with pytest.raises(ConfigError, match="method.guide=weak.ckpt is not attached"):  # a fit without fewstep.train
        method.on_fit_start()
    fewstep.distill.attach_guide(method)  # what fewstep.train does after attaching the teacher
    assert read == ["weak.ckpt"] and method.guide is guide
    x, sigma = torch.randn(2, 1, 8, 8), torch.full((2,), 1.0)
    with torch.no_grad():
        torch.testing.assert_close(method.teacher_denoise(x, sigma), 2 * method.teacher.denoiser(x, sigma) - guide.denoiser(x, sigma))
    with pytest.raises(CheckpointError, match="makes samples of shape"):  # checked against the teacher
        method.attach_guide(ExactGaussian(1.0, dim=64))
    with pytest.raises(ConfigError, match="guidance_interval"):
        student(Progressive, guidance_interval=[3.0, 1.0])


# ---------------------------------------------------------------- the entry points


def perturbed_checkpoint(ckpt, path, scale=0.05):
    """A copy of the fewstep checkpoint ``ckpt`` whose weights are moved by a little noise: another model of the data."""
    from fewstep.checkpoints import read_checkpoint

    checkpoint = dict(read_checkpoint(ckpt, mmap=False))
    generator = torch.Generator().manual_seed(0)
    checkpoint["state_dict"] = {
        key: value + scale * torch.randn(value.shape, generator=generator) if value.is_floating_point() else value
        for key, value in checkpoint["state_dict"].items()
    }
    checkpoint.pop("current_model_state", None)
    torch.save(checkpoint, path)
    return path


@pytest.mark.slow
def test_sample_with_a_guide(tiny_checkpoint, compose_cfg, tmp_path):
    import numpy as np

    from fewstep.sample import sample_checkpoint

    _, ckpt = tiny_checkpoint
    weak = perturbed_checkpoint(ckpt, tmp_path / "weak.ckpt")
    settings = [f"ckpt={ckpt}", "sampler=euler", "nfe=4", "n=4", "device=cpu"]

    def draw(*overrides):
        out = tmp_path / str(len(list(tmp_path.iterdir())))
        sample_checkpoint(compose_cfg("sample", [*settings, f"paths.output_dir={out}", *overrides]))
        return np.load(out / "samples.npz")["samples"]

    plain = draw()
    np.testing.assert_allclose(draw(f"guide={ckpt}", "guidance=1"), plain, rtol=1e-5, atol=1e-5)  # its own guide: D itself
    guided = draw(f"guide={weak}", "guidance=1")
    assert np.isfinite(guided).all() and not np.allclose(guided, plain, atol=1e-3)
    # guidance only below sigma = 1e-9, where the Euler grid never goes: the plain samples
    np.testing.assert_array_equal(draw(f"guide={weak}", "guidance=1", "guidance_interval=[0,1e-9]"), plain)
    with pytest.raises(ConfigError, match="guidance needs a class-conditional model"):
        draw("guidance=1")


@pytest.mark.slow
def test_sample_command_with_a_guide(tiny_checkpoint, tmp_path):
    root, ckpt = tiny_checkpoint
    weak = perturbed_checkpoint(ckpt, tmp_path / "weak.ckpt")
    result = run_module(
        "fewstep.sample", f"ckpt={ckpt}", f"guide={weak}", "guidance=1", "guidance_interval=[0.1,10]", "sampler=heun",
        "nfe=5", "n=4", f"hydra.run.dir={tmp_path / 'out'}", cwd=root,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "4 samples, heun at 5 NFE" in result.stdout
    bad = run_module("fewstep.sample", f"ckpt={ckpt}", f"guide={weak}", "guidance=1", "guidance_interval=[2,1]", cwd=root)
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert bad.returncode == 2 and len(lines) == 1 and "guidance_interval=[2, 1]" in lines[0], bad.stderr


@pytest.mark.slow
def test_evaluate_row_names_the_guide(tiny_checkpoint, tmp_path, monkeypatch):
    from fewstep.evaluate import evaluate_checkpoint

    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    _, ckpt = tiny_checkpoint
    weak = perturbed_checkpoint(ckpt, tmp_path / "weak.ckpt")
    row = evaluate_checkpoint(ckpt, "euler", nfe=2, n=16, metric="fid_domain", batch_size=16, guidance=0.5, guide=weak,
                              guidance_interval=[0.1, 10.0], out=tmp_path / "api")
    assert row["guide"] == str(weak.resolve()) and row["guidance"] == 0.5 and row["guidance_interval"] == [0.1, 10.0]
    assert json.loads((tmp_path / "api" / "result.json").read_text())["guide"] == str(weak.resolve())


def test_report_curves_tell_guides_and_intervals_apart():
    from fewstep.metrics.curves import tables

    row = {"metric": "fid", "sampler": "heun", "nfe": 35, "value": 1.0, "guidance": 1.0}
    rows = [{**row, "guide": "/runs/a/last.ckpt"}, {**row, "guide": "/runs/b.pkl", "value": 2.0},
            {**row, "guide": "/runs/b.pkl", "guidance_interval": [0.3, 3.0], "value": 3.0}, {**row, "value": 4.0}]
    curves = tables(rows)["fid"]
    assert len(curves) == 4 and curves["heun, w=1, guide b.pkl, sigma in (0.3, 3]"] == {35: 3.0}
