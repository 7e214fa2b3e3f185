"""LPIPS as a distillation loss (consistency and progressive distillation), with no download ever attempted.

Every test runs on an untrained backbone ("random") or on a backbone file written here: the ImageNet weights are
not on this machine and must not be fetched.
"""

import types
import urllib.request

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import torchvision
from lightning.pytorch.callbacks import EMAWeightAveraging
from torch.utils.data import DataLoader, TensorDataset

from fewstep.checkpoints import load_method
from fewstep.errors import ConfigError
from fewstep.methods import Consistency, EDMTeacher, Progressive
from fewstep.methods.consistency import consistency_distance
from fewstep.methods.progressive import progressive_target
from fewstep.networks.lpips_loss import LPIPSLoss, hub_backbone_path
from fewstep.train import train

from helpers import SHAPE, TINY, UNET

ADAM = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-3}
FAST = {"lpips_backbone": "random", "lpips_resize": 32}  # VGG on 32 x 32: a fraction of a second per step


@pytest.fixture(autouse=True)
def no_download(monkeypatch, tmp_path):
    """Any attempt to fetch weights fails the test; the torch hub cache is an empty folder of this test's."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"a download was attempted: {args[:1]}")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))


def vgg_features(seed: int) -> torch.nn.Module:
    """torchvision's VGG16 ``features`` (14.7M parameters, what LPIPS uses) without its 120M-parameter classifier."""
    torch.manual_seed(seed)
    return torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])


def save_vgg_backbone(path, seed: int = 1, prefix: str = "features.", legacy: bool = False):
    """A file in the format of torchvision's vgg16 state_dict (its classifier left out), random weights; ``legacy``:
    torch's pre-1.6 file format, which torchvision's own vgg16-397923af.pth has."""
    state = {prefix + key: value for key, value in vgg_features(seed).state_dict().items()}
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    return state


def images(n=4, channels=1, size=8, seed=0):
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# -- the distance ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("net, resize", [("vgg", 32), ("alex", 64)])
def test_lpips_is_zero_on_identical_images_positive_otherwise_symmetric_and_per_sample(net, resize):
    lpips = LPIPSLoss(net, "random", resize=resize)
    for a, b in ((images(4), images(4, seed=1)), (images(3, 3, 20, seed=2), images(3, 3, 20, seed=3))):
        d = lpips(a, b)
        assert d.shape == (a.shape[0],) and (d > 0).all()
        assert (lpips(a, a.clone()) == 0).all()
        torch.testing.assert_close(lpips(b, a), d)
        torch.testing.assert_close(lpips(a[1:2], b[1:2]), d[1:2])  # per sample: independent of the batch
    near = a + 0.05 * torch.randn(a.shape, generator=torch.Generator().manual_seed(4))
    assert (lpips(a, near) < lpips(a, b)).all()  # a slightly noisier image is nearer than an unrelated one


def test_grayscale_images_are_repeated_to_rgb_and_upsampled_bilinearly_before_the_network():
    lpips = LPIPSLoss("vgg", "random", resize=32)
    a, b = images(2), images(2, seed=1)

    def rgb32(x):
        return F.interpolate(x.repeat(1, 3, 1, 1), size=(32, 32), mode="bilinear", align_corners=False)

    torch.testing.assert_close(lpips(a, b), lpips.lpips(rgb32(a), rgb32(b)).flatten())
    big = images(1, 3, 40)  # larger than resize: left as it is
    torch.testing.assert_close(lpips(big, -big), lpips.lpips(big, -big).flatten())


def test_lpips_is_differentiable_in_the_students_output_and_its_network_is_frozen():
    lpips = LPIPSLoss("vgg", "random", resize=32)
    conv = torch.nn.Conv2d(1, 1, 3, padding=1)
    output = conv(images(4))
    lpips(output, images(4, seed=1)).mean().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0 and torch.isfinite(conv.weight.grad).all()
    assert not any(p.requires_grad for p in lpips.parameters())
    lpips.train()
    assert not lpips.training and not lpips.lpips.lin0.training  # the heads' dropout stays off


