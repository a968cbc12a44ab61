"""Training loops: the learning-rate schedule, stand-alone runs on real data, resume checks,
and what happens on a non-finite loss."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest
import torch

from fairnas.arch import Architecture
from fairnas.config import SupernetConfig, TrainConfig
from fairnas.data import (
    DEBIAN_FASHION_MNIST,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    BatchPlan,
    DataSplits,
    TensorSplit,
    split_train,
)
from fairnas.evaluate import accuracy
from fairnas.io import load_checkpoint, read_jsonl
from fairnas.network import SinglePathNet, Supernet
from fairnas.samplers import PathSampler
from fairnas.space import get_space
from fairnas.training import NonFiniteError, lr_at, train_standalone, train_supernet

TINY = get_space("tiny")


# -- the schedule --------------------------------------------------------------------------------


def test_lr_warmup_is_linear_and_ends_at_the_base_rate() -> None:
    schedule = dict(base_lr=0.1, warmup_steps=10, total_steps=110)
    assert [round(lr_at(s, **schedule), 10) for s in range(10)] == [
        round(0.01 * (s + 1), 10) for s in range(10)
    ]
    assert lr_at(10, **schedule) == pytest.approx(0.1)


def test_lr_cosine_decay_after_warmup() -> None:
    schedule = dict(base_lr=0.1, warmup_steps=10, total_steps=110)
    assert lr_at(35, **schedule) == pytest.approx(0.05 * (1 + math.cos(math.pi / 4)))
    assert lr_at(60, **schedule) == pytest.approx(0.05)
    assert lr_at(85, **schedule) == pytest.approx(0.05 * (1 + math.cos(3 * math.pi / 4)))
    assert lr_at(110, **schedule) == pytest.approx(0.0)
    assert lr_at(500, **schedule) == pytest.approx(0.0)  # past the end stays at zero
    values = [lr_at(s, **schedule) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_lr_without_warmup_starts_at_the_base_rate() -> None:
    assert lr_at(0, base_lr=0.2, warmup_steps=0, total_steps=4) == pytest.approx(0.2)
    assert lr_at(2, base_lr=0.2, warmup_steps=0, total_steps=4) == pytest.approx(0.1)


# -- stand-alone training on real Fashion-MNIST -------------------------------------------------


def read_idx(name: str, count: int) -> torch.Tensor:
    """The first ``count`` items of one of Debian's gzip idx files (images or labels)."""
    with gzip.open(DEBIAN_FASHION_MNIST / f"{name}.gz", "rb") as handle:
        magic = int.from_bytes(handle.read(4), "big")
        dims = [int.from_bytes(handle.read(4), "big") for _ in range(magic & 0xFF)]
        item = math.prod(dims[1:])
        data = handle.read(count * item)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(count, *dims[1:])


