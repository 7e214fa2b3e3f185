"""fewstep.networks.edm2 against EDM2's own outputs, and EDM2 snapshots read safely (tests/fixtures/edm2, made with
NVlabs/edm2: see its README.md).

Tolerance: D in float32 must agree with EDM2's to 1e-5 absolute where |D| <= 1 and 1e-5 relative to max |D| above:
|D - D_edm2| <= 1e-5 * max(1, max |D_edm2|). On the CPU here eval mode agrees exactly; in train mode EDM2 renormalises
the stored weights at every forward, fewstep once per weight update (a few ulp apart from the second forward on).
"""

from __future__ import annotations

import functools
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import test_edm_pickle as edm_helpers
import torch
from hydra.utils import instantiate

from fewstep.checkpoints import load_method
from fewstep.errors import CheckpointError, ConfigError
from fewstep.external.edm_pickle import load_edm_network, read_edm_pickle
from fewstep.generate import generate
from fewstep.methods import EDMTeacher
from fewstep.networks.edm2 import EDM2Precond, MPConv, edm2_denoiser, mp_cat, mp_silu, mp_sum, normalize
from fewstep.networks.preconditioning import PreconditionedDenoiser
from fewstep.train import train

from helpers import TINY

# the stand-ins of tests/test_edm_pickle.py that write pickles naming EDM's (and EDM2's) persistence globals
edm_names, Call, persistent_reduce = edm_helpers.edm_names, edm_helpers.Call, edm_helpers.persistent_reduce

FIXTURES = Path(__file__).parent / "fixtures" / "edm2"
NETWORKS = ["edm2_uncond", "edm2_cond"]
TOL = 1e-5


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    error = (actual - expected).abs().max().item()
    bound = TOL * max(1.0, expected.abs().max().item())
    assert error <= bound, f"{what}: max |D - D_edm2| = {error:.3g} > {bound:.3g}"


@functools.cache
def fixture(name: str) -> dict:
    return torch.load(FIXTURES / f"{name}.pt", weights_only=True)


def network(name: str) -> EDM2Precond:
    """A fresh copy of the fixture's network, read from its EDM2 snapshot by fewstep's reader."""
    net = load_edm_network(FIXTURES / f"{name}.pkl")
    assert isinstance(net, EDM2Precond) and isinstance(net, PreconditionedDenoiser) and not net.training
    return net.requires_grad_(False)


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    return message


# ---------------------------------------------------------------------------------------------------------------
# Equivalence with EDM2's code


def test_fixtures_are_edm2_training_snapshots():
    for name in NETWORKS:
        top = read_edm_pickle(FIXTURES / f"{name}.pkl")
        assert list(top) == ["encoder", "dataset_kwargs", "loss_fn", "ema"]  # training_loop.py's snapshot
        assert [top[key].class_name for key in ("encoder", "loss_fn", "ema")] == ["StandardRGBEncoder", "EDM2Loss", "Precond"]
        assert top["ema"].init_kwargs == fixture(name)["init_kwargs"]
    assert fixture("edm2_cond")["labels"].tolist() == [1, 3, 4]  # 4 = no label: EDM2 got the zero vector


@pytest.mark.parametrize("name", NETWORKS)
def test_denoiser_matches_edm2_in_eval_mode_at_every_sigma(name):
    record, net = fixture(name), network(name)
    assert record["sigma"].tolist() == pytest.approx([0.002, 0.1, 1, 10, 80])
    with torch.no_grad():
        for x, sigma, expected, logvar in zip(record["x"], record["sigma"], record["expected"], record["logvar"]):
            batch_sigma = sigma.expand(x.shape[0])
            assert_close(net(x, batch_sigma, record["labels"]), expected, f"{name} sigma={sigma.item():g}")
            assert_close(net(x, float(sigma), record["labels"]), expected, f"{name} float sigma={sigma.item():g}")
            denoised, u = net(x, batch_sigma, record["labels"], return_logvar=True)
            assert_close(u.flatten(), logvar, f"{name} logvar sigma={sigma.item():g}")
            assert torch.equal(denoised, net(x, batch_sigma, record["labels"]))


