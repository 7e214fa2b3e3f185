"""The DataLoader settings every fewstep DataModule uses."""

from __future__ import annotations

from torch.utils.data import DataLoader, Dataset


def make_loader(dataset: Dataset, batch_size: int, num_workers: int, train: bool) -> DataLoader:
    """Shuffled, full batches for training; in order for validation."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train,
        drop_last=train and len(dataset) >= batch_size,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )
