"""EDM's data set format: a .zip (or a folder) of images plus an optional dataset.json of class labels.

This is what EDM's ``dataset_tool.py`` writes (``python dataset_tool.py --source=... --dest=cifar10-32x32.zip``):
images ``00000/img00000000.png``, ... and ``dataset.json`` = ``{"labels": [["00000/img00000000.png", 6], ...]}``,
or ``{"labels": null}`` for an unconditional set. As in EDM's ``ImageFolderDataset``, the images are every
file PIL recognises by its extension, in sorted path order, and a set without labels has no classes.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset
from torchvision.transforms.v2 import functional as TF

from fewstep.data.images import MAX_IMAGE_SIDE, ImageDataModule, open_image
from fewstep.errors import DatasetNotFound, one_line
from fewstep.schema import MAX_CLASSES

HOW_TO_MAKE = (
    "make one with EDM's dataset_tool.py (python dataset_tool.py --source=DIR_OR_ARCHIVE --dest=NAME.zip), "
    "or point data.path at a folder of PNG images (labels, if any, in its dataset.json)"
)

# Bounds on what the files of a data set may make the reader allocate, each checked before the allocation.
MAX_DOWNSCALE = 16  # with data.resolution=N an image may be up to 16N a side (FFHQ's 1024 read at 64)
MAX_EDM_IMAGE_SIDE = 4096  # without data.resolution (EDM's data sets: 32 to 512; FFHQ's originals 1024)
MAX_DATASET_JSON_BYTES = 256 << 20  # dataset.json (ImageNet's 1.28M labels take about 45 MB)
METADATA_BYTES = 1 << 20  # what an image file may hold beyond its pixels (ICC profile, EXIF, text chunks)
IMAGE_FILE_BYTES_PER_PIXEL = 8  # an uncompressed 16-bit RGBA pixel: the most a pixel takes in an image file


class EDMZip(ImageDataModule):
    """Images and labels from an EDM data set zip or folder (``data.path``), decoded with PIL all at once.

    ``shape`` reads only the first image and ``num_classes`` only dataset.json (max label + 1; 0 without
    labels, as in EDM). Images in mode L stay grey, RGB as they are; any other mode is converted to RGB.
    Every kept image is held in memory as float32: CIFAR-10's 50,000 at 3 x 32 x 32 take 600 MB.
    """

    MAX_VALUE = 255.0

    def __init__(self, *, path: str | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.path = path
        self._names: list[str] | None = None
        self._native: tuple[int, int, int] | None = None  # (C, H, W) of the first image
        self._labels: torch.Tensor | None = None

    # ------------------------------------------------------------------ cheap metadata

    @property
    def shape(self) -> tuple[int, int, int]:
        channels, height, width = self._first_image_shape()
        if self.resolution is not None:
            return (channels, self.resolution, self.resolution)
        return (channels, height, width)

    @property
    def num_classes(self) -> int:
        labels = self._label_tensor()
        return int(labels.max()) + 1 if labels is not None and len(labels) else 0

    def _archive(self) -> _Archive:
        if self.path is None:
            raise DatasetNotFound(f"data=edm_zip needs data.path=PATH to a .zip or folder of images: {HOW_TO_MAKE}")
        max_side = MAX_EDM_IMAGE_SIDE if self.resolution is None else min(MAX_IMAGE_SIDE, MAX_DOWNSCALE * self.resolution)
        return _Archive(Path(self.path).expanduser(), max_side)

    def _image_names(self) -> list[str]:
        if self._names is None:
            with self._archive() as archive:
                self._names = archive.image_names()
        return self._names

    def _first_image_shape(self) -> tuple[int, int, int]:
        if self._native is None:
            names = self._image_names()
            with self._archive() as archive:
                self._native = tuple(archive.read_image(names[0]).shape)
        return self._native

    def _label_tensor(self) -> torch.Tensor | None:
        """int64 labels [N] in image order, or None for an unconditional set."""
        if self._labels is None:
            names = self._image_names()
            with self._archive() as archive:
                labels = archive.labels(names)
            self._labels = torch.empty(0, dtype=torch.int64) if labels is None else labels
        return self._labels if len(self._labels) else None

    # ------------------------------------------------------------------ loading

    def _make_datasets(self) -> tuple[Dataset, Dataset]:
        names = self._image_names()
        labels = self._label_tensor()
        if labels is None:
            labels = torch.zeros(len(names), dtype=torch.int64)  # unconditional: class 0 everywhere, never used
        expected = self._first_image_shape()
        train_idx, val_idx = self._split_indices(len(names))
        self._check_memory(len(train_idx) + len(val_idx), expected)
        with self._archive() as archive:  # decode only the images kept (data.limit)

            def dataset(indices: torch.Tensor) -> TensorDataset:
                images = torch.empty((len(indices), *expected), dtype=torch.uint8)
                for row, index in enumerate(indices.tolist()):
                    image = archive.read_image(names[index])
                    if tuple(image.shape) != expected:
                        raise DatasetNotFound(
                            f"{names[index]} in {self.path} is {_describe(image.shape)}, the first image "
                            f"{_describe(expected)}: all images of a data set must have one size and mode"
                        )
                    images[row] = image
                return TensorDataset(self._to_model_range(images), labels[indices])

            return dataset(train_idx), dataset(val_idx)

    def _check_memory(self, count: int, shape: tuple[int, int, int]) -> None:
        """Refuses a set whose decoded images cannot fit in this machine's memory, before allocating them: many
        small, well-compressed files can declare far more pixels than the archive's size suggests."""
        channels, height, width = shape
        side = self.resolution
        needed = count * channels * (height * width * 5 + (side * side * 4 if side else 0))  # uint8, float32, resized
        try:
            available = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):  # no sysconf (Windows): nothing to compare with
            return
        if needed > available:
            raise DatasetNotFound(one_line(
                f"{self.path}: its {count} images of {_describe(shape)} need {needed / 2**30:.1f} GiB in memory, more "
                f"than this machine's {available / 2**30:.1f} GiB: set data.limit=N, a smaller data.resolution, or "
                "make a smaller data set with EDM's dataset_tool.py --resolution"
            ))

    def _to_model_range(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(torch.float32) / self.MAX_VALUE * 2 - 1
        if self.resolution is not None and tuple(images.shape[-2:]) != (self.resolution, self.resolution):
            x = TF.resize(x, [self.resolution, self.resolution], antialias=True)
        return x.clamp(-1, 1).contiguous()


def _describe(shape) -> str:
    channels, height, width = shape
    return f"{width}x{height} with {channels} channel{'s' if channels != 1 else ''}"


class _Archive:
    """Read access to the files of a zip or a folder, by relative path with '/' separators; images no larger than
    ``max_side`` a side."""

    def __init__(self, path: Path, max_side: int = MAX_EDM_IMAGE_SIDE) -> None:
        self.path = path
        self.max_side = max_side
        self.zip: zipfile.ZipFile | None = None
        if path.is_dir():
            self.files = {
                Path(os.path.relpath(os.path.join(root, name), path)).as_posix()
                for root, _dirs, files in os.walk(path)
                for name in files
            }
        elif path.is_file():
            try:
                self.zip = zipfile.ZipFile(path)
            except (zipfile.BadZipFile, OSError) as error:
                raise DatasetNotFound(f"data.path={path} is not a readable zip ({error}): {HOW_TO_MAKE}") from error
            self.files = set(self.zip.namelist())
        else:
            raise DatasetNotFound(f"EDM data set not found at data.path={path}: {HOW_TO_MAKE}")

    def __enter__(self) -> _Archive:
        return self

    def __exit__(self, *exc) -> None:
        if self.zip is not None:
            self.zip.close()

    def read(self, name: str, max_bytes: int, bound: str) -> bytes:
        """The file's bytes, refused before reading when it declares more than ``max_bytes`` (a zip member's
        uncompressed size, a file's size on disk); ``bound`` says where that number comes from, for the message."""
        try:
            if self.zip is not None:
                size = self.zip.getinfo(name).file_size  # zipfile stops at this size, and checks the CRC there
            else:
                size = (self.path / name).stat().st_size
            if size > max_bytes:
                raise DatasetNotFound(one_line(
                    f"refusing {name} in {self.path}: it declares {size} bytes, more than the {max_bytes} {bound}: "
                    "the data set is damaged; remake it with EDM's dataset_tool.py (its --resolution resizes images)"
                ))
            if self.zip is not None:
                return self.zip.read(name)
            return (self.path / name).read_bytes()
        except (OSError, KeyError, zipfile.BadZipFile, EOFError) as error:
            raise DatasetNotFound(one_line(f"cannot read {name} from {self.path}: {error}")) from error

    def image_names(self) -> list[str]:
        import PIL.Image

        PIL.Image.init()
        names = sorted(name for name in self.files if os.path.splitext(name)[1].lower() in PIL.Image.EXTENSION)
        if not names:
            raise DatasetNotFound(f"no image files in data.path={self.path}: {HOW_TO_MAKE}")
        return names

    def read_image(self, name: str) -> torch.Tensor:
        """uint8 [C, H, W]: mode L as one channel, RGB as three, any other mode converted to RGB."""
        max_bytes = IMAGE_FILE_BYTES_PER_PIXEL * self.max_side**2 + METADATA_BYTES
        where = f"{name} in {self.path}"
        bound = f"an image file of at most {self.max_side}x{self.max_side} pixels can need"
        with open_image(io.BytesIO(self.read(name, max_bytes, bound)), where, self.max_side) as image:
            try:
                if image.mode not in ("L", "RGB"):
                    image = image.convert("RGB")
                array = np.asarray(image, dtype=np.uint8)
            except MemoryError:
                raise
            except Exception as error:  # the header read, the pixels do not decode (PIL raises many kinds)
                raise DatasetNotFound(one_line(f"cannot decode {where}: {type(error).__name__}: {error}")) from None
        if array.ndim == 2:
            array = array[:, :, None]
        return torch.from_numpy(array.transpose(2, 0, 1).copy())

    def labels(self, names: list[str]) -> torch.Tensor | None:
        """Class labels of ``names`` from dataset.json; None without the file or with ``"labels": null``."""
        if "dataset.json" not in self.files:
            return None
        where = f"dataset.json in {self.path}"
        try:
            labels = json.loads(self.read("dataset.json", MAX_DATASET_JSON_BYTES, "fewstep reads as labels"))["labels"]
        except RecursionError:  # json's parser recurses once per level of nesting
            raise DatasetNotFound(one_line(
                f"{where} nests deeper than a JSON parser can follow: EDM's format is {{\"labels\": [[file, label], ...]}}"
            )) from None
        except (ValueError, KeyError, TypeError) as error:
            raise DatasetNotFound(one_line(
                f"{where} is not EDM's format {{\"labels\": [[file, label], ...]}}: {str(error)[:200]!r}"
            )) from error
        if labels is None:
            return None
        pairs = labels if isinstance(labels, list) else None
        if pairs is None or not all(isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str) for pair in pairs):
            raise DatasetNotFound(one_line(
                f"{where}: labels must be a list of [file, label] pairs, as EDM's dataset_tool.py writes"
            ))
        by_name = {name.replace("\\", "/"): label for name, label in pairs}
        missing = [name for name in names if name not in by_name]
        if missing:
            raise DatasetNotFound(one_line(
                f"{where} has no label for {len(missing)} of {len(names)} images (first: {missing[0]})"
            ))
        values = [by_name[name] for name in names]
        if not all(isinstance(value, int) and not isinstance(value, bool) for value in values):
            raise DatasetNotFound(one_line(
                f"{where}: fewstep reads integer class labels >= 0 only, not vectors or other values"
            ))
        outside = next((name for name, value in zip(names, values) if not 0 <= value < MAX_CLASSES), None)
        if outside is not None:
            raise DatasetNotFound(one_line(
                f"{where}: the label {str(by_name[outside])[:30]} of {outside} is outside [0, {MAX_CLASSES}): class labels are "
                f"0, 1, ..., number of classes - 1, and fewstep reads at most {MAX_CLASSES} classes"
            ))
        return torch.tensor(values, dtype=torch.int64)
