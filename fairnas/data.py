"""Data: Fashion-MNIST from Debian's package, or a folder of the user's own images, split into
train / validation / calibration / test.

Both are held in memory as one tensor, which on a 2-core machine is much faster than per-image
loading; the folder reader targets small data sets for that reason (see
:func:`load_image_folders`). Folders too large for memory (ImageNet) are streamed instead with
``data.stream``: the training split is then a :class:`FileSplit`, a list of files decoded batch
by batch by :mod:`fairnas.streaming`, while validation, calibration and test images are still
decoded into memory (:func:`load_streamed_folders`). The split rules are the part that matters
for NAS:

* ``val`` is held out from the *training* file; candidates are scored on it during search.
* ``calib`` is a fixed, seeded subset of the remaining training images; BN statistics of every
  candidate are recalibrated on exactly these images.
* ``test`` is the test file (or ``test/`` folder), used only to report stand-alone accuracy.

:meth:`DataSplits.check_no_leaks` asserts at load time that the validation images (which score
candidates) are none of the training, calibration or test images of the same file, by
position. For folder data, where the same picture can sit in ``train/`` and ``test/`` under
different names, a validation image whose content (SHA-256 of the file) is also a test image
stops the run; one whose content is also a training image is only reported in the log (not
checked for streamed training files, which are not read at load time).

Batches come from :class:`BatchPlan`, a deterministic function of (seed, epoch, step), so a
resumed run sees the same data order as an uninterrupted one and every rank of a distributed run
can take its own slice of the same global batch.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import logging
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

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
    """Images (N x C x H x W) and integer labels held in memory.

    ``images`` are normalised floats, or, when ``mean`` and ``std`` are set, the uint8 pixels
    they are computed from batch by batch (:meth:`normalised`): a quarter of the memory, which
    matters for the validation, calibration and test images of a streamed ImageNet-sized
    folder, held in every process. Both give the same numbers bit for bit.
    """

    images: torch.Tensor
    labels: torch.Tensor
    source: str  # which file the images came from, for the leak check
    indices: torch.Tensor  # positions of the images in that file
    # Folder data only: each image's file and the SHA-256 of its bytes, for the leak check.
    files: list[str] | None = None
    digests: list[str] | None = None
    mean: tuple[float, ...] | None = None  # per channel, for uint8 ``images``
    std: tuple[float, ...] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def normalised(self, images: torch.Tensor | None = None) -> torch.Tensor:
        """``images`` (default: all of the split's, or a batch taken from them) as the
        normalised floats a network reads."""
        images = self.images if images is None else images
        if self.mean is None or self.std is None:
            return images
        return normalise_pixels(images, torch.tensor(self.mean), torch.tensor(self.std))

    def subset(self, positions: torch.Tensor) -> TensorSplit:
        keep = positions.tolist()
        return TensorSplit(self.images[positions], self.labels[positions], self.source,
                           self.indices[positions],
                           None if self.files is None else [self.files[i] for i in keep],
                           None if self.digests is None else [self.digests[i] for i in keep],
                           self.mean, self.std)


def normalise_pixels(pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (N x C x H x W) to normalised floats, with per-channel ``mean`` and ``std``
    of pixel values in [0, 1]; the same operations, in the same order, for every split and
    feeder, so an image gives the same floats whichever way it was stored."""
    images = pixels.float().div_(255)
    return (images - mean.to(images.device).view(1, -1, 1, 1)) / \
        std.to(images.device).view(1, -1, 1, 1)


@dataclass
class FileSplit:
    """Training images as files and labels, decoded when a batch needs them (``data.stream``).

    Nothing is read at load time, so a folder of any size costs only its file list. How a file
    becomes a tensor (size, channels, augmentation, normalisation) travels with the split, so the
    trainers need no data configuration to build the streamed feeder
    (:class:`fairnas.streaming.StreamedBatchFeeder`).
    """

    files: list[str]  # full paths
    labels: torch.Tensor
    source: str  # as TensorSplit.source: positions below are positions in that listing
    indices: torch.Tensor
    root: str  # the train folder; the content digest uses paths relative to it
    input_size: int
    input_channels: int
    augment: bool = True
    skip_bad_images: bool = False
    workers: int = 0  # DataLoader worker processes
    # Normalisation, from the calibration images (set once they are decoded).
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, positions: torch.Tensor) -> FileSplit:
        return dataclasses.replace(self, files=[self.files[i] for i in positions.tolist()],
                                   labels=self.labels[positions], indices=self.indices[positions])

    def update_digest(self, digest: Any) -> None:
        """(path relative to the train folder, size in bytes) of every file, and the labels.

        Hashing every byte of an ImageNet-sized folder would take minutes on every start; this
        catches other, added, removed or resized files and a ``data.root`` that points at other
        images, but not a file rewritten in place with the same size.
        """
        for name in self.files:
            relative = os.path.relpath(name, self.root)
            digest.update(f"{relative}\0{os.stat(name).st_size}\n".encode())
        digest.update(self.labels.contiguous().numpy().tobytes())


