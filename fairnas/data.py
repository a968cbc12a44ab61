"""Data: Fashion-MNIST from Debian's package, or a folder of the user's own images, split into
train / validation / calibration / test.

Both are held in memory as one tensor, which on a 2-core machine is much faster than per-image
loading; the folder reader targets small data sets for that reason (see
:func:`load_image_folders`). The split rules are the part that matters for NAS:

* ``val`` is held out from the *training* file; candidates are scored on it during search.
* ``calib`` is a fixed, seeded subset of the remaining training images; BN statistics of every
  candidate are recalibrated on exactly these images.
* ``test`` is the test file (or ``test/`` folder), used only to report stand-alone accuracy.

:meth:`DataSplits.check_no_leaks` asserts at load time that the validation images (which score
candidates) are none of the training, calibration or test images of the same file, by
position. For folder data, where the same picture can sit in ``train/`` and ``test/`` under
different names, a validation image whose content (SHA-256 of the file) is also a test image
stops the run; one whose content is also a training image is only reported in the log.

Batches come from :class:`BatchPlan`, a deterministic function of (seed, epoch, step), so a
resumed run sees the same data order as an uninterrupted one and every rank of a distributed run
can take its own slice of the same global batch.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

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
    """Images (float, normalised, N x C x H x W) and integer labels held in memory."""

    images: torch.Tensor
    labels: torch.Tensor
    source: str  # which file the images came from, for the leak check
    indices: torch.Tensor  # positions of the images in that file
    # Folder data only: each image's file and the SHA-256 of its bytes, for the leak check.
    files: list[str] | None = None
    digests: list[str] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, positions: torch.Tensor) -> TensorSplit:
        keep = positions.tolist()
        return TensorSplit(self.images[positions], self.labels[positions], self.source,
                           self.indices[positions],
                           None if self.files is None else [self.files[i] for i in keep],
                           None if self.digests is None else [self.digests[i] for i in keep])


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
        _check_distinct_content(self.val, self.test)
        _warn_on_duplicates(self.val, self.train)


def _check_disjoint(a: TensorSplit, b: TensorSplit, name_a: str, name_b: str) -> None:
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
        raise ValueError(f"data.calib_size should be in (0, {len(train)}], got {calib_size}")
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
        yield split.images[start:start + batch_size], split.labels[start:start + batch_size]


def load_splits(config: DataConfig, *, input_size: int | None = None,
                input_channels: int | None = None) -> DataSplits:
    """The data set a configuration names, split for NAS.

    Folder images are converted to the search space's ``input_channels`` and ``input_size``,
    which are therefore required for ``dataset: folder``.
    """
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
    options = dict(size=input_size, mode=_MODES[input_channels], skip=skip_bad_images)
    train, skipped = _read_split(root / "train", folders["train"], classes, **options)
    test, skipped_test = _read_split(root / "test", folders["test"], classes, **options)
    skipped += skipped_test
    if skipped:
        logger.warning("skipped %d unreadable image files (data.skip_bad_images): %s%s",
                       len(skipped), ", ".join(skipped[:5]), " ..." if len(skipped) > 5 else "")
    pixels = train.images.transpose(0, 1).reshape(input_channels, -1)
    mean, std = pixels.mean(dim=1), pixels.std(dim=1).clamp_min(1e-6)
    for split in (train, test):
        split.images = (split.images - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    logger.info("read %d training and %d test images of %d classes from %s", len(train),
                len(test), len(classes), root)
    return train, test, classes


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


def _read_split(folder: Path, files: dict[str, list[Path]], classes: list[str], *, size: int,
                mode: str, skip: bool) -> tuple[TensorSplit, list[str]]:
    """Decode one split's files; returns the split and the files skipped as unreadable."""
    arrays, labels, names, digests, skipped = [], [], [], [], []
    listed = [(path, label) for label, name in enumerate(classes) for path in files[name]]
    for path, label in tqdm(listed, desc=f"reading {folder.name}", unit="img", disable=None):
        data = path.read_bytes()
        try:
            arrays.append(_decode(data, size, mode))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            if not skip:
                raise ValueError(f"image file {path} cannot be read ({error}); replace or remove "
                                 f"it, or set data.skip_bad_images=true to skip such files"
                                 ) from error
            skipped.append(str(path))
            continue
        labels.append(label)
        names.append(str(path))
        digests.append(hashlib.sha256(data).hexdigest())
    if not arrays:
        raise ValueError(f"{folder} holds no readable images ({len(skipped)} skipped)")
    images = torch.from_numpy(np.stack(arrays)).float().div_(255)
    images = images.unsqueeze(1) if images.dim() == 3 else images.permute(0, 3, 1, 2)
    split = TensorSplit(images.contiguous(), torch.tensor(labels), f"folder:{folder}",
                        torch.arange(len(labels)), names, digests)
    return split, skipped


def _decode(data: bytes, size: int, mode: str) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        image.load()  # decodes now, so a truncated file fails here with its name at hand
        square = ImageOps.fit(image.convert(mode), (size, size), Image.Resampling.BILINEAR)
    return np.asarray(square, dtype=np.uint8)
