"""A diffusers UNet2DModel folder as an EDM-space denoiser (fewstep.external.diffusers), on tiny random UNets.

Tolerances (float32 throughout): at the scheduler's own discrete sigmas the wrapper calls the UNet at exactly the
integer t, so D differs from the DDPM formulas evaluated directly only by rounding of x (up to ~160 at sigma_max)
and of the input scaling: |D - formula| / (1 + sigma) < 1e-6 (measured 4.5e-7 to 5e-7). eta = 0 DDIM through
fewstep's ddim and euler solvers matches diffusers' DDIMScheduler loop to 1e-5 relative to the images' scale
(measured 2.5e-7 to 3.1e-7; a random epsilon-UNet does not denoise, so its images reach |x| ~ 600, while the
v-prediction ones stay at |x| ~ 4, i.e. about 1e-6 absolute).
"""

from __future__ import annotations

import json
import math
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may touch the hub: every path is local

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from fewstep.errors import CheckpointError, ConfigError  # noqa: E402
from fewstep.external.diffusers import DiffusersDenoiser, is_diffusers_folder, load_diffusers  # noqa: E402
from fewstep.samplers import SOLVERS  # noqa: E402

T = 1000
TS = [0, 1, 10, 250, 500, 998, 999]


def tiny_unet(channels: int = 1, **kwargs) -> "diffusers.UNet2DModel":
    """A ~20k-parameter UNet2DModel on 8x8 images, with random (seeded) weights."""
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=channels, out_channels=channels, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=4, attention_head_dim=4, down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), **kwargs,
    ).eval()