AnySplit = TypeVar("AnySplit", TensorSplit, FileSplit)


@dataclass
class DataSplits:
    """Everything a FairNAS run reads."""

    train: TensorSplit | FileSplit
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
        _check_distinct_content(self.val, self.test)
        if isinstance(self.train, FileSplit):
            logger.info("leak checks: validation files are none of the streamed training files "
                        "(by position) and none has the content of a test image (SHA-256); "
                        "copies of a validation image among the training files are not looked "
                        "for, since streamed training files are not read at load time")
        else:
            _warn_on_duplicates(self.val, self.train)

    def content_digest(self) -> str:
        """SHA-256 of every split's images and labels, in order; a streamed training split
        contributes its file names and sizes (:meth:`FileSplit.update_digest`)."""
        digest = hashlib.sha256()
        for split in (self.train, self.val, self.calib, self.test):
            if isinstance(split, FileSplit):
                split.update_digest(digest)
                continue
            digest.update(split.images.contiguous().numpy().tobytes())
            digest.update(split.labels.contiguous().numpy().tobytes())
        return digest.hexdigest()


def _check_disjoint(a: TensorSplit | FileSplit, b: TensorSplit | FileSplit, name_a: str,
                    name_b: str) -> None:
    if a.source != b.source:
        return
    overlap = set(a.indices.tolist()) & set(b.indices.tolist())
    if overlap:
        raise RuntimeError(
            f"{name_a} and {name_b} images overlap in {len(overlap)} images of {a.source}; "
            f"the split is broken"
        )


def _shared_content(a: TensorSplit, b: TensorSplit) -> list[tuple[str, str]]:
    """(file in a, file in b) pairs whose bytes are identical; empty without hashes."""
    if a.digests is None or b.digests is None:
        return []
    first_in_b = {}
    for digest, name in zip(b.digests, b.files or b.digests, strict=True):
        first_in_b.setdefault(digest, name)
    return [(name, first_in_b[digest])
            for digest, name in zip(a.digests, a.files or a.digests, strict=True)
            if digest in first_in_b]


def _check_distinct_content(val: TensorSplit, test: TensorSplit) -> None:
    shared = _shared_content(val, test)
    if shared:
        raise ValueError(
            f"{len(shared)} validation images (held out from the training folder to score "
            f"candidates) are also test images, for example {shared[0][0]} has the same content "
            f"as {shared[0][1]}. Remove the duplicates from one of the folders."
        )


def _warn_on_duplicates(val: TensorSplit, train: TensorSplit) -> None:
    """Copies inside the training folder put a trained-on image among the scoring images."""
    shared = _shared_content(val, train)
    if shared:
        logger.warning("%d validation images have an identical copy among the training images "
                       "(for example %s and %s): their scores are optimistic", len(shared),
                       *shared[0])


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
        # One partial file per process: the ranks of a torchrun job unpack at the same moment,
        # and each must not truncate or rename another's file (the contents are identical).
        partial = raw / f".{name}.{os.getpid()}.partial"
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
    train, val, calib = hold_out(full_train, val_size=val_size, calib_size=calib_size,
                                 split_seed=split_seed, train_limit=train_limit)
    if test_limit is not None:
        test = test.subset(torch.arange(min(test_limit, len(test))))
    splits = DataSplits(train, val, calib, test, num_classes,
                        full_train.images.shape[1], full_train.images.shape[-1])
    splits.check_no_leaks()
    return splits


