"""``transfer``: fine-tuning with a new head on real images, carried weights, exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_pretrained import official_listing, random_release_state, write_release_file

from fairnas.arch import Architecture
from fairnas.cli import main
from fairnas.config import TrainConfig
from fairnas.data import DEBIAN_FASHION_MNIST, prepare_fashion_mnist
from fairnas.io import load_checkpoint
from fairnas.network import SinglePathNet
from fairnas.space import get_space
from fairnas.transfer import LazyImages, TransferSettings, transfer

pytestmark = pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(),
                                reason="Fashion-MNIST package not installed")
FMNIST_ARCH = "k3e3-k3e6-k5e3-k5e6-k7e3-k7e6"



@pytest.fixture(scope="module")
def fmnist_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fmnist")
    prepare_fashion_mnist(root)
    return root


@pytest.fixture(scope="module")
def four_classes(tmp_path_factory, fmnist_root) -> Path:
    """Class folders train/ (8 per class) and test/ (4 per class) of four Fashion-MNIST classes."""
    from torchvision.datasets import FashionMNIST

    root = tmp_path_factory.mktemp("four")
    for split, train, count in (("train", True, 8), ("test", False, 4)):
        data = FashionMNIST(str(fmnist_root), train=train, download=False)
        labels = data.targets.numpy()
        for label in range(4):
            folder = root / split / data.classes[label].replace("/", "-")
            folder.mkdir(parents=True)
            for i in np.flatnonzero(labels == label)[:count]:
                Image.fromarray(data.data[i].numpy()).convert("RGB").save(folder / f"{i}.jpg")
    return root


def _run(capsys, *args: str) -> dict:
    assert main(["transfer", "--json", "--log-interval", "5", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_transfer_learns_fashion_mnist(fmnist_root, tmp_path, capsys):
    result = _run(capsys, "--space", "fmnist", "--arch", FMNIST_ARCH,
                  "--dataset", "fashion-mnist", "--data-root", str(fmnist_root),
                  "--out-dir", str(tmp_path), "--image-size", "28", "--train-limit", "640",
                  "--test-limit", "200", "--val-size", "100", "--batch-size", "32",
                  "--epochs", "2", "--lr", "0.1")

    assert result["steps"] == 40 and result["test_images"] == 200
    assert result["test_top1"] > 25.0  # chance is 10%
    assert result["test_top1"] == pytest.approx(100 * result["test_accuracy"])
    for name in ("model.pt", "checkpoint.pt", "metrics.jsonl", "transfer.json",
                 "architecture.json", "result.json"):
        assert (tmp_path / name).is_file(), name
    assert json.loads((tmp_path / "result.json").read_text())["test_top1"] == result["test_top1"]


def test_published_model_transfers_with_a_new_head(four_classes, tmp_path, capsys):
    state = random_release_state(official_listing("fairnas_c_se_0.5"), seed=2)
    checkpoint = write_release_file(tmp_path / "fairnas_c_se_0.5.pth.tar", state, "bare")
    out = tmp_path / "run"

    # lr 0: the run must carry the released weights over unchanged (BN statistics aside)
    result = _run(capsys, "--model", "fairnas_c_se_0.5", "--checkpoint", str(checkpoint),
                  "--data-root", str(four_classes), "--out-dir", str(out),
                  "--image-size", "32", "--batch-size", "16", "--lr", "0")

    assert result["num_classes"] == 4 and result["test_images"] == 16 and result["steps"] == 2
    model = load_checkpoint(out / "model.pt")["model"]
    assert model["classifier.weight"].shape == (4, 1280)
    torch.testing.assert_close(model["layers.18.depthwise.conv.weight"],
                               state["blocks.5.4.conv_dw.weight"])
    torch.testing.assert_close(model["stem.conv.weight"], state["conv_stem.weight"])
    space = json.loads((out / "architecture.json").read_text())["space"]
    assert (space["num_classes"], space["dropout"], space["se_ratio"]) == (4, 0.1, 0.5)

    # the fine-tuned files validate to the same accuracy (eval resize 37 = 32 * 256 / 224)
    assert main(["validate", "--arch", str(out / "architecture.json"), "--checkpoint",
                 str(out / "model.pt"), "--data-root", str(four_classes), "--resize", "37",
                 "--crop", "32", "--workers", "0", "--json"]) == 0
    validated = json.loads(capsys.readouterr().out)
    assert validated["images"] == 16
    assert validated["top1"] == pytest.approx(result["test_top1"])


def _small_run(fmnist_root: Path, out: Path) -> dict:
    arch = Architecture.from_string(get_space("fmnist"), FMNIST_ARCH)
    settings = TransferSettings(dataset="fashion-mnist", data_root=str(fmnist_root),
                                image_size=28, train_limit=128, test_limit=64)
    config = TrainConfig(epochs=1.0, batch_size=32, lr=0.05, warmup_steps=0, log_interval=2)
    torch.manual_seed(0)
    return transfer(SinglePathNet(arch), settings, config, out, checkpoint_every=1)


def test_interrupted_transfer_resumes_exactly(fmnist_root, tmp_path, monkeypatch):
    reference = _small_run(fmnist_root, tmp_path / "straight")

    original = LazyImages.__getitem__
    batches = {"count": 0}

    def interrupt_on_third_batch(self, index):
        if isinstance(index, torch.Tensor):
            batches["count"] += 1
            if batches["count"] == 3:
                raise KeyboardInterrupt
        return original(self, index)

    monkeypatch.setattr(LazyImages, "__getitem__", interrupt_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        _small_run(fmnist_root, tmp_path / "resumed")
    assert load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")["step"] == 2
    monkeypatch.setattr(LazyImages, "__getitem__", original)

    resumed = _small_run(fmnist_root, tmp_path / "resumed")

    assert resumed["steps"] == reference["steps"] == 4
    assert resumed["test_accuracy"] == reference["test_accuracy"]
    straight = load_checkpoint(tmp_path / "straight" / "model.pt")["model"]
    again = load_checkpoint(tmp_path / "resumed" / "model.pt")["model"]
    for key, value in straight.items():
        torch.testing.assert_close(again[key], value, rtol=0, atol=0)


def test_resume_refuses_changed_settings(fmnist_root, tmp_path, capsys):
    args = ["--space", "fmnist", "--arch", FMNIST_ARCH, "--dataset", "fashion-mnist",
            "--data-root", str(fmnist_root), "--out-dir", str(tmp_path), "--image-size", "28",
            "--train-limit", "32", "--test-limit", "32", "--batch-size", "32"]
    _run(capsys, *args)

    assert main(["transfer", *args, "--dropout", "0.3"]) == 2
    assert "transfer settings changed" in capsys.readouterr().err
    assert main(["transfer", *args, "--no-resume"]) == 2
    assert "already holds a transfer run" in capsys.readouterr().err