def save(folder, unet, scheduler, layout: str = "pipeline"):
    """The folder to load: a pipeline (model_index.json, unet/, scheduler/), its unet/ (the scheduler config in the
    sibling scheduler/), or a UNet folder with scheduler_config.json in it (weights as safetensors, or .bin)."""
    if layout in ("pipeline", "sibling"):
        unet.save_pretrained(folder / "unet")
        scheduler.save_pretrained(folder / "scheduler")
        (folder / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"]}))
        return folder if layout == "pipeline" else folder / "unet"
    unet.save_pretrained(folder, safe_serialization=layout != "model_bin")
    scheduler.save_pretrained(folder)
    return folder


def vp_sigma(scheduler, t) -> torch.Tensor:
    abar = scheduler.alphas_cumprod[t].double()
    return ((1 - abar) / abar).sqrt()


@pytest.mark.parametrize("layout", ["pipeline", "sibling", "model", "model_bin"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_discrete_sigmas_give_the_ddpm_formulas_at_integer_t(tmp_path, layout, prediction):
    unet = tiny_unet()
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=T, prediction_type=prediction)
    den = load_diffusers(save(tmp_path, unet, scheduler, layout))
    assert den.prediction_type == prediction and isinstance(den.unet, diffusers.UNet2DModel)
    ts = torch.tensor(TS)
    # the wrapper's sigmas are the scheduler's, and map back to exactly the integer t
    torch.testing.assert_close(den.sigmas.double()[ts], vp_sigma(scheduler, ts), rtol=1e-6, atol=0)
    assert torch.equal(den.sigma_to_t(den.sigmas[ts]), ts.float())
    assert den.sigma_min == pytest.approx(float(vp_sigma(scheduler, 0)), rel=1e-6)
    assert den.sigma_max == pytest.approx(float(vp_sigma(scheduler, T - 1)), rel=1e-6)
    sigma = den.sigmas[ts]
    x = torch.randn(len(TS), 1, 8, 8) * (1 + sigma.view(-1, 1, 1, 1))
    s = sigma.view(-1, 1, 1, 1).double()
    abar = scheduler.alphas_cumprod[ts].double().view(-1, 1, 1, 1)
    x_vp = (x / (1 + s**2).sqrt()).float()
    with torch.no_grad():
        out = unet(x_vp, ts).sample.double()  # integer timesteps, as diffusers' own loops call it
        D = den(x, sigma)
    expected = {
        "epsilon": x - s * out,
        "v_prediction": abar.sqrt() * x_vp - (1 - abar).sqrt() * out,
        "sample": out,
    }[prediction]
    assert D.dtype == torch.float32
    # float32 rounding of x (up to ~160 at sigma_max) and of the input scaling: the error scales with 1 + sigma
    error = ((D.double() - expected).abs() / (1 + s)).max()
    print(f"{prediction}: max |D - formula| / (1 + sigma) = {error:.1e}")
    assert error < 1e-6


@pytest.mark.parametrize(
    "scheduler_class, options",
    [
        (diffusers.DDPMScheduler, dict(beta_schedule="linear")),
        (diffusers.DDIMScheduler, dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)),
        (diffusers.PNDMScheduler, dict(beta_schedule="squaredcos_cap_v2")),
        (diffusers.DDIMScheduler, dict(beta_schedule="squaredcos_cap_v2", num_train_timesteps=100)),
        (diffusers.DDPMScheduler, dict(trained_betas=torch.linspace(1e-3, 0.2, 50).tolist(), num_train_timesteps=50)),
    ],
)
def test_betas_give_the_schedulers_own_alphas_cumprod(scheduler_class, options):
    scheduler = scheduler_class(**options)
    den = DiffusersDenoiser(dict(tiny_unet().config), json.loads(scheduler.to_json_string()))
    abar = 1 / (1 + den.sigmas.double() ** 2)
    torch.testing.assert_close(abar, scheduler.alphas_cumprod.double(), rtol=2e-6, atol=1e-12)
    assert torch.all(den.sigmas[1:] > den.sigmas[:-1])


@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("solver", ["ddim", "euler"])
def test_ddim_through_fewstep_solvers_equals_diffusers_ddim(tmp_path, set_alpha_to_one, prediction, solver):
    unet = tiny_unet()
    scheduler = diffusers.DDIMScheduler(
        num_train_timesteps=T, clip_sample=False, set_alpha_to_one=set_alpha_to_one, prediction_type=prediction,
        timestep_spacing="trailing",  # starts at t = T - 1, the wrapper's sigma_max
    )
    den = load_diffusers(save(tmp_path, unet, scheduler))
    scheduler.set_timesteps(10)
    torch.manual_seed(1)
    x_vp = torch.randn(4, 1, 8, 8)
    x = x_vp.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x, eta=0.0).prev_sample
    # DDIM's last step goes to final_alpha_cumprod: 1 (sigma 0) with set_alpha_to_one, else abar_0 (sigma_0)
    final = torch.zeros(1) if set_alpha_to_one else den.sigmas[:1]
    sigmas = torch.cat([den.sigmas[scheduler.timesteps], final])
    assert sigmas[0] == den.sigma_max
    out = SOLVERS[solver].fn(den, x_vp * (1 + sigmas[0] ** 2).sqrt(), sigmas)
    out_vp = out / (1 + final**2).sqrt()
    # a random epsilon-UNet does not denoise, so its images reach |x| ~ 200: compare relative to their scale
    error = ((out_vp - x).abs().max() / x.abs().max()).item()
    print(f"DDIM {solver} {prediction} set_alpha_to_one={set_alpha_to_one}: max |x| {x.abs().max():.3g}, relative error {error:.1e}")
    assert error < 1e-5


def test_continuous_sigma_interpolates_t_in_log_sigma(tmp_path):
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=T)
    den = load_diffusers(save(tmp_path, tiny_unet(), scheduler))
    k = torch.tensor([0, 3, 400, T - 2])
    between = (den.sigmas[k] * den.sigmas[k + 1]).sqrt()  # the geometric mean: halfway in log sigma
    t = den.sigma_to_t(between)
    assert torch.all(t > k) and torch.all(t < k + 1)
    torch.testing.assert_close(t, k + 0.5, rtol=0, atol=1e-3)
    outside = torch.tensor([0.0, 0.002, den.sigma_min * 0.999, den.sigma_max * 1.001, 1e4])
    assert den.sigma_to_t(outside).tolist() == [0, 0, 0, T - 1, T - 1]
    # the UNet gets that fractional t, as a float tensor
    seen = []
    den.unet.register_forward_pre_hook(lambda module, args: seen.append(args[1].clone()))
    with torch.no_grad():
        den(torch.randn(4, 1, 8, 8), between)
    assert seen[0].dtype == torch.float32 and torch.equal(seen[0], t)