def hold_out(
    full_train: AnySplit, *, val_size: int, calib_size: int, split_seed: int,
    train_limit: int | None = None,
) -> tuple[AnySplit, AnySplit, AnySplit]:
    """(train, val, calib) of the training images: ``val_size`` seeded picks held out, then
    the first ``train_limit`` of the rest, of which ``calib_size`` seeded picks are the
    calibration pool (a subset of the training images, as FairNAS recalibrates BN on them).

    Works on in-memory and file splits alike, so a streamed folder holds out the very files the
    in-memory loader would (as long as no unreadable file was skipped before the split).
    """
    n = len(full_train)
    if not 0 < val_size < n:
        raise ValueError(f"data.val_size should be in (0, {n}) for {n} training images, got "
                         f"{val_size}")
    generator = torch.Generator().manual_seed(split_seed)
    order = torch.randperm(n, generator=generator)
    val = full_train.subset(order[:val_size])
    train = full_train.subset(order[val_size:])
    if train_limit is not None:
        train = train.subset(torch.arange(min(train_limit, len(train))))
    if not 0 < calib_size <= len(train):
        raise ValueError(f"data.calib_size should be in (0, {len(train)}] (the training images "
                         f"left after data.val_size={val_size} are held out), got {calib_size}")
    calib = train.subset(torch.randperm(len(train), generator=generator)[:calib_size])
    return train, val, calib


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
        if world_size > 1 and not drop_last:
            raise ValueError("a partial last batch cannot be split evenly across processes; "
                             "use drop_last=True with several processes")
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
        yield (split.normalised(split.images[start:start + batch_size]),
               split.labels[start:start + batch_size])


def load_splits(config: DataConfig, *, input_size: int | None = None,
                input_channels: int | None = None) -> DataSplits:
    """The data set a configuration names, split for NAS.

    Folder images are converted to the search space's ``input_channels`` and ``input_size``,
    which are therefore required for ``dataset: folder``.
    """
    config.__post_init__()  # data.stream only with folders, also for a config changed in code
    root = Path(config.root) if config.root else None
    splitting = dict(val_size=config.val_size, calib_size=config.calib_size,
                     split_seed=config.split_seed, train_limit=config.train_limit,
                     test_limit=config.test_limit)
    if config.dataset == "fashion-mnist":
        return load_fashion_mnist(root, **splitting)
    if config.dataset == "folder":
        if root is None:
            raise ValueError("data.dataset 'folder' needs data.root: a folder holding "
                             "train/<class>/<images> and test/<class>/<images>")
        if input_size is None or input_channels is None:
            raise ValueError("folder data is converted to the search space's input size and "
                             "channels; pass input_size and input_channels")
        if config.stream:
            return load_streamed_folders(
                root, input_size=input_size, input_channels=input_channels,
                skip_bad_images=config.skip_bad_images, augment=config.augment,
                workers=config.workers, **splitting)
        full_train, test, classes = load_image_folders(
            root, input_size=input_size, input_channels=input_channels,
            skip_bad_images=config.skip_bad_images)
        return split_train(full_train, test, num_classes=len(classes), **splitting)
    raise ValueError(f"data.dataset {config.dataset!r} is not supported for NAS runs yet; use "
                     f"fashion-mnist or folder")


# -- a folder of the user's own images ---------------------------------------------------------

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_MODES = {1: "L", 3: "RGB"}


def load_image_folders(
    root: str | os.PathLike, *, input_size: int, input_channels: int,
    skip_bad_images: bool = False,
) -> tuple[TensorSplit, TensorSplit, list[str]]:
    """``root/train/<class>/*`` and ``root/test/<class>/*`` as normalised tensors in memory.

    Every image is decoded once, converted to ``input_channels`` (grey or RGB), cropped to a
    square around its centre and resized to ``input_size``, then normalised per channel with
    the mean and standard deviation of the training folder. Everything stays in memory, which
    suits the small data sets a CPU search handles (10,000 RGB images of 32x32 take 120 MB as
    float32), not ImageNet-sized folders.

    Classes are the sorted folder names and must be the same in both splits. An image file
    that cannot be decoded stops loading with its name, or, with ``skip_bad_images``, is left
    out and counted in the log. Returns (all training images, test images, class names).
    """
    root = Path(root)
    listings, classes = _list_image_folders(root, input_channels)
    options = dict(size=input_size, mode=_MODES[input_channels], skip=skip_bad_images)
    train, skipped = _read_files(listings["train"], f"folder:{root / 'train'}", **options)
    test, skipped_test = _read_files(listings["test"], f"folder:{root / 'test'}", **options)
    _report_skipped(skipped + skipped_test)
    _normalise([train, test], *_channel_stats(train.images))
    logger.info("read %d training and %d test images of %d classes from %s", len(train),
                len(test), len(classes), root)
    return train, test, classes


