"""A diffusers ``UNet2DModel`` with its scheduler configuration as an EDM-space denoiser ``D(x, sigma)``.

DDPM-family models (Ho et al. 2020; DDIM, Song et al. 2021) are trained at discrete t = 0..T-1 on
x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, abar_t = prod_{s<=t} (1 - beta_s). Dividing by sqrt(abar_t)
gives EDM's x = x0 + sigma_t eps with sigma_t = sqrt((1 - abar_t) / abar_t) (Karras et al. 2022, the VP
row of Table 1), so the network sees x_vp = x / sqrt(1 + sigma^2). A continuous sigma is mapped to a
fractional t by interpolating linearly in log sigma between the two neighbouring discrete sigmas, clamped
to [sigma_0, sigma_{T-1}] (k-diffusion's DiscreteSchedule.sigma_to_t); at the discrete sigmas t is the
integer itself. The scheduler's sampling options (clip_sample, thresholding, timestep_spacing) are not part
of the denoiser: fewstep's samplers pick their own grids (eta = 0 DDIM on the scheduler's own sigmas is
diffusers' DDIMScheduler, see tests/test_diffusers_teacher.py).

Weights are read by diffusers itself (``UNet2DModel.from_pretrained(folder, local_files_only=True)``):
``.safetensors`` with safetensors, which it prefers, and ``.bin`` with ``torch.load(weights_only=True)``
(checked in diffusers 0.42; its log still calls that fallback "unsafe serialization"), so no pickle code runs;
older diffusers may differ, so prefer safetensors folders.
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from fewstep.errors import CheckpointError, ConfigError, FewstepError, one_line
from fewstep.networks.preconditioning import PreconditionedDenoiser
from fewstep.schema import MAX_CLASSES

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# What fixes abar_t; the rest of a scheduler config (DDIM's, PNDM's, ...) is about sampling.
BETA_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "rescale_betas_zero_snr")

# Bounds on what a model folder's configs may ask for, checked before diffusers allocates anything from them; each is
# far beyond the pixel-space DDPM-family models fewstep reads and far below what would exhaust a machine.
MAX_CONFIG_BYTES = 16 << 20  # one config file (trained_betas for 100,000 steps take about 2.5 MB)
MAX_CONFIG_DEPTH = 8  # nesting of a config value (diffusers' configs: a list of numbers or names, one level)
MAX_TRAIN_TIMESTEPS = 100_000  # discrete training steps (DDPM: 1,000; iDDPM: 4,000)
MAX_SAMPLE_SIZE = 4096  # pixels a side (pixel-space models: 32 to 1024)
MAX_IMAGE_CHANNELS = 64  # in_channels and out_channels (images: 1 to 4, twice that with learned variance)
MAX_BLOCK_CHANNELS = 4096  # channels of a block, groups, head size (ADM's widest block: 1536)
MAX_BLOCKS = 16  # down blocks, and up blocks (DDPM at 256 x 256: 6)
MAX_LAYERS_PER_BLOCK = 16  # (ADM: 3)
MAX_UNET_PARAMETERS = 2_000_000_000  # counted on torch's meta device before any weight exists (ADM's largest: ~550M)

# UNet2DModel's integer arguments: (smallest, largest, None allowed)
_UNET_INTEGERS = {
    "in_channels": (1, MAX_IMAGE_CHANNELS, False),
    "out_channels": (1, MAX_IMAGE_CHANNELS, False),
    "layers_per_block": (1, MAX_LAYERS_PER_BLOCK, False),
    "norm_num_groups": (1, MAX_BLOCK_CHANNELS, True),
    "attn_norm_num_groups": (1, MAX_BLOCK_CHANNELS, True),
    "attention_head_dim": (1, MAX_BLOCK_CHANNELS, True),
    "time_embedding_dim": (1, 4 * MAX_BLOCK_CHANNELS, True),
    "num_class_embeds": (1, MAX_CLASSES, True),
    "num_train_timesteps": (1, MAX_TRAIN_TIMESTEPS, True),
    "downsample_padding": (0, 16, False),
}


def _import_diffusers():
    try:
        import diffusers
    except ImportError as e:
        raise CheckpointError(
            f'reading a diffusers model needs diffusers ({e}): pip install "fewstep[diffusers]" (or pip install diffusers)'
        ) from None
    return diffusers


def _is_list(value) -> bool:
    """A list in a config: JSON's, a tuple of diffusers' FrozenDict, or OmegaConf's ListConfig from a Hydra node."""
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


