"""Image data for the published models: the evaluation protocol, datasets, ImageNet preparation.

* The protocol of the released models: shorter side resized to 256 (PIL bilinear), center crop
  224, ImageNet mean and standard deviation; top-1 and top-5 summed over every image.
* Datasets read from local files only: an ImageNet-style tree of class folders, CIFAR-10 in
  torchvision's local format (read without unpickling code), Fashion-MNIST as RGB images.
* ``prepare_imagenet``: the 50,000 flat ILSVRC2012 validation images moved into one folder per
  class, from the ground truth in the official devkit archive.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import re
import tarfile
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DATASETS = ("auto", "folder", "cifar10", "fashion-mnist")


def _to_tensor(channels: int) -> list[Callable]:
    """PIL image -> normalised tensor with the channels the model expects.

    Three channels use ImageNet's statistics. One channel (models searched on the project's
    Fashion-MNIST space) gets grayscale images normalised as that space was trained.
    """
    from torchvision import transforms

    from fairnas.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD

    if channels == 3:
        return [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if channels == 1:
        return [transforms.Grayscale(1), transforms.ToTensor(),
                transforms.Normalize((FASHION_MNIST_MEAN,), (FASHION_MNIST_STD,))]
    raise ValueError(f"input channels should be 1 or 3, got {channels}")


def eval_transform(
    *, resize: int = 256, crop: int = 224, channels: int = 3
) -> Callable[[Image.Image], torch.Tensor]:
    """The released models' evaluation transform (defaults: resize 256, center crop 224)."""
    from torchvision import transforms

    if crop > resize:
        raise ValueError(f"crop should be at most resize ({resize}), got {crop}")
    return transforms.Compose([
        transforms.Resize(resize, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop(crop),
        *_to_tensor(channels),
    ])


def train_transform(
    *, crop: int = 224, scale: tuple[float, float] = (0.2, 1.0), channels: int = 3
) -> Callable[[Image.Image], torch.Tensor]:
    """Fine-tuning augmentation as the released loader hints: random resized crop and flip."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.RandomResizedCrop(crop, scale=scale),
        transforms.RandomHorizontalFlip(),
        *_to_tensor(channels),
    ])


# -- datasets -----------------------------------------------------------------------------------


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, lists and dicts, and refuses everything else.

    CIFAR-10's python files are pickles; a plain ``pickle.load`` would run whatever a tampered
    file asks for. These are the only globals a genuine batch file references.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _read_cifar_pickle(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            data = _ArrayUnpickler(handle, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as error:
        raise ValueError(f"{path} is not a CIFAR-10 batch file: {error}") from error
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in data.items()}


def find_cifar10_folder(root: str | os.PathLike) -> Path | None:
    """The ``cifar-10-batches-py`` folder at or under ``root``, if there is one."""
    root = Path(root)
    for folder in (root / "cifar-10-batches-py", root):
        if (folder / "test_batch").is_file() or (folder / "data_batch_1").is_file():
            return folder
    return None


class Cifar10(Dataset):
    """CIFAR-10 from torchvision's local layout; nothing is downloaded or executed."""

    def __init__(self, root: str | os.PathLike, *, train: bool,
                 transform: Callable | None = None) -> None:
        folder = find_cifar10_folder(root)
        names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        missing = [n for n in names if folder is None or not (folder / n).is_file()]
        if missing:
            raise FileNotFoundError(
                f"CIFAR-10 files {missing} not found under {root}: expected torchvision's local "
                f"layout, cifar-10-batches-py/ with data_batch_1..5, test_batch, batches.meta "
                f"(the python version of the data set, unpacked)"
            )
        assert folder is not None
        images, labels = [], []
        for name in names:
            batch = _read_cifar_pickle(folder / name)
            data = np.asarray(batch["data"], dtype=np.uint8)
            if data.ndim != 2 or data.shape[1] != 3072 or len(batch["labels"]) != len(data):
                raise ValueError(f"{folder / name} has an unexpected shape {data.shape}")
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.extend(int(label) for label in batch["labels"])
        self.images = np.concatenate(images)
        self.targets = labels
        meta = folder / "batches.meta"
        names = _read_cifar_pickle(meta)["label_names"] if meta.is_file() else range(10)
        self.classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = Image.fromarray(self.images[index])
        return (self.transform(image) if self.transform else image), self.targets[index]


class FashionMNISTImages(Dataset):
    """Fashion-MNIST as RGB PIL images, so ImageNet models and transforms apply unchanged."""

    def __init__(self, root: str | os.PathLike, *, train: bool,
                 transform: Callable | None = None) -> None:
        from torchvision.datasets import FashionMNIST

        from fairnas.data import prepare_fashion_mnist

        prepare_fashion_mnist(Path(root))
        self.data = FashionMNIST(str(root), train=train, download=False)
        self.classes = list(self.data.classes)
        self.targets = [int(t) for t in self.data.targets]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, label = self.data[index]
        image = image.convert("RGB")
        return (self.transform(image) if self.transform else image), int(label)


def image_folder(root: str | os.PathLike, transform: Callable | None = None) -> Dataset:
    """A tree of class folders; classes in sorted folder order (sorted wnids for ImageNet)."""
    from torchvision.datasets import ImageFolder

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist")
    try:
        return ImageFolder(str(root), transform=transform)
    except (FileNotFoundError, RuntimeError) as error:
        raise FileNotFoundError(
            f"{root} is not a tree of class folders with images ({error}); for ImageNet run "
            f"`fairnas prepare-imagenet` first"
        ) from error


def _split_folder(root: Path, names: Iterable[str]) -> Path | None:
    return next((root / n for n in names if (root / n).is_dir()), None)


def open_dataset(kind: str, root: str | os.PathLike, *, train: bool,
                 transform: Callable | None = None) -> tuple[Dataset, str]:
    """A dataset of ``kind`` (or detected with ``auto``) and a short description of it.

    Folders: ``root`` itself, or its ``train/`` (training) or ``val/``/``test/`` subfolder when
    present. CIFAR-10 and Fashion-MNIST: the training or test split of the local files.
    """
    if kind not in DATASETS:
        raise ValueError(f"dataset should be one of {DATASETS}, got {kind!r}")
    root = Path(root)
    if not root.exists() and kind != "fashion-mnist":  # Fashion-MNIST is unpacked into root
        raise FileNotFoundError(f"data root {root} does not exist")
    if kind == "auto":
        kind = "cifar10" if find_cifar10_folder(root) is not None else "folder"
    split = "train" if train else "test"
    if kind == "cifar10":
        return Cifar10(root, train=train, transform=transform), f"CIFAR-10 {split} split"
    if kind == "fashion-mnist":
        return (FashionMNISTImages(root, train=train, transform=transform),
                f"Fashion-MNIST {split} split")
    folder = _split_folder(root, ("train",) if train else ("val", "test")) or root
    return image_folder(folder, transform), f"class folders in {folder}"


def num_classes_of(dataset: Dataset) -> int:
    classes = getattr(dataset, "classes", None)
    return len(classes) if classes else len(set(dataset.targets))


# -- evaluation ---------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """``cpu`` or ``cuda[:N]``, refusing CUDA when none is available."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was requested but CUDA is not available here")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device should be cpu or cuda, got {name!r}")
    return device


@dataclass
class TopK:
    """Summed hits over a whole data set; accuracies in percent."""

    images: int = 0
    top1_hits: int = 0
    top5_hits: int = 0

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        k = min(5, logits.shape[1])
        best = logits.topk(k, dim=1).indices
        hits = best.eq(labels.unsqueeze(1))
        self.top1_hits += int(hits[:, 0].sum())
        self.top5_hits += int(hits.any(dim=1).sum())
        self.images += len(labels)

    @property
    def top1(self) -> float:
        return 100.0 * self.top1_hits / max(self.images, 1)

    @property
    def top5(self) -> float:
        return 100.0 * self.top5_hits / max(self.images, 1)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, *, batch_size: int = 256, workers: int = 4,
             device: str | torch.device = "cpu", progress: bool = True,
             desc: str = "validate") -> dict[str, float | int]:
    """Top-1 and top-5 (percent) of ``model`` in eval mode over every image of ``dataset``."""
    if batch_size < 1 or workers < 0:
        raise ValueError(f"batch_size should be >= 1 and workers >= 0, got {batch_size}, "
                         f"{workers}")
    device = torch.device(device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=device.type == "cuda")
    model = model.to(device).eval()
    score = TopK()
    start = time.perf_counter()
    # tqdm's rate is images per second here, since the bar counts images.
    # disable=None: shown on a terminal, silent in logs and pipes.
    bar = tqdm(total=len(dataset), desc=desc, unit="img", disable=None if progress else True,
               dynamic_ncols=True, mininterval=1.0)
    with bar:
        for images, labels in loader:
            logits = model(images.to(device, non_blocking=True))
            score.add(logits.float().cpu(), labels)
            bar.update(len(labels))
            bar.set_postfix(top1=f"{score.top1:.2f}", top5=f"{score.top5:.2f}")
    seconds = time.perf_counter() - start
    return {"top1": score.top1, "top5": score.top5, "images": score.images,
            "top1_hits": score.top1_hits, "top5_hits": score.top5_hits,
            "seconds": round(seconds, 3), "images_per_second": round(score.images / seconds, 1)}