def test_the_network_matches_the_lpips_package_with_the_same_backbone(tmp_path, monkeypatch):
    import lpips as package

    # the package's own construction and heads, with torchvision's vgg16 reduced to the features LPIPS slices
    monkeypatch.setattr(package.pretrained_networks.tv, "vgg16", lambda **kwargs: types.SimpleNamespace(features=vgg_features(3)))
    reference = package.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    save_vgg_backbone(tmp_path / "vgg16.pth", seed=3)
    ours = LPIPSLoss("vgg", tmp_path / "vgg16.pth", resize=None)
    a, b = images(2, 3, 32), images(2, 3, 32, seed=1)
    torch.testing.assert_close(ours(a, b), reference(a, b).flatten())


# -- the backbone weights -------------------------------------------------------------------------------------


@pytest.mark.parametrize("net, name", [("vgg", "vgg16-397923af.pth"), ("alex", "alexnet-owt-7be5be79.pth")])
def test_missing_backbone_weights_are_one_line_naming_the_file_and_where_it_goes(tmp_path, net, name):
    expected = tmp_path / "hub" / "checkpoints" / name  # where torchvision's download would put it
    assert hub_backbone_path(net) == expected
    with pytest.raises(ConfigError) as error:
        LPIPSLoss(net)
    message = str(error.value)
    assert "\n" not in message and str(expected) in message and "method.lpips_backbone" in message
    with pytest.raises(ConfigError, match="nowhere.pth") as error:
        LPIPSLoss(net, tmp_path / "nowhere.pth")
    assert "\n" not in str(error.value)


def test_a_backbone_file_is_loaded_from_the_option_or_the_hub_cache_and_changes_the_distance(tmp_path):
    state = save_vgg_backbone(tmp_path / "mine.pth")
    loaded = LPIPSLoss("vgg", tmp_path / "mine.pth", resize=32)
    weights = loaded.lpips.net.state_dict()  # lpips slices torchvision's features, keeping their indices
    torch.testing.assert_close(weights["slice5.28.weight"], state["features.28.weight"])
    torch.testing.assert_close(weights["slice1.0.bias"], state["features.0.bias"])
    a, b = images(3), images(3, seed=1)
    d = loaded(a, b)
    assert not torch.allclose(d, LPIPSLoss("vgg", "random", resize=32)(a, b))
    # the same file where torchvision keeps it, and one of the features alone (keys without "features.")
    hub = hub_backbone_path("vgg")
    hub.parent.mkdir(parents=True)
    save_vgg_backbone(hub, legacy=True)
    torch.testing.assert_close(LPIPSLoss("vgg", resize=32)(a, b), d)
    save_vgg_backbone(tmp_path / "features.pth", prefix="")
    torch.testing.assert_close(LPIPSLoss("vgg", tmp_path / "features.pth", resize=32)(a, b), d)


def test_a_file_that_is_not_the_backbone_is_refused_in_one_line(tmp_path):
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, tmp_path / "partial.pth")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    (tmp_path / "text.pth").write_text("not torch")
    for name, match in (("partial.pth", "lacks 'features.0.bias'"), ("other.pth", "lacks"), ("text.pth", "not a readable")):
        with pytest.raises(ConfigError, match=match) as error:
            LPIPSLoss("vgg", tmp_path / name)
        assert "\n" not in str(error.value)
    save_vgg_backbone(tmp_path / "vgg.pth")
    with pytest.raises(ConfigError, match="has shape"):  # a VGG file given for AlexNet
        LPIPSLoss("alex", tmp_path / "vgg.pth")


# -- the students -----------------------------------------------------------------------------------------------


def student(cls, **kwargs):
    method = cls(net=UNET, data_shape=SHAPE, optimizer=ADAM, **kwargs)
    teacher = EDMTeacher(net=UNET, data_shape=SHAPE)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    method.attach_teacher(teacher)
    return method


def fit_two_steps(method):
    data = DataLoader(TensorDataset(images(8), torch.zeros(8, dtype=torch.long)), batch_size=4)
    trainer = L.Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, callbacks=[EMAWeightAveraging(decay=0.9)],
    )
    trainer.fit(method, data)
    return trainer