def load_streamed_folders(
    root: str | os.PathLike, *, input_size: int, input_channels: int, val_size: int,
    calib_size: int, split_seed: int, train_limit: int | None = None,
    test_limit: int | None = None, skip_bad_images: bool = False, augment: bool = True,
    workers: int = 0,
) -> DataSplits:
    """``data.stream``: the training folder as a file list; the other splits in memory.

    The validation and calibration files are picked by :func:`hold_out` from the listing of
    ``train/`` exactly as :func:`split_train` picks them from the decoded images, then decoded
    (centre crop, like the in-memory loader) together with the test folder (its first
    ``test_limit`` files). They are needed whole and over and over (every candidate is scored on
    val, recalibrated on calib), and are small next to an ImageNet training set. Normalisation
    statistics come from the calibration images, not from every training image, which would mean
    decoding the whole folder once per start.
    """
    root = Path(root)
    listings, classes = _list_image_folders(root, input_channels)
    listed = listings["train"]
    full_train = FileSplit(
        files=[str(path) for path, _ in listed],
        labels=torch.tensor([label for _, label in listed], dtype=torch.long),
        source=f"folder:{root / 'train'}", indices=torch.arange(len(listed)),
        root=str(root / "train"), input_size=input_size, input_channels=input_channels,
        augment=augment, skip_bad_images=skip_bad_images, workers=workers)
    train, val_files, calib_files = hold_out(full_train, val_size=val_size,
                                             calib_size=calib_size, split_seed=split_seed,
                                             train_limit=train_limit)
    options = dict(size=input_size, mode=_MODES[input_channels], skip=skip_bad_images,
                   keep_uint8=True)
    val, skipped = _read_files(_as_listing(val_files), val_files.source,
                               indices=val_files.indices.tolist(), **options)
    calib, skipped_calib = _read_files(_as_listing(calib_files), calib_files.source,
                                       indices=calib_files.indices.tolist(), **options)
    test_listed = listings["test"][:test_limit] if test_limit is not None else listings["test"]
    test, skipped_test = _read_files(test_listed, f"folder:{root / 'test'}", **options)
    _report_skipped(skipped + skipped_calib + skipped_test)
    mean, std = _channel_stats(calib.images.float().div_(255))
    for split in (train, val, calib, test):  # uint8 kept; normalised batch by batch
        split.mean, split.std = tuple(mean.tolist()), tuple(std.tolist())
    held = {"validation": val, "calibration": calib, "test": test}
    total = sum(split.images.nelement() * split.images.element_size() for split in held.values())
    logger.info("streaming %d training images of %d classes from %s (%d DataLoader workers, "
                "augmentation %s); decoded into memory: %s images of %s uint8, %s in all "
                "(in every process)", len(train), len(classes), root / "train", workers,
                "on" if augment else "off",
                ", ".join(f"{len(split)} {name}" for name, split in held.items()),
                "x".join(map(str, val.images.shape[1:])), _size_text(total))
    if total > 8 * 2**30:
        logger.warning("the validation, calibration and test images take %s of memory in "
                       "every process; lower data.val_size, data.calib_size or data.test_limit "
                       "if that is too much (see docs/data.md)", _size_text(total))
    splits = DataSplits(train, val, calib, test, len(classes), input_channels, input_size)
    splits.check_no_leaks()
    return splits


def _size_text(size: float) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def _list_image_folders(
    root: Path, input_channels: int,
) -> tuple[dict[str, list[tuple[Path, int]]], list[str]]:
    """(file, label) of every image under ``train/`` and ``test/``, in class then file order,
    after checking the layout; and the class names (sorted folder names)."""
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist")
    if input_channels not in _MODES:
        raise ValueError(f"folder images can be read as 1 or 3 channels, not {input_channels}")
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise FileNotFoundError(
                f"{root / split} does not exist: data.dataset 'folder' expects "
                f"{root}/train/<class>/<images> and {root}/test/<class>/<images>")
    folders = {split: _class_files(root / split) for split in ("train", "test")}
    only_train = sorted(set(folders["train"]) - set(folders["test"]))
    only_test = sorted(set(folders["test"]) - set(folders["train"]))
    if only_train or only_test:
        raise ValueError(
            f"the class folders of {root / 'train'} and {root / 'test'} differ: only in train: "
            f"{', '.join(only_train) or '-'}; only in test: {', '.join(only_test) or '-'}"
        )
    classes = sorted(folders["train"])
    listings = {split: [(path, label) for label, name in enumerate(classes)
                        for path in files[name]] for split, files in folders.items()}
    return listings, classes


