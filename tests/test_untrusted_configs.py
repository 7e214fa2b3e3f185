"""What a file says is data: configs read from checkpoints, EDM files, diffusers folders and saved run configs never
reach Hydra's instantiate or an import by name. Each test plants a Hydra node that, if built, runs
``torch.load(weights_only=False)`` on a protocol-0 pickle that writes a marker file; the file must be refused in one
line and the marker never written."""

from __future__ import annotations

import json
import pickle
import sys
import types
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from fewstep.checkpoints import load_method
from fewstep.constructors import build
from fewstep.errors import CheckpointError
from fewstep.evaluate import evaluate
from fewstep.methods import EDMTeacher
from fewstep.schema import UntrustedConfig, check_hyperparameters, check_node
from fewstep.train import train

from helpers import TINY, run_module

TINY_NET = {"_target_": "fewstep.networks.UNet", "model_channels": 4, "channel_mult": [1, 2], "num_res_blocks": 1,
            "attn_levels": [1], "dropout": 0.0}
# attribute walks that start with an allowed prefix, and the plain call a permissive reader would make
WALKS = ["fewstep.networks.unet.torch.load", "torch.optim.optimizer.torch.load", "torch.load", "os.system"]
ADAM = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-3}
WARMUP = {"_target_": "torch.optim.lr_scheduler.LinearLR", "_partial_": True, "start_factor": 0.01, "total_iters": 200}
EDM_PICKLE = Path(__file__).parent / "fixtures" / "edm" / "edm_ncsnpp.pkl"  # made by EDM's own code


@pytest.fixture
def marker(tmp_path):
    return tmp_path / "pwned"


@pytest.fixture
def payload(tmp_path, marker):
    """payload(target) -> a Hydra node that, built, unpickles a text pickle calling os.system('touch marker')."""
    pickled = tmp_path / "payload.pkl"
    pickled.write_text(f"cos\nsystem\n(S'touch {marker}'\ntR.")  # protocol 0: plain text

    def node(target: str = WALKS[0]) -> dict:
        if target == "os.system":  # hydra-core 1.3.2 builds this one as it is
            return {"_target_": target, "command": f"touch {marker}"}
        return {"_target_": target, "f": str(pickled), "weights_only": False}

    return node


def one_line_refusal(error, marker) -> str:
    message = str(error.value)
    assert "\n" not in message and len(message) < 600, message
    assert not marker.exists(), "the payload ran"
    return message


def test_the_payload_runs_when_hydra_builds_it(payload, marker):
    # the refusals below mean something only if Hydra itself would run this node (torch then fails on what the
    # pickle returned, after the command has run)
    with pytest.raises(Exception, match="magic number"):
        instantiate(payload(WALKS[0]))
    assert marker.exists()


def fewstep_checkpoint(path, net=None, **hyperparameters):
    """A checkpoint shaped as fewstep writes it, of a tiny EDM teacher, with its hyperparameters changed."""
    method = EDMTeacher(net=TINY_NET, data_shape=[1, 8, 8], optimizer=ADAM, scheduler=WARMUP)
    hparams = {**dict(method.hparams), **hyperparameters}
    if net is not None:
        hparams["net"] = net
    torch.save({"epoch": 0, "global_step": 1, "state_dict": method.state_dict(), "hyper_parameters": hparams,
                "fewstep": {"method_class": "fewstep.methods.edm_teacher.EDMTeacher"}}, path)
    return path


@pytest.mark.parametrize("walk", WALKS)
@pytest.mark.parametrize("where", ["net", "inside net", "optimizer", "inside optimizer", "scheduler"])
def test_a_checkpoints_hyperparameters_cannot_name_an_attribute_walk(tmp_path, payload, marker, walk, where):
    node = payload(walk)
    fields = {
        "net": {"net": node},
        "inside net": {"net": {**TINY_NET, "model_channels": node}},
        "optimizer": {"optimizer": {**node, "_partial_": True}},
        "inside optimizer": {"optimizer": {"_target_": "torch.optim.Adam", "_partial_": True, "lr": node}},
        "scheduler": {"scheduler": {**node, "_partial_": True}},
    }[where]
    path = fewstep_checkpoint(tmp_path / "hostile.ckpt", **fields)
    with pytest.raises(CheckpointError) as error:
        load_method(path)
    assert "hyper_parameters" in one_line_refusal(error, marker)


