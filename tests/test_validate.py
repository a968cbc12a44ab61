"""``validate`` against an independent computation, local datasets, and ``prepare-imagenet``.

The images are real: Fashion-MNIST test images (from Debian's package) written as RGB JPEG
files into class folders, or into CIFAR-10's local batch format.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_pretrained import official_listing, random_release_state, write_release_file

from fairnas.cli import main
from fairnas.data import DEBIAN_FASHION_MNIST, prepare_fashion_mnist
from fairnas.imagenet import IMAGENET_MEAN, IMAGENET_STD, Cifar10
from fairnas.pretrained import load_pretrained

MODEL = "fairnas_c_se_0.5_transfer"

needs_fashion_mnist = pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(),
                                         reason="Fashion-MNIST package not installed")



@pytest.fixture(scope="module")
def fashion_images(tmp_path_factory) -> tuple[np.ndarray, np.ndarray]:
    """Three test images of each of the ten classes, 28x28 grayscale."""
    if not DEBIAN_FASHION_MNIST.is_dir():
        pytest.skip("Fashion-MNIST package not installed")
    from torchvision.datasets import FashionMNIST

    root = tmp_path_factory.mktemp("fmnist")
    prepare_fashion_mnist(root)
    data = FashionMNIST(str(root), train=False, download=False)
    labels = data.targets.numpy()
    picks = np.concatenate([np.flatnonzero(labels == c)[:3] for c in range(10)])
    return data.data.numpy()[picks], labels[picks]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    state = random_release_state(official_listing(MODEL), seed=21)
    return write_release_file(tmp_path_factory.mktemp("ckpt") / f"{MODEL}.pt.tar", state,
                              "model_state")


def _protocol(image: Image.Image, resize: int, crop: int) -> np.ndarray:
    """Resize the shorter side (PIL bilinear), center crop, normalise: written out by hand."""
    width, height = image.size
    if width <= height:
        size = (resize, int(resize * height / width))
    else:
        size = (int(resize * width / height), resize)
    image = image.resize(size, Image.BILINEAR)
    left = int(round((size[0] - crop) / 2.0))
    top = int(round((size[1] - crop) / 2.0))
    pixels = np.asarray(image.crop((left, top, left + crop, top + crop)), np.float32) / 255.0
    pixels = (pixels - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    return pixels.transpose(2, 0, 1)


def _independent_scores(model, images: list[Image.Image], labels: list[int], resize: int,
                        crop: int) -> tuple[int, int]:
    batch = torch.from_numpy(np.stack([_protocol(im, resize, crop) for im in images]))
    with torch.no_grad():
        logits = model(batch).numpy()
    ranked = np.argsort(-logits, axis=1)
    top1 = int((ranked[:, 0] == labels).sum())
    top5 = int((ranked[:, :5] == np.asarray(labels)[:, None]).any(axis=1).sum())
    return top1, top5


def _validate(capsys, *args: str) -> dict:
    assert main(["validate", "--workers", "0", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


@needs_fashion_mnist
def test_validate_class_folders_with_the_published_protocol(fashion_images, checkpoint,
                                                           tmp_path, capsys):
    pictures, labels = fashion_images
    folder = tmp_path / "val"
    for i, (picture, label) in enumerate(zip(pictures, labels, strict=True)):
        (folder / f"class_{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(picture).convert("RGB").save(folder / f"class_{label}" / f"{i}.JPEG",
                                                     quality=90)

    result = _validate(capsys, "--model", MODEL, "--checkpoint", str(checkpoint),
                       "--data-root", str(tmp_path), "--batch-size", "16")

    files = sorted(folder.glob("*/*.JPEG"))  # class folders sorted = label order
    images = [Image.open(f).convert("RGB") for f in files]
    truth = [int(f.parent.name.split("_")[1]) for f in files]
    top1, top5 = _independent_scores(load_pretrained(MODEL, checkpoint), images, truth, 256, 224)
    assert result["images"] == len(files) == 30
    assert result["top1"] == pytest.approx(100.0 * top1 / 30, abs=1e-9)
    assert result["top5"] == pytest.approx(100.0 * top5 / 30, abs=1e-9)
    assert result["top5"] >= result["top1"]
    assert result["reported_top1"] == 97.99


def _write_cifar(folder: Path, pictures: np.ndarray, labels: np.ndarray) -> None:
    """CIFAR-10's python format: pickled dicts of uint8 rows (R, G, B planes of 32x32)."""
    folder.mkdir(parents=True)
    rgb = np.stack([np.pad(p, 2) for p in pictures])[:, None].repeat(3, axis=1)
    batch = {b"batch_label": b"testing batch 1 of 1", b"labels": [int(v) for v in labels],
             b"data": rgb.reshape(len(rgb), -1).astype(np.uint8),
             b"filenames": [f"{i}.png".encode() for i in range(len(rgb))]}
    (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    meta = {b"label_names": [f"c{i}".encode() for i in range(10)], b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))


