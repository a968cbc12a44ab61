"""Data: Fashion-MNIST from Debian's package, split into train / validation / calibration / test.

Fashion-MNIST is small enough to hold in memory as one tensor, which on a 2-core machine is much
faster than per-image loading. The split rules are the part that matters for NAS:

* ``val`` is held out from the *training* file; candidates are scored on it during search.
* ``calib`` is a fixed, seeded subset of the remaining training images; BN statistics of every
  candidate are recalibrated on exactly these images.
* ``test`` is the test file, used only to report stand-alone accuracy.

Batches come from :class:`BatchPlan`, a deterministic function of (seed, epoch, step), so a
resumed run sees the same data order as an uninterrupted one and every rank of a distributed run
can take its own slice of the same global batch.
"""

from __future__ import annotations

import gzip
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from fairnas.config import DataConfig

logger = logging.getLogger(__name__)

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte", "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
)
# Mean and standard deviation of the Fashion-MNIST training images (pixel values in [0, 1]).
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530


@dataclass
class TensorSplit:
    """Images (float, normalised, N x C x H x W) and integer labels held in memory."""

    images: torch.Tensor
    labels: torch.Tensor
    source: str  # which file the images came from, for the leak check
    indices: torch.Tensor  # positions of the images in that file

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, positions: torch.Tensor) -> TensorSplit:
        return TensorSplit(self.images[positions], self.labels[positions], self.source,
                           self.indices[positions])


@dataclass
class DataSplits:
    """Everything a FairNAS run reads."""

    train: TensorSplit
    val: TensorSplit
    calib: TensorSplit
    test: TensorSplit
    num_classes: int
    input_channels: int
    input_size: int

    def check_no_leaks(self) -> None:
        """Scoring images (val) must be disjoint from training and from test images."""
        _check_disjoint(self.val, self.train, "validation", "training")
        _check_disjoint(self.val, self.test, "validation", "test")
        _check_disjoint(self.calib, self.val, "calibration", "validation")


def _check_disjoint(a: TensorSplit, b: TensorSplit, name_a: str, name_b: str) -> None:
    if a.source != b.source:
        return
    overlap = set(a.indices.tolist()) & set(b.indices.tolist())
    if overlap:
        raise RuntimeError(
            f"{name_a} and {name_b} images overlap in {len(overlap)} images of {a.source}; "
            f"the split is broken"
        )


def default_data_root() -> Path:
    return Path(os.environ.get("FAIRNAS_DATA", Path.cwd() / "data"))


def prepare_fashion_mnist(root: Path, source: Path = DEBIAN_FASHION_MNIST) -> Path:
    """Unpack Debian's gzip files into torchvision's ``FashionMNIST/raw`` layout under ``root``."""
    raw = Path(root) / "FashionMNIST" / "raw"
    missing = [name for name in FASHION_MNIST_FILES if not (raw / name).exists()]
    if not missing:
        return raw
    if not source.is_dir():
        raise FileNotFoundError(
            f"Fashion-MNIST not found: {raw} lacks {missing} and {source} does not exist. "
            f"Install Debian's package (as root: apt-get install dataset-fashion-mnist), or "
            f"place the four idx files under {raw}."
        )
    raw.mkdir(parents=True, exist_ok=True)
    for name in missing:
        archive = source / f"{name}.gz"
        if not archive.exists():
            raise FileNotFoundError(f"{archive} is missing from the Fashion-MNIST package")
        partial = raw / f".{name}.partial"
        with gzip.open(archive, "rb") as packed, open(partial, "wb") as unpacked:
            shutil.copyfileobj(packed, unpacked)
        os.replace(partial, raw / name)
    logger.info("unpacked Fashion-MNIST into %s", raw)
    return raw


def _fashion_mnist_tensors(root: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from torchvision.datasets import FashionMNIST

    prepare_fashion_mnist(root)
    dataset = FashionMNIST(str(root), train=train, download=False)
    images = dataset.data.unsqueeze(1).float().div_(255)
    images = images.sub_(FASHION_MNIST_MEAN).div_(FASHION_MNIST_STD)
    return images, dataset.targets.long()


def load_fashion_mnist(
    root: Path | None = None,
    *,
    val_size: int = 5000,
    calib_size: int = 2048,
    split_seed: int = 0,
    train_limit: int | None = None,
    test_limit: int | None = None,
) -> DataSplits:
    """Fashion-MNIST with a seeded validation split held out from the training file."""
    root = Path(root) if root is not None else default_data_root()
    train_images, train_labels = _fashion_mnist_tensors(root, train=True)
    test_images, test_labels = _fashion_mnist_tensors(root, train=False)
    full_train = TensorSplit(train_images, train_labels, "fashion-mnist/train",
                             torch.arange(len(train_labels)))
    test = TensorSplit(test_images, test_labels, "fashion-mnist/test",
                       torch.arange(len(test_labels)))
    return split_train(full_train, test, val_size=val_size, calib_size=calib_size,
                       split_seed=split_seed, train_limit=train_limit, test_limit=test_limit,
                       num_classes=10)


def split_train(
    full_train: TensorSplit,
    test: TensorSplit,
    *,
    val_size: int,
    calib_size: int,
    split_seed: int,
    num_classes: int,
    train_limit: int | None = None,
    test_limit: int | None = None,
) -> DataSplits:
    """Hold out ``val_size`` training images; draw the calibration set from the rest."""
    n = len(full_train)
    if not 0 < val_size < n:
        raise ValueError(f"val_size should be in (0, {n}), got {val_size}")
    generator = torch.Generator().manual_seed(split_seed)
    order = torch.randperm(n, generator=generator)
    val = full_train.subset(order[:val_size])
    train = full_train.subset(order[val_size:])
    if train_limit is not None:
        train = train.subset(torch.arange(min(train_limit, len(train))))
    if not 0 < calib_size <= len(train):
        raise ValueError(f"calib_size should be in (0, {len(train)}], got {calib_size}")
    calib = train.subset(torch.randperm(len(train), generator=generator)[:calib_size])
    if test_limit is not None:
        test = test.subset(torch.arange(min(test_limit, len(test))))
    splits = DataSplits(train, val, calib, test, num_classes,
                        full_train.images.shape[1], full_train.images.shape[-1])
    splits.check_no_leaks()
    return splits


class BatchPlan:
    """Deterministic batches: the order of epoch ``e`` depends only on ``(seed, e)``.

    With ``world_size > 1`` every rank reads the same global batch and keeps its own contiguous
    slice, so the union over ranks is the batch a single process would see.
    """

    def __init__(
        self, num_items: int, batch_size: int, *, seed: int, drop_last: bool = True,
        rank: int = 0, world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size should be >= 1, got {batch_size}")
        if batch_size % world_size:
            raise ValueError(
                f"batch_size should be divisible by the number of processes ({world_size}), "
                f"got {batch_size}"
            )
        if num_items < batch_size and drop_last:
            raise ValueError(f"batch_size {batch_size} is larger than the data ({num_items})")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.drop_last, self.rank, self.world_size = drop_last, rank, world_size

    def __len__(self) -> int:
        full, rest = divmod(self.num_items, self.batch_size)
        return full + (0 if self.drop_last or rest == 0 else 1)

    def batches(self, epoch: int, start: int = 0) -> Iterator[torch.Tensor]:
        """Index tensors of this rank's part of batches ``start, start + 1, ...`` of ``epoch``."""
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(self.num_items, generator=generator)
        local = self.batch_size // self.world_size
        for step in range(start, len(self)):
            batch = order[step * self.batch_size:(step + 1) * self.batch_size]
            yield batch[self.rank * local:(self.rank + 1) * local]


def iterate_in_order(split: TensorSplit, batch_size: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """Fixed-order batches of a split, for evaluation and calibration."""
    for start in range(0, len(split), batch_size):
        yield split.images[start:start + batch_size], split.labels[start:start + batch_size]


def load_splits(config: DataConfig) -> DataSplits:
    """The data set a configuration names, split for NAS."""
    root = Path(config.root) if config.root else None
    if config.dataset == "fashion-mnist":
        return load_fashion_mnist(root, val_size=config.val_size, calib_size=config.calib_size,
                                  split_seed=config.split_seed, train_limit=config.train_limit,
                                  test_limit=config.test_limit)
    raise ValueError(
        f"data.dataset {config.dataset!r} is not supported for NAS runs yet; use fashion-mnist"
    )