def test_a_clean_checkpoint_still_loads_and_builds_its_optimiser(tmp_path):
    method = load_method(fewstep_checkpoint(tmp_path / "clean.ckpt"))
    optimizers = method.configure_optimizers()
    assert isinstance(method, EDMTeacher) and optimizers


@pytest.mark.parametrize("value, named", [
    ("${oc.env:HOME}", "not a number"), (float("nan"), "not finite"), ({"a": 1}, "not a number"),
    ([1, 2], "not a number"), ("0.5", "not a number"),
])
def test_hyperparameters_of_the_wrong_type_are_refused_in_one_line(tmp_path, value, named):
    with pytest.raises(CheckpointError, match=named) as error:
        load_method(fewstep_checkpoint(tmp_path / "typed.ckpt", sigma_data=value))
    assert "\n" not in str(error.value)


def test_an_unknown_hyperparameter_and_a_huge_shape_are_refused():
    good = dict(EDMTeacher(net=TINY_NET, data_shape=[1, 8, 8]).hparams)
    with pytest.raises(UntrustedConfig, match="not an argument"):
        check_hyperparameters(EDMTeacher, {**good, "bogus": 1})
    with pytest.raises(UntrustedConfig, match="data_shape"):
        check_hyperparameters(EDMTeacher, {**good, "data_shape": [3, 100_000, 100_000]})
    with pytest.raises(UntrustedConfig, match="num_classes"):
        check_hyperparameters(EDMTeacher, {**good, "num_classes": 2**40})
    assert check_hyperparameters(EDMTeacher, good)["net"] == TINY_NET


def test_a_method_class_is_named_exactly(tmp_path):
    path = fewstep_checkpoint(tmp_path / "c.ckpt")
    checkpoint = torch.load(path, weights_only=True)
    for name in ["fewstep.methods.edm_teacher.torch.load", "fewstep.methods.missing.Module", "fewstep.methods.EDMTeacher"]:
        checkpoint["fewstep"]["method_class"] = name
        torch.save(checkpoint, path)
        with pytest.raises(CheckpointError, match="not a fewstep method"):
            load_method(path)


def test_wrong_shaped_weights_and_nan_weights_are_one_line_errors(tmp_path):
    path = fewstep_checkpoint(tmp_path / "w.ckpt")
    checkpoint = torch.load(path, weights_only=True)
    name = next(iter(checkpoint["state_dict"]))
    good = checkpoint["state_dict"][name]
    checkpoint["state_dict"][name] = torch.zeros(3, 3, 3)
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match="does not fit"):
        load_method(path)
    checkpoint["state_dict"][name] = torch.full_like(good, float("nan"))
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match="NaN") as error:
        load_method(path)
    assert "\n" not in str(error.value)


def edm_torch_file(path, **init_kwargs):
    """EDM's network as the {class_name, init_kwargs, state_dict} torch file fewstep reads, from the EDM fixture."""
    net = load_method(EDM_PICKLE).net
    kwargs = {**net.edm_arguments, **init_kwargs}
    torch.save({"class_name": type(net).__name__, "init_kwargs": kwargs, "state_dict": net.state_dict()}, path)
    return path


@pytest.mark.parametrize("argument", ["label_dropout", "sigma_data", "model_channels", "channel_mult"])
def test_an_edm_torch_file_cannot_smuggle_a_node_in_a_constructor_argument(tmp_path, payload, marker, argument):
    path = edm_torch_file(tmp_path / "hostile.pt", **{argument: payload(WALKS[0])})
    with pytest.raises(CheckpointError) as error:
        load_method(path)
    assert argument in one_line_refusal(error, marker)
    assert load_method(edm_torch_file(tmp_path / "clean.pt")).num_classes == 0  # the same file, clean, loads


