"""fewstep.networks.edm against EDM's own outputs (tests/fixtures/edm, made with NVlabs/edm: see its README.md).

Tolerance: D in float32 must agree with EDM's to 1e-5 absolute where |D| <= 1 and 1e-5 relative to max |D| above
(VP/VE outputs reach ~250 at sigma = 80): |D - D_edm| <= 1e-5 * max(1, max |D_edm|). On the CPU here the two
implementations agree exactly (the same floating-point operations in the same order).
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from fewstep.errors import ConfigError
from fewstep.networks.edm import EDM_CLASSES, EDMPreconditioning, UNetBlock, edm_denoiser
from fewstep.networks.preconditioning import PreconditionedDenoiser

FIXTURES = Path(__file__).parent / "fixtures" / "edm"
NETWORKS = sorted(p.stem for p in FIXTURES.glob("*.pt") if not p.stem.startswith("block_"))
BLOCKS = sorted(p.stem for p in FIXTURES.glob("block_*.pt"))
CONDITIONAL = [name for name in NETWORKS if torch.load(FIXTURES / f"{name}.pt", weights_only=True)["labels"] is not None]
TOL = 1e-5


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    error = (actual - expected).abs().max().item()
    bound = TOL * max(1.0, expected.abs().max().item())
    assert error <= bound, f"{what}: max |D - D_edm| = {error:.3g} > {bound:.3g}"


@functools.cache
def fixture(name: str) -> dict:
    return torch.load(FIXTURES / f"{name}.pt", weights_only=True)


@functools.cache
def network(name: str) -> EDMPreconditioning:
    """The fewstep network of a fixture, built from EDM's class name and constructor arguments, EDM's weights loaded."""
    record = fixture(name)
    net = EDM_CLASSES[record["class_name"]](**record["init_kwargs"])
    net.load_state_dict(record["state_dict"], strict=True)
    return net.eval().requires_grad_(False)


def test_fixtures_cover_every_configuration():
    assert set(NETWORKS) >= {"edm_ddpmpp", "edm_ncsnpp", "vp_ddpmpp", "vp_ncsnpp", "ve_ddpmpp", "ve_ncsnpp",
                             "iddpm_adm", "edm_adm_cond"}
    assert {"block_song_2heads", "block_adm_2heads"} <= set(BLOCKS)
    assert set(CONDITIONAL) >= {"edm_ddpmpp", "ve_ncsnpp", "edm_adm_cond"}
    for name in NETWORKS:  # the snapshot pickles (for the pickle reader's tests); the skip variant is .pt only
        assert (FIXTURES / f"{name}.pkl").exists() or name == "edm_song_skip"


@pytest.mark.parametrize("name", NETWORKS)
def test_denoiser_matches_edm_at_every_sigma(name):
    record, net = fixture(name), network(name)
    assert isinstance(net, EDMPreconditioning) and isinstance(net, PreconditionedDenoiser)  # called as it is
    with torch.no_grad():
        for x, sigma, expected in zip(record["x"], record["sigma"], record["expected"]):
            batch_sigma = sigma.expand(x.shape[0])
            assert_close(net(x, batch_sigma, record["labels"]), expected, f"{name} sigma={sigma.item():g}")
            if "augment_labels" in record:
                augmented = net(x, batch_sigma, record["labels"], augment_labels=record["augment_labels"])
                assert_close(augmented, record["expected_augmented"][record["sigma"].tolist().index(sigma.item())])


@pytest.mark.parametrize("name", NETWORKS)
def test_attributes_and_round_sigma_match_edm(name):
    record, net = fixture(name), network(name)
    # computed in float32 from the iDDPM schedule: one ulp apart on some CPUs (20291.1719 against 20291.1699 on AMD EPYC)
    assert net.sigma_min == pytest.approx(record["sigma_min"], rel=1e-6)
    assert net.sigma_max == pytest.approx(record["sigma_max"], rel=1e-6)
    assert torch.equal(net.round_sigma(record["sigma"]), record["round_sigma"])
    kwargs = record["init_kwargs"]
    assert (net.img_resolution, net.img_channels, net.label_dim) == (
        kwargs["img_resolution"], kwargs["img_channels"], kwargs["label_dim"])
    assert net.sigma_data == kwargs.get("sigma_data", 0.5)


@pytest.mark.parametrize("name", NETWORKS)
def test_float_sigma_equals_batched_sigma(name):
    record, net = fixture(name), network(name)
    x, sigma = record["x"][2], record["sigma"][2]
    with torch.no_grad():
        assert torch.equal(net(x, float(sigma), record["labels"]), net(x, sigma.expand(x.shape[0]), record["labels"]))


@pytest.mark.parametrize("name", CONDITIONAL)
def test_integer_labels_equal_one_hot_and_null_label_is_zero_vector(name):
    record, net = fixture(name), network(name)
    x, sigma, labels = record["x"][2], record["sigma"][2].expand(3), record["labels"]
    one_hot = torch.nn.functional.one_hot(labels, net.label_dim + 1)[:, : net.label_dim].float()
    null = torch.full_like(labels, net.label_dim)
    with torch.no_grad():
        assert torch.equal(net(x, sigma, labels), net(x, sigma, one_hot))
        assert torch.equal(net(x, sigma, null), net(x, sigma, torch.zeros(3, net.label_dim)))
        assert torch.equal(net(x, sigma, null), net(x, sigma, None))  # EDM: no labels = the zero vector
        assert not torch.equal(net(x, sigma, labels), net(x, sigma, null))


@pytest.mark.parametrize("name", ["edm_ddpmpp", "edm_ncsnpp", "edm_song_skip", "edm_adm_cond"])
def test_encoder_features_are_each_resolution_then_the_bottleneck(name):
    record, net = fixture(name), network(name)
    with torch.no_grad():
        features = net.encoder_features(record["x"][2], record["sigma"][2], record["labels"])
    width = record["init_kwargs"]["model_channels"]
    assert [tuple(f.shape) for f in features] == [(3, width, 8, 8), (3, 2 * width, 4, 4), (3, 2 * width, 4, 4)]


def test_trains_with_gradients_everywhere_and_label_dropout():
    net = edm_denoiser([3, 8, 8], num_classes=3, model_type="SongUNet", model_channels=8, channel_mult=[1, 2],
                       num_blocks=1, attn_resolutions=[4], label_dropout=0.5, dropout=0.1, augment_dim=2)
    net.train()
    x = torch.randn(4, 3, 8, 8)
    loss = (net(x, torch.rand(4) + 0.1, torch.tensor([0, 1, 2, 3]), augment_labels=torch.randn(4, 2)) - x).square().mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


@pytest.mark.parametrize("name", BLOCKS)
def test_multi_head_blocks_match_edm(name):
    record = fixture(name)
    block = UNetBlock(**record["init_kwargs"])
    block.load_state_dict(record["state_dict"], strict=True)
    assert block.eval().num_heads == 2
    with torch.no_grad():
        assert_close(block(record["x"], record["emb"]), record["expected"], name)


# EDM's architectures at full size (parameter counts from EDM's own code, at the same label_dim).
FULL_SIZE = {"edm_ddpmpp_cifar": ([3, 32, 32], 10, 55_735_299), "edm_ncsnpp_cifar": ([3, 32, 32], 0, 56_397_827),
             "edm_adm_imagenet64": ([3, 64, 64], 1000, 295_899_267)}
SMALL = ["model.model_channels=8", "model.channel_mult=[1,2]", "model.num_blocks=1", "model.attn_resolutions=[4]"]


@pytest.mark.parametrize("model", sorted(FULL_SIZE))
def test_model_configs_are_edms_architectures_and_run(compose_cfg, model):
    shape, num_classes, parameters = FULL_SIZE[model]
    with torch.device("meta"):  # EDM's full size, without allocating it
        full = instantiate(compose_cfg("train", [f"model={model}"]).model, data_shape=shape, num_classes=num_classes)
    assert sum(p.numel() for p in full.parameters()) == parameters

    cfg = compose_cfg("train", [f"model={model}", *SMALL])
    net = instantiate(cfg.model, data_shape=[3, 8, 8], num_classes=4).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        out = net(x, torch.tensor([0.5, 5.0]), torch.tensor([1, 4]))
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("kwargs, message", [
    (dict(data_shape=[3, 8, 6]), "square images"),
    (dict(data_shape=[2]), "square images"),
    (dict(data_shape=[3, 8, 8], precond="KarrasPrecond"), "not an EDM preconditioning"),
    (dict(data_shape=[3, 8, 8], model_type="UNet"), "not an EDM architecture"),
    (dict(data_shape=[3, 8, 8], precond="VPPrecond", sigma_data=0.5), "not an argument"),
])
def test_edm_denoiser_config_errors_are_one_line(kwargs, message):
    with pytest.raises(ConfigError, match=message) as error:
        edm_denoiser(**kwargs)
    assert "\n" not in str(error.value)