# -- ImageNet validation images into class folders ----------------------------------------------

DEVKIT_ARCHIVE = "ILSVRC2012_devkit_t12.tar.gz"
VAL_ARCHIVE = "ILSVRC2012_img_val.tar"
_VAL_NAME = re.compile(r"^ILSVRC2012_val_(\d{8})\.JPEG$")
_PARTIAL = ".partial"


def read_devkit(path: str | os.PathLike) -> list[str]:
    """The class folder (wnid) of every validation image, from the devkit archive or folder.

    ``meta.mat`` maps the ILSVRC2012 class ids of the 1,000 leaf synsets to wnids; the ground
    truth file lists one class id per validation image, in image-number order.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"ImageNet devkit not found at {path}: download {DEVKIT_ARCHIVE} (the development "
            f"kit of ILSVRC2012, task 1 & 2) from image-net.org and put it there, or give its "
            f"path with --devkit"
        )
    meta_bytes = _devkit_member(path, "meta.mat")
    truth_bytes = _devkit_member(path, "ILSVRC2012_validation_ground_truth.txt")
    from scipy.io import loadmat

    synsets = loadmat(io.BytesIO(meta_bytes), squeeze_me=True)["synsets"]
    ids = np.atleast_1d(synsets["ILSVRC2012_ID"]).astype(int)
    wnids = [str(w) for w in np.atleast_1d(synsets["WNID"])]
    children = np.atleast_1d(synsets["num_children"]).astype(int)
    wnid_of = {int(i): w for i, w, c in zip(ids, wnids, children, strict=True) if c == 0}
    labels = []
    for number, line in enumerate(truth_bytes.decode().split(), start=1):
        if int(line) not in wnid_of:
            raise ValueError(f"devkit {path}: image {number} has class id {line}, which is not "
                             f"one of the {len(wnid_of)} leaf classes of meta.mat")
        labels.append(wnid_of[int(line)])
    if len(wnid_of) != 1000 or len(labels) != 50_000:
        logger.warning("devkit %s lists %d classes and %d images (ILSVRC2012: 1000 and 50000)",
                       path, len(wnid_of), len(labels))
    return labels


def _devkit_member(path: Path, basename: str) -> bytes:
    if path.is_dir():
        found = sorted(path.rglob(basename))
        if not found:
            raise FileNotFoundError(f"devkit folder {path} has no {basename}")
        return found[0].read_bytes()
    try:
        with tarfile.open(path) as archive:
            for member in archive:
                if member.isfile() and Path(member.name).name == basename:
                    handle = archive.extractfile(member)
                    assert handle is not None
                    return handle.read()
    except (tarfile.TarError, EOFError, OSError) as error:
        raise ValueError(f"devkit archive {path} is truncated or not a tar archive ({error}); "
                         f"download it again") from error
    raise FileNotFoundError(f"devkit archive {path} has no {basename}; is it the ILSVRC2012 "
                            f"devkit ({DEVKIT_ARCHIVE})?")


def _label_of(name: str, labels: list[str], source: str, consequence: str) -> str:
    number = int(_VAL_NAME.match(name).group(1))  # type: ignore[union-attr]
    if not 1 <= number <= len(labels):
        raise ValueError(f"{source} has {name}, but the devkit's ground truth covers images "
                         f"1..{len(labels)}; {consequence}")
    return labels[number - 1]


def prepare_imagenet(
    root: str | os.PathLike, *, devkit: str | os.PathLike | None = None,
    val_archive: str | os.PathLike | None = None, val_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Arrange the ILSVRC2012 validation images into ``val_dir/<wnid>/`` (default ``root/val``).

    Sources: flat ``ILSVRC2012_val_*.JPEG`` files in ``val_dir``, and the images archive (given,
    or ``root/ILSVRC2012_img_val.tar`` if present). Every image's destination is checked before
    any file moves; each move is one ``os.replace`` within the folder, and each extracted image
    is written to a temporary name and renamed, so an interrupted run leaves every image either
    in its old place or complete in its class folder. Running it again finishes the job and
    changes nothing once everything is in place.
    """
    root = Path(root)
    labels = read_devkit(Path(devkit) if devkit else root / DEVKIT_ARCHIVE)
    val_dir = Path(val_dir) if val_dir else root / "val"
    archive = Path(val_archive) if val_archive else root / VAL_ARCHIVE
    if val_archive and not archive.is_file():
        raise FileNotFoundError(f"validation images archive {archive} does not exist")
    flat = sorted(p for p in val_dir.glob("ILSVRC2012_val_*.JPEG") if _VAL_NAME.match(p.name)) \
        if val_dir.is_dir() else []
    if not flat and not archive.is_file() and not val_dir.is_dir():
        raise FileNotFoundError(
            f"no validation images: {val_dir} does not exist and there is no {archive}; put the "
            f"50,000 ILSVRC2012_val_*.JPEG files in {val_dir}, or {VAL_ARCHIVE} in {root}"
        )
    for stale in val_dir.glob(f"*/*{_PARTIAL}") if val_dir.is_dir() else []:
        stale.unlink()  # an extraction interrupted mid-file; the image is extracted again

    moves = [(p, val_dir / _label_of(p.name, labels, str(val_dir), "nothing was moved") / p.name)
             for p in flat]
    for source, target in moves:
        if target.exists() and target.read_bytes() != source.read_bytes():
            raise ValueError(f"{source} and {target} both exist and differ; remove the wrong "
                             f"one and run again (nothing was moved)")
    for source, target in tqdm(moves, desc="moving", unit="img", disable=None):
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():  # an identical copy is already in place
            source.unlink()
        else:
            os.replace(source, target)
    extracted = _extract_val_archive(archive, val_dir, labels) if archive.is_file() else 0

    counts = Counter(p.parent.name for p in val_dir.glob("*/ILSVRC2012_val_*.JPEG"))
    expected = Counter(labels)
    missing = sum(max(expected[w] - counts.get(w, 0), 0) for w in expected)
    summary = {"val_dir": str(val_dir), "images": sum(counts.values()), "classes": len(counts),
               "moved": len(moves), "extracted": extracted, "missing": missing}
    if missing:
        logger.warning("%d of the %d validation images are not in place yet under %s",
                       missing, len(labels), val_dir)
    return summary


def _extract_val_archive(archive: Path, val_dir: Path, labels: list[str]) -> int:
    """Extract the images not yet in their class folder; returns how many were extracted."""
    extracted = 0
    try:
        with tarfile.open(archive) as tar, tqdm(total=len(labels), desc="extracting",
                                                 unit="img", disable=None) as bar:
            for member in tar:
                bar.update(1)
                name = Path(member.name).name
                if not member.isfile() or not _VAL_NAME.match(name):
                    continue
                label = _label_of(name, labels, str(archive), "extraction stopped there")
                target = val_dir / label / name
                if target.exists() and target.stat().st_size == member.size:
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                partial = target.with_name(name + _PARTIAL)
                handle = tar.extractfile(member)
                assert handle is not None
                partial.write_bytes(handle.read())
                os.replace(partial, target)
                extracted += 1
    except (tarfile.TarError, EOFError) as error:
        raise ValueError(f"validation archive {archive} is truncated or not a tar archive "
                         f"({error}); images extracted so far are complete, download the "
                         f"archive again and rerun") from error
    return extracted
