"""The command-line options of the sampling entry points, checked before any work: one line that names the key, the
value and the fix (a ``ConfigError``, printed by ``fewstep.cli.user_errors`` as ``fewstep: error: ...``, exit 2).

One function per entry-point family: ``check_sample_options`` (``python -m fewstep.sample``),
``check_evaluate_options`` (``python -m fewstep.evaluate``) and ``check_reference_options``
(``python -m fewstep.fid_reference``). They check the composed config's values by type, never by casting:
OmegaConf has already turned ``nfe=abc`` into the string "abc", ``nfe=2.5`` into a float and ``guidance=nan``
into a float NaN, and each of those must be refused here rather than fail deep inside sampling or, worse,
give NaN samples and exit 0.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from fewstep.errors import ConfigError

# Classifier-free guidance: D_w = (1 + w) D(x | y) - w D(x | empty) (fewstep.samplers.guidance). Scales used in
# practice are 0 to about 20 (EDM2 1.2-2.5, Stable Diffusion 7.5); w multiplies the difference of two network
# outputs, so far beyond that it only amplifies their error into saturated images, and w = 1e30 overflows float32
# (max 3.4e38) within a step: NaN samples. 100 leaves every sensible scale open and refuses the typos (1e30, 1500).
MAX_GUIDANCE = 100.0
INT64 = 2**63  # seeds are stored as int64 (samples.npz) and hashed as 64-bit words

# Options of sample() itself that every diffusion sampler takes beside its own (fewstep.samplers.sample)
SAMPLE_OPTIONS = ("sigma_min", "sigma_max", "rho")
# Arguments of the solver functions and of sample() / sample_kac() that fewstep fills in, never options
NOT_OPTIONS = {
    "denoiser", "velocity", "x", "x_T", "sigmas", "ts", "noise", "generator", "callback", "sampler", "nfe", "grid",
    "T", "solver_options",
}
# Options that may be null: the lazy samplers then use the model's sigma_data (GenerativeMethod.sample_batch)
NULLABLE = {"sigma_data"}
# Ranges of the numeric sampler options, beside finiteness: (lowest, lowest allowed itself, highest)
OPTION_RANGES = {
    "sigma_min": (0.0, False, None), "sigma_max": (0.0, False, None), "rho": (0.0, False, None),
    "sigma_data": (0.0, False, None),  # noise levels and data scales are positive
    "s_churn": (0.0, True, None), "s_tmin": (0.0, True, None), "s_tmax": (0.0, True, None),
    "s_noise": (0.0, True, None), "eta": (0.0, True, None),  # amounts of added noise
    "c2": (0.0, False, 1.0),  # SEEDS-2's intermediate stage lies inside the step
}
CHOICES = {"weights": ("phi1", "phi2")}  # sample_seeds2's quadrature weights


def show(value: Any) -> str:
    """A value as the user would type it on the command line."""
    if value is None:
        return "null"
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value)
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(show(v) for v in value) + "]"
    return str(value)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def whole(cfg: Mapping, key: str, what: str, example: int, minimum: int | None = 1, too_small: str | None = None) -> int:
    """``cfg[key]`` as a whole number (not a float, a string or a boolean) >= ``minimum``."""
    value = cfg.get(key)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        raise ConfigError(f"{key}={show(value)} is not a whole number ({what}): write it without a decimal point or "
                          f"exponent, {key}={int(value)}")
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key}={show(value)} is not a whole number ({what}): e.g. {key}={example}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{key}={value}: " + (too_small or f"must be >= {minimum} ({what}), e.g. {key}={example}"))
    return value


def finite(key: str, value: Any, what: str, example: Any, low: float | None = None, low_inclusive: bool = True,
           high: float | None = None) -> float:
    """``value`` as a finite number within [low, high] (``low`` excluded unless ``low_inclusive``)."""
    if not is_number(value):
        raise ConfigError(f"{key}={show(value)} is not a number ({what}): e.g. {key}={example}")
    if not math.isfinite(value):
        raise ConfigError(f"{key}={show(value)}: must be a finite number ({what}), e.g. {key}={example}")
    below = low is not None and (value < low if low_inclusive else value <= low)
    if below or (high is not None and value > high):
        if low is not None and high is not None:
            bounds = f"between {low:g} and {high:g}"
        elif low is not None:
            bounds = f"{'>=' if low_inclusive else '>'} {low:g}"
        else:
            bounds = f"<= {high:g}"
        raise ConfigError(f"{key}={show(value)}: must be {bounds} ({what}), e.g. {key}={example}")
    return float(value)


def check_guidance(cfg: Mapping) -> float:
    return finite("guidance", cfg.get("guidance"), "the classifier-free guidance scale w; 0: none", 1.5,
                  low=0.0, high=MAX_GUIDANCE)


def check_device(value: Any) -> None:
    """A device string that torch accepts and that this machine has (auto: cuda when available, else cpu)."""
    fix = "use device=auto (cuda when available, else cpu), device=cpu, device=cuda or device=cuda:N"
    if not isinstance(value, str):
        raise ConfigError(f"device={show(value)} is not a device name: {fix}")
    if value == "auto":
        return
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise ConfigError(f"device={value} is not a device torch knows: {fix}") from None
    if device.type == "cpu":
        return
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={value}: no CUDA GPU is visible: use device=cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(f"device={value}: {count} CUDA GPU{'s' if count > 1 else ''} visible (cuda:0 to "
                              f"cuda:{count - 1}): use one of them, or device=cuda")
        return
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"device={value}: no Apple GPU (MPS) is available here: use device=cpu")
        return
    raise ConfigError(f"device={value}: fewstep runs on cpu, cuda or mps: {fix}")


def check_progress(cfg: Mapping) -> None:
    """The ``progress:`` block: ``interval`` seconds >= 0 between plain lines, ``mode`` auto, rich or text."""
    node = cfg.get("progress")
    if node is None:
        return
    finite("progress.interval", node.get("interval", 30), "seconds between progress lines; 0: every batch", 30,
           low=0.0)
    mode = node.get("mode", "auto")
    if mode not in ("auto", "rich", "text"):
        raise ConfigError(f"progress.mode={show(mode)}: choose auto (a bar on a terminal, else plain lines), rich or text")


def sampler_parameters(name: str) -> dict[str, Any]:
    """The options sampler ``name`` takes, each with its default: the solver function's own and sample()'s noise
    levels for a diffusion sampler, sample_kac()'s ``denoise`` for a Kac one."""
    from fewstep.samplers import KAC_SOLVERS, SOLVERS, check_solver, sample, sample_kac

    if name in KAC_SOLVERS:
        functions = [sample_kac]
    elif name in SOLVERS:
        functions = [SOLVERS[name].fn, sample]
    else:
        check_solver(name, 1)  # the one-line "unknown sampler" with the choices
        raise AssertionError(name)  # check_solver refuses every other name
    found = {}
    for function in functions:
        for parameter in inspect.signature(function).parameters.values():
            if parameter.name in NOT_OPTIONS or parameter.kind in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL):
                continue
            if function is sample and parameter.name not in SAMPLE_OPTIONS:
                continue
            found[parameter.name] = parameter.default
    return found


