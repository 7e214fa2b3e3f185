"""Drawing samples from a trained method: seeds, class labels and guidance around ``samplers.sample``,
in one process or split across the ranks of a distributed run."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from fewstep.errors import ConfigError, FewstepError
from fewstep.images import to_uint8
from fewstep.samplers import SeededNoise
from fewstep.samplers.guidance import check_guide, check_interval
from fewstep.strategies import full_weights


class NonFiniteSamples(FewstepError):
    """A sampler returned NaN or infinite values: nothing is written or scored from them."""


@torch.no_grad()
def generate(
    method, n: int, sampler: str, nfe: int, seed: int = 0, guidance: float = 0.0, batch_size: int = 256,
    grid: str | None = None, offset: int = 0, callback: Callable[[dict], None] | None = None, check_finite: bool = True,
    guide=None, guidance_interval=None, **solver_options,
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Draw samples ``offset .. offset + n - 1`` from ``method.denoiser``; sample i depends on seed ``seed + i`` only.

    Conditional methods get class labels i mod num_classes and classifier-free guidance ``guidance``; with ``guide``
    (a weaker model, ``load_guide``) the guidance is autoguidance instead, for unconditional methods too, and with
    ``guidance_interval`` [sigma_lo, sigma_hi] either applies for sigma in that range only (``sampling_model``).
    ``grid`` None is the method's default time grid. Returns (samples, labels or None, NFE per sample as counted).

    ``callback`` (k-diffusion style) gets a dict after each batch: ``i`` (the batch), ``done`` and ``total`` (samples
    drawn so far, of n), ``x`` (the batch's samples) and ``seeds``. With ``check_finite`` a batch holding NaN or
    infinite values stops the run with a one-line ``NonFiniteSamples`` that names their seeds (one cheap
    ``isfinite(x).all()`` per batch).
    """
    indices = torch.arange(offset, offset + n, device=method.device)
    labels = indices % method.num_classes if method.num_classes else None
    out, nfe_used = [], 0
    for i, start in enumerate(range(0, n, batch_size)):
        seeds = range(seed + offset + start, seed + offset + min(n, start + batch_size))
        noise = SeededNoise(seeds, method.device)
        batch_labels = None if labels is None else labels[start : start + len(seeds)]
        samples, nfe_used = method.sample_batch(noise, sampler, nfe, batch_labels, guidance, grid, guide=guide,
                                                interval=guidance_interval, **solver_options)
        if check_finite and not torch.isfinite(samples).all():
            raise NonFiniteSamples(non_finite_message(samples, seeds, n, guidance, solver_options))
        out.append(samples)
        if callback is not None:
            callback({"i": i, "done": start + len(seeds), "total": n, "x": samples, "seeds": seeds})
    return torch.cat(out), labels, nfe_used


def load_guide(method, guide: str | None, guidance: float, interval=None, map_location="cpu", weights: str = "ema"):
    """The guide model read from ``guide`` (any file ``load_method`` reads), checked against ``method``, or None
    without one; one line for guidance that ``method`` cannot take (a guidance scale for an unconditional model
    without a guide, a bad interval)."""
    from fewstep.checkpoints import load_method

    check_interval(interval)
    if not guide:
        if guidance and not method.num_classes:
            raise ConfigError("guidance needs a class-conditional model (trained with method.conditional=true) or a "
                              "guide (guide=PATH, a weaker model of the same data); use guidance=0")
        return None
    try:
        model = load_method(guide, map_location=map_location, weights=weights)
    except FewstepError as error:
        raise type(error)(f"guide={guide}: {error}") from None
    check_guide(method, model, f"guide '{guide}'")
    return model


def non_finite_message(samples: torch.Tensor, seeds: range, n: int, guidance: float, options: dict | None = None) -> str:
    """Which samples of a batch are not finite, and what to do about it (one line)."""
    bad = (~torch.isfinite(samples.reshape(len(samples), -1))).any(dim=1).nonzero().flatten().tolist()
    named = ", ".join(str(seeds[k]) for k in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    fixes = ["check the checkpoint (python -m fewstep.sample weights=raw ...)"]
    if guidance:
        fixes.append(f"lower guidance (now {guidance:g})")
    given = [f"sampler.{key}={value}" for key, value in (options or {}).items() if value is not None]
    if given:
        fixes.append(f"the sampler's options ({', '.join(given)})")
    return (
        f"{len(bad)} of the {len(seeds)} samples with seeds {seeds.start} to {seeds.stop - 1} hold NaN or infinite "
        f"values (seeds {named}); stopped before writing or scoring any of the {n} samples: the model returns "
        f"non-finite values: {', or '.join(fixes)}"
    )


def rank_shard(n: int, rank: int, world: int) -> tuple[int, int]:
    """(first global index, count) of the samples that rank ``rank`` of ``world`` draws out of ``n``.

    Every rank draws ceil(n / world), the last ones padding past n, so that all ranks gather equal parts
    and make the same network calls.
    """
    chunk = math.ceil(n / world)
    return rank * chunk, chunk


@torch.no_grad()
def generate_across_ranks(
    trainer, pl_module, n: int, sampler: str, nfe: int, seed: int = 0, guidance: float = 0.0, batch_size: int = 256,
    grid: str | None = None, uint8: bool = False, preview: int = 0,
    **solver_options,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``generate`` with the n samples split across the ranks of ``trainer``; every rank must call it.

    Each rank draws its ``rank_shard``, then every rank receives all n in global order: the samples do
    not depend on the number of devices. With ``uint8``, images (not vectors) travel and come back as
    ``to_uint8`` images, a quarter of the traffic; the first ``preview`` samples also come back as the
    sampler's floats, for a picture. Returns (samples, preview samples, NFE per sample as counted).
    """
    offset, count = rank_shard(n, trainer.global_rank, trainer.world_size)
    with full_weights(trainer):
        # No finiteness stop here: one rank raising alone would leave the others waiting at the gather, and a
        # callback during training (grids, SamplerBenchmark) must not end the run; training stops on a NaN loss.
        shard, _, nfe_used = generate(
            pl_module, count, sampler, nfe, seed, guidance, batch_size, grid, offset=offset, check_finite=False,
            **solver_options,
        )
    samples = gather_in_order(trainer, to_uint8(shard) if uint8 and shard.ndim == 4 else shard, n)
    # The shards are consecutive and equal, so the first `preview` samples lie in the ranks' first `preview`.
    preview = min(preview, n)  # not the padding past n
    first = gather_in_order(trainer, shard[:preview], preview) if preview else shard[:0]
    return samples, first, nfe_used


def gather_in_order(trainer, part: torch.Tensor, count: int) -> torch.Tensor:
    """The first ``count`` samples of the ranks' equally long ``part``s put end to end in rank order, on every rank."""
    gathered = trainer.strategy.all_gather(part)  # [world, *part.shape]; ``part`` itself in a single process
    return gathered.reshape(-1, *part.shape[1:])[:count]


def resolve_device(name: str) -> torch.device:
    """``auto``: cuda when available, else cpu; any other name as torch reads it (``fewstep.options.check_device``
    has checked it first)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