def _is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _non_finite(value, key: str, depth: int = 0) -> str | None:
    """Why a config value holds a number that is not finite (or nests too deep to look), or None."""
    if depth > MAX_CONFIG_DEPTH:
        return f"{key} nests deeper than {MAX_CONFIG_DEPTH} levels"
    if isinstance(value, float) and not math.isfinite(value):
        return f"{key} is {value}, not a finite number"
    if _is_list(value):
        return next((p for p in (_non_finite(v, key, depth + 1) for v in value) if p), None)
    if isinstance(value, Mapping):
        return next((p for p in (_non_finite(v, f"{key}.{k}", depth + 1) for k, v in value.items()) if p), None)
    return None


def _in_range(value, low, high, integer: bool) -> bool:
    return (_is_integer(value) if integer else _is_number(value)) and low <= value <= high


def _beta_problem(config: dict) -> str | None:
    """Why a scheduler config's betas are not a DDPM schedule (or would take unbounded work to compute), or None:
    checked before diffusers computes them."""
    problem = next((p for p in (_non_finite(v, str(k)) for k, v in config.items()) if p), None)
    if problem:
        return problem
    steps = config.get("num_train_timesteps", 1000)
    if not _in_range(steps, 2, MAX_TRAIN_TIMESTEPS, integer=True):
        return f"num_train_timesteps is {str(steps)[:40]}, not an integer in [2, {MAX_TRAIN_TIMESTEPS}]"
    for key in ("beta_start", "beta_end"):
        if key in config and not (_is_number(config[key]) and 0 < config[key] < 1):
            return f"{key} is {str(config[key])[:40]}, not a number in (0, 1)"
    betas = config.get("trained_betas")
    if betas is not None:
        if not _is_list(betas) or not 2 <= len(betas) <= MAX_TRAIN_TIMESTEPS:
            return f"trained_betas is not a list of 2 to {MAX_TRAIN_TIMESTEPS} numbers"
        outside = next((i for i, beta in enumerate(betas) if not (_is_number(beta) and 0 < beta < 1)), None)
        if outside is not None:
            return f"trained_betas[{outside}] is {str(betas[outside])[:40]}, not a number in (0, 1)"
        if "num_train_timesteps" in config and len(betas) != steps:
            return f"trained_betas has {len(betas)} entries but num_train_timesteps is {steps}"
    if not isinstance(config.get("rescale_betas_zero_snr", False), bool):
        return "rescale_betas_zero_snr is not true or false"
    return None


def _unet_problem(config: dict) -> str | None:
    """Why a UNet2DModel config is not a DDPM-family model within the bounds above, or None: checked before diffusers
    builds anything from it."""
    problem = next((p for p in (_non_finite(v, str(k)) for k, v in config.items()) if p), None)
    if problem:
        return problem
    for key, (low, high, optional) in _UNET_INTEGERS.items():
        value = config.get(key)
        if key in config and not (value is None and optional) and not _in_range(value, low, high, integer=True):
            return f"{key} is {str(value)[:40]}, not an integer in [{low}, {high}]"
    size = config.get("sample_size")
    sides = size if _is_list(size) and len(size) == 2 else [size]
    if size is not None and not all(_in_range(side, 1, MAX_SAMPLE_SIZE, integer=True) for side in sides):
        return f"sample_size is {str(size)[:40]}, not an integer (or two) in [1, {MAX_SAMPLE_SIZE}]"
    for key in ("block_out_channels", "down_block_types", "up_block_types"):
        value = config.get(key, [0])
        if not _is_list(value) or not 1 <= len(value) <= MAX_BLOCKS:
            return f"{key} is not a list of 1 to {MAX_BLOCKS} entries"
    channels = config.get("block_out_channels")
    if channels is not None and not all(_in_range(c, 1, MAX_BLOCK_CHANNELS, integer=True) for c in channels):
        return f"block_out_channels is {str(channels)[:80]}, not integers in [1, {MAX_BLOCK_CHANNELS}]"
    for key in ("down_block_types", "up_block_types"):
        if key in config and not all(isinstance(name, str) for name in config[key]):
            return f"{key} holds something other than block names"
    return None