@needs_fashion_mnist
def test_validate_cifar10_local_format(fashion_images, checkpoint, tmp_path, capsys):
    pictures, labels = fashion_images
    _write_cifar(tmp_path / "cifar-10-batches-py", pictures, labels)

    result = _validate(capsys, "--model", MODEL, "--checkpoint", str(checkpoint),
                       "--data-root", str(tmp_path), "--resize", "72", "--crop", "64")

    dataset = Cifar10(tmp_path, train=False)
    assert dataset.classes[3] == "c3" and len(dataset) == 30
    images = [dataset[i][0] for i in range(len(dataset))]
    top1, top5 = _independent_scores(load_pretrained(MODEL, checkpoint), images,
                                     list(labels), 72, 64)
    assert "CIFAR-10" in result["data"] and result["images"] == 30
    assert result["top1"] == pytest.approx(100.0 * top1 / 30, abs=1e-9)
    assert result["top5"] == pytest.approx(100.0 * top5 / 30, abs=1e-9)


def test_cifar_reader_refuses_pickled_code(tmp_path, capsys, checkpoint):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Payload()}, protocol=2))

    assert main(["validate", "--model", MODEL, "--checkpoint", str(checkpoint),
                 "--data-root", str(tmp_path), "--workers", "0"]) == 2
    assert "not a CIFAR-10 batch file" in capsys.readouterr().err and not marker.exists()


