"""``data.stream``: training images decoded from files by DataLoader workers, batch by batch.

What must hold: the same batches for any number of workers and after a restart mid-run, fresh
augmentation every epoch, the validation files never trained on, unreadable files named, and a
real ``fairnas run`` killed and resumed ending with the weights of a run that never stopped.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from test_folder_data import folder_config, write_image_folders
from test_resume_kill import assert_identical

from fairnas.cli import main
from fairnas.config import ConfigError, DataConfig, resolve_config
from fairnas.data import BatchPlan, DataSplits, FileSplit, iterate_in_order, load_splits
from fairnas.io import load_checkpoint, read_jsonl
from fairnas.streaming import StreamedBatchFeeder, StreamedImages

SIZE, CHANNELS = 12, 1  # the tiny space's input


def streamed(root: Path, **changes: Any) -> DataSplits:
    config = folder_config(root, stream=True, **{"workers": 0, **changes})
    return load_splits(config, input_size=SIZE, input_channels=CHANNELS)


def feeder(splits: DataSplits, workers: int, *, batch_size: int = 8, seed: int = 0,
           **plan: Any) -> StreamedBatchFeeder:
    batches = BatchPlan(len(splits.train), batch_size, seed=seed, **plan)
    return StreamedBatchFeeder(splits.train, batches, batches_per_epoch=len(batches),
                               workers=workers)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 classes x 10 training images (8 held out for validation: 32 to train on), 3 test."""
    return write_image_folders(tmp_path_factory.mktemp("stream") / "images", size=(16, 16))


@pytest.fixture(scope="module")
def splits(folder: Path) -> DataSplits:
    return streamed(folder)


def test_the_training_split_is_a_file_list_and_the_rest_is_decoded(
    folder: Path, splits: DataSplits,
) -> None:
    in_memory = load_splits(folder_config(folder), input_size=SIZE, input_channels=CHANNELS)

    assert isinstance(splits.train, FileSplit) and len(splits.train) == 32
    assert splits.val.images.shape == (8, 1, 12, 12) and splits.test.images.shape[0] == 12
    # The very files the in-memory loader holds out, and the same calibration pool.
    assert splits.val.files == in_memory.val.files
    assert splits.calib.files == in_memory.calib.files
    assert splits.train.files == in_memory.train.files
    assert not set(splits.val.files) & set(splits.train.files)
    # Held as uint8 pixels (a quarter of the memory), normalised with the calibration images'
    # statistics when read.
    assert splits.val.images.dtype == splits.test.images.dtype == torch.uint8
    calib = splits.calib.normalised()
    assert float(calib.mean()) == pytest.approx(0, abs=1e-5)
    assert float(calib.std()) == pytest.approx(1, rel=1e-4)
    assert len(splits.train.mean) == 1 and 0 < splits.train.std[0] < 1
    assert splits.val.mean == splits.test.mean == splits.train.mean
    mean, std = splits.val.mean[0], splits.val.std[0]
    torch.testing.assert_close(splits.val.normalised(),
                               (splits.val.images.float() / 255 - mean) / std)
    first_batch = next(iterate_in_order(splits.val, 4))[0]
    assert first_batch.dtype == torch.float32
    assert torch.equal(first_batch, splits.val.normalised()[:4])


def test_batches_are_the_same_with_worker_processes(splits: DataSplits) -> None:
    """Every image seeds its own crop: which process decodes it changes nothing."""
    inline, workers = feeder(splits, 0), feeder(splits, 2)
    try:
        for number in range(6):  # 4 batches per epoch: into the second epoch
            images, labels = inline(number)
            images_2, labels_2 = workers(number)
            assert images.shape == (8, 1, 12, 12)
            assert torch.equal(images, images_2) and torch.equal(labels, labels_2)
            assert labels.tolist() == splits.train.labels[inline.indices(number)].tolist()
    finally:
        workers.close()


def test_a_feeder_started_mid_run_gives_the_same_batches(splits: DataSplits) -> None:
    through = feeder(splits, 0)
    expected = [through(number) for number in range(7)]

    resumed = feeder(splits, 2)
    try:
        for number in (5, 6, 2, 3):  # a fresh start at 5, then a jump back restarts at 2
            images, labels = resumed(number)
            assert torch.equal(images, expected[number][0])
            assert torch.equal(labels, expected[number][1])
    finally:
        resumed.close()


def test_streaming_leaves_the_global_random_state_alone(splits: DataSplits) -> None:
    """Dropout draws from torch's global generator, which checkpoints carry."""
    torch.manual_seed(123)
    state = torch.get_rng_state()
    for workers in (0, 1):
        streaming = feeder(splits, workers)
        streaming(0)
        streaming(3)
        streaming.close()
    assert torch.equal(torch.get_rng_state(), state)