@pytest.mark.parametrize("name", NETWORKS)
def test_denoiser_matches_edm2_in_train_mode_with_forced_weight_normalisation(name):
    record, net = fixture(name), network(name)
    before = {key: value.clone() for key, value in net.state_dict().items()}
    net.train()
    with torch.no_grad():
        for i, (x, sigma) in enumerate(zip(record["x"], record["sigma"])):
            torch.manual_seed(int(record["train_seeds"][i]))  # the dropout masks EDM2 drew
            assert_close(net(x, sigma.expand(x.shape[0]), record["labels"]), record["expected_train"][i],
                         f"{name} train sigma={sigma.item():g}")
    convs = {key: m for key, m in net.named_modules() if isinstance(m, MPConv) and key.startswith("unet.")}
    assert convs and all(not torch.equal(m.weight, before[f"{key}.weight"]) for key, m in convs.items())
    for m in convs.values():  # written in place: each output channel's weights now of unit magnitude (up to eps)
        rms = m.weight.flatten(1).square().mean(1).sqrt()
        assert torch.allclose(rms, torch.ones_like(rms), atol=1e-3)
    assert not torch.equal(record["expected_train"], record["expected"])  # train mode is a different function


def test_float16_ema_loads_in_float32():
    top = read_edm_pickle(FIXTURES / "edm2_cond.pkl")  # as EDM2's training loop writes it: the EMA in float16
    stored = top["ema"].state["_modules"]["unet"].state["_parameters"]["out_gain"]
    assert stored.dtype == torch.float16
    net = network("edm2_cond")
    assert all(t.dtype == torch.float32 for t in net.state_dict().values())
    assert net.unet.out_gain.item() == stored.float().item()
    assert read_edm_pickle(FIXTURES / "edm2_uncond.pkl")["ema"].state["_modules"]["unet"].state[
        "_parameters"]["out_gain"].dtype == torch.float32  # a float32 EMA loads too


def test_state_dict_matches_edm2_names_and_a_fresh_network_loads_it_strictly():
    for name in NETWORKS:
        record, net = fixture(name), network(name)
        fresh = EDM2Precond(**record["init_kwargs"])
        assert list(fresh.state_dict()) == list(net.state_dict())
        fresh.load_state_dict(net.state_dict(), strict=True)
        names = set(net.state_dict())
        assert {"unet.out_gain", "unet.emb_fourier.freqs", "unet.emb_fourier.phases", "logvar_linear.weight",
                "unet.enc.8x8_conv.weight", "unet.dec.4x4_in0.emb_gain"} <= names
        assert not any(key.endswith("bias") for key in names)  # no biases anywhere


