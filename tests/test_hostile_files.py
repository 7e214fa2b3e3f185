"""Files a user names are data: reading a hostile one never hangs, never allocates what a small file declares, never
changes fewstep, and never gives a wrong answer; each refusal is one line of the right FewstepError.

Every hostile file is built here, in tmp_path. A "bomb" is read in a forked child whose address space is capped at
its size at the fork plus 1 GiB (``capped``): a reader that allocated what the file declares would fail there with
a MemoryError (or torch's allocator error) instead of the one-line refusal asserted.
"""

from __future__ import annotations

import collections
import io
import json
import math
import multiprocessing
import pickle
import resource
import struct
import time
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import test_edm_pickle as edm_helpers
import torch
from omegaconf import OmegaConf

from fewstep.data import EDMZip, ImageFolder
from fewstep.errors import CheckpointError, ConfigError, DatasetNotFound
from fewstep.external import edm_pickle
from fewstep.external.edm_pickle import load_edm_network, read_edm_pickle
from fewstep.metrics.reference import read_npz_reference

# the fake EDM modules and network classes of tests/test_edm_pickle.py, which write pickles as EDM's code does
edm_names, fake_classes = edm_helpers.edm_names, edm_helpers.fake_classes

CAP = 1 << 30  # address space a capped child may add to what it had at the fork
needs_proc = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the address-space size from /proc")


def _address_space() -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmSize:")).split()[1]) * 1024


def capped(read, *args, timeout: float = 60.0) -> tuple[str, str, float]:
    """(exception class name, or "ok"; its message; seconds) of ``read(*args)`` in a forked child whose address
    space is capped at its size at the fork plus CAP."""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)

    def child() -> None:
        limit = _address_space() + CAP
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        start = time.perf_counter()
        try:
            read(*args)
            outcome = ("ok", "")
        except BaseException as error:  # noqa: B036 (the child reports whatever ended the read)
            outcome = (type(error).__name__, str(error)[:4000])
        send.send((*outcome, time.perf_counter() - start))

    process = context.Process(target=child)
    process.start()
    try:
        if not receive.poll(timeout):
            pytest.fail(f"reading the file did not finish in {timeout} s")
        return receive.recv()
    finally:
        if process.is_alive():
            process.kill()
        process.join()


def one_line(error_class, read, *args, match: str) -> str:
    with pytest.raises(error_class) as caught:
        read(*args)
    message = str(caught.value)
    assert "\n" not in message and match in message, message
    return message


def refused_in_capped_child(error_class, read, *args, match: str) -> str:
    kind, message, _ = capped(read, *args)
    assert kind == error_class.__name__ and "\n" not in message and match in message, (kind, message)
    return message


# ---------------------------------------------------------------- hand-written pickle streams

def _text(value: str) -> bytes:
    data = value.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(data)) + data


