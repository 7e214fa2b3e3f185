"""Domain FID's feature network: a small classifier trained on the data set itself, once, then cached.

Its penultimate features replace Inception's in torchmetrics' FrechetInceptionDistance. The numbers
it gives are cheap on a CPU and rank samples of one data set well, but they are not standard FID:
report them as `fid_domain`, and never compare them with published FIDs or across data sets.
"""

from __future__ import annotations

import hashlib
import json
import logging
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewstep.errors import ConfigError

log = logging.getLogger(__name__)

# Raise when the network or its training changes, so that older cached weights are not reused.
ARCH_VERSION = 2
FEATURE_DIM = 128


class DomainClassifier(nn.Module):
    """Images [N, C, H, W] in [-1, 1] (C = 1 or 3; 8x8 to 32x32 or so) -> class logits [N, num_classes].

    Three 3x3 conv layers (the last two halve the resolution, and the first too from 16x16 up, which
    keeps 28x28 training cheap on a CPU), average pooling to 2x2 (global pooling lost the layout of
    strokes and trained to half the accuracy), a feature layer of FEATURE_DIM units and a linear head.
    """

    def __init__(self, in_channels: int, num_classes: int, size: int, widths: tuple[int, int, int] = (32, 64, 128)):
        super().__init__()
        w1, w2, w3 = widths
        stem_stride = 2 if size >= 16 else 1
        self.convs = nn.Sequential(
            nn.Conv2d(in_channels, w1, 3, stride=stem_stride, padding=1),
            nn.SiLU(),
            nn.Conv2d(w1, w2, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(w2, w3, 3, stride=2, padding=1),
            nn.SiLU(),
        )
        # SiLU rather than ReLU: dead units would give features of zero variance, useless to FID.
        self.feature = nn.Sequential(nn.Linear(w3 * 4, FEATURE_DIM), nn.SiLU())
        self.head = nn.Linear(FEATURE_DIM, num_classes)
        self.size = size

    def features(self, x: Tensor) -> Tensor:
        return self.feature(F.adaptive_avg_pool2d(self.convs(x), 2).flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class DomainFeatures(nn.Module):
    """uint8 images [N, C, H, W] -> a trained DomainClassifier's features [N, FEATURE_DIM] in float32.

    A torchmetrics feature extractor (it has `num_features`), frozen and always in eval mode.
    `accuracy` is the classifier's held-out accuracy, to report beside the FID it gives.
    """

    num_features = FEATURE_DIM  # torchmetrics' FrechetInceptionDistance reads this from a custom extractor

    def __init__(self, classifier: DomainClassifier, accuracy: float = float("nan"), path: Path | None = None):
        super().__init__()
        self.classifier = classifier
        self.accuracy = accuracy
        self.path = path
        self.classifier.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> DomainFeatures:
        # A parent's .train() (a LightningModule holding the metric) must not change the features.
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"DomainFeatures takes uint8 images in [0, 255], got {images.dtype}")
        dtype = self.classifier.head.weight.dtype
        return self.classifier.features(to_model_range(images).to(dtype)).float()


def to_model_range(images: Tensor) -> Tensor:
    """uint8 [0, 255] -> float32 [-1, 1] as the DataModules map pixels; float input is taken to be [-1, 1] already."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32) / 127.5 - 1
    return images.to(torch.float32)


# ---------------------------------------------------------------- training, once per data set


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 4
    batch_size: int = 64
    lr: float = 2e-3
    holdout: float = 0.1  # the fraction kept out of training to measure accuracy
    seed: int = 0


def domain_features(
    data_name: str,
    images: Tensor,
    labels: Tensor | None,
    num_classes: int,
    cache_dir: Path,
    *,
    epochs: int = 4,
    seed: int = 0,
) -> DomainFeatures:
    """The domain-FID feature extractor for a data set: trained on (images, labels) the first time, then loaded.

    images: [N, C, H, W], uint8 or float in [-1, 1]; labels: int [N]. The weights and the held-out
    accuracy go to `cache_dir / domain_{data_name}_{H}x{W}_{hash}.pt`.
    """
    if labels is None or num_classes < 2:
        raise ConfigError(
            f"domain FID needs class labels to train its classifier, and data '{data_name}' has none: "
            "use standard FID (fid) instead"
        )
    settings = TrainSettings(epochs=epochs, seed=seed)
    path = cache_path(data_name, tuple(images.shape[1:]), num_classes, len(images), settings, Path(cache_dir))
    if path.is_file():
        return load_features(path)
    classifier, accuracy = train_classifier(images, labels, num_classes, settings)
    save_features(path, classifier, accuracy, data_name)
    return DomainFeatures(classifier, accuracy, path)


def cache_path(
    data_name: str, shape: tuple[int, ...], num_classes: int, n: int, settings: TrainSettings, cache_dir: Path
) -> Path:
    identity = dict(
        data=data_name, shape=list(shape), num_classes=num_classes, n=n, arch=ARCH_VERSION, **asdict(settings)
    )
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir / f"domain_{data_name}_{shape[-2]}x{shape[-1]}_{digest}.pt"


def train_classifier(
    images: Tensor, labels: Tensor, num_classes: int, settings: TrainSettings
) -> tuple[DomainClassifier, float]:
    """A few epochs of Adam on a seeded (1 - holdout) share; returns the classifier and its held-out accuracy."""
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    x, y = to_model_range(images), labels.long()
    order = torch.randperm(len(x), generator=generator)
    n_holdout = max(1, round(settings.holdout * len(x)))
    test, train = order[:n_holdout], order[n_holdout:]
    classifier = DomainClassifier(x.shape[1], num_classes, min(x.shape[-2:]))
    optimizer = torch.optim.Adam(classifier.parameters(), lr=settings.lr)
    steps = settings.epochs * -(-len(train) // settings.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, settings.lr, total_steps=steps)
    log.info(f"domain FID: training its classifier on {len(train)} images ({settings.epochs} epochs)")
    classifier.train()
    with one_thread():
        for _ in range(settings.epochs):
            for batch in train[torch.randperm(len(train), generator=generator)].split(settings.batch_size):
                loss = F.cross_entropy(classifier(x[batch]), y[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
    classifier.eval()
    return classifier, accuracy(classifier, x[test], y[test])


@contextmanager
def one_thread():
    """Run torch's CPU ops on one thread, then restore the setting.

    The network is too small to gain from more, and on a shared CPU two threads made mnist5k's training
    40x slower (40 s instead of 1 s an epoch): each small op waits for a thread that another process holds.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def accuracy(classifier: DomainClassifier, x: Tensor, y: Tensor, batch_size: int = 512) -> float:
    predictions = torch.cat([classifier(batch).argmax(1) for batch in x.split(batch_size)])
    return (predictions == y).float().mean().item()


def save_features(path: Path, classifier: DomainClassifier, accuracy: float, data_name: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    record = dict(
        state_dict=classifier.state_dict(),
        in_channels=classifier.convs[0].in_channels,
        num_classes=classifier.head.out_features,
        size=classifier.size,
        accuracy=accuracy,
        data_name=data_name,
        arch=ARCH_VERSION,
    )
    # Write then rename, so an interrupted run never leaves a half-written file to be loaded later.
    partial = path.with_suffix(".partial")
    torch.save(record, partial)
    partial.replace(path)
    log.info(f"domain FID: classifier held-out accuracy {accuracy:.4f}, saved to {path}")


def load_features(path: Path) -> DomainFeatures:
    record = torch.load(path, map_location="cpu", weights_only=True)
    classifier = DomainClassifier(record["in_channels"], record["num_classes"], record["size"])
    classifier.load_state_dict(record["state_dict"])
    log.info(f"domain FID: loaded its classifier (held-out accuracy {record['accuracy']:.4f}) from {path}")
    return DomainFeatures(classifier, record["accuracy"], path)
