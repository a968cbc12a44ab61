"""Fine-tuning a trained network on another data set with a new head.

The recipe of the released CIFAR-10 transfer models: keep every weight of the network, replace
the classifier with Dropout + a fresh Linear layer sized for the new classes, and fine-tune the
whole network at the network's input resolution (small images are resized up). Any network
transfers this way, published or searched.

Training goes through :func:`fairnas.training.train_standalone`, so a transfer run has the
stand-alone trainer's schedule, logs, per-epoch metrics and exact resume. That trainer indexes
in-memory tensors; :class:`LazyImages` gives it the same indexing over image files, decoding
and augmenting each image when its batch is drawn, so no data set has to fit in memory.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from fairnas.arch import Architecture
from fairnas.config import TrainConfig
from fairnas.data import DataSplits, TensorSplit
from fairnas.export import architecture_json
from fairnas.imagenet import eval_transform, num_classes_of, open_dataset, train_transform
from fairnas.io import atomic_write_json
from fairnas.network import SinglePathNet
from fairnas.training import train_standalone

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TransferSettings:
    """What to fine-tune on, and the new head. Optimisation settings are a ``TrainConfig``."""

    dataset: str  # auto | folder | cifar10 | fashion-mnist
    data_root: str
    image_size: int = 224  # crop fed to the network; the released transfer models used 224
    dropout: float = 0.1  # before the new classifier, as in the released transfer models
    val_size: int = 0  # training images held out for per-epoch validation (0: none)
    train_limit: int | None = None  # use only the first N training images (smoke runs)
    test_limit: int | None = None
    source: str = ""  # what the weights came from, recorded for the reader

    def __post_init__(self) -> None:
        if self.image_size < 8:
            raise ValueError(f"image_size should be at least 8, got {self.image_size}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout should be in [0, 1), got {self.dropout}")
        if self.val_size < 0:
            raise ValueError(f"val_size should be >= 0, got {self.val_size}")

    @property
    def resize(self) -> int:
        """Evaluation resize, in the protocol's 256:224 proportion."""
        return int(round(self.image_size * 256 / 224))


class LazyImages:
    """Images of a dataset at given positions, loaded and transformed when indexed.

    Supports what the training loop asks of an image tensor: indexing with an index tensor or a
    slice returns the stacked batch. Random augmentation draws from torch's generator, which
    the trainer's checkpoints carry, so a resumed run sees the same augmented images.
    """

    def __init__(self, dataset: Dataset, positions: torch.Tensor, channels: int,
                 size: int) -> None:
        self.dataset, self.positions = dataset, positions
        self.shape = (len(positions), channels, size, size)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index: torch.Tensor | slice) -> torch.Tensor:
        chosen = self.positions[index].reshape(-1)
        return torch.stack([self.dataset[int(i)][0] for i in chosen])


def with_new_head(model: SinglePathNet, num_classes: int, *, dropout: float,
                  input_size: int | None = None) -> SinglePathNet:
    """A copy of ``model`` whose classifier is new and sized for ``num_classes``."""
    space = model.space
    new_space = space.with_options(
        name=f"{space.name}_to{num_classes}", num_classes=num_classes, dropout=dropout,
        input_size=input_size or space.input_size,
    )
    target = SinglePathNet(Architecture(new_space, model.arch.indices))
    body = {k: v for k, v in model.state_dict().items() if not k.startswith("classifier.")}
    incompatible = target.load_state_dict(body, strict=False)
    assert set(incompatible.missing_keys) == {"classifier.weight", "classifier.bias"}, \
        incompatible
    return target


def _labels(dataset: Dataset) -> torch.Tensor:
    return torch.as_tensor(list(dataset.targets), dtype=torch.long)


def _split(dataset: Dataset, labels: torch.Tensor, positions: torch.Tensor, source: str,
           channels: int, size: int) -> TensorSplit:
    return TensorSplit(LazyImages(dataset, positions, channels, size),  # type: ignore[arg-type]
                       labels[positions], source, positions)


