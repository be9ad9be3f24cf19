"""Labelled image sets for training and evaluation, decoded exactly as the server decodes uploads.

Every image is handed out as ``uint8 [H, W, 3]`` RGB, the array the HTTP layer produces, and
turned into pixels by the server's own ``pixels_from_uint8``: what the λ-net and the head are
trained on is bit for bit what they will see when serving. Fashion-MNIST's 28x28 grayscale
images become RGB by replicating the channel, which is what PIL's ``convert("RGB")`` does to
an uploaded grayscale PNG.

Each set carries a ``fingerprint`` (a digest of its pixels and labels) so that the feature
cache can never serve features of different data under the same key.
"""

from __future__ import annotations

import gzip
import hashlib
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from app.backbones.preprocess import pixels_from_uint8

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass
class ImageSet:
    """Images with integer labels. ``images`` is either one uint8 array ``[N, H, W]`` (gray) /
    ``[N, H, W, 3]`` (RGB), or a list of files decoded on access (image-folder trees)."""

    images: np.ndarray | list[Path]
    labels: np.ndarray  # int64 [N]
    classes: list[str]
    name: str = "images"
    max_pixels: int = 40_000_000
    _fingerprint: str | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.labels)

    def rgb(self, index: int, min_side: int = 0) -> np.ndarray:
        """Image ``index`` as ``uint8 [H, W, 3]`` RGB, as the server would decode the upload."""
        if isinstance(self.images, np.ndarray):
            image = self.images[index]
            return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image
        from app.backbones.images import decode_image  # the server's decoder: EXIF, modes, JPEG draft

        return decode_image(self.images[index].read_bytes(), max_pixels=self.max_pixels, min_side=min_side)

    def pixels(self, indices: Sequence[int] | np.ndarray, input_size: int) -> Tensor:
        """``[B, 3, S, S]`` float pixels in ``[0, 1]``: the server's preprocessing, image by image."""
        return torch.stack([pixels_from_uint8(self.rgb(int(i), min_side=input_size), input_size) for i in indices])

    def batches(self, input_size: int, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        for start in range(0, len(self), batch_size):
            idx = range(start, min(start + batch_size, len(self)))
            yield self.pixels(idx, input_size), torch.as_tensor(self.labels[start : idx.stop])

    def subset(self, indices: Sequence[int] | np.ndarray, name: str | None = None) -> ImageSet:
        indices = np.asarray(indices, dtype=np.int64)
        images = self.images[indices] if isinstance(self.images, np.ndarray) else [self.images[i] for i in indices]
        return ImageSet(images, self.labels[indices], list(self.classes), name or self.name, self.max_pixels)

    @property
    def fingerprint(self) -> str:
        """sha256 of the labels, the class names and the image bytes (file contents for folders)."""
        if self._fingerprint is None:
            digest = hashlib.sha256()
            digest.update("\x1f".join(self.classes).encode())
            digest.update(np.ascontiguousarray(self.labels, dtype=np.int64).tobytes())
            if isinstance(self.images, np.ndarray):
                digest.update(str(self.images.shape).encode())
                digest.update(np.ascontiguousarray(self.images).tobytes())
            else:
                for path in self.images:
                    digest.update(hashlib.sha256(path.read_bytes()).digest())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint


# -- Fashion-MNIST (IDX files from the Debian package dataset-fashion-mnist) -------------------


def _read_idx(path: Path, magic: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    found, count = struct.unpack(">II", data[:8])
    if found != magic:
        raise ValueError(f"{path}: not an IDX file with magic {magic} (found {found})")
    if magic == 2049:  # labels
        return np.frombuffer(data, dtype=np.uint8, count=count, offset=8).astype(np.int64)
    rows, cols = struct.unpack(">II", data[8:16])
    return np.frombuffer(data, dtype=np.uint8, count=count * rows * cols, offset=16).reshape(count, rows, cols)


def fashion_mnist(split: str = "train", root: Path = FASHION_MNIST_ROOT) -> ImageSet:
    """Fashion-MNIST ``train`` (60k) or ``test`` (10k): gray ``[N, 28, 28]`` uint8, 10 classes."""
    prefix = {"train": "train", "test": "t10k"}[split]
    if not (root / f"{prefix}-images-idx3-ubyte.gz").exists():
        raise FileNotFoundError(f"Fashion-MNIST is not in {root}: `apt-get install dataset-fashion-mnist`")
    images = _read_idx(root / f"{prefix}-images-idx3-ubyte.gz", 2051)
    labels = _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz", 2049)
    return ImageSet(images, labels, list(FASHION_MNIST_CLASSES), f"fashion-mnist-{split}")


# -- image-folder trees: root/<class>/<image> -----------------------------------------------------


def image_folder(root: str | Path, classes: Sequence[str] | None = None) -> ImageSet:
    """``root/<class name>/*.png|jpg|...``; classes sorted by folder name unless given."""
    root = Path(root)
    names = list(classes) if classes is not None else sorted(p.name for p in root.iterdir() if p.is_dir())
    if not names:
        raise FileNotFoundError(f"{root} has no class folders")
    files: list[Path] = []
    labels: list[int] = []
    for label, class_name in enumerate(names):
        folder = root / class_name
        for path in sorted(folder.rglob("*")):
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                files.append(path)
                labels.append(label)
    if not files:
        raise FileNotFoundError(f"{root} has no images ({', '.join(IMAGE_SUFFIXES)})")
    return ImageSet(files, np.asarray(labels, dtype=np.int64), names, root.name)


# -- choosing the data: one spec string for the CLI ----------------------------------------------


@dataclass(frozen=True)
class Splits:
    train: ImageSet
    val: ImageSet
    test: ImageSet | None


def random_split(n: int, sizes: Sequence[int], seed: int) -> list[np.ndarray]:
    """Disjoint random index sets of the given sizes (sorted, so caches read in file order)."""
    if sum(sizes) > n:
        raise ValueError(f"asked for {sum(sizes)} items of {n}")
    order = np.random.default_rng(seed).permutation(n)
    out, start = [], 0
    for size in sizes:
        out.append(np.sort(order[start : start + size]))
        start += size
    return out


def load_splits(
    data: str,
    *,
    train_size: int | None = None,
    val_size: int | None = None,
    test_size: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> Splits:
    """``data`` is ``fashion-mnist`` or an image-folder root.

    The validation set is always carved out of the training data (never the test set). An
    image folder with ``train/`` (and optionally ``val/``, ``test/``) subfolders uses them;
    a plain class-per-folder tree is all training data.
    """
    base = data if data == "fashion-mnist" else Path(data).name
    if data == "fashion-mnist":
        full_train, full_test = fashion_mnist("train"), fashion_mnist("test")
        test_indices = random_split(len(full_test), [test_size or len(full_test)], seed)[0]
        test: ImageSet | None = full_test.subset(test_indices)
        given_val = None
    else:
        root = Path(data)
        if (root / "train").is_dir():
            full_train = image_folder(root / "train")
            given_val = image_folder(root / "val", full_train.classes) if (root / "val").is_dir() else None
            test = image_folder(root / "test", full_train.classes) if (root / "test").is_dir() else None
            if test is not None and test_size is not None:
                test = test.subset(random_split(len(test), [min(test_size, len(test))], seed)[0])
        else:
            full_train, given_val, test = image_folder(root), None, None
    if given_val is not None:
        train_idx = random_split(len(full_train), [min(train_size or len(full_train), len(full_train))], seed)[0]
        val = given_val.subset(random_split(len(given_val), [min(val_size or len(given_val), len(given_val))], seed)[0])
        return Splits(full_train.subset(train_idx), val, test)
    n = len(full_train)
    n_val = val_size if val_size is not None else max(1, round(n * val_fraction))
    n_train = train_size if train_size is not None else n - n_val
    train_idx, val_idx = random_split(n, [n_train, n_val], seed)
    return Splits(full_train.subset(train_idx, f"{base}-train"), full_train.subset(val_idx, f"{base}-val"), test)


def load_test(data: str, *, test_size: int | None = None, seed: int = 0, split: str = "test") -> ImageSet:
    """The evaluation set: Fashion-MNIST's test split, or ``<root>/test`` (or ``root`` itself)."""
    if data == "fashion-mnist":
        full = fashion_mnist(split)
    else:
        root = Path(data)
        full = image_folder(root / split) if (root / split).is_dir() else image_folder(root)
    if test_size is None or test_size >= len(full):
        return full
    return full.subset(random_split(len(full), [test_size], seed)[0])