def test_validate_refuses_missing_data_and_cuda_without_gpu(tmp_path, capsys, checkpoint):
    assert main(["validate", "--model", MODEL, "--checkpoint", str(checkpoint),
                 "--data-root", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["validate", "--model", MODEL, "--checkpoint", str(checkpoint),
                     "--data-root", str(tmp_path), "--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err


# -- prepare-imagenet ---------------------------------------------------------------------------

WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361", "n01494475"]


def _write_devkit(root: Path, truth: list[int]) -> Path:
    """A devkit archive shaped like ILSVRC2012's: meta.mat (leaf synsets) and the ground truth."""
    from scipy.io import savemat

    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children",
              "wordnet_height", "num_train_images"]
    synsets = np.zeros((len(WNIDS) + 1, 1), dtype=[(f, "O") for f in fields])
    for i, wnid in enumerate([*WNIDS, "n00001740"]):
        leaf = i < len(WNIDS)
        children = np.array([[0 if leaf else 5]])
        synsets[i, 0] = (np.array([[i + 1]]), wnid, f"class {i}", "", children,
                         np.zeros((1, 0)), np.array([[0]]), np.array([[1300]]))
    meta = io.BytesIO()
    savemat(meta, {"synsets": synsets})
    members = {"ILSVRC2012_devkit_t12/data/meta.mat": meta.getvalue(),
               "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt":
                   "".join(f"{t}\n" for t in truth).encode()}
    path = root / "ILSVRC2012_devkit_t12.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def _jpeg(number: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), (number * 20 % 255, 0, 0)).save(buffer, "JPEG")
    return buffer.getvalue()


TRUTH = [1, 3, 3, 5, 2, 1, 4, 5, 2, 2, 1, 3]  # class id of validation images 1..12


def _arranged(val: Path) -> dict[str, list[str]]:
    return {d.name: sorted(f.name for f in d.iterdir()) for d in sorted(val.iterdir())
            if d.is_dir()}


def _expected() -> dict[str, list[str]]:
    expected: dict[str, list[str]] = {}
    for number, class_id in enumerate(TRUTH, start=1):
        expected.setdefault(WNIDS[class_id - 1], []).append(f"ILSVRC2012_val_{number:08d}.JPEG")
    return {k: sorted(v) for k, v in sorted(expected.items())}


def _prepare(capsys, root: Path, *extra: str) -> tuple[int, dict | str]:
    code = main(["prepare-imagenet", "--root", str(root), "--json", *extra])
    captured = capsys.readouterr()
    return code, json.loads(captured.out) if code == 0 else captured.err


def test_prepare_imagenet_moves_flat_images_and_is_idempotent(tmp_path, capsys):
    _write_devkit(tmp_path, TRUTH)
    val = tmp_path / "val"
    val.mkdir()
    for number in range(1, 13):
        (val / f"ILSVRC2012_val_{number:08d}.JPEG").write_bytes(_jpeg(number))
    # an earlier run was interrupted: one image already moved, one half-written extraction
    (val / WNIDS[0]).mkdir()
    first = "ILSVRC2012_val_00000001.JPEG"
    os.replace(val / first, val / WNIDS[0] / first)
    (val / WNIDS[1] / "ILSVRC2012_val_00000005.JPEG.partial").parent.mkdir()
    (val / WNIDS[1] / "ILSVRC2012_val_00000005.JPEG.partial").write_bytes(b"\xff\xd8")

    code, summary = _prepare(capsys, tmp_path)

    assert code == 0 and summary["moved"] == 11 and summary["missing"] == 0
    assert _arranged(val) == _expected()
    assert not list(val.glob("*.JPEG")) and not list(val.glob("*/*.partial"))
    assert (val / WNIDS[4] / "ILSVRC2012_val_00000004.JPEG").read_bytes() == _jpeg(4)

    code, again = _prepare(capsys, tmp_path)
    assert code == 0 and again["moved"] == 0 and again["images"] == 12
    assert _arranged(val) == _expected()


def test_prepare_imagenet_from_the_images_archive(tmp_path, capsys):
    _write_devkit(tmp_path, TRUTH)
    with tarfile.open(tmp_path / "ILSVRC2012_img_val.tar", "w") as archive:
        for number in range(1, 13):
            data = _jpeg(number)
            info = tarfile.TarInfo(f"ILSVRC2012_val_{number:08d}.JPEG")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))

    code, summary = _prepare(capsys, tmp_path)
    assert code == 0 and summary["extracted"] == 12 and summary["classes"] == 5
    assert _arranged(tmp_path / "val") == _expected()

    code, again = _prepare(capsys, tmp_path)
    assert code == 0 and again["extracted"] == 0 and again["images"] == 12


def test_prepare_imagenet_errors_leave_images_untouched(tmp_path, capsys):
    val = tmp_path / "val"
    val.mkdir()
    for number in range(1, 14):  # one image more than the ground truth covers
        (val / f"ILSVRC2012_val_{number:08d}.JPEG").write_bytes(_jpeg(number))

    code, err = _prepare(capsys, tmp_path)
    assert code == 2 and "ILSVRC2012_devkit_t12.tar.gz" in err and "image-net.org" in err

    _write_devkit(tmp_path, TRUTH)
    code, err = _prepare(capsys, tmp_path)
    assert code == 2 and "ILSVRC2012_val_00000013.JPEG" in err and "nothing was moved" in err
    assert len(list(val.glob("*.JPEG"))) == 13 and not _arranged(val)

    code, err = _prepare(capsys, tmp_path / "empty")
    assert code == 2 and "not found" in err