def _count_parameters(config: dict) -> int:
    """The UNet's parameters, counted on torch's meta device: nothing is allocated, whatever the config asks for."""
    diffusers = _import_diffusers()
    with torch.device("meta"):
        unet = diffusers.UNet2DModel.from_config(dict(config))  # a dict: anything else diffusers takes for a hub name
    return sum(parameter.numel() for parameter in unet.parameters())


def check_diffusers_configs(unet_config: dict, scheduler_config: dict) -> tuple[str, str] | None:
    """(which config: "unet" or "scheduler", why) for configs fewstep refuses to build, or None. Cheap checks first;
    then the UNet is built on the meta device to count its parameters."""
    for which, problem in (("scheduler", _beta_problem(scheduler_config)), ("unet", _unet_problem(unet_config))):
        if problem:
            return which, problem
    kind = unet_config.get("time_embedding_type", "positional"), unet_config.get("class_embed_type")
    if kind != ("positional", None):  # "learned" sizes an embedding by num_train_timesteps: refuse before building
        return "unet", (
            f"the UNet has time_embedding_type={str(kind[0])[:40]!r}, class_embed_type={str(kind[1])[:40]!r}: fewstep "
            "reads DDPM-family UNet2DModels with positional time embedding and integer labels (num_class_embeds)"
        )
    try:
        parameters = _count_parameters(unet_config)
    except FewstepError:
        raise
    except Exception as error:  # diffusers refuses the config (block names, mismatched lists)
        return "unet", f"diffusers cannot build a UNet2DModel from it ({type(error).__name__}: {str(error)[:200]})"
    if parameters > MAX_UNET_PARAMETERS:
        return "unet", f"it describes a UNet of {parameters} parameters, more than the {MAX_UNET_PARAMETERS} fewstep reads"
    betas = _betas(scheduler_config)
    if betas is not None and not (torch.isfinite(betas).all() and (betas > 0).all() and (betas < 1).all()):
        outside = int((~(torch.isfinite(betas) & (betas > 0) & (betas < 1))).nonzero()[0])
        return "scheduler", (
            f"its schedule gives beta_{outside} = {float(betas[outside]):.6g}, outside (0, 1) (with "
            "rescale_betas_zero_snr the last beta is 1: an infinite sigma): fewstep needs every beta in (0, 1)"
        )
    return None


def _betas(scheduler_config: dict) -> torch.Tensor | None:
    """The betas diffusers' own code makes of a (checked) scheduler config, or None where it makes none."""
    try:
        scheduler = _import_diffusers().DDPMScheduler(
            **{k: scheduler_config[k] for k in BETA_KEYS if k in scheduler_config}
        )
    except (NotImplementedError, ValueError, TypeError):  # DiffusersDenoiser says why, with the schedules it takes
        return None
    return scheduler.betas.double()


def _scheduler_problem(config: dict) -> str | None:
    """Why a scheduler config is not a DDPM-family one fewstep can read, or None."""
    if "beta_schedule" not in config and "trained_betas" not in config and "sigma_max" in config:
        return (
            f"{config.get('_class_name', 'the scheduler')} is a variance-exploding / EDM schedule without betas: "
            "fewstep reads DDPM-family schedulers (DDPMScheduler, DDIMScheduler, PNDMScheduler, ...)"
        )
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        return f"prediction_type {prediction!r} is not one of {', '.join(PREDICTION_TYPES)}: set one in the scheduler config"
    return None