def transfer_splits(settings: TransferSettings, channels: int, seed: int) -> DataSplits:
    """Training, held-out validation and test splits, decoded lazily from the files."""
    size = settings.image_size
    train_set, description = open_dataset(
        settings.dataset, settings.data_root, train=True,
        transform=train_transform(crop=size, channels=channels))
    plain_train, _ = open_dataset(settings.dataset, settings.data_root, train=True,
                                  transform=eval_transform(resize=settings.resize, crop=size,
                                                           channels=channels))
    test_set, test_description = open_dataset(
        settings.dataset, settings.data_root, train=False,
        transform=eval_transform(resize=settings.resize, crop=size, channels=channels))
    classes = num_classes_of(train_set)
    if num_classes_of(test_set) != classes:
        raise ValueError(f"{description} has {classes} classes but {test_description} has "
                         f"{num_classes_of(test_set)}")

    train_labels, test_labels = _labels(train_set), _labels(test_set)
    order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed))
    if settings.val_size >= len(order):
        raise ValueError(f"val_size should be below the {len(order)} training images, got "
                         f"{settings.val_size}")
    val_positions, train_positions = order[:settings.val_size], order[settings.val_size:]
    if settings.train_limit is not None:
        train_positions = train_positions[:settings.train_limit]
    test_positions = torch.arange(len(test_set))
    if settings.test_limit is not None:
        test_positions = test_positions[:settings.test_limit]
    logger.info("transfer data: %d training, %d validation, %d test images, %d classes (%s)",
                len(train_positions), len(val_positions), len(test_positions), classes,
                description)
    return DataSplits(
        train=_split(train_set, train_labels, train_positions, description, channels, size),
        val=_split(plain_train, train_labels, val_positions, description, channels, size),
        calib=_split(plain_train, train_labels, train_positions[:0], description, channels,
                     size),
        test=_split(test_set, test_labels, test_positions, test_description, channels, size),
        num_classes=classes, input_channels=channels, input_size=size,
    )


def transfer(
    model: SinglePathNet, settings: TransferSettings, config: TrainConfig,
    out_dir: str | os.PathLike, *, device: str | torch.device = "cpu", resume: bool = True,
    checkpoint_every: int | None = None,
) -> dict[str, Any]:
    """Fine-tune ``model`` (already holding its weights) on ``settings``' data set.

    Writes into ``out_dir``: ``transfer.json`` (the settings), ``architecture.json`` (the new
    network, for ``--arch``), and the trainer's files (``checkpoint.pt``, ``metrics.jsonl``,
    ``model.pt``, ``result.json``). Rerunning with the same settings resumes; different
    settings in the same folder are refused.
    """
    if getattr(config, "pin_memory", False):
        raise ValueError("pin_memory gathers batches from in-memory tensors; transfer decodes "
                         "images as batches are drawn, so set pin_memory to false")
    out_dir = Path(out_dir)
    splits = transfer_splits(settings, model.space.input_channels, config.seed)
    record = json.loads(json.dumps({  # as it reads back from transfer.json
        "settings": asdict(settings), "train": asdict(config), "arch": str(model.arch),
        "source_space": model.space.to_dict()}))
    _check_resume(out_dir / "transfer.json", record, resume)

    torch.manual_seed(config.seed)  # the new classifier's initial weights
    target = with_new_head(model, splits.num_classes, dropout=settings.dropout,
                           input_size=settings.image_size)
    atomic_write_json(out_dir / "transfer.json", record)
    atomic_write_json(out_dir / "architecture.json",
                      architecture_json(target.arch, name=f"{settings.source or 'model'} "
                                                         f"fine-tuned"))
    if len(splits.val) == 0:
        splits.val = splits.test  # NOTE: per-epoch curves then show test accuracy; say so
        logger.info("no validation images held out (val_size 0): per-epoch accuracy is on "
                    "the test split")
    result = train_standalone(target, splits, config, out_dir, device=device, resume=resume,
                              checkpoint_every=checkpoint_every, test_split=splits.test)
    result.update({
        "arch": str(target.arch),
        "test_top1": 100.0 * result["test_accuracy"],
        "test_images": len(splits.test),
        "num_classes": splits.num_classes,
        "out_dir": str(out_dir),
        "model_file": str(out_dir / "model.pt"),
        "arch_file": str(out_dir / "architecture.json"),
    })
    atomic_write_json(out_dir / "result.json", result)
    return result


def _check_resume(path: Path, record: dict[str, Any], resume: bool) -> None:
    if not path.exists():
        return
    previous = json.loads(path.read_text(encoding="utf-8"))
    if not resume:
        raise ValueError(f"{path.parent} already holds a transfer run; use another --out-dir "
                         f"or drop --no-resume to continue it")
    changed = [key for key in record if previous.get(key) != record[key]]
    if changed:
        raise ValueError(f"refusing to resume in {path.parent}: the transfer settings changed "
                         f"({', '.join(changed)}); use another --out-dir or restore them")