@pytest.fixture
def edm_writer(monkeypatch):
    """Stand-ins under EDM's module names, so pickle writes the records EDM's own snapshots hold."""
    persistence, util = types.ModuleType("torch_utils.persistence"), types.ModuleType("dnnlib.util")

    def _reconstruct_persistent_obj(meta):
        raise AssertionError("only for writing pickles")

    _reconstruct_persistent_obj.__module__ = persistence.__name__
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    for module in [types.ModuleType("torch_utils"), persistence, types.ModuleType("dnnlib"), util]:
        monkeypatch.setitem(sys.modules, module.__name__, module)
    return _reconstruct_persistent_obj


class Record:
    """Pickles as EDM's persistent_class does: its class name, init arguments and state in one record."""

    def __init__(self, reconstruct, class_name, init_kwargs, state):
        self.reconstruct, self.class_name, self.init_kwargs, self.state = reconstruct, class_name, init_kwargs, state

    def __reduce__(self):
        state = {**self.state, "_init_args": (), "_init_kwargs": self.init_kwargs}
        return self.reconstruct, (dict(type="class", version=6, module_src="", class_name=self.class_name, state=state),)


def test_an_edm_pickle_cannot_smuggle_a_node_in_a_constructor_argument(tmp_path, payload, marker, edm_writer):
    inner = Record(edm_writer, "SongUNet", {}, {"_parameters": {}, "_buffers": {}, "_modules": {}})
    kwargs = {"img_resolution": 8, "img_channels": 3, "label_dim": 0, "model_type": "SongUNet",
              "label_dropout": payload(WALKS[0])}
    net = Record(edm_writer, "EDMPrecond", kwargs, {"_parameters": {}, "_buffers": {}, "_modules": {"model": inner}})
    path = tmp_path / "hostile.pkl"
    path.write_bytes(pickle.dumps({"ema": net, "loss_fn": None}, protocol=4))
    with pytest.raises(CheckpointError) as error:
        load_method(path)
    assert "label_dropout" in one_line_refusal(error, marker)


def diffusers_folder(root):
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                norm_num_groups=4).save_pretrained(root / "unet")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(root / "scheduler")
    return root


@pytest.mark.parametrize("config", ["unet/config.json", "scheduler/scheduler_config.json"])
def test_a_diffusers_folder_cannot_smuggle_a_node_in_its_configs(tmp_path, payload, marker, config):
    pytest.importorskip("diffusers")
    root = diffusers_folder(tmp_path / "ddpm")
    assert load_method(root).num_classes == 0  # clean, it loads
    path = root / config
    path.write_text(json.dumps({**json.loads(path.read_text()), "extra": payload(WALKS[0])}))
    with pytest.raises(CheckpointError) as error:
        load_method(root)
    assert "_target_" in one_line_refusal(error, marker)


def test_a_saved_run_config_is_read_as_data(tmp_path, payload, marker, compose_cfg):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    clean = fewstep_checkpoint(run / "checkpoints" / "last.ckpt")
    hostile = [
        {"_target_": "fewstep.data.Digits", "limit": payload(WALKS[0])},
        {"_target_": "fewstep.data.images.torch.load", "f": payload()["f"], "weights_only": False},
        {"_target_": "fewstep.data.Digits", "_args_": [payload()]},
    ]
    cfg = compose_cfg("evaluate", [f"ckpt={clean}", "metric=fid_domain", "n=2", "nfe=1", "sampler=euler"])
    (run / ".hydra").mkdir()
    for data in hostile:
        OmegaConf.save({"data": data, "model": TINY_NET}, run / ".hydra" / "config.yaml")
        with pytest.raises(CheckpointError) as error:
            evaluate(cfg)
        assert "run config" in one_line_refusal(error, marker)


def plant_teacher_run(root, cfg, data=None, checkpoint_fields=None):
    """A finished-looking edm_teacher run under ``root`` with ``cfg``'s data and model (or ``data`` in its place)."""
    run = root / "edm_teacher" / "digits" / "2099-01-01_00-00-00"
    (run / "checkpoints").mkdir(parents=True)
    (run / ".hydra").mkdir()
    saved = OmegaConf.to_container(cfg, resolve=False)
    saved["method"] = {"conditional": False}
    saved["trainer"] = {"max_steps": 1}
    if data is not None:
        saved["data"] = data
    OmegaConf.save(saved, run / ".hydra" / "config.yaml")
    fewstep_checkpoint(run / "checkpoints" / "last.ckpt", **(checkpoint_fields or {}))
    return run