class DiffusersDenoiser(PreconditionedDenoiser):
    """``D(x, sigma, class_labels=None) -> x0_hat`` (float32) of a ``UNet2DModel`` built from its config.

    The UNet has random weights until ``load_state_dict`` (or ``load_diffusers``) fills them; the state dict's
    keys are the UNet's under ``unet.``. ``data_shape`` (C, H, W) and ``num_classes`` are checked against the
    model when given. Class labels are integers; fewstep's "no label" index is ``num_classes``, which is the
    model's null class when it has ``num_class_embeds = num_classes + 1`` embeddings. A model with exactly
    ``num_classes`` embeddings has no null class: classifier-free guidance (which asks for label
    ``num_classes``) is then refused with a ConfigError; sample it with guidance scale 0.
    """

    def __init__(self, unet_config: dict, scheduler_config: dict, data_shape=None, num_classes: int = 0):
        super().__init__()
        diffusers = _import_diffusers()
        problem = _scheduler_problem(scheduler_config)
        if problem:
            raise ConfigError(one_line(problem))
        refused = check_diffusers_configs(unet_config, scheduler_config)  # before anything is allocated from them
        if refused:
            raise ConfigError(one_line(f"the diffusers {refused[0]} config: {refused[1]}"))
        self.unet_config, self.scheduler_config = dict(unet_config), dict(scheduler_config)
        self.unet = diffusers.UNet2DModel.from_config(self.unet_config)
        self.prediction_type = scheduler_config.get("prediction_type", "epsilon")
        # diffusers' own betas -> abar code (every beta_schedule, trained_betas, zero-SNR rescaling)
        try:
            betas = diffusers.DDPMScheduler(**{k: scheduler_config[k] for k in BETA_KEYS if k in scheduler_config})
        except (NotImplementedError, ValueError, TypeError) as e:
            raise ConfigError(one_line(
                f"the scheduler config gives no betas ({e}): use beta_schedule linear, scaled_linear or squaredcos_cap_v2, "
                "or trained_betas"
            )) from None
        abar = betas.alphas_cumprod.double()
        self.register_buffer("sigmas", ((1 - abar) / abar).sqrt().float(), persistent=False)
        self.sigma_min, self.sigma_max = float(self.sigmas[0]), float(self.sigmas[-1])
        # DDPM-family models take images in [-1, 1]; EDM's sigma_data = 0.5 is the std it assumes for them.
        self.sigma_data = 0.5
        self.num_classes = num_classes
        self._check(self.unet.config, data_shape, num_classes)

    def _check(self, cfg, data_shape, num_classes: int) -> None:
        channels = cfg.in_channels
        # learned-variance models (iDDPM) put the variance after the prediction, as DDPMScheduler.step splits it
        self.out_channels = channels if cfg.out_channels == 2 * channels else cfg.out_channels
        self.num_class_embeds = cfg.num_class_embeds
        if self.out_channels != channels:
            raise ConfigError(
                f"the UNet has in_channels={channels} but out_channels={cfg.out_channels}: "
                "fewstep needs out_channels = in_channels (or twice that, for learned variance)"
            )
        if cfg.time_embedding_type != "positional" or cfg.class_embed_type is not None:
            # "fourier" takes VE sigmas (score-SDE models), "learned" integer t only; the other label embeddings take vectors
            raise ConfigError(
                f"the UNet has time_embedding_type={cfg.time_embedding_type!r}, class_embed_type={cfg.class_embed_type!r}: "
                "fewstep reads DDPM-family UNet2DModels with positional time embedding and integer labels (num_class_embeds)"
            )
        if data_shape is not None:
            size = cfg.sample_size if isinstance(cfg.sample_size, (list, tuple, type(None))) else (cfg.sample_size,) * 2
            if data_shape[0] != channels or size is not None and tuple(data_shape[1:]) != tuple(size):
                raise ConfigError(
                    f"the diffusers UNet takes {channels}x{'x'.join(map(str, size or ('H', 'W')))} images (in_channels x "
                    f"sample_size) but the data set's are {'x'.join(map(str, data_shape))}: use a data set of the model's "
                    "image size and channels, or a model trained on this one"
                )
        if num_classes and (self.num_class_embeds or 0) not in (num_classes, num_classes + 1):
            raise ConfigError(
                f"the data set has {num_classes} classes but the UNet has num_class_embeds={self.num_class_embeds}: use a "
                f"model with {num_classes} (or {num_classes + 1}, with a null class) class embeddings, or a data set of its classes"
            )

    def feature_modules(self) -> list[torch.nn.Module]:
        """The encoder's levels (each down block's output) and the middle block, the bottleneck."""
        return [*self.unet.down_blocks, self.unet.mid_block]

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional t: linear in log sigma between the neighbouring discrete sigmas, clamped at the ends."""
        # the log of the float32 buffer, as for sigma: a sigma taken from the buffer gives bit-for-bit its integer t
        log_sigmas = self.sigmas.float().log()
        log_sigma = sigma.float().log().clamp(log_sigmas[0], log_sigmas[-1])
        low = (torch.searchsorted(log_sigmas, log_sigma, right=True) - 1).clamp(0, len(log_sigmas) - 2)
        w = (log_sigma - log_sigmas[low]) / (log_sigmas[low + 1] - log_sigmas[low])
        return low + w  # w = 0 exactly at sigma_low, 1 at sigma_{T-1}: integer t at the discrete sigmas

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        x = x.float()
        sigma = torch.as_tensor(sigma, device=x.device).float().reshape(-1).expand(x.shape[0])
        s = sigma.view(-1, *([1] * (x.ndim - 1)))
        c_in = (1 + s**2).rsqrt()  # sqrt(abar); sigma * c_in = sqrt(1 - abar)
        if self.num_class_embeds is None:
            class_labels = None  # an unconditional model ignores labels, as fewstep's own networks do
        elif class_labels is None:
            if not self.num_classes or self.num_class_embeds != self.num_classes + 1:
                raise ConfigError(f"the UNet is class-conditional ({self.num_class_embeds} class embeddings): pass class_labels")
            class_labels = torch.full((x.shape[0],), self.num_classes, device=x.device)  # the model's null class
        elif (class_labels >= self.num_class_embeds).any():  # fewstep's null label on a model without a null class
            raise ConfigError(
                f"class label {int(class_labels.max())} is outside the UNet's {self.num_class_embeds} class embeddings (it has "
                "no null class): sample with guidance scale 0 (no classifier-free guidance) and labels below that"
            )
        labels = None if class_labels is None else class_labels.long()
        out = self.unet((x * c_in).to(self.unet.dtype), self.sigma_to_t(sigma), class_labels=labels).sample.float()
        out = out[:, : self.out_channels]
        if self.prediction_type == "epsilon":
            return x - s * out
        if self.prediction_type == "v_prediction":
            return c_in * (c_in * x) - s * c_in * out
        return out


def _read_json(file: Path) -> dict:
    """A config file's JSON object; too big, too deep, not an object or not JSON is a one-line CheckpointError."""
    try:
        size = file.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise CheckpointError(one_line(
                f"refusing {file}: {size} bytes, more than the {MAX_CONFIG_BYTES} a diffusers config needs"
            ))
        config = json.loads(file.read_bytes())
    except RecursionError:  # json's parser recurses once per level of nesting
        raise CheckpointError(one_line(f"refusing {file}: it nests deeper than a JSON parser can follow")) from None
    except (OSError, ValueError) as e:
        raise CheckpointError(one_line(f"cannot read {file} ({str(e)[:200]}): restore it from the model's source")) from None
    if not isinstance(config, dict):
        raise CheckpointError(one_line(f"{file} holds a JSON {type(config).__name__}, not an object of settings"))
    return config


