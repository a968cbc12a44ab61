"""``data.dataset: folder``: the user's own images for NAS runs, and every way such a folder can
be wrong (missing, empty, classes that differ, unreadable files, the same picture in the
validation and test images)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from fairnas.cli import main
from fairnas.config import DataConfig
from fairnas.data import load_image_folders, load_splits

CLASSES = ("boot", "coat", "shirt", "bag")


def write_image_folders(root: Path, *, train: int = 10, test: int = 3, size: tuple = (20, 16),
                        mode: str = "RGB", classes: tuple[str, ...] = CLASSES) -> Path:
    """``root/{train,test}/<class>/<n>.png``: every image distinct, brightness set by the class
    so a small network can learn something."""
    generator = np.random.default_rng(0)
    channels = 3 if mode == "RGB" else 1
    for split, count in (("train", train), ("test", test)):
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for number in range(count):
                pixels = generator.integers(0, 60, (size[1], size[0], channels)) + 60 * label
                image = Image.fromarray(pixels.astype(np.uint8).squeeze(), mode)
                image.save(folder / f"{split}{number}.png")
    return root


def folder_config(root: Path, **changes) -> DataConfig:
    defaults = dict(dataset="folder", root=str(root), val_size=8, calib_size=8)
    return DataConfig(**{**defaults, **changes})


def test_images_are_read_resized_and_converted_to_the_space(tmp_path: Path) -> None:
    root = write_image_folders(tmp_path)  # RGB, 20x16

    splits = load_splits(folder_config(root), input_size=12, input_channels=1)

    assert splits.num_classes == 4 and splits.input_channels == 1 and splits.input_size == 12
    assert len(splits.train) + len(splits.val) == 40 and len(splits.val) == 8
    assert splits.test.images.shape == (12, 1, 12, 12)
    assert splits.test.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]  # sorted names
    everything = torch.cat([splits.train.images, splits.val.images])
    assert abs(float(everything.mean())) < 1e-4
    assert float(everything.std()) == pytest.approx(1, rel=1e-3)
    grey = load_splits(folder_config(write_image_folders(tmp_path / "grey", mode="L")),
                       input_size=8, input_channels=3)
    assert grey.train.images.shape[1:] == (3, 8, 8)


def test_a_missing_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"data folder {tmp_path / 'nowhere'} does not"):
        load_splits(folder_config(tmp_path / "nowhere"), input_size=12, input_channels=1)
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path / 'test'} does not exist.*train/<cl"):
        load_splits(folder_config(tmp_path), input_size=12, input_channels=1)
    with pytest.raises(ValueError, match="needs data.root"):
        load_splits(DataConfig(dataset="folder"), input_size=12, input_channels=1)


def test_folders_without_images_are_refused(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    with pytest.raises(ValueError, match="train holds no class folders"):
        load_image_folders(tmp_path, input_size=12, input_channels=1)
    (tmp_path / "train" / "boot").mkdir()
    (tmp_path / "train" / "boot" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=r"class folder .*train/boot holds no images"):
        load_image_folders(tmp_path, input_size=12, input_channels=1)


def test_class_folders_that_differ_between_splits_are_named(tmp_path: Path) -> None:
    root = write_image_folders(tmp_path)
    shutil.rmtree(root / "test" / "coat")
    (root / "test" / "sandal").mkdir()
    shutil.copy(root / "test" / "bag" / "test0.png", root / "test" / "sandal" / "x.png")

    with pytest.raises(ValueError, match="differ: only in train: coat; only in test: sandal"):
        load_image_folders(root, input_size=12, input_channels=1)


def break_two_images(root: Path) -> list[Path]:
    """One file of garbage and one cut off half-way, both with an image suffix."""
    garbage, truncated = root / "train" / "coat" / "train3.png", root / "test" / "bag" / "test1.png"
    garbage.write_bytes(b"this is not an image at all" * 10)
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    return [garbage, truncated]


def test_an_unreadable_image_is_named(tmp_path: Path) -> None:
    root = write_image_folders(tmp_path)
    garbage, truncated = break_two_images(root)

    with pytest.raises(ValueError, match=rf"image file {garbage} cannot be read.*skip_bad_images"):
        load_image_folders(root, input_size=12, input_channels=1)
    garbage.unlink()
    with pytest.raises(ValueError, match=rf"image file {truncated} cannot be read .*truncated"):
        load_image_folders(root, input_size=12, input_channels=1)


def test_unreadable_images_can_be_skipped_and_are_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    root = write_image_folders(tmp_path)
    broken = break_two_images(root)

    with caplog.at_level(logging.WARNING, logger="fairnas.data"):
        train, test, _ = load_image_folders(root, input_size=12, input_channels=1,
                                            skip_bad_images=True)

    assert len(train) == 39 and len(test) == 11
    assert not set(map(str, broken)) & set(train.files + test.files)
    assert "skipped 2 unreadable image file(s)" in caplog.text
    assert all(str(path) in caplog.text for path in broken)


def test_the_same_picture_in_validation_and_test_images_is_refused(tmp_path: Path) -> None:
    """Every training image is copied into test/ under another name: whichever images the
    validation split holds out, one of them is a test image."""
    root = write_image_folders(tmp_path)
    for image in (root / "train").glob("*/*.png"):
        shutil.copy(image, root / "test" / image.parent.name / f"copy_{image.name}")

    with pytest.raises(ValueError, match=r"8 validation images .* are also test images, for "
                                         r"example .*/train/\w+/train\d\.png has the same content "
                                         r"as .*/test/\w+/copy_train\d\.png"):
        load_splits(folder_config(root), input_size=12, input_channels=1)


def test_train_supernet_on_a_folder_through_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture,
) -> None:
    """A corrupt file stops the command with its name; skipping it lets the run go on."""
    root = write_image_folders(tmp_path / "images")
    garbage, _ = break_two_images(root)
    config = tmp_path / "folder.yaml"
    config.write_text(yaml.safe_dump({
        "space": "tiny", "out_dir": str(tmp_path / "run"),
        "data": {"dataset": "folder", "root": str(root), "val_size": 8, "calib_size": 8},
        "supernet": {"max_steps": 2, "batch_size": 8, "warmup_steps": 0},
    }))

    assert main(["train-supernet", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"image file {garbage} cannot be read" in err and err.count("\n") == 1

    assert main(["train-supernet", "--config", str(config), "--json",
                 "--set", "data.skip_bad_images=true"]) == 0
    assert "skipped 2 unreadable image file(s)" in caplog.text
    assert (tmp_path / "run" / "supernet" / "supernet.pt").is_file()


def test_the_data_digest_follows_the_images_not_the_folder(tmp_path: Path) -> None:
    """Moving the same files keeps the digest a resume compares; other images change it."""
    from fairnas.config import resolve_config
    from fairnas.pipeline import RunContext

    def digest(root: Path) -> str:
        config = resolve_config(overrides=[
            "space={base: tiny, name: tiny-folder, input_size: 12, num_classes: 4}",
            "data.dataset=folder", f"data.root={root}", "data.val_size=8", "data.calib_size=8",
        ])
        return RunContext(config).data_digest

    original = digest(write_image_folders(tmp_path / "a"))
    shutil.copytree(tmp_path / "a", tmp_path / "moved")
    assert digest(tmp_path / "moved") == original

    other = write_image_folders(tmp_path / "b")
    picture = sorted((other / "train" / "bag").iterdir())[0]
    Image.new("RGB", (20, 16), (7, 7, 7)).save(picture)  # one image differs
    assert digest(other) != original
