"""The DataLoader settings every fewstep DataModule uses, and the resumable order of training samples."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class ResumableSampler(Sampler[int]):
    """An endless stream of per-epoch permutations (epoch e: randperm(n) seeded by (seed, e)) from any position.

    The samples a run sees depend only on the seed and the position in the stream, so a run resumed at
    step s (``start_step``) sees what the uninterrupted run saw from step s on. With ``world`` ranks the
    stream is cut into consecutive chunks of ``batch_size``, chunk j going to rank j mod world: together
    the ranks see at each step the samples one process sees with a global batch of world x batch_size.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, start_step: int = 0, rank: int = 0, world: int = 1):
        super().__init__()
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start_step, self.rank, self.world = start_step, rank, world

    def permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=generator)

    def __iter__(self) -> Iterator[int]:
        step, epoch, order = self.start_step, -1, None
        while True:
            chunk = step * self.world + self.rank
            for position in range(chunk * self.batch_size, (chunk + 1) * self.batch_size):
                if position // self.n != epoch:
                    epoch = position // self.n
                    order = self.permutation(epoch)
                yield int(order[position % self.n])
            step += 1


def make_loader(
    dataset: Dataset, batch_size: int, num_workers: int, train: bool, seed: int = 0, start_step: int = 0,
    rank: int = 0, world: int = 1,
) -> DataLoader:
    """Training: full batches in the ResumableSampler's order (an endless loader: runs are bounded by
    max_steps); validation: in order. The loader's own generator seeds the workers, so creating an
    iterator draws nothing from torch's global generator (a resumed run's randomness stays in step)."""
    common = {"batch_size": batch_size, "num_workers": num_workers, "persistent_workers": num_workers > 0}
    if not train:
        return DataLoader(dataset, shuffle=False, **common)
    sampler = ResumableSampler(len(dataset), batch_size, seed, start_step, rank, world)
    return DataLoader(dataset, sampler=sampler, generator=torch.Generator().manual_seed(seed), **common)


class ResumableTrainOrder:
    """For LightningDataModules with ``batch_size``, ``num_workers`` and ``seed``: a training loader in
    ResumableSampler order for this rank, and the step reached in the DataModule's state_dict (which
    Lightning writes into every checkpoint), so that a resumed run continues the same sample order."""

    start_step: int = 0

    def train_loader(self, dataset: Dataset) -> DataLoader:
        trainer = getattr(self, "trainer", None)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        return make_loader(dataset, self.batch_size, self.num_workers, True, self.seed, self.start_step, rank, world)

    def state_dict(self) -> dict:
        trainer = getattr(self, "trainer", None)
        return {"train_step": trainer.global_step if trainer is not None else self.start_step}

    def load_state_dict(self, state: dict) -> None:
        self.start_step = int(state.get("train_step", 0))