def check_sampler(cfg: Mapping) -> None:
    """``sampler.name`` and every ``sampler.<option>`` against the signature of that sampler's function."""
    node = cfg.get("sampler")
    if not isinstance(node, Mapping) or not isinstance(node.get("name"), str):
        raise ConfigError(f"sampler={show(node)}: choose a sampler by name, e.g. sampler=heun")
    name = node["name"]
    parameters = sampler_parameters(name)
    for key, value in node.items():
        if key == "name":
            continue
        option = f"sampler.{key}"
        if key not in parameters:
            takes = ", ".join(parameters) or "no options"
            raise ConfigError(f"{option}={show(value)}: sampler '{name}' has no option '{key}' (it takes: {takes}); "
                              f"remove it (see fewstep/conf/sampler/{name}.yaml)")
        default = parameters[key]
        if value is None and key in NULLABLE:
            continue
        if key == "denoise":  # Kac: fractions of T of the final denoising jumps
            check_denoise_fractions(option, value)
        elif key in CHOICES:
            if value not in CHOICES[key]:
                raise ConfigError(f"{option}={show(value)}: choose one of {', '.join(CHOICES[key])}")
        elif isinstance(default, str):
            if not isinstance(value, str):
                raise ConfigError(f"{option}={show(value)} is not a name, e.g. {option}={default}")
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{option}={show(value)}: choose true or false")
        else:  # a float option (every numeric solver option is one)
            low, inclusive, high = OPTION_RANGES.get(key, (None, True, None))
            finite(option, value, f"an option of sampler '{name}'", default if default is not None else 0.5,
                   low=low, low_inclusive=inclusive, high=high)