def _check_weights(unet_dir: Path) -> None:
    """Torch-format weights are read by torch.load, which allocates sizes a file declares: refuse those it cannot
    hold (safetensors checks its own header against the file's size, and diffusers prefers it when present)."""
    from fewstep.torch_files import check_torch_archive

    if not any(unet_dir.glob("*.safetensors")):
        for weights in sorted(unet_dir.glob("*.bin")):
            check_torch_archive(weights)


def _locate(path: Path) -> tuple[Path, Path]:
    """(the UNet folder, its scheduler_config.json) of a pipeline folder or a model folder."""
    if not path.is_dir():
        raise CheckpointError(
            f"no diffusers model folder at {path}: pass a folder written by save_pretrained "
            "(a pipeline with unet/ and scheduler/, or a UNet folder with config.json)"
        )
    if (path / "unet").is_dir():  # a pipeline folder (model_index.json)
        unet_dir, candidates = path / "unet", [path / "scheduler" / "scheduler_config.json"]
    else:
        unet_dir, candidates = path, [path / "scheduler_config.json", path.parent / "scheduler" / "scheduler_config.json"]
    config = unet_dir / "config.json"
    class_name = _read_json(config).get("_class_name") if config.is_file() else None
    if class_name != "UNet2DModel":
        found = f"{config} names {class_name or 'no _class_name'}" if config.is_file() else f"{config} is missing"
        raise CheckpointError(f"no UNet2DModel in {path} ({found}): fewstep reads pixel-space DDPM-family UNet2DModel folders")
    scheduler = next((c for c in candidates if c.is_file()), None)
    if scheduler is None:
        raise CheckpointError(
            f"no scheduler configuration for {unet_dir}: looked for {' and '.join(map(str, candidates))}; "
            "add the training scheduler's scheduler_config.json there (scheduler.save_pretrained(folder))"
        )
    return unet_dir, scheduler