@pytest.mark.parametrize("cls, kwargs", [
    (Consistency, {"teacher_steps": 8, "sample_steps": 2}),
    (Progressive, {"student_steps": 2}),
])
def test_each_student_trains_on_lpips_with_the_network_outside_its_state_dict_and_ema(cls, kwargs):
    method = student(cls, loss="lpips", **FAST, **kwargs)
    before = {k: v.clone() for k, v in method.net.state_dict().items()}
    trainer = fit_two_steps(method)
    assert trainer.global_step == 2 and torch.isfinite(trainer.callback_metrics["train/loss"])
    assert any(not torch.equal(before[k], v) for k, v in method.net.state_dict().items())
    lpips = method.perceptual()
    assert isinstance(lpips, LPIPSLoss) and next(lpips.parameters()).device == method.device
    assert not any(k.startswith(("_lpips", "lpips")) for k in method.state_dict())
    assert all(p is not q for p in method.parameters() for q in lpips.parameters())
    ema = next(c for c in trainer.callbacks if isinstance(c, EMAWeightAveraging))._average_model
    assert sum(p.numel() for p in ema.module.parameters()) == sum(p.numel() for p in method.parameters())
    assert "_lpips_loss" not in vars(ema.module)  # built at fit start, after the EMA copied the method


def test_lpips_losses_are_the_per_sample_distance_of_each_method():
    method = student(Consistency, teacher_steps=8, sample_steps=2, loss="lpips", **FAST)
    a, b = images(3), images(3, seed=1)
    torch.testing.assert_close(consistency_distance(a, b, "lpips", lpips=method.perceptual()), method.perceptual()(a, b))
    # progressive: the truncated-SNR weight max(1 / sigma^2, 1) on LPIPS in place of the squared error
    progressive = student(Progressive, student_steps=2, loss="lpips", **FAST)
    x, k = images(3), torch.tensor([0, 1, 1])
    levels, fine = progressive.student_sigmas, progressive.grid(4)
    target = progressive_target(progressive.teacher_denoise, x, levels[k], fine[2 * k + 1], levels[k + 1])
    weight = (1 / levels[k] ** 2).clamp(min=1.0)
    expected = (weight * progressive.perceptual()(progressive.denoiser(x, levels[k]), target)).mean()
    torch.testing.assert_close(progressive.state_loss(x, k, None, None), expected)
    # the defaults stay today's: x-MSE for both
    assert student(Progressive, student_steps=2).hparams.loss == "l2" and student(Consistency).hparams.loss == "l2"


def test_unknown_losses_and_impossible_lpips_settings_are_refused_in_one_line():
    for cls, kwargs, match in (
        (Consistency, {"loss": "lpip"}, "choose one of l2, huber, lpips"),
        (Progressive, {"loss": "huber"}, "choose one of l2, lpips"),
        (Progressive, {"loss": "lpips", "lpips_net": "squeeze"}, "choose one of vgg, alex"),
        (Consistency, {"loss": "lpips", "lpips_resize": 8}, "lpips_resize=8"),
    ):
        with pytest.raises(ConfigError, match=match) as error:
            cls(net=UNET, data_shape=SHAPE, **kwargs)
        assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="grayscale or RGB"):
        Consistency(net={"_target_": "fewstep.networks.MLP"}, data_shape=[2], loss="lpips")


def test_a_student_without_the_weights_stops_at_fit_start_in_one_line(tmp_path):
    method = student(Consistency, teacher_steps=8, sample_steps=2, loss="lpips", lpips_resize=32)
    with pytest.raises(ConfigError, match="vgg16-397923af.pth") as error:
        fit_two_steps(method)
    assert "\n" not in str(error.value) and str(tmp_path / "hub" / "checkpoints") in str(error.value)


def test_progressive_rounds_on_lpips_from_the_command_line(compose_cfg, tmp_path):
    cfg = compose_cfg("train", [
        "method=progressive", "summary=false", "method.start_steps=4", "method.steps_per_round=2", "++method.loss=lpips",
        "++method.lpips_backbone=random", "++method.lpips_resize=32", *TINY, "data=digits",
        f"paths.root={tmp_path}/outputs", "teacher.max_steps=2", "callbacks.sample_grid.n=4",
        "trainer.enable_checkpointing=true", "+callbacks.model_checkpoint._target_=lightning.pytorch.callbacks.ModelCheckpoint",
        "+callbacks.model_checkpoint.dirpath=${paths.output_dir}/checkpoints", "+callbacks.model_checkpoint.save_last=true",
    ])
    train(cfg)
    last = tmp_path / "stage2_1steps" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    assert not any("lpips" in key for key in checkpoint["state_dict"])
    model = load_method(last)  # the checkpoint rebuilds without building LPIPS
    assert model.hparams.loss == "lpips" and model.hparams.student_steps == 1 and "_lpips_loss" not in vars(model)