def test_magnitude_preserving_operations_keep_unit_magnitude():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4096, 8, generator=g), torch.randn(4096, 24, generator=g)
    rms = lambda t: t.square().mean().sqrt().item()  # noqa: E731
    assert rms(mp_silu(torch.randn(100_000, generator=g))) == pytest.approx(1, abs=0.02)
    assert rms(mp_sum(a, b[:, :8], t=0.3)) == pytest.approx(1, abs=0.02)
    assert rms(mp_cat(a, b, t=0.7)) == pytest.approx(1, abs=0.02)
    # the two parts contribute (1 - t)^2 : t^2 of the magnitude, whatever their widths
    joined = mp_cat(a, b, t=0.7)
    assert joined[:, :8].square().sum().item() / joined[:, 8:].square().sum().item() == pytest.approx(0.09 / 0.49, rel=0.05)
    w = normalize(torch.randn(5, 3, 3, 3, generator=g) * 7)
    assert torch.allclose(w.flatten(1).square().mean(1).sqrt(), torch.ones(5), atol=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# Training


def test_training_forward_twice_in_one_graph_and_under_jvp():
    """A student and its critic, or a JVP, call the network twice before backward: the in-place normalisation must
    not rewrite a weight autograd saved; every parameter gets a gradient (the uncertainty head through logvar)."""
    net = edm2_denoiser([3, 8, 8], num_classes=3, model_channels=4, channel_mult=[1, 2], num_blocks=1,
                        attn_resolutions=[4], channels_per_head=4, logvar_channels=4, dropout=0.1).train()
    x, sigma, labels = torch.randn(2, 3, 8, 8), torch.tensor([0.3, 3.0]), torch.tensor([0, 3])
    first, logvar = net(x, sigma, labels, return_logvar=True)
    second = net(first, sigma, labels)
    (second.square().mean() + logvar.mean()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    torch.optim.SGD(net.parameters(), lr=0.1).step()
    conv = net.unet.enc["8x8_conv"]
    assert conv.weight_changed()  # the optimiser step is renormalised at the next training forward
    _, tangent = torch.func.jvp(lambda s: net(x, s, labels), (sigma,), (torch.ones_like(sigma),))
    assert torch.isfinite(tangent).all()
    net(x, sigma, labels)
    assert not conv.weight_changed()


# (model_channels, parameters) of EDM2's networks, counted by instantiating EDM2's code with 1000 classes
EDM2_SIZES = {"s": (192, 280_209_381), "m": (256, 497_803_173), "l": (320, 777_492_325), "xl": (384, 1_119_276_837)}
SMALL = ["model.model_channels=4", "model.channel_mult=[1,2]", "model.num_blocks=1", "model.attn_resolutions=[4]",
         "model.channels_per_head=4", "model.logvar_channels=4"]


@pytest.mark.parametrize("size", sorted(EDM2_SIZES))
def test_model_configs_have_edm2s_parameter_counts(compose_cfg, size):
    with torch.device("meta"):  # EDM2's full size, without allocating it
        net = instantiate(compose_cfg("train", [f"model=edm2_img64_{size}"]).model, data_shape=[3, 64, 64], num_classes=1000)
    channels, parameters = EDM2_SIZES[size]
    assert sum(p.numel() for p in net.parameters()) == parameters
    assert sum(b.numel() for b in net.buffers()) == 2 * (channels + 128)  # the two MPFouriers' freqs and phases


def test_edm2_model_trains_from_scratch_and_its_checkpoint_loads(compose_cfg, tmp_path):
    overrides = ["model=edm2_img64_s", *SMALL, *TINY[1:], "data=digits", "trainer.max_steps=2", "trainer.limit_val_batches=0",
                 "trainer.enable_checkpointing=true",
                 "+callbacks.model_checkpoint._target_=lightning.pytorch.callbacks.ModelCheckpoint",
                 "+callbacks.model_checkpoint.dirpath=${paths.output_dir}/checkpoints",
                 "+callbacks.model_checkpoint.save_last=true", "+callbacks.model_checkpoint.save_top_k=0"]
    train(compose_cfg("train", overrides))
    (last,) = tmp_path.rglob("checkpoints/last.ckpt")
    method = load_method(last, weights="raw")
    assert isinstance(method.net, EDM2Precond) and list(method.hparams.data_shape) == [1, 8, 8]
    fresh = edm2_denoiser([1, 8, 8], **{k: v for k, v in method.hparams.net.items() if k != "_target_"})
    changed = [k for k, v in fresh.state_dict().items() if not torch.equal(v, method.net.state_dict()[k])]
    assert "unet.out_gain" in changed  # trained: the output gain left zero
    samples, _, nfe = generate(method, 2, "euler", 2)
    assert nfe == 2 and torch.isfinite(samples).all()


@pytest.mark.parametrize("kwargs, message", [
    (dict(data_shape=[3, 8, 6]), "square images"),
    (dict(data_shape=[3, 12, 12], channel_mult=[1, 2, 2, 2]), "divisible by 8"),
])
def test_edm2_denoiser_config_errors_are_one_line(kwargs, message):
    with pytest.raises(ConfigError, match=message) as error:
        edm2_denoiser(**kwargs)
    one_line(error)


# ---------------------------------------------------------------------------------------------------------------
# Loading as a fewstep model


@pytest.mark.parametrize("name", NETWORKS)
def test_load_method_gives_an_edm_teacher_whose_denoiser_is_edm2s_and_samples(name):
    record = fixture(name)
    teacher = load_method(FIXTURES / f"{name}.pkl")
    assert isinstance(teacher, EDMTeacher) and isinstance(teacher.net, EDM2Precond)
    assert list(teacher.hparams.data_shape) == [3, 8, 8] and teacher.num_classes == record["init_kwargs"]["label_dim"]
    assert teacher.hparams.net["_target_"] == "fewstep.networks.edm2.edm2_denoiser"
    x, sigma = record["x"][2], record["sigma"][2].expand(len(record["x"][2]))
    with torch.no_grad():
        assert_close(teacher.denoiser(x, sigma, record["labels"]), record["expected"][2], name)
    # a student built from the recorded config (as teacher.ckpt= students are) runs the same network
    rebuilt = EDMTeacher(net=teacher.hparams.net, data_shape=[3, 8, 8], num_classes=teacher.num_classes,
                         conditional=teacher.num_classes > 0).eval()
    rebuilt.net.load_state_dict(teacher.net.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(rebuilt.denoiser(x, sigma, record["labels"]), teacher.denoiser(x, sigma, record["labels"]))
    samples, labels, nfe = generate(teacher, 3, "heun", 5, guidance=1.5 if teacher.num_classes else 0.0)
    assert samples.shape == (3, 3, 8, 8) and torch.isfinite(samples).all() and nfe >= 5
    assert (labels is None) == (teacher.num_classes == 0)


# ---------------------------------------------------------------------------------------------------------------
# Refusals


class Persistent:
    """An object that pickles as an EDM2 persistent record of ``class_name`` with ``state``."""

    def __init__(self, class_name, state=None):
        self.class_name, self.state = class_name, dict(state or {})

    def __reduce__(self):
        record = dict(type="class", version=6, module_src="", class_name=self.class_name, state=self.state)
        return sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj, (record,)


def snapshot(edm_names, encoder="StandardRGBEncoder", ema=None, **entries):
    """An EDM2 training snapshot's layout: EasyDict(encoder, dataset_kwargs, loss_fn, ema)."""
    if isinstance(encoder, str):
        encoder = Persistent(encoder, {"_init_args": (), "_init_kwargs": {}})
    data = edm_names.EasyDict(encoder=encoder,
                              dataset_kwargs=edm_names.EasyDict(class_name="training.dataset.ImageFolderDataset"),
                              loss_fn=Persistent("EDM2Loss", {"P_mean": -0.8}))
    data["ema"] = ema if ema is not None else Persistent("Precond", {"_init_kwargs": {"img_resolution": 8}})
    data.update(entries)
    return data


@pytest.mark.parametrize("kind", ["system", "open", "exec"])
def test_payload_in_an_edm2_shaped_snapshot_is_refused_and_never_runs(tmp_path, edm_names, kind):
    pwned = tmp_path / "pwned"
    payload = edm_helpers.payloads(pwned)[kind]
    name = f"{payload.fn.__module__}.{payload.fn.__name__}"
    cases = {
        "ema": snapshot(edm_names, ema=payload),
        "encoder state": snapshot(edm_names, encoder=Persistent("StandardRGBEncoder", {"_init_kwargs": {"x": payload}})),
        "network state": snapshot(edm_names, ema=Persistent("Precond", {"_init_kwargs": {"label_dim": payload}})),
        "extra entry": snapshot(edm_names, optimizer=payload),
    }
    for label, obj in cases.items():
        path = tmp_path / f"{label}.pkl"
        path.write_bytes(pickle.dumps(obj, protocol=4))
        for read in (read_edm_pickle, load_edm_network, load_method):
            with pytest.raises(CheckpointError) as error:
                read(path)
            assert name in one_line(error) and "not an EDM network pickle" in str(error.value), label
        assert not pwned.exists(), label
    pickle.loads(pickle.dumps(edm_helpers.payloads(tmp_path / "control")["open"]))  # the payloads are real
    assert (tmp_path / "control").exists()
    os.remove(tmp_path / "control")


def test_latent_edm2_snapshot_is_refused_in_one_line(tmp_path, edm_names):
    latent = FIXTURES / "edm2_latent.pkl"  # written by EDM2's code: its Stability VAE encoder record holds numpy arrays
    for read in (read_edm_pickle, load_edm_network, load_method):
        with pytest.raises(CheckpointError, match="latent models are not supported") as error:
            read(latent)
        assert "StabilityVAEEncoder" in one_line(error)
    # the same refusal where the encoder record is read whole
    path = tmp_path / "latent.pkl"
    path.write_bytes(pickle.dumps(snapshot(edm_names, encoder="StabilityVAEEncoder"), protocol=4))
    assert read_edm_pickle(path)["encoder"].class_name == "StabilityVAEEncoder"
    with pytest.raises(CheckpointError, match="latent models are not supported") as error:
        load_edm_network(path)
    one_line(error)


def test_an_unknown_encoder_or_network_is_named_in_one_line(tmp_path, edm_names):
    path = tmp_path / "other_encoder.pkl"
    path.write_bytes(pickle.dumps(snapshot(edm_names, encoder="FancyEncoder"), protocol=4))
    with pytest.raises(CheckpointError, match="its encoder is a FancyEncoder, not EDM2's pixel encoder") as error:
        load_edm_network(path)
    one_line(error)
    path = tmp_path / "bad_argument.pkl"
    ema = Persistent("Precond", {"_init_kwargs": {"img_resolution": 8, "img_channels": 3, "label_dim": 0, "rope": True},
                                 "_modules": {}, "_parameters": {}, "_buffers": {}})
    path.write_bytes(pickle.dumps(snapshot(edm_names, ema=ema), protocol=4))
    with pytest.raises(CheckpointError, match="rope is not an argument of fewstep's EDM2 Precond") as error:
        load_edm_network(path)
    one_line(error)


def test_numpy_arrays_stay_refused_outside_an_encoder(tmp_path, edm_names):
    path = tmp_path / "array.pkl"
    path.write_bytes(pickle.dumps(snapshot(edm_names, stats=np.zeros(3)), protocol=4))
    with pytest.raises(CheckpointError, match="refusing the global numpy") as error:
        read_edm_pickle(path)
    one_line(error)
