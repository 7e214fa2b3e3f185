"""Reading NVlabs/edm network pickles: nothing named by the file runs, and EDM's networks load exactly into fewstep's."""

from __future__ import annotations

import builtins
import io
import os
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from fewstep.errors import CheckpointError
from fewstep.external.edm_pickle import PersistentRecord, load_edm_network, read_edm_pickle

FIXTURES = Path(__file__).parent / "fixtures" / "edm"


class Call:
    """Pickles as ``fn(*args)``: how a malicious pickle runs a callable while it is being read."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.fixture
def edm_names(monkeypatch):
    """Stand-ins under EDM's module names, so pickle writes the globals EDM's own pickles name (without EDM's code)."""
    persistence, util = types.ModuleType("torch_utils.persistence"), types.ModuleType("dnnlib.util")

    def _reconstruct_persistent_obj(meta):
        raise AssertionError("only for writing pickles")

    class EasyDict(dict):
        pass

    for obj, module in [(_reconstruct_persistent_obj, persistence), (EasyDict, util)]:
        obj.__module__, obj.__qualname__ = module.__name__, obj.__name__
        setattr(module, obj.__name__, obj)
    for module in [types.ModuleType("torch_utils"), persistence, types.ModuleType("dnnlib"), util]:
        monkeypatch.setitem(sys.modules, module.__name__, module)
    return types.SimpleNamespace(reconstruct=_reconstruct_persistent_obj, EasyDict=EasyDict)


def persistent_reduce(obj, module_src="", **meta):
    """EDM's ``persistent_class.__reduce__``: the class's source and the object's state in one record."""
    state = dict(obj.__dict__)
    record = dict(type="class", version=6, module_src=module_src, class_name=type(obj).__name__, state=state, **meta)
    return sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj, (record,)


class Persistent(torch.nn.Module):
    """A torch module that pickles the way EDM's persistent layers do (init arguments recorded in its state)."""

    def __init__(self, *args, **kwargs):
        super().__init__()
        self._init_args, self._init_kwargs = args, kwargs

    def __reduce__(self):
        return persistent_reduce(self)


class Layer(Persistent):
    def __init__(self, channels, scale=np.sqrt(0.5)):
        super().__init__(channels, scale=scale)
        self.weight = torch.nn.Parameter(torch.randn(channels))
        self.bias = None  # a None parameter, as EDM's Conv2d without bias
        self.register_parameter("unused", None)
        self.register_buffer("resample_filter", torch.randn(2, 2))
        self.register_buffer("cache", torch.zeros(1), persistent=False)  # not in the state_dict
        self.scale = scale  # a numpy scalar in the state, as EDM's skip_scale

    def forward(self, x):
        return x * self.weight[:, None, None] * self.scale + self.resample_filter.sum()


class TinyNet(Persistent):
    """EDM's pattern: persistent layers inside a plain ``torch.nn.ModuleDict``, plus a buffer of its own."""

    def __init__(self, channels=3, depth=2):
        super().__init__(channels=channels, depth=depth)
        self.enc = torch.nn.ModuleDict({f"b{i}": Layer(channels) for i in range(depth)})
        self.register_buffer("u", torch.linspace(0, 1, 5))

    def forward(self, x, sigma, class_labels=None):
        for block in self.enc.values():
            x = block(x)
        return x / (1 + sigma[:, None, None, None]) + self.u.sum()


class Loss:
    """Stands in for EDMLoss: a persistent object that is not a network, with module source that must never run."""

    def __init__(self, module_src):
        self.P_mean, self.module_src = -1.2, module_src

    def __reduce__(self):
        return persistent_reduce(self, module_src=self.module_src)


@pytest.fixture
def fake_classes(monkeypatch):
    """fewstep.networks.edm replaced by a registry holding TinyNet, so the reader is tested apart from EDM's networks."""
    module = types.ModuleType("fewstep.networks.edm")
    module.EDM_CLASSES = {"TinyNet": TinyNet, "SongUNet": torch.nn.Identity}
    monkeypatch.setitem(sys.modules, "fewstep.networks.edm", module)


def write(path, obj):
    path.write_bytes(pickle.dumps(obj, protocol=4))  # EDM's snapshots: Python's default protocol of the time
    return path


def payloads(target):
    """Pickles that create ``target`` when read by pickle.load."""
    return {
        "system": Call(os.system, f"touch {target}"),
        "open": Call(builtins.open, str(target), "w"),
        "exec": Call(builtins.exec, f"open({str(target)!r}, 'w')"),
    }


def assert_one_line_refusal(path, name):
    for read in (read_edm_pickle, load_edm_network):
        with pytest.raises(CheckpointError) as caught:
            read(path)
        message = str(caught.value)
        assert "\n" not in message and name in message and "not an EDM network pickle" in message, message


# (1) Code named by the file never runs.

@pytest.mark.parametrize("kind", ["system", "open", "exec"])
def test_malicious_pickle_is_refused_before_anything_runs(tmp_path, edm_names, kind):
    pwned = tmp_path / "pwned"
    payload = payloads(pwned)[kind]
    name = f"{payload.fn.__module__}.{payload.fn.__name__}"  # as the pickle names it: posix.system, io.open, builtins.exec
    cases = {
        "bare": payload,
        "snapshot": {"ema": payload, "loss_fn": None},
        "in a record's state": Call(edm_names.reconstruct, dict(type="class", version=6, module_src="", class_name="EDMPrecond",
                                                                state={"_init_kwargs": {"x": payload}})),
    }
    for label, obj in cases.items():
        assert_one_line_refusal(write(tmp_path / f"{label}.pkl", obj), name)
        assert not pwned.exists(), label
    pickle.loads(pickle.dumps(payloads(tmp_path / "control")["open"]))  # the payloads are real
    assert (tmp_path / "control").exists()


def test_module_source_in_a_record_is_kept_as_text_never_run(tmp_path, edm_names, fake_classes):
    pwned = tmp_path / "pwned"
    src = f"open({str(pwned)!r}, 'w')\nclass EDMLoss: pass\n"
    top = read_edm_pickle(write(tmp_path / "s.pkl", dict(ema=TinyNet(), loss_fn=Loss(src))))
    assert isinstance(top["loss_fn"], PersistentRecord) and top["loss_fn"].module_src == src
    assert top["loss_fn"].state["P_mean"] == -1.2
    load_edm_network(tmp_path / "s.pkl")
    assert not pwned.exists()


def test_persistent_ids_are_refused(tmp_path):
    class WithIds(pickle.Pickler):
        def persistent_id(self, obj):
            return "storage-0" if obj == "ref" else None

    buffer = io.BytesIO()
    WithIds(buffer, protocol=4).dump({"ema": "ref"})
    (tmp_path / "p.pkl").write_bytes(buffer.getvalue())
    with pytest.raises(CheckpointError, match="persistent id") as caught:
        read_edm_pickle(tmp_path / "p.pkl")
    assert "\n" not in str(caught.value)


# (2) Tensor storages: torch's _load_from_bytes calls torch.load(weights_only=False) on the bytes; ours does not.

@pytest.mark.parametrize("zipped", [False, True])
def test_malicious_storage_bytes_are_refused(tmp_path, zipped):
    pwned = tmp_path / "pwned"
    buffer = io.BytesIO()
    torch.save(payloads(pwned)["open"], buffer, _use_new_zipfile_serialization=zipped)
    storage = Call(torch.storage._load_from_bytes, buffer.getvalue())
    path = write(tmp_path / "s.pkl", {"ema": Call(torch._utils._rebuild_tensor_v2, storage, 0, (1,), (1,), False, {})})
    assert_one_line_refusal(path, "embedded tensor storage")
    assert not pwned.exists()
    with pytest.raises(Exception):  # noqa: B017 (the control: torch's own reader runs the payload, then fails on its result)
        pickle.loads(path.read_bytes())
    assert pwned.exists()


# (3) EDM's own pickles (tests/fixtures/edm, written by EDM's code) load into fewstep's networks.

def test_edm_fixture_pickles_load_exactly():
    pickles = sorted(FIXTURES.glob("*.pkl"))
    assert pickles, f"no EDM pickles in {FIXTURES} (written with fewstep.networks.edm by the EDM-networks change)"
    for path in pickles:
        companion = torch.load(path.with_suffix(".pt"), weights_only=True)
        top = read_edm_pickle(path)
        assert isinstance(top["ema"], PersistentRecord) and top["ema"].class_name == companion["class_name"]
        # loss_fn / augment_pipe stay inert records, never built
        assert all(isinstance(top[k], (PersistentRecord, type(None))) for k in ("loss_fn", "augment_pipe") if k in top)
        for source in (path, path.with_suffix(".pt")):  # (4) also the plain torch format of the same network
            net = load_edm_network(source)
            state = net.state_dict()
            assert list(state) == list(companion["state_dict"]), source
            assert all(torch.equal(state[k], v) for k, v in companion["state_dict"].items()), source
            with torch.no_grad():  # x and expected: [noise level, batch, C, H, W]
                out = torch.stack([net(x, sigma.expand(len(x)), companion["labels"])
                                   for x, sigma in zip(companion["x"], companion["sigma"])])
            # float32 rounding of EDM's own output differs by CPU (1.5e-5 of outputs near 100 on AMD EPYC)
            torch.testing.assert_close(out, companion["expected"], atol=1e-5, rtol=1e-6)


# EDM's layout (persistent records, a plain ModuleDict, None and non-persistent entries) gives torch's state_dict.

def test_snapshot_ema_loads_with_torch_state_dict(tmp_path, edm_names, fake_classes):
    torch.manual_seed(0)
    net = TinyNet(channels=4).eval()
    snapshot = dict(ema=net, loss_fn=Loss(""), augment_pipe=None, dataset_kwargs=edm_names.EasyDict(path="x.zip"))
    path = write(tmp_path / "snapshot.pkl", snapshot)
    top = read_edm_pickle(path)
    assert top["dataset_kwargs"] == {"path": "x.zip"}
    for source in (path, write(tmp_path / "bare.pkl", net)):
        loaded = load_edm_network(source)
        assert isinstance(loaded, TinyNet) and not loaded.training
        assert list(loaded.state_dict()) == list(net.state_dict())
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in net.state_dict().items())
        x, sigma = torch.randn(2, 4, 3, 3), torch.tensor([0.5, 2.0])
        assert torch.equal(loaded(x, sigma), net(x, sigma))


