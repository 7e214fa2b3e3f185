"""Drawing samples from a trained method: seeds, class labels and guidance around ``samplers.sample``."""

from __future__ import annotations

import torch

from fewstep.samplers import SeededNoise


@torch.no_grad()
def generate(
    method, n: int, sampler: str, nfe: int, seed: int = 0, guidance: float = 0.0, batch_size: int = 256,
    grid: str | None = None,
    **solver_options,
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Draw ``n`` samples from ``method.denoiser``; sample i depends on seed ``seed + i`` only.

    Conditional methods get class labels i mod num_classes and classifier-free guidance ``guidance``.
    ``grid`` None is the method's default time grid. Returns (samples, labels or None, NFE per sample as counted).
    """
    labels = torch.arange(n, device=method.device) % method.num_classes if method.num_classes else None
    out, nfe_used = [], 0
    for start in range(0, n, batch_size):
        seeds = range(seed + start, seed + min(n, start + batch_size))
        noise = SeededNoise(seeds, method.device)
        batch_labels = None if labels is None else labels[start : start + len(seeds)]
        samples, nfe_used = method.sample_batch(noise, sampler, nfe, batch_labels, guidance, grid, **dict(solver_options))
        out.append(samples)
    return torch.cat(out), labels, nfe_used