def _as_listing(split: FileSplit) -> list[tuple[Path, int]]:
    return [(Path(name), label) for name, label in zip(split.files, split.labels.tolist(),
                                                       strict=True)]


def _report_skipped(skipped: list[str]) -> None:
    if skipped:
        logger.warning("skipped %d unreadable image file(s) (data.skip_bad_images): %s%s",
                       len(skipped), ", ".join(skipped[:5]), " ..." if len(skipped) > 5 else "")


def _channel_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation of N x C x H x W images."""
    pixels = images.transpose(0, 1).reshape(images.shape[1], -1)
    return pixels.mean(dim=1), pixels.std(dim=1).clamp_min(1e-6)


def _normalise(splits: list[TensorSplit], mean: torch.Tensor, std: torch.Tensor) -> None:
    for split in splits:
        split.images = (split.images - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def _class_files(folder: Path) -> dict[str, list[Path]]:
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{folder} holds no class folders; expected {folder}/<class>/<images>")
    files = {}
    for class_dir in classes:
        found = sorted(p for p in class_dir.rglob("*")
                       if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise ValueError(f"class folder {class_dir} holds no images (looked for "
                             f"{', '.join(IMAGE_SUFFIXES)})")
        files[class_dir.name] = found
    return files


# What PIL raises for a file that is not a readable image (OSError covers a missing file too).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def _read_files(listed: list[tuple[Path, int]], source: str, *, size: int, mode: str,
                skip: bool, indices: list[int] | None = None,
                keep_uint8: bool = False) -> tuple[TensorSplit, list[str]]:
    """Decode (file, label) pairs into a split of pixel values in [0, 1] (or the uint8 pixels
    with ``keep_uint8``), not yet normalised; returns it and the files skipped as unreadable.
    ``indices``: each file's position in ``source`` (default: the position among the files
    kept)."""
    arrays, labels, names, digests, kept, skipped = [], [], [], [], [], []
    name = source.rstrip("/").rsplit("/", 1)[-1]
    for position, (path, label) in enumerate(tqdm(listed, desc=f"reading {name}", unit="img",
                                                  disable=None)):
        data = path.read_bytes()
        try:
            arrays.append(_decode(data, size, mode))
        except DECODE_ERRORS as error:
            if not skip:
                raise ValueError(unreadable_message(path, error)) from error
            skipped.append(str(path))
            continue
        labels.append(label)
        names.append(str(path))
        digests.append(hashlib.sha256(data).hexdigest())
        kept.append(position)
    if not arrays:
        raise ValueError(f"{source.removeprefix('folder:')} holds no readable images "
                         f"({len(skipped)} skipped)")
    images = torch.from_numpy(np.stack(arrays))
    if not keep_uint8:
        images = images.float().div_(255)
    images = images.unsqueeze(1) if images.dim() == 3 else images.permute(0, 3, 1, 2)
    positions = torch.arange(len(labels)) if indices is None else torch.tensor(
        [indices[k] for k in kept], dtype=torch.long)
    split = TensorSplit(images.contiguous(), torch.tensor(labels, dtype=torch.long), source,
                        positions, names, digests)
    return split, skipped


def decode_error_text(error: BaseException | str) -> str:
    """What went wrong decoding a file, without Pillow's in-memory buffer address (Pillow
    names the ``BytesIO`` it was given, not the file)."""
    text = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(error)).strip()
    return text or (type(error).__name__ if isinstance(error, BaseException) else "unreadable")


def unreadable_message(path: str | os.PathLike, error: BaseException | str) -> str:
    return (f"image file {path} cannot be read ({decode_error_text(error)}); replace or remove "
            f"it, or set data.skip_bad_images=true to skip such files")


def open_image(data: bytes, mode: str) -> Image.Image:
    """The decoded image in ``mode`` ("L" or "RGB")."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()  # decodes now, so a truncated file fails here with its name at hand
        return image.convert(mode)


def centre_fit(image: Image.Image, size: int) -> np.ndarray:
    """The largest centred square, resized to ``size`` (bilinear): how evaluation images are
    made, and streamed training images when augmentation is off."""
    square = ImageOps.fit(image, (size, size), Image.Resampling.BILINEAR)
    return np.asarray(square, dtype=np.uint8)


def _decode(data: bytes, size: int, mode: str) -> np.ndarray:
    return centre_fit(open_image(data, mode), size)