def image_in(feed: StreamedBatchFeeder, number: int, position: int) -> torch.Tensor:
    indices = feed.indices(number).tolist()
    return feed(number)[0][indices.index(position)]


def by_file(feed: StreamedBatchFeeder, epoch: int) -> torch.Tensor:
    """Every training image as seen in ``epoch`` (4 batches), in file order."""
    images = torch.empty(32, 1, 12, 12)
    for number in range(4 * epoch, 4 * epoch + 4):
        images[feed.indices(number)] = feed(number)[0]
    return images


def changed(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many of the images differ by more than rounding."""
    return int(((a - b).abs().amax(dim=(1, 2, 3)) > 0.05).sum())


def test_augmentation_changes_images_between_epochs(folder: Path, splits: DataSplits) -> None:
    augmented = feeder(splits, 0)
    first, second = by_file(augmented, 0), by_file(augmented, 1)
    assert changed(first, second) >= 28  # out of 32; a crop can come out whole twice

    plain = streamed(folder, augment=False)
    centred = feeder(plain, 0)
    centre, again = by_file(centred, 0), by_file(centred, 1)
    assert torch.equal(centre, again)
    assert changed(first, centre) >= 28  # random crops and flips, not the centre crop
    for position, name in enumerate(plain.train.files):  # centre crop: as calibration images
        if name in plain.calib.files:
            calib = plain.calib.normalised()
            assert torch.equal(centre[position], calib[plain.calib.files.index(name)])


def test_validation_files_are_never_read_for_training(
    splits: DataSplits, monkeypatch: pytest.MonkeyPatch,
) -> None:
    opened: list[str] = []
    load = StreamedImages.load

    def recording_load(self: StreamedImages, position: int, seed: int) -> torch.Tensor:
        opened.append(self.path(position))
        return load(self, position, seed)

    monkeypatch.setattr(StreamedImages, "load", recording_load)
    streaming = feeder(splits, 0)
    for number in range(8):  # two epochs: every training image twice
        streaming(number)

    assert sorted(opened) == sorted(splits.train.files * 2)
    assert not set(opened) & set(splits.val.files)
    assert set(splits.calib.files) <= set(opened)  # BN is recalibrated on training images


def test_ranks_read_their_slices_of_the_same_global_batch(splits: DataSplits) -> None:
    """Two ranks' halves, augmentation included, make up the single process's batch."""
    single = feeder(splits, 0)
    ranks = [feeder(splits, 0, rank=rank, world_size=2) for rank in (0, 1)]
    for number in (0, 5):
        whole, labels = single(number)
        parts = [rank(number) for rank in ranks]
        assert torch.equal(torch.cat([images for images, _ in parts]), whole)
        assert torch.equal(torch.cat([part for _, part in parts]), labels)


def test_stream_is_refused_for_fashion_mnist(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ConfigError, match=r"data.stream=true needs data.dataset: folder .* got "
                                          r"data.dataset 'fashion-mnist'"):
        resolve_config(overrides=["data.stream=true"])
    with pytest.raises(ConfigError, match="data.stream=true needs data.dataset: folder"):
        DataConfig(dataset="cifar10", stream=True)
    assert main(["train-supernet", "--set", "data.stream=true"]) == 2
    err = capsys.readouterr().err
    assert "needs data.dataset: folder" in err and err.count("\n") == 1
    with pytest.raises(ConfigError, match=r"data.workers should be >= 0, got -1"):
        resolve_config(overrides=["data.dataset=folder", "data.workers=-1"])
    with pytest.raises(ConfigError, match=r"did you mean 'data.workers'"):
        resolve_config(overrides=["data.worker=2"])
    config = resolve_config(overrides=["data.dataset=folder", "data.stream=true",
                                       "data.workers=0", "data.augment=false"])
    assert (config.data.stream, config.data.workers, config.data.augment) == (True, 0, False)


def test_an_unreadable_training_file_is_named_or_replaced(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """Training files are not read at load time: a bad one shows up in its batch."""
    root = write_image_folders(tmp_path, size=(16, 16))
    splits = streamed(root)
    garbage = next(Path(f) for f in splits.train.files if f not in splits.calib.files)
    garbage.write_bytes(b"this is not an image at all" * 10)
    position = splits.train.files.index(str(garbage))
    number = next(n for n in range(4) if position in feeder(splits, 0).indices(n).tolist())

    with pytest.raises(ValueError, match=rf"image file {garbage} cannot be read .*skip_bad_im"):
        feeder(streamed(root), 2)(number)

    skipping = streamed(root, skip_bad_images=True)
    with caplog.at_level(logging.WARNING, logger="fairnas.streaming"):
        batches = [feeder(skipping, workers)(number) for workers in (0, 2)]
    images, labels = batches[0]
    assert images.shape == (8, 1, 12, 12) and torch.isfinite(images).all()
    assert torch.equal(images, batches[1][0]) and torch.equal(labels, batches[1][1])
    assert f"unreadable image file {garbage}" in caplog.text
    # Replaced by the next training file, with that file's label.
    slot = feeder(skipping, 0).indices(number).tolist().index(position)
    assert labels[slot] == skipping.train.labels[(position + 1) % 32]


def test_the_digest_follows_file_names_and_sizes(tmp_path: Path) -> None:
    from fairnas.pipeline import data_result_settings

    root = write_image_folders(tmp_path / "a", size=(16, 16))
    original = streamed(root).content_digest()
    shutil.copytree(root, tmp_path / "moved")
    assert streamed(tmp_path / "moved").content_digest() == original
    picture = root / "train" / "bag" / "train9.png"
    picture.write_bytes(picture.read_bytes() + b"\0")  # one training file grows
    assert streamed(root).content_digest() != original
    # Results record the settings that change images; not the number of workers, and
    # nothing new when not streaming (so older checkpoints still resume).
    assert "workers" not in data_result_settings(DataConfig(dataset="folder", stream=True))
    assert set(data_result_settings(DataConfig())) == {
        "dataset", "root", "val_size", "calib_size", "split_seed", "train_limit", "test_limit",
        "skip_bad_images"}


# -- a whole run, killed and resumed -------------------------------------------------------------

KILLING_RUN = textwrap.dedent("""
    import os, signal, sys

    from fairnas.cli import main
    from fairnas.training import TrainingLoop

    stage, at = sys.argv[1], int(sys.argv[2])
    loop = TrainingLoop.run

    def run(self, step_fn):
        def step_or_die(step):
            if self.name == stage and step == at:
                os.kill(os.getpid(), signal.SIGKILL)
            return step_fn(step)
        return loop(self, step_or_die)

    TrainingLoop.run = run
    sys.exit(main(sys.argv[3:]))
""")


def run_config(root: Path, out_dir: Path, workers: int) -> dict[str, Any]:
    """Supernet: 4 steps per epoch, 6 steps, checkpoints every 2. Retraining: 1 epoch of 4."""
    return {
        "space": "tiny", "out_dir": str(out_dir), "threads": 1,
        "data": {"dataset": "folder", "root": str(root), "val_size": 8, "calib_size": 8,
                 "stream": True, "workers": workers},
        "supernet": {"max_steps": 6, "batch_size": 8, "warmup_steps": 1, "checkpoint_every": 2,
                     "log_interval": 100},
        "eval": {"calib_images": 8, "val_images": 8, "batch_size": 8},
        "search": {"population": 4, "generations": 1},
        "train": {"epochs": 1.0, "batch_size": 8, "warmup_steps": 1, "checkpoint_every": 2,
                  "log_interval": 100},
    }


def run_killed(config_path: Path, stage: str, at: int) -> None:
    process = subprocess.run(
        [sys.executable, "-c", KILLING_RUN, stage, str(at), "run", "--config", str(config_path)],
        capture_output=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert process.returncode == -9, process.stderr.decode()[-3000:]


def test_a_streamed_run_killed_twice_ends_as_an_uninterrupted_one(
    folder: Path, tmp_path: Path,
) -> None:
    """Straight: no worker process. Killed in the supernet stage (step 3, mid-epoch, after the
    checkpoint at 2) and in retraining (step 3) with 2 workers, finished with 1."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    config_path = tmp_path / "resumed.yaml"
    config_path.write_text(yaml.safe_dump(run_config(folder, resumed, workers=2)))
    straight_path = tmp_path / "straight.yaml"
    straight_path.write_text(yaml.safe_dump(run_config(folder, straight, workers=0)))
    assert main(["run", "--config", str(straight_path), "--json"]) == 0

    run_killed(config_path, "supernet", 3)
    assert load_checkpoint(resumed / "supernet" / "checkpoint.pt")["step"] == 2
    run_killed(config_path, "standalone", 3)
    assert load_checkpoint(resumed / "retrain" / "checkpoint.pt")["step"] == 2
    assert not (resumed / "retrain" / "model.pt").exists()
    assert main(["run", "--config", str(config_path), "--set", "data.workers=1"]) == 0

    for name in ("supernet/supernet.pt", "supernet/checkpoint.pt", "retrain/model.pt",
                 "retrain/checkpoint.pt"):
        assert_identical(load_checkpoint(straight / name), load_checkpoint(resumed / name), name)
    for name in ("supernet/metrics.jsonl", "retrain/metrics.jsonl", "search/front.json"):
        assert (straight / name).read_text() == (resumed / name).read_text(), name
    rows = list(read_jsonl(resumed / "supernet" / "metrics.jsonl"))
    assert [row["step"] for row in rows] == [4, 6] and all(row["loss"] > 0 for row in rows)
    saved = load_checkpoint(resumed / "supernet" / "checkpoint.pt")["config"]["data"]
    assert saved["stream"] is True and "workers" not in saved