def _global(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def _build_on(module: str, name: str, state: bytes) -> bytes:
    """A stream that names a global and BUILDs ``state`` (pickle opcodes) on the object it gets."""
    return pickle.PROTO + b"\x02" + _global(module, name) + state + pickle.BUILD + pickle.STOP


def _attributes(**values: bool) -> bytes:
    """(None, {name: True, ...}): BUILD's slot-state form, which sets attributes with setattr."""
    items = b"".join(_text(key) + (pickle.NEWTRUE if value else pickle.NEWFALSE) for key, value in values.items())
    return pickle.NONE + pickle.EMPTY_DICT + pickle.MARK + items + pickle.SETITEMS + pickle.TUPLE2


def _record_that_contains_itself() -> bytes:
    """An EDM class record R whose state's _modules (an OrderedDict M) gets R put into it after R is built."""
    meta = (pickle.EMPTY_DICT + pickle.MARK + _text("type") + _text("class") + _text("class_name") + _text("TinyNet")
            + _text("state") + pickle.EMPTY_DICT + _text("_modules") + pickle.BINGET + b"\x00" + pickle.SETITEM
            + pickle.SETITEMS)
    return (pickle.PROTO + b"\x02"
            + _global("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.REDUCE + pickle.BINPUT + b"\x00"
            + pickle.POP
            + _global("torch_utils.persistence", "_reconstruct_persistent_obj") + meta + pickle.TUPLE1 + pickle.REDUCE
            + pickle.BINPUT + b"\x01" + pickle.POP
            + pickle.BINGET + b"\x00" + _text("loop") + pickle.BINGET + b"\x01" + pickle.SETITEM + pickle.POP
            + pickle.BINGET + b"\x01" + pickle.STOP)


# ---------------------------------------------------------------- 1. EDM network pickles

@pytest.mark.slow
def test_records_shared_over_60_levels_are_refused_in_under_a_second(tmp_path, edm_names, fake_classes):
    for leaf in (edm_helpers.Layer(2), edm_helpers.Persistent()):  # with tensors, and module records alone
        module = leaf
        for _ in range(60):  # each level holds the one below twice: 2^60 paths to the leaf
            parent = edm_helpers.Persistent()
            parent.left, parent.right = module, module
            module = parent
        path = edm_helpers.write(tmp_path / "shared.pkl", {"ema": module})
        assert path.stat().st_size < 16_000
        kind, message, seconds = capped(load_edm_network, path, timeout=30)
        assert kind == "CheckpointError" and "\n" not in message and "refusing more than" in message, (kind, message)
        assert seconds < 1.0, seconds


def test_a_record_that_contains_itself_is_refused_in_one_line(tmp_path, fake_classes):
    path = tmp_path / "loop.pkl"
    path.write_bytes(_record_that_contains_itself())
    record = read_edm_pickle(path)
    assert record.state["_modules"]["loop"] is record  # the stream really makes a cycle
    one_line(CheckpointError, load_edm_network, path, match="a module record that contains itself (at 'loop')")


def test_constructor_arguments_that_contain_themselves_or_nest_deep_are_refused_in_one_line(tmp_path, fake_classes):
    loop: list = []
    loop.append(loop)
    shared = [0]
    for _ in range(12):  # 2^12 paths through 12 levels of lists shared twice
        shared = [shared, shared]
    deep: list = []
    for _ in range(100):  # deeper than torch.save's pickler follows would need a hand-made stream
        deep = [deep]
    for name, value, expected in [("loop", loop, "nested deeper than"), ("deep", deep, "nested deeper than"),
                                  ("shared", shared, "more than 10000 values")]:
        torch.save({"class_name": "TinyNet", "init_kwargs": {"channels": value}, "state_dict": {}}, tmp_path / f"{name}.pt")
        one_line(CheckpointError, load_edm_network, tmp_path / f"{name}.pt", match=expected)


def test_a_refused_pickle_leaves_fewsteps_classes_and_functions_as_they_were(tmp_path, edm_names, fake_classes):
    targets = {
        ("dnnlib.util", "EasyDict"): edm_pickle.EasyDict,
        ("torch.nn.modules.container", "ModuleDict"): edm_pickle._ModuleDictRecord,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_parameter"): edm_pickle._rebuild_parameter,
        ("torch_utils.persistence", "_reconstruct_persistent_obj"): edm_pickle._reconstruct_persistent_obj,
    }
    for (module, name), target in targets.items():
        for label, state in [("attributes", _attributes(polluted=True, __defaults__=True)),
                             ("dict", pickle.EMPTY_DICT + _text("polluted") + pickle.NEWTRUE + pickle.SETITEM)]:
            path = tmp_path / f"{name}-{label}.pkl"
            path.write_bytes(_build_on(module, name, state))
            with pytest.raises(CheckpointError) as caught:
                read_edm_pickle(path)
            assert "\n" not in str(caught.value), str(caught.value)
            if target is not collections.OrderedDict:  # a C type: Python itself refuses the write
                assert "refusing a change to the" in str(caught.value), str(caught.value)
            assert not hasattr(target, "polluted") and getattr(target, "__defaults__", None) is not True, (name, label)
    # an EasyDict instance with attributes (they would shadow dict methods) is refused too
    easy = (pickle.PROTO + b"\x02" + _global("dnnlib.util", "EasyDict") + pickle.EMPTY_TUPLE + pickle.NEWOBJ
            + _attributes(get=True) + pickle.BUILD + pickle.STOP)
    (tmp_path / "easy.pkl").write_bytes(easy)
    one_line(CheckpointError, read_edm_pickle, tmp_path / "easy.pkl", match="attributes on an EasyDict")
    # and real snapshots still read: EasyDict entries as items
    snapshot = dict(ema=edm_helpers.TinyNet(), dataset_kwargs=edm_names.EasyDict(path="x.zip"))
    top = read_edm_pickle(edm_helpers.write(tmp_path / "snapshot.pkl", snapshot))
    assert top["dataset_kwargs"] == {"path": "x.zip"} and type(top["dataset_kwargs"]) is edm_pickle.EasyDict
    assert load_edm_network(tmp_path / "snapshot.pkl").state_dict().keys() == snapshot["ema"].state_dict().keys()


def _storage_declaring(numel: int) -> bytes:
    """A FloatStorage of 4 elements as EDM's pickles embed it (torch's legacy format), its record saying ``numel``."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage's deprecation: it is what EDM's pickles hold
        torch.save(torch.zeros(4).storage(), buffer, _use_new_zipfile_serialization=False)
    data = buffer.getvalue()
    assert data.count(b"K\x04Nt") == 1  # BININT1 4, NONE, TUPLE: the storage record's numel and view
    return data.replace(b"K\x04Nt", pickle.BININT + struct.pack("<i", numel) + b"Nt")


@pytest.mark.slow
@needs_proc
def test_embedded_storages_and_tensors_are_refused_before_torch_allocates_what_they_declare(tmp_path, edm_names):
    call, hooks = edm_helpers.Call, collections.OrderedDict()
    storage = call(torch.storage._load_from_bytes, _storage_declaring(2**31 - 1))  # 8 GiB declared in 270 bytes
    path = edm_helpers.write(tmp_path / "storage.pkl", {"ema": call(torch._utils._rebuild_tensor_v2, storage, 0, (4,),
                                                                    (1,), False, hooks)})
    assert path.stat().st_size < 1000
    refused_in_capped_child(CheckpointError, read_edm_pickle, path, match="declares 8589934588 bytes in")
    small = call(torch.storage._load_from_bytes, _storage_declaring(4))  # an honest storage, viewed as 2^40 elements
    path = edm_helpers.write(tmp_path / "view.pkl", {"ema": call(torch._utils._rebuild_tensor_v2, small, 0, (2**40,),
                                                                 (0,), False, hooks)})
    one_line(CheckpointError, read_edm_pickle, path, match="a tensor of 1099511627776 elements")


@pytest.mark.slow
@needs_proc
def test_a_torch_file_with_a_compressed_or_legacy_member_is_refused_before_torch_reads_it(tmp_path):
    torch.save({"class_name": "TinyNet", "init_kwargs": {}, "state_dict": {"u": torch.zeros(5)}}, tmp_path / "ok.pt")
    with zipfile.ZipFile(tmp_path / "ok.pt") as source:  # torch's members, the tensor data deflated and declaring 2 GiB
        members = {m.filename: 2**31 if m.filename.endswith("data/0") else source.read(m) for m in source.infolist()}
    write_zip(tmp_path / "bomb.pt", members)
    assert (tmp_path / "bomb.pt").stat().st_size < 4 << 20
    refused_in_capped_child(CheckpointError, load_edm_network, tmp_path / "bomb.pt",
                            match="which declares 2147483648 bytes compressed")
    buffer = io.BytesIO()
    torch.save({"state_dict": {}}, buffer, _use_new_zipfile_serialization=False)
    (tmp_path / "legacy.pt").write_bytes(buffer.getvalue())
    one_line(CheckpointError, load_edm_network, tmp_path / "legacy.pt", match="not a zip-format torch file")


@pytest.mark.slow
def test_a_checkpoint_with_a_compressed_member_is_refused_before_torch_reads_it(tmp_path):
    from fewstep.checkpoints import read_checkpoint

    torch.save({"fewstep": {}, "state_dict": {"u": torch.zeros(5)}}, tmp_path / "ok.ckpt")
    with zipfile.ZipFile(tmp_path / "ok.ckpt") as source:
        members = {m.filename: 2**31 if m.filename.endswith("data/0") else source.read(m) for m in source.infolist()}
    write_zip(tmp_path / "bomb.ckpt", members)
    refused_in_capped_child(CheckpointError, read_checkpoint, tmp_path / "bomb.ckpt",
                            match="which declares 2147483648 bytes compressed")


# ---------------------------------------------------------------- files that declare gigabytes in kilobytes

def deflated_zeros(count: int) -> bytes:
    """Raw deflate data that inflates to ``count`` zero bytes, made in milliseconds: after a full flush a block
    stands alone, so copies of one block of 1 MiB of zeros inflate to copies of that MiB."""
    compressor, chunk = zlib.compressobj(9, zlib.DEFLATED, -15), 1 << 20
    block = compressor.compress(bytes(chunk)) + compressor.flush(zlib.Z_FULL_FLUSH)
    whole, rest = divmod(count, chunk)
    return block * whole + compressor.compress(bytes(rest)) + compressor.flush()


def write_zip(path: Path, members: dict) -> Path:
    """A zip of stored members (bytes) and deflated ones of that many zero bytes (an int), written by hand, as zipfile
    deflates only data it is given. The zeros' CRC is left 0: a reader that inflates them fails only at the end,
    after the allocation these tests are about."""
    local, central = bytearray(), bytearray()
    for name, content in members.items():
        encoded = name.encode()
        if isinstance(content, int):
            method, data, size, crc = 8, deflated_zeros(content), content, 0
        else:
            method, data, size, crc = 0, content, len(content), zlib.crc32(content)
        fields = struct.pack("<HHHHHIIIH", 20, 0, method, 0, 0x21, crc, len(data), size, len(encoded))
        central += b"PK\x01\x02" + struct.pack("<H", 20) + fields + struct.pack("<HHHHII", 0, 0, 0, 0, 0, len(local))
        central += encoded
        local += b"PK\x03\x04" + fields + struct.pack("<H", 0) + encoded + data
    end = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, len(members), len(members), len(central), len(local), 0)
    path.write_bytes(bytes(local + central + end))
    return path


def zero_png(width: int, height: int, channels: int = 3) -> bytes:
    """A valid black PNG of any declared size, a few hundred bytes per megapixel."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = height * (1 + width * channels)  # each row: a filter byte, then the pixels
    adler = ((raw % 65521) << 16) | 1  # zlib's checksum of `raw` zero bytes
    stream = b"\x78\xda" + deflated_zeros(raw) + struct.pack(">I", adler)
    color = {1: 0, 3: 2, 4: 6}[channels]  # grey, RGB, RGBA
    header = struct.pack(">IIBBBBB", width, height, 8, color, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", stream) + chunk(b"IEND", b"")


def test_the_hand_made_files_are_what_they_declare(tmp_path):
    import PIL.Image

    with PIL.Image.open(io.BytesIO(zero_png(300, 200, 4))) as image:  # decodes, as a bomb of its kind would
        assert image.size == (300, 200) and image.mode == "RGBA" and not np.asarray(image).any()
    with zipfile.ZipFile(write_zip(tmp_path / "z.zip", {"a": b"stored", "b": 3 << 20 | 5})) as archive:
        assert archive.read("a") == b"stored" and archive.getinfo("b").file_size == 3 << 20 | 5
        with archive.open("b") as member:  # inflates to what it declares, then fails its CRC
            assert len(member.read((3 << 20 | 5) - 1)) == (3 << 20 | 5) - 1
            with pytest.raises(zipfile.BadZipFile, match="CRC"):
                member.read()


# ---------------------------------------------------------------- 2. data sets: EDM zips and image folders

def edm_shape(path, resolution=None):
    return EDMZip(path=str(path), resolution=resolution).shape


def edm_classes(path):
    return EDMZip(path=str(path)).num_classes


@pytest.mark.slow
@needs_proc
def test_an_image_declaring_more_pixels_than_the_resolution_needs_is_refused_before_decoding(tmp_path):
    bomb = zero_png(13_000, 13_000, channels=4)  # 676 MB of RGBA when decoded, 1.2 GB with the RGB copy
    assert len(bomb) < 1 << 20
    path = write_zip(tmp_path / "bomb.zip", {"00000/img00000000.png": bomb})
    for resolution in (32, None):  # against data.resolution, and against the stated maximum without one
        message = refused_in_capped_child(DatasetNotFound, edm_shape, path, resolution, match="13000x13000")
        assert "00000/img00000000.png" in message and str(path) in message


@pytest.mark.slow
@needs_proc
def test_a_zip_member_declaring_gigabytes_is_refused_before_it_is_inflated(tmp_path):
    path = write_zip(tmp_path / "bomb.zip", {"00000/img00000000.png": 2**31})  # 2 GiB of zeros in 2 MB
    assert path.stat().st_size < 4 << 20
    message = refused_in_capped_child(DatasetNotFound, edm_shape, path, 32, match="declares 2147483648 bytes")
    assert "00000/img00000000.png" in message


def test_pils_decompression_bomb_error_is_a_one_line_refusal(tmp_path):
    path = write_zip(tmp_path / "bomb.zip", {"00000/img00000000.png": zero_png(20_000, 20_000, channels=1)})
    one_line(DatasetNotFound, edm_shape, path, match="decompression bomb")
    folder = tmp_path / "folder" / "cats"
    folder.mkdir(parents=True)
    (folder / "bomb.png").write_bytes(zero_png(20_000, 20_000, channels=1))
    data = ImageFolder(root=str(tmp_path / "folder"), resolution=32, val_size=0)
    data.setup()
    message = one_line(DatasetNotFound, data.train_set.__getitem__, 0, match="decompression bomb")
    assert "bomb.png" in message
    (folder / "bomb.png").write_bytes(zero_png(9_000, 8_000, channels=1))  # below PIL's limit, above fewstep's
    one_line(DatasetNotFound, data.train_set.__getitem__, 0, match="declares 9000x8000 pixels")


def test_a_set_too_big_for_memory_is_refused_before_its_images_are_allocated(tmp_path, monkeypatch):
    from fewstep.data import edm_zip

    images = {f"00000/img0000000{i}.png": zero_png(64, 64) for i in range(4)}
    data = EDMZip(path=str(write_zip(tmp_path / "set.zip", images)), val_size=1)
    monkeypatch.setattr(edm_zip.os, "sysconf", lambda name: {"SC_PHYS_PAGES": 16, "SC_PAGE_SIZE": 4096}[name])
    message = one_line(DatasetNotFound, data.setup, match="need 0.0 GiB in memory, more than this machine's")
    assert "set data.limit=N" in message and data.train_set is None


def _one_image_set(path: Path, dataset_json: bytes) -> Path:
    from PIL import Image

    bits = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(bits, format="png")
    return write_zip(path, {"00000/img00000000.png": bits.getvalue(), "dataset.json": dataset_json})


def test_labels_must_lie_in_zero_to_the_class_limit(tmp_path):
    for label in (2**40, 100_000, -1):
        labels = json.dumps({"labels": [["00000/img00000000.png", label]]}).encode()
        path = _one_image_set(tmp_path / f"labels{label}.zip", labels)
        message = one_line(DatasetNotFound, edm_classes, path, match="outside [0, 100000)")
        assert "dataset.json" in message and str(label) in message
    ok = json.dumps({"labels": [["00000/img00000000.png", 99_999]]}).encode()
    assert edm_classes(_one_image_set(tmp_path / "ok.zip", ok)) == 100_000


def test_a_deeply_nested_dataset_json_is_a_one_line_refusal(tmp_path):
    deep = b'{"labels": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    one_line(DatasetNotFound, edm_classes, _one_image_set(tmp_path / "deep.zip", deep), match="nests deeper")
    shallow_but_wrong = b'{"labels": [[[["00000/img00000000.png"]], 0]]}'
    one_line(DatasetNotFound, edm_classes, _one_image_set(tmp_path / "odd.zip", shallow_but_wrong),
             match="labels must be a list of [file, label] pairs")


# ---------------------------------------------------------------- 3. .npz reference statistics

def npz_with(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


@pytest.mark.slow
@needs_proc
def test_an_npz_declaring_a_huge_sigma_is_refused_before_numpy_allocates_it(tmp_path):
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": (40_000, 40_000)})
    assert header.getvalue().startswith(np.lib.format.magic(1, 0))
    with zipfile.ZipFile(tmp_path / "bomb.npz", "w", zipfile.ZIP_DEFLATED) as npz:
        with npz.open("mu.npy", "w") as member:
            np.lib.format.write_array(member, np.zeros(2048))
        npz.writestr("sigma.npy", header.getvalue() + bytes(1000))  # 12.8 GB declared
    assert (tmp_path / "bomb.npz").stat().st_size < 20_000
    refused_in_capped_child(ConfigError, read_npz_reference, tmp_path / "bomb.npz",
                            match="sigma has shape (40000, 40000), not the 2048 features")


def test_npz_arrays_that_are_not_numbers_are_refused_in_one_line(tmp_path):
    sigma = np.eye(2048)
    one_line(ConfigError, read_npz_reference, npz_with(tmp_path / "text.npz", mu=np.array(["0"] * 2048), sigma=sigma),
             match="mu holds <U1 values, not a number type")
    objects = np.array([0.0] * 2048, dtype=object)
    one_line(ConfigError, read_npz_reference, npz_with(tmp_path / "objects.npz", mu=objects, sigma=sigma),
             match="mu holds |O values")
    one_line(ConfigError, read_npz_reference, npz_with(tmp_path / "n.npz", mu=np.zeros(2048), sigma=sigma, n="many"),
             match="n holds <U4 values, not an integer type")


def test_a_sigma_that_is_not_a_covariance_is_refused_not_turned_into_a_wrong_fid(tmp_path):
    rng = np.random.default_rng(0)
    features = rng.standard_normal((100, 2048))
    mu, sigma = features.mean(0), np.cov(features, rowvar=False)  # rank 99: PSD up to rounding
    reference = read_npz_reference(npz_with(tmp_path / "ok.npz", mu=mu, sigma=sigma))
    assert reference["cov"].shape == (2048, 2048)
    indefinite = sigma.copy()
    indefinite[0, 0] = -1.0  # e0' sigma e0 < 0
    message = one_line(ConfigError, read_npz_reference, npz_with(tmp_path / "bad.npz", mu=mu, sigma=indefinite),
                       match="sigma is not positive semi-definite")
    assert "it has an eigenvalue of -" in message
    asymmetric = sigma + np.triu(np.ones((2048, 2048)), 1)
    one_line(ConfigError, read_npz_reference, npz_with(tmp_path / "skew.npz", mu=mu, sigma=asymmetric),
             match="sigma is not symmetric")


# ---------------------------------------------------------------- 4. diffusers model folders

UNET = {
    "_class_name": "UNet2DModel", "sample_size": 8, "in_channels": 1, "out_channels": 1, "block_out_channels": [8, 16],
    "layers_per_block": 1, "norm_num_groups": 4, "attention_head_dim": 4,
    "down_block_types": ["DownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "UpBlock2D"],
}
SCHEDULER = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02,
             "beta_schedule": "linear"}


def diffusers_folder(path: Path, unet: dict | None = None, scheduler: dict | None = None) -> Path:
    """A UNet folder with its scheduler config and no weights: every refusal here comes before the weights."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({**UNET, **(unet or {})}))
    (path / "scheduler_config.json").write_text(json.dumps({**SCHEDULER, **(scheduler or {})}))
    return path


# (which config, the change, what the one-line refusal says, whether diffusers would allocate gigabytes from it)
DIFFUSERS_CASES = [
    ("scheduler", {"num_train_timesteps": 0}, "num_train_timesteps is 0", False),
    ("scheduler", {"num_train_timesteps": 1}, "num_train_timesteps is 1", False),
    ("scheduler", {"num_train_timesteps": 10**9}, "num_train_timesteps is 1000000000", True),
    ("scheduler", {"beta_start": -0.1}, "beta_start is -0.1", False),
    ("scheduler", {"beta_end": 1.5}, "beta_end is 1.5", False),
    ("scheduler", {"trained_betas": [0.1, math.nan, 0.2], "num_train_timesteps": 3}, "trained_betas is nan", False),
    ("scheduler", {"trained_betas": [0.1, -0.2, 0.3], "num_train_timesteps": 3}, "trained_betas[1] is -0.2", False),
    ("scheduler", {"rescale_betas_zero_snr": True}, "beta_999 = 1, outside (0, 1)", False),  # an infinite sigma
    ("unet", {"sample_size": 100_000}, "sample_size is 100000", False),
    ("unet", {"in_channels": 0}, "in_channels is 0", False),
    ("unet", {"norm_eps": math.nan}, "norm_eps is nan", False),
    ("unet", {"block_out_channels": [100_000, 100_000]}, "block_out_channels is [100000, 100000]", True),
    ("unet", {"layers_per_block": 10**6}, "layers_per_block is 1000000", True),
    ("unet", {"num_class_embeds": 2**40}, "num_class_embeds is 1099511627776", True),
    ("unet", {"block_out_channels": [4096] * 8, "layers_per_block": 16, "norm_num_groups": 32,
              "down_block_types": ["DownBlock2D"] * 8, "up_block_types": ["UpBlock2D"] * 8}, "parameters, more than", True),
]


def test_diffusers_configs_out_of_range_are_refused_in_one_line_naming_file_and_key(tmp_path):
    pytest.importorskip("diffusers")
    from fewstep.external.diffusers import DiffusersDenoiser, load_diffusers

    for i, (which, change, expected, _) in enumerate(DIFFUSERS_CASES):
        folder = diffusers_folder(tmp_path / str(i), **{which: change})
        message = one_line(CheckpointError, load_diffusers, folder, match=expected)
        assert str(folder / ("config.json" if which == "unet" else "scheduler_config.json")) in message, message
        unet, scheduler = {**UNET, **(change if which == "unet" else {})}, {**SCHEDULER, **(change if which != "unet" else {})}
        one_line(ConfigError, DiffusersDenoiser, unet, scheduler, match=expected)  # the same configs from a checkpoint
        one_line(ConfigError, DiffusersDenoiser, OmegaConf.create(unet), OmegaConf.create(scheduler), match=expected)
    # in range, the configs pass and diffusers goes on to the (absent) weights
    one_line(CheckpointError, load_diffusers, diffusers_folder(tmp_path / "fine"), match="restore its weights file")
    assert DiffusersDenoiser(OmegaConf.create(UNET), OmegaConf.create(SCHEDULER)).sigmas.shape == (1000,)  # Hydra's


@pytest.mark.slow
@needs_proc
def test_diffusers_configs_asking_for_gigabytes_are_refused_before_diffusers_allocates(tmp_path):
    pytest.importorskip("diffusers")
    from fewstep.external.diffusers import load_diffusers

    for i, (which, change, expected, _) in enumerate(case for case in DIFFUSERS_CASES if case[3]):
        refused_in_capped_child(CheckpointError, load_diffusers, diffusers_folder(tmp_path / str(i), **{which: change}),
                                match=expected)