@pytest.fixture(scope="module")
def fashion_mnist() -> DataSplits:
    """The first 640 training and 200 test images: 440 train, 200 val (held out), 64 calib."""
    if not DEBIAN_FASHION_MNIST.is_dir():
        pytest.skip(f"Fashion-MNIST is not installed at {DEBIAN_FASHION_MNIST}")

    def split(prefix: str, count: int, source: str) -> TensorSplit:
        images = read_idx(f"{prefix}-images-idx3-ubyte", count).unsqueeze(1).float() / 255
        images = (images - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
        labels = read_idx(f"{prefix}-labels-idx1-ubyte", count).long()
        return TensorSplit(images, labels, source, torch.arange(count))

    train = split("train", 640, "fashion-mnist/train")
    test = split("t10k", 200, "fashion-mnist/test")
    return split_train(train, test, val_size=200, calib_size=64, split_seed=0, num_classes=10)


def standalone_config(**changes) -> TrainConfig:
    defaults = dict(epochs=1.0, batch_size=110, lr=0.05, warmup_steps=1, log_interval=2)
    return TrainConfig(**{**defaults, **changes})


def test_train_standalone_writes_its_files(fashion_mnist: DataSplits, tmp_path: Path) -> None:
    space = get_space("fmnist")
    arch = Architecture.from_string(space, "k3e3-k5e6-k7e3-k3e6-k5e3-k7e6")
    assert fashion_mnist.train.images.shape[1:] == (1, 28, 28)

    result = train_standalone(arch, fashion_mnist, standalone_config(), tmp_path)

    assert result["steps"] == 4  # 440 images, batches of 110, one epoch
    assert result["arch"] == str(arch)
    for key in ("val_accuracy", "test_accuracy"):
        assert 0.0 <= result[key] <= 1.0
        assert result[key] * 200 == pytest.approx(round(result[key] * 200))  # 200 images each
    for name in ("metrics.jsonl", "checkpoint.pt", "result.json", "model.pt"):
        assert (tmp_path / name).is_file(), name

    assert json.loads((tmp_path / "result.json").read_text()) == result
    rows = list(read_jsonl(tmp_path / "metrics.jsonl"))
    assert [(row["epoch"], row["step"]) for row in rows] == [(1, 4)]
    assert math.isfinite(rows[0]["loss"]) and 0.0 <= rows[0]["val_accuracy"] <= 1.0
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 4

    # The saved model is the trained one: reloaded, it scores what the result reports.
    saved = load_checkpoint(tmp_path / "model.pt")
    assert saved["arch"] == str(arch)
    model = SinglePathNet(arch)
    model.load_state_dict(saved["model"])
    assert accuracy(model, fashion_mnist.test) == result["test_accuracy"]
    assert accuracy(model, fashion_mnist.val) == result["val_accuracy"]

    # A second call with the same configuration resumes at the end and trains nothing more.
    again = train_standalone(arch, fashion_mnist, standalone_config(log_interval=7), tmp_path)
    assert again["steps"] == 4 and again["test_accuracy"] == result["test_accuracy"]

    # A changed hyper-parameter is refused, naming it.
    with pytest.raises(ValueError, match=r"configuration changed in lr\b"):
        train_standalone(arch, fashion_mnist, standalone_config(lr=0.1), tmp_path)


# -- non-finite losses ---------------------------------------------------------------------------


def synthetic_splits(*, train: int = 64) -> DataSplits:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(train + 16, 1, 12, 12, generator=generator)
    labels = torch.randint(4, (train + 16,), generator=generator)
    full = TensorSplit(images[:train], labels[:train], "synthetic/train", torch.arange(train))
    test = TensorSplit(images[train:], labels[train:], "synthetic/test", torch.arange(16))
    return split_train(full, test, val_size=16, calib_size=16, split_seed=0, num_classes=4)


def poison(splits: DataSplits, position: int) -> None:
    splits.train.images[position, 0, 3, 3] = float("nan")


def steps_reading(position: int, plan: BatchPlan, steps: int) -> list[int]:
    """The optimizer steps whose (shared) batch contains train image ``position``."""
    return [step for step in range(steps)
            if position in next(plan.batches(*divmod(step, len(plan)))).tolist()]


def supernet_config(**changes) -> SupernetConfig:
    defaults = dict(batch_size=8, max_steps=10, warmup_steps=0, lr=0.05, log_interval=1000)
    return SupernetConfig(**{**defaults, **changes})


def test_non_finite_loss_stops_supernet_training(tmp_path: Path) -> None:
    splits, config = synthetic_splits(), supernet_config()
    poison(splits, 5)
    bad_steps = steps_reading(5, BatchPlan(len(splits.train), 8, seed=0), 10)
    assert bad_steps
    first_path = PathSampler(TINY, "strict", seed=0).sample(bad_steps[0])[0]

    torch.manual_seed(0)
    with pytest.raises(NonFiniteError) as error:
        train_supernet(Supernet(TINY), splits, config, tmp_path)
    message = str(error.value)
    assert f"supernet step {bad_steps[0]}:" in message
    assert f"path {first_path}" in message
    assert "on_nonfinite=skip" in message


def test_non_finite_steps_are_skipped_and_counted(tmp_path: Path) -> None:
    splits, config = synthetic_splits(), supernet_config(on_nonfinite="skip")
    poison(splits, 5)
    bad_steps = steps_reading(5, BatchPlan(len(splits.train), 8, seed=0), 10)
    assert 0 < len(bad_steps) < 10

    torch.manual_seed(0)
    supernet = Supernet(TINY)
    summary = train_supernet(supernet, splits, config, tmp_path)

    ledger = summary["ledger"]
    assert summary["steps"] == 10
    assert ledger["skipped_steps"] == len(bad_steps)
    assert ledger["steps"] == 10 - len(bad_steps)
    assert ledger["strictly_fair"]  # every block updated once per step that was taken
    assert ledger["updates_min"] == ledger["updates_max"] == 10 - len(bad_steps)
    # Nothing of a skipped step stays behind, BN running statistics included.
    for key, value in supernet.state_dict().items():
        assert torch.isfinite(value.float()).all(), key


def test_a_run_of_only_skipped_steps_leaves_the_supernet_unchanged(tmp_path: Path) -> None:
    splits = synthetic_splits()
    splits.train.images[:, 0, 0, 0] = float("nan")
    torch.manual_seed(0)
    supernet = Supernet(TINY)
    before = {k: v.clone() for k, v in supernet.state_dict().items()}

    summary = train_supernet(supernet, splits, supernet_config(on_nonfinite="skip", max_steps=3),
                             tmp_path)

    assert summary["ledger"]["skipped_steps"] == 3 and summary["ledger"]["steps"] == 0
    for key, value in supernet.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_huge_learning_rate_stops_with_a_clear_error(tmp_path: Path) -> None:
    torch.manual_seed(0)
    with pytest.raises(NonFiniteError, match=r"supernet step \d+: non-finite"):
        train_supernet(Supernet(TINY), synthetic_splits(),
                       supernet_config(lr=1e30, momentum=0.0, max_steps=20), tmp_path)


def test_non_finite_loss_stops_standalone_training(tmp_path: Path) -> None:
    splits = synthetic_splits()
    poison(splits, 5)
    bad_steps = steps_reading(5, BatchPlan(len(splits.train), 8, seed=0), 6)
    arch = Architecture(TINY, (0, 1, 2))
    with pytest.raises(NonFiniteError, match=rf"stand-alone step {bad_steps[0]}: .*{arch}"):
        train_standalone(arch, splits, TrainConfig(epochs=1.0, batch_size=8, warmup_steps=0,
                                                   lr=0.05), tmp_path)
