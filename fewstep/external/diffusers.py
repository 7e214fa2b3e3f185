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
from pathlib import Path

import torch

from fewstep.errors import CheckpointError, ConfigError, one_line
from fewstep.networks.preconditioning import PreconditionedDenoiser

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# What fixes abar_t; the rest of a scheduler config (DDIM's, PNDM's, ...) is about sampling.
BETA_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "rescale_betas_zero_snr")


def _import_diffusers():
    try:
        import diffusers
    except ImportError as e:
        raise CheckpointError(
            f'reading a diffusers model needs diffusers ({e}): pip install "fewstep[diffusers]" (or pip install diffusers)'
        ) from None
    return diffusers


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
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(one_line(f"cannot read {file} ({e}): restore it from the model's source")) from None


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
        return json.loads((path / "config.json").read_text()).get("_class_name") == "UNet2DModel"
    except (OSError, ValueError, AttributeError):
        return False