def check_denoise_fractions(option: str, value: Any) -> None:
    if value is None:
        return
    values = OmegaConf.to_container(value) if isinstance(value, ListConfig) else value
    example = f"{option}=[0.2,0.1,0.05] (or [] for none)"
    if not isinstance(values, Sequence) or isinstance(values, str):
        raise ConfigError(f"{option}={show(value)}: give a list of fractions of T in (0, 1], e.g. {example}")
    for fraction in values:
        if not is_number(fraction) or not math.isfinite(fraction) or not 0 < fraction <= 1:
            raise ConfigError(f"{option}={show(value)}: each entry must be a fraction of T in (0, 1], e.g. {example}")


def check_ckpt(cfg: DictConfig) -> None:
    if OmegaConf.is_missing(cfg, "ckpt") or not isinstance(cfg.get("ckpt"), str) or not cfg.get("ckpt"):
        value = "???" if OmegaConf.is_missing(cfg, "ckpt") else show(cfg.get("ckpt"))
        raise ConfigError(f"ckpt={value}: pass ckpt=PATH, a .ckpt written by fewstep.train (under "
                          "outputs/<method>/<data>/<run>/checkpoints/), an EDM network pickle or a diffusers folder")


def check_seeds(cfg: Mapping, count: int) -> None:
    """``seed`` a whole number whose ``count`` seeds seed .. seed + count - 1 fit in 64 bits."""
    seed = whole(cfg, "seed", "sample i uses seed + i", 0, minimum=None)
    if not -INT64 <= seed or seed + count > INT64:
        raise ConfigError(f"seed={seed}: the seeds seed to seed + {count - 1} must fit in a signed 64-bit integer, "
                          "e.g. seed=0")


def check_sampling(cfg: DictConfig, what: str) -> int:
    """What fewstep.sample and fewstep.evaluate share; returns the number of samples drawn in all."""
    check_ckpt(cfg)
    n = whole(cfg, "n", f"the number of {what}s", 64, too_small=f"ask for at least one {what} (n>=1)")
    whole(cfg, "nfe", "network evaluations per sample", 35)
    whole(cfg, "batch_size", "samples per batch", 256)
    check_guidance(cfg)
    check_device(cfg.get("device"))
    check_sampler(cfg)
    check_progress(cfg)
    return n


def check_sample_options(cfg: DictConfig) -> None:
    """``python -m fewstep.sample``: ckpt, n, nfe, seed, batch_size, guidance, device, sampler.*, progress.*."""
    n = check_sampling(cfg, "sample")
    check_seeds(cfg, n)


def check_evaluate_options(cfg: DictConfig) -> None:
    """``python -m fewstep.evaluate``: those of fewstep.sample, and metric and repeats."""
    from fewstep.metrics.score import check_metric

    check_metric(cfg.get("metric"))
    n = check_sampling(cfg, "image")
    repeats = whole(cfg, "repeats", "sample sets scored, with disjoint seeds", 3,
                    too_small="score at least one sample set (repeats>=1)")
    check_seeds(cfg, n * repeats)


def check_reference_options(cfg: DictConfig) -> None:
    """``python -m fewstep.fid_reference``: n (null: all, else >= 2), batch_size, device, progress.*."""
    if cfg.get("n") is not None:
        whole(cfg, "n", "training images to use; null: all", 10000, minimum=2,
              too_small="reference statistics need at least 2 images (n>=2, or n=null for all)")
    whole(cfg, "batch_size", "images per Inception forward pass", 256)
    check_device(cfg.get("device"))
    check_progress(cfg)
