"""Drawing samples from a trained method: seeds, class labels and guidance around ``samplers.sample``."""

from __future__ import annotations

import torch

from fewstep.samplers import CountingDenoiser, SeededNoise, guided_denoiser, sample


@torch.no_grad()
def generate(
    method, n: int, sampler: str, nfe: int, seed: int = 0, guidance: float = 0.0, batch_size: int = 256,
    grid: str = "karras",
    **solver_options,
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Draw ``n`` samples from ``method.denoiser``; sample i depends on seed ``seed + i`` only.

    Conditional methods get class labels i mod num_classes and classifier-free guidance ``guidance``.
    Returns (samples, labels or None, NFE per sample as counted).
    """
    if solver_options.get("sigma_data", 0.5) is None:  # lazy samplers: the data scale the model was trained with
        solver_options["sigma_data"] = float(method.hparams.get("sigma_data", 0.5))
    shape = tuple(method.hparams.data_shape)
    labels = torch.arange(n, device=method.device) % method.num_classes if method.num_classes else None
    out, nfe_used = [], 0
    for start in range(0, n, batch_size):
        seeds = range(seed + start, seed + min(n, start + batch_size))
        noise = SeededNoise(seeds, method.device)
        denoiser = method.denoiser
        if labels is not None:
            denoiser = guided_denoiser(denoiser, guidance, labels[start : start + len(seeds)], method.null_label)
        counted = CountingDenoiser(denoiser)
        out.append(sample(counted, noise.randn(shape), sampler, nfe, generator=noise, grid=grid, **solver_options))
        nfe_used = counted.nfe
    return torch.cat(out), labels, nfe_used