@pytest.mark.parametrize("num_classes", [3, 4])
def test_class_conditional_model_takes_labels(tmp_path, num_classes):
    # 4 embeddings: with 3 data classes the 4th is the null class (fewstep's label num_classes), with 4 there is none
    unet = tiny_unet(num_class_embeds=4)
    den = load_diffusers(save(tmp_path, unet, diffusers.DDPMScheduler(num_train_timesteps=T)), num_classes=num_classes)
    x, sigma = torch.randn(3, 1, 8, 8), den.sigmas[[5, 50, 500]]
    labels = torch.tensor([0, 1, 2])
    with torch.no_grad():
        D = den(x, sigma, class_labels=labels)
        eps = unet(x / (1 + sigma.view(-1, 1, 1, 1) ** 2).sqrt(), torch.tensor([5, 50, 500]), class_labels=labels).sample
        assert not torch.allclose(D, den(x, sigma, class_labels=torch.tensor([2, 0, 1])))
        null = torch.full((3,), num_classes)
        if num_classes == 3:
            assert torch.equal(den(x, sigma), den(x, sigma, class_labels=null))
        else:
            with pytest.raises(ConfigError, match="guidance scale 0"):
                den(x, sigma, class_labels=null)
    torch.testing.assert_close(D, x - sigma.view(-1, 1, 1, 1) * eps, rtol=0, atol=1e-5)


def one_line_error(error_class, fn, *args, **kwargs) -> str:
    with pytest.raises(error_class) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_one_line_errors(tmp_path, monkeypatch):
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=T)
    model = tmp_path / "model"
    tiny_unet().save_pretrained(model)  # no scheduler config beside it
    message = one_line_error(CheckpointError, load_diffusers, model)
    assert "scheduler_config.json" in message and str(model) in message and "scheduler" + os.sep in message
    assert is_diffusers_folder(model) and not is_diffusers_folder(tmp_path / "absent")

    scheduler.save_pretrained(model)
    message = one_line_error(ConfigError, load_diffusers, model, data_shape=(3, 8, 8))
    assert "1x8x8" in message and "3x8x8" in message
    message = one_line_error(ConfigError, load_diffusers, model, data_shape=(1, 28, 28))
    assert "1x8x8" in message and "1x28x28" in message
    assert "num_class_embeds=None" in one_line_error(ConfigError, load_diffusers, model, num_classes=10)
    assert "no diffusers model folder" in one_line_error(CheckpointError, load_diffusers, tmp_path / "absent")

    config = json.loads((model / "scheduler_config.json").read_text())
    (model / "scheduler_config.json").write_text(json.dumps({**config, "prediction_type": "flow"}))
    assert "epsilon, v_prediction, sample" in one_line_error(CheckpointError, load_diffusers, model)

    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    assert "no UNet2DModel" in one_line_error(CheckpointError, load_diffusers, other)
    assert not is_diffusers_folder(other)

    monkeypatch.setitem(sys.modules, "diffusers", None)  # as if diffusers were not installed
    message = one_line_error(CheckpointError, load_diffusers, model)
    assert 'pip install "fewstep[diffusers]"' in message and "pip install diffusers" in message


def test_rebuilt_from_configs_and_state_dict_is_identical(tmp_path):
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=T, prediction_type="v_prediction")
    den = load_diffusers(save(tmp_path, tiny_unet(num_class_embeds=2), scheduler), data_shape=(1, 8, 8), num_classes=2)
    assert is_diffusers_folder(tmp_path) and den.sigma_data == 0.5
    state = den.state_dict()
    assert state and all(key.startswith("unet.") for key in state)
    # a fewstep checkpoint keeps the two configs as plain (JSON) data
    configs = json.loads(json.dumps({"unet_config": den.unet_config, "scheduler_config": den.scheduler_config}))
    rebuilt = DiffusersDenoiser(**configs, data_shape=(1, 8, 8), num_classes=2)
    assert not torch.equal(rebuilt.unet.conv_in.weight, den.unet.conv_in.weight)  # random until loaded
    rebuilt.load_state_dict(state)
    rebuilt.eval()
    x, sigma, labels = torch.randn(4, 1, 8, 8), torch.tensor([0.002, 0.5, 3.0, 200.0]), torch.tensor([0, 1, 1, 0])
    with torch.no_grad():
        assert torch.equal(rebuilt(x, sigma, class_labels=labels), den(x, sigma, class_labels=labels))
    assert math.isclose(rebuilt.sigma_max, den.sigma_max) and rebuilt.prediction_type == "v_prediction"