@pytest.mark.parametrize("planted", ["config", "checkpoint"])
def test_a_planted_teacher_run_is_checked_like_a_named_file(tmp_path, payload, marker, compose_cfg, planted):
    root = tmp_path / "outputs"
    cfg = compose_cfg("train", ["method=gdd", "data=digits", *TINY, f"paths.root={root}"])
    if planted == "config":
        plant_teacher_run(root, cfg, data={**OmegaConf.to_container(cfg.data), "limit": payload()})
    else:
        plant_teacher_run(root, cfg, checkpoint_fields={"net": {**TINY_NET, "dropout": payload()}})
    with pytest.raises(CheckpointError) as error:
        train(cfg)
    assert ("refusing run config" if planted == "config" else "refusing checkpoint") in one_line_refusal(error, marker)


def test_build_takes_fewsteps_own_table_and_the_users_own_classes(payload, marker):
    net = build(TINY_NET, data_shape=[1, 8, 8], num_classes=0)
    assert type(net).__name__ == "UNet"
    adam = build({"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-3})
    assert adam([torch.nn.Parameter(torch.zeros(1))]).defaults["lr"] == 1e-3
    # a class outside the table comes from the user's own config, which Hydra builds as before
    assert build({"_target_": "collections.OrderedDict"}) == {}
    with pytest.raises(UntrustedConfig):
        check_node({"_target_": "collections.OrderedDict"}, "network", "model")
    assert not marker.exists()


@pytest.mark.slow
def test_the_entry_points_refuse_each_hostile_file_in_one_line(tmp_path, payload, marker, edm_writer):
    ckpt = fewstep_checkpoint(tmp_path / "hostile.ckpt", net=payload(WALKS[0]))
    pt = edm_torch_file(tmp_path / "hostile.pt", label_dropout=payload())
    commands = [
        ("fewstep.sample", f"ckpt={ckpt}", "n=2", "nfe=1"),
        ("fewstep.sample", f"ckpt={pt}", "n=2", "nfe=1"),
        ("fewstep.train", *TINY, "data=digits", "method=gdd", f"teacher.ckpt={ckpt}"),
    ]
    for module, *args in commands:
        result = run_module(module, *args, f"hydra.run.dir={tmp_path}/out", cwd=tmp_path)
        lines = [line for line in result.stderr.splitlines() if line.startswith("fewstep: error:")]
        assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
        assert not marker.exists()


class MyNet(torch.nn.Module):
    """A network of the user's own: a checkpoint may name it once the program registers it."""

    def __init__(self, data_shape: list[int], num_classes: int = 0, scale: float = 1.0):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(scale))

    def forward(self, x, c_noise, class_labels=None):
        return self.scale * x


def test_a_network_of_the_users_own_loads_once_registered(tmp_path, monkeypatch):
    from fewstep import constructors

    net = {"_target_": f"{MyNet.__module__}.MyNet", "scale": 0.5}
    path = fewstep_checkpoint(tmp_path / "mine.ckpt")
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["hyper_parameters"]["net"] = net
    checkpoint["state_dict"] = EDMTeacher(net=net, data_shape=[1, 8, 8]).state_dict()
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match="MyNet"):
        load_method(path)
    monkeypatch.setitem(constructors.GROUPS, "network", dict(constructors.NETWORKS))
    constructors.register("network", MyNet)
    assert isinstance(load_method(path).net, MyNet)
    checkpoint["hyper_parameters"]["net"] = {**net, "scale": "1"}
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match="scale"):
        load_method(path)


def test_a_model_whose_output_on_a_probe_is_not_finite_is_refused(tmp_path):
    # finite weights and a finite, huge sigma_data: EDM's c_skip = sd^2 / (sigma^2 + sd^2) becomes inf / inf
    with pytest.raises(CheckpointError, match="probe input") as error:
        load_method(fewstep_checkpoint(tmp_path / "probe.ckpt", sigma_data=1e200))
    assert "\n" not in str(error.value)