def load_diffusers(path, data_shape=None, num_classes: int = 0) -> DiffusersDenoiser:
    """The denoiser of a diffusers folder: a pipeline (unet/ + scheduler/), or a UNet2DModel folder with
    scheduler_config.json in it or in a sibling scheduler/ folder. Nothing is downloaded."""
    diffusers = _import_diffusers()
    unet_dir, scheduler_file = _locate(Path(path))
    scheduler_config = _read_json(scheduler_file)
    problem = _scheduler_problem(scheduler_config)
    if problem:
        raise CheckpointError(one_line(f"{scheduler_file}: {problem}"))
    refused = check_diffusers_configs(_read_json(unet_dir / "config.json"), scheduler_config)
    if refused:
        file = scheduler_file if refused[0] == "scheduler" else unet_dir / "config.json"
        raise CheckpointError(one_line(f"{file}: {refused[1]}: use the model's own configuration files"))
    _check_weights(unet_dir)
    try:
        # low_cpu_mem_usage needs accelerate; asking for it without accelerate only prints a warning
        low_memory = importlib.util.find_spec("accelerate") is not None
        unet = diffusers.UNet2DModel.from_pretrained(unet_dir, local_files_only=True, low_cpu_mem_usage=low_memory)
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(one_line(f"diffusers cannot read the UNet in {unet_dir} ({e}): restore its weights file")) from None
    denoiser = DiffusersDenoiser(_read_json(unet_dir / "config.json"), scheduler_config, data_shape, num_classes)
    denoiser.unet = unet  # the same config with the folder's weights, in place of the random ones
    return denoiser.eval()


def is_diffusers_folder(path) -> bool:
    """Cheap check: a folder with model_index.json or unet/, or a config.json naming UNet2DModel."""
    path = Path(path)
    if not path.is_dir():
        return False
    if (path / "model_index.json").is_file() or (path / "unet").is_dir():
        return True
    try:
        return _read_json(path / "config.json").get("_class_name") == "UNet2DModel"
    except CheckpointError:
        return False
