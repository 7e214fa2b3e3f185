"""Diagonal Gaussian mixtures with an exact denoiser, and a data module sampling from one."""

from __future__ import annotations

import math

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from fewstep.data.loaders import ResumableTrainOrder, make_loader
from fewstep.errors import ConfigError, one_line


class GaussianMixture(nn.Module):
    """sum_k pi_k N(mu_k, diag(s_k^2)); buffers default to float64 and follow `.to(dtype/device)`.

    Every method computes in the dtype and device of its input tensor.
    """

    def __init__(self, means: Tensor, stds: Tensor, weights: Tensor | None = None) -> None:
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim != 2:
            raise ValueError(f"means must be [K, d], got shape {tuple(means.shape)}")
        modes, dim = means.shape
        stds = torch.as_tensor(stds, dtype=torch.float64)
        if stds.shape == (modes,):
            stds = stds[:, None].expand(modes, dim)
        if stds.shape != (modes, dim) or not bool((stds > 0).all()):
            raise ValueError(f"stds must be positive with shape [K] or [K, d] = [{modes}, {dim}]")
        weights = torch.ones(modes) if weights is None else torch.as_tensor(weights)
        weights = weights.to(torch.float64)
        if weights.shape != (modes,) or not bool((weights >= 0).all()) or not weights.sum() > 0:
            raise ValueError(f"weights must be non-negative with shape [K] = [{modes}] and a positive sum")
        self.register_buffer("means", means.clone())
        self.register_buffer("stds", stds.clone())
        self.register_buffer("weights", weights / weights.sum())

    @classmethod
    def benchmark(
        cls, dim: int = 2, modes: int = 8, radius: float = 1.0, std: float = 0.1, seed: int = 0
    ) -> GaussianMixture:
        """Equal-weight isotropic modes at distance `radius` from the origin.

        dim=2: evenly spaced on a circle (seed unused); dim>2: at seeded random directions.
        """
        if dim == 2:
            angles = torch.arange(modes, dtype=torch.float64) * (2 * math.pi / modes)
            means = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
        else:
            directions = torch.randn(modes, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
            means = radius * directions / directions.norm(dim=1, keepdim=True)
        return cls(means, torch.full((modes,), float(std), dtype=torch.float64))

    @property
    def num_modes(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """n points [n, d] and the index of the mode each came from [n]."""
        labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, dtype=self.means.dtype, device=self.means.device, generator=generator)
        return self.means[labels] + self.stds[labels] * noise, labels

    def log_prob(self, x: Tensor) -> Tensor:
        """log density [B] of points x [B, d]."""
        means, stds, weights = self._params_like(x)
        return torch.logsumexp(weights.log() + _diag_normal_log_prob(x, means, stds.square()), dim=1)

    def denoiser(self, x: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None) -> Tensor:
        """Exact posterior mean E[x0 | x] for x = x0 + sigma * n, n ~ N(0, I), x0 from the mixture.

        sigma: a float or a tensor with one value per row (any shape with B elements).
        class_labels: condition on the given mode of each row instead of averaging over modes.
        """
        means, stds, weights = self._params_like(x)
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, 1, 1)  # [B or 1, 1, 1]
        prior_var = stds.square()  # [K, d]
        noisy_var = prior_var + sigma.square()  # [B or 1, K, d]
        # Per-mode posterior mean: Gaussian shrinkage of x towards mu_k.
        mode_means = means + prior_var / noisy_var * (x[:, None, :] - means)  # [B, K, d]
        if class_labels is None:
            # Responsibilities under the noisy marginal N(mu_k, s_k^2 + sigma^2).
            responsibilities = torch.softmax(weights.log() + _diag_normal_log_prob(x, means, noisy_var), dim=1)
        else:
            responsibilities = nn.functional.one_hot(class_labels.long(), self.num_modes).to(x.dtype)
        return torch.einsum("bk,bkd->bd", responsibilities, mode_means)

    def mean(self) -> Tensor:
        """Mixture mean [d]."""
        return self.weights @ self.means

    def covariance(self) -> Tensor:
        """Mixture covariance [d, d]: sum_k pi_k (diag(s_k^2) + mu_k mu_k^T) - m m^T."""
        centered = self.means - self.mean()
        between = centered.T @ (self.weights[:, None] * centered)
        return between + torch.diag(self.weights @ self.stds.square())

    def _params_like(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return tuple(t.to(dtype=x.dtype, device=x.device) for t in (self.means, self.stds, self.weights))


def _diag_normal_log_prob(x: Tensor, means: Tensor, variances: Tensor) -> Tensor:
    """log N(x_b; mu_k, diag(variances)) as [B, K]; variances is [K, d] or [B, K, d]."""
    squared = (x[:, None, :] - means).square() / variances
    return -0.5 * (squared + (2 * math.pi * variances).log()).sum(-1)


class GMMDataModule(ResumableTrainOrder, L.LightningDataModule):
    """A fixed data set drawn once from `GaussianMixture.benchmark`; batches (x float32 [B, d], y int64 mode [B])."""

    def __init__(
        self,
        *,
        dim: int = 2,
        modes: int = 8,
        std: float = 0.1,
        radius: float = 1.0,
        n_train: int = 4096,
        val_size: int = 512,
        batch_size: int = 256,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        minimums = {"dim": (dim, 1), "modes": (modes, 1), "n_train": (n_train, 1), "batch_size": (batch_size, 1)}
        minimums |= {"val_size": (val_size, 0), "num_workers": (num_workers, 0)}
        for name, (value, low) in minimums.items():
            if value < low:
                raise ConfigError(one_line(f"data.{name} must be >= {low}, got {value}"))
        if not std > 0:
            raise ConfigError(f"data.std must be > 0, got {std}")
        self.n_train = n_train
        self.val_size = val_size
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.mixture = GaussianMixture.benchmark(dim=dim, modes=modes, radius=radius, std=std, seed=seed)
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    @property
    def shape(self) -> tuple[int]:
        return (self.mixture.dim,)

    @property
    def num_classes(self) -> int:
        return self.mixture.num_modes

    @property
    def denoiser(self):
        """The exact denoiser `(x, sigma, class_labels=None) -> E[x0 | x]` of the data distribution."""
        return self.mixture.denoiser

    def setup(self, stage: str | None = None) -> None:
        """Draw the data once; later calls do nothing."""
        if self.train_set is not None:
            return
        x, y = self.mixture.sample(self.n_train + self.val_size, generator=torch.Generator().manual_seed(self.seed))
        x = x.to(torch.float32)
        self.train_set = TensorDataset(x[: self.n_train], y[: self.n_train])
        self.val_set = TensorDataset(x[self.n_train :], y[self.n_train :])

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self.train_loader(self.train_set)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return make_loader(self.val_set, self.batch_size, self.num_workers, train=False)
