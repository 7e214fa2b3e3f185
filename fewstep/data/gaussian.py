"""A full-covariance Gaussian with an exact denoiser: the analytic benchmark for solvers."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class Gaussian(nn.Module):
    """N(mean, cov) with a full covariance; buffers default to float64 and follow `.to(dtype/device)`.

    The covariance is eigendecomposed once (cov = V diag(lam) V^T), so the denoiser, the sampler
    and the density each cost two matrix products. Every method computes in the dtype and device
    of its input tensor.
    """

    def __init__(self, mean: Tensor, cov: Tensor) -> None:
        super().__init__()
        mean = torch.as_tensor(mean, dtype=torch.float64)
        cov = torch.as_tensor(cov, dtype=torch.float64)
        if mean.ndim != 1 or cov.shape != (mean.shape[0], mean.shape[0]):
            raise ValueError(f"need mean [d] and cov [d, d], got {tuple(mean.shape)} and {tuple(cov.shape)}")
        if not torch.allclose(cov, cov.T, rtol=1e-10, atol=1e-12 * float(cov.abs().max())):
            raise ValueError("cov must be symmetric")
        cov = (cov + cov.T) / 2  # exactly symmetric, so that eigh returns an orthonormal basis
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)
        if not bool((eigenvalues > 0).all()):
            raise ValueError(f"cov must be positive definite, smallest eigenvalue {float(eigenvalues.min()):.3g}")
        self.register_buffer("loc", mean.clone())
        self.register_buffer("cov", cov.clone())
        self.register_buffer("eigenvalues", eigenvalues)
        self.register_buffer("eigenvectors", eigenvectors)

    @classmethod
    def benchmark(cls, dim: int = 64, seed: int = 0, min_std: float = 0.05, max_std: float = 1.0) -> Gaussian:
        """A seeded random rotation of standard deviations log-spaced in [min_std, max_std], with a small seeded mean.

        The spread of scales (20x by default) is what makes few-step solvers err: no single
        step size suits every direction.
        """
        generator = torch.Generator().manual_seed(seed)
        rotation = _random_rotation(dim, generator)
        stds = torch.logspace(math.log10(min_std), math.log10(max_std), dim, dtype=torch.float64)
        mean = 0.1 * torch.randn(dim, dtype=torch.float64, generator=generator)
        return cls(mean, rotation @ torch.diag(stds.square()) @ rotation.T)

    @property
    def dim(self) -> int:
        return self.loc.shape[0]

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n points [n, d], in the dtype and device of the buffers."""
        white = torch.randn(n, self.dim, dtype=self.loc.dtype, device=self.loc.device, generator=generator)
        return self.loc + (white * self.eigenvalues.sqrt()) @ self.eigenvectors.T

    def log_prob(self, x: Tensor) -> Tensor:
        """log density [B] of points x [B, d]."""
        loc, eigenvalues, eigenvectors = self._params_like(x)
        whitened = ((x - loc) @ eigenvectors).square() / eigenvalues
        return -0.5 * (whitened.sum(-1) + eigenvalues.log().sum() + self.dim * math.log(2 * math.pi))

    def denoiser(self, x: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None) -> Tensor:
        """Exact posterior mean E[x0 | x] = mean + cov (cov + sigma^2 I)^-1 (x - mean) for x = x0 + sigma * n.

        sigma: a float or a tensor with one value per row (any shape with B elements).
        class_labels: ignored (a Gaussian has one class); accepted so that any sampler can call it.
        """
        loc, eigenvalues, eigenvectors = self._params_like(x)
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, 1)  # [B or 1, 1]
        # In the eigenbasis the posterior mean shrinks each coordinate by lam / (lam + sigma^2).
        shrink = eigenvalues / (eigenvalues + sigma.square())  # [B or 1, d]
        return loc + (((x - loc) @ eigenvectors) * shrink) @ eigenvectors.T

    def mean(self) -> Tensor:
        """Mean [d]."""
        return self.loc

    def covariance(self) -> Tensor:
        """Covariance [d, d]."""
        return self.cov

    def _params_like(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return tuple(t.to(dtype=x.dtype, device=x.device) for t in (self.loc, self.eigenvalues, self.eigenvectors))


def _random_rotation(dim: int, generator: torch.Generator) -> Tensor:
    """A Haar-distributed orthogonal matrix: QR of a Gaussian matrix, with R's diagonal signs folded into Q."""
    q, r = torch.linalg.qr(torch.randn(dim, dim, dtype=torch.float64, generator=generator))
    return q * torch.sign(torch.diagonal(r))