# (4) The plain torch format round-trips.

def test_plain_state_dict_file_round_trips(tmp_path, fake_classes):
    net = TinyNet(channels=2, depth=3)
    torch.save({"class_name": "TinyNet", "init_kwargs": {"channels": 2, "depth": 3}, "state_dict": net.state_dict()},
               tmp_path / "net.pt")
    loaded = load_edm_network(tmp_path / "net.pt")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in net.state_dict().items())


# (5) Every bad input is one line that says what is wrong.

def one_line_error(path, match):
    with pytest.raises(CheckpointError, match=match) as caught:
        load_edm_network(path)
    assert "\n" not in str(caught.value), str(caught.value)


def test_bad_inputs_are_one_line_errors(tmp_path, edm_names, fake_classes):
    one_line_error(tmp_path / "absent.pkl", "not found")
    (tmp_path / "text.pkl").write_bytes(b"not a pickle\n at all\n")
    one_line_error(tmp_path / "text.pkl", "not a pickle")
    (tmp_path / "empty.pkl").write_bytes(b"")
    one_line_error(tmp_path / "empty.pkl", "truncated")
    whole = pickle.dumps(dict(ema=TinyNet()), protocol=4)
    (tmp_path / "cut.pkl").write_bytes(whole[: len(whole) // 2])
    one_line_error(tmp_path / "cut.pkl", "truncated")
    one_line_error(write(tmp_path / "no_ema.pkl", {"loss_fn": Loss(""), "step": 3}), "no EDM network.*loss_fn")
    one_line_error(write(tmp_path / "loss.pkl", Loss("")), "Loss, which is not a network")

    class DhariwalUNetV2(Persistent):  # a class fewstep does not implement: the message names those it does
        pass

    one_line_error(write(tmp_path / "other.pkl", {"ema": DhariwalUNetV2()}), "does not implement.*TinyNet, SongUNet")

    state = TinyNet().state_dict()
    for name, broken, key in [
        ("missing", {k: v for k, v in state.items() if k != "enc.b1.weight"}, "'enc.b1.weight' is missing"),
        ("extra", {**state, "enc.b9.weight": state["u"]}, "'enc.b9.weight' is not in"),
        ("shape", {**state, "u": torch.zeros(6)}, r"'u' is shape \(6,\) in the file, \(5,\) in fewstep"),
    ]:
        torch.save({"class_name": "TinyNet", "init_kwargs": {}, "state_dict": broken}, tmp_path / f"{name}.pt")
        one_line_error(tmp_path / f"{name}.pt", "do not fit fewstep's TinyNet: " + key)
    torch.save({"weights": state}, tmp_path / "keys.pt")
    one_line_error(tmp_path / "keys.pt", "no EDM network")
    torch.save(Call(builtins.open, str(tmp_path / "pwned"), "w"), tmp_path / "evil.pt")
    one_line_error(tmp_path / "evil.pt", "cannot read .* as a torch file")
    assert not (tmp_path / "pwned").exists()
