"""What the benchmarks in tools/ share: the machine they ran on, device timing, standard JSON, the k-diffusion peer."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import math
import platform
import statistics
import sys
import time


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), or what the platform says."""
    try:
        with open("/proc/cpuinfo") as file:
            return next((line.split(":", 1)[1].strip() for line in file if line.startswith("model name")), "CPU")
    except OSError:
        return platform.processor() or platform.machine() or "CPU"


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def synchronize(device) -> None:
    """Wait for the device's queued work (CUDA), so that a wall-clock time covers it."""
    if getattr(device, "type", device) == "cuda":
        import torch

        torch.cuda.synchronize()


def median_seconds(fn, device, repeats: int) -> float:
    """The median wall time of ``repeats`` calls of ``fn`` on ``device``, after one warm-up call."""
    fn()  # kernels, allocator, caches
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def strict_json(value):
    """NaN and infinities (a diverged run) as null, so that ``json.dumps(..., allow_nan=False)`` writes standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(item) for item in value]
    return value


def kdiffusion_sampling():
    """k-diffusion's ``sampling`` module without its package's ``__init__`` (which needs scikit-image and more that the
    samplers do not), or None with one line saying how to install it."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        print("k-diffusion is not installed; its rows are left out: pip install --no-deps k-diffusion==0.1.1.post1 "
              "dctorch==0.1.2 torchsde torchdiffeq trampoline", flush=True)
        return None
    if "k_diffusion" not in sys.modules:  # the package from its own spec, its __init__ not run: others find it intact
        sys.modules["k_diffusion"] = importlib.util.module_from_spec(spec)
    try:
        return importlib.import_module("k_diffusion.sampling")
    except ImportError as error:
        print(f"k_diffusion.sampling is not importable ({error}); its rows are left out", flush=True)
        return None
