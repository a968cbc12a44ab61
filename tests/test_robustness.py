"""Nothing lost on a full disk or a diverged run, and nothing executed from a file.

* A write that fails (a full disk) leaves the previous checkpoint or log intact, leaves no
  temporary file, and is reported naming the file; through the CLI it is one line, exit 2.
* A non-finite step stops training with the last good checkpoint kept, and the run can go on
  from there with ``on_nonfinite: skip``; stand-alone training skips and counts such steps too.
* Weights load with ``weights_only``, configs with a safe YAML loader; the project's model
  files can be written as safetensors and used from there.
"""

from __future__ import annotations

import errno
import json
import os
import re
import resource
import signal
from pathlib import Path

import pytest
import torch
import yaml
from test_folder_data import write_image_folders

from fairnas.arch import Architecture
from fairnas.cli import main
from fairnas.config import SupernetConfig, TrainConfig
from fairnas.data import BatchPlan, DataSplits, TensorSplit, split_train
from fairnas.io import (
    OutputWriteError,
    append_jsonl,
    atomic_torch_save,
    load_checkpoint,
    load_model_file,
    read_jsonl,
)
from fairnas.network import Supernet
from fairnas.space import get_space
from fairnas.training import NonFiniteError, TrainingLoop, train_standalone, train_supernet

TINY = get_space("tiny")
PACKAGE = Path(__file__).resolve().parents[1] / "fairnas"


def synthetic_splits() -> DataSplits:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(80, 1, 12, 12, generator=generator)
    labels = torch.randint(4, (80,), generator=generator)
    full = TensorSplit(images[:64], labels[:64], "synthetic/train", torch.arange(64))
    test = TensorSplit(images[64:], labels[64:], "synthetic/test", torch.arange(16))
    return split_train(full, test, val_size=16, calib_size=16, split_seed=0, num_classes=4)


def supernet_config(**changes) -> SupernetConfig:
    defaults = dict(batch_size=8, max_steps=8, warmup_steps=0, lr=0.05, log_interval=1000)
    return SupernetConfig(**{**defaults, **changes})


def temporary_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


# -- a full disk ---------------------------------------------------------------------------------


def test_a_file_too_large_for_the_disk_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    """A real write error from the kernel: the file-size limit makes ``write`` fail (EFBIG)
    the way a full disk does (ENOSPC), part-way through the new checkpoint."""
    path = tmp_path / "checkpoint.pt"
    atomic_torch_save(path, {"step": 1, "weights": torch.zeros(10)})
    before = path.read_bytes()

    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an error, not a killed process
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, limits[1]))
    try:
        with pytest.raises(OutputWriteError) as error:
            atomic_torch_save(path, {"step": 2, "weights": torch.zeros(100_000)})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)

    assert error.value.errno == errno.EFBIG
    assert f"could not write {path}" in str(error.value) and "is intact" in str(error.value)
    assert path.read_bytes() == before and load_checkpoint(path)["step"] == 1
    assert temporary_files(tmp_path) == []


def fail_on_fsync(monkeypatch: pytest.MonkeyPatch, marker: str, at: int) -> None:
    """The ``at``-th fsync of a file whose name contains ``marker`` fails with ENOSPC: where a
    full disk shows on file systems that allocate late."""
    real, seen = os.fsync, []

    def fsync(fd: int) -> None:
        if marker in os.readlink(f"/proc/self/fd/{fd}"):
            seen.append(fd)
            if len(seen) == at:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name open files")
def test_a_full_disk_mid_training_is_one_line_and_keeps_the_last_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "space": "tiny", "out_dir": str(tmp_path / "run"),
        "data": {"dataset": "folder", "root": str(write_image_folders(tmp_path / "images")),
                 "val_size": 8, "calib_size": 8},
        "supernet": {"max_steps": 6, "batch_size": 8, "warmup_steps": 0, "checkpoint_every": 2},
    }))
    fail_on_fsync(monkeypatch, ".checkpoint.pt.", at=2)  # the checkpoint of step 4

    assert main(["train-supernet", "--config", str(config)]) == 2

    err = capsys.readouterr().err.splitlines()[-1]
    checkpoint = tmp_path / "run" / "supernet" / "checkpoint.pt"
    assert re.fullmatch(rf"fairnas train-supernet: error: \[Errno {errno.ENOSPC}\] could not "
                        rf"write {checkpoint}: No space left on device; the previous version "
                        rf"\(if any\) is intact", err), err
    assert load_checkpoint(checkpoint)["step"] == 2
    assert temporary_files(tmp_path / "run") == []

    monkeypatch.undo()  # space freed: the same command goes on from step 2
    assert main(["train-supernet", "--config", str(config)]) == 0
    assert load_checkpoint(checkpoint)["step"] == 6


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name open files")
def test_a_failed_append_is_cut_off_so_later_lines_stay_readable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = tmp_path / "metrics.jsonl"
    append_jsonl(path, {"step": 1})
    with monkeypatch.context() as patch:
        fail_on_fsync(patch, "metrics.jsonl", at=1)
        with pytest.raises(OutputWriteError, match=f"could not append to {path}: No space"):
            append_jsonl(path, {"step": 2})
    assert path.read_text() == '{"step": 1}\n'
    append_jsonl(path, {"step": 3})
    assert [row["step"] for row in read_jsonl(path)] == [1, 3]


# -- exact resume details ------------------------------------------------------------------------


class KilledError(Exception):
    """Stands in for a kill between an epoch's metrics row and its checkpoint."""


def test_metrics_logged_after_the_checkpoint_are_not_repeated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    splits, config = synthetic_splits(), supernet_config()  # 6 steps per epoch, 8 in all
    real_save = TrainingLoop.save

    def save_until_epoch_end(self: TrainingLoop) -> None:
        if self.step == 6:
            raise KilledError
        real_save(self)

    with monkeypatch.context() as patch:
        patch.setattr(TrainingLoop, "save", save_until_epoch_end)
        torch.manual_seed(0)
        with pytest.raises(KilledError):
            train_supernet(Supernet(TINY), splits, config, tmp_path, checkpoint_every=4)
    assert [row["step"] for row in read_jsonl(tmp_path / "metrics.jsonl")] == [6]

    train_supernet(Supernet(TINY), splits, config, tmp_path)
    assert [row["step"] for row in read_jsonl(tmp_path / "metrics.jsonl")] == [6, 8]


# -- non-finite values ---------------------------------------------------------------------------


def poisoned(position: int = 5) -> tuple[DataSplits, list[int]]:
    """Splits with a NaN in one training image, and the steps (of 8) whose batch holds it."""
    splits = synthetic_splits()
    splits.train.images[position, 0, 3, 3] = float("nan")
    plan = BatchPlan(len(splits.train), 8, seed=0)
    steps = [s for s in range(8) if position in next(plan.batches(*divmod(s, len(plan))))]
    return splits, steps


def test_a_non_finite_step_keeps_the_last_good_checkpoint_and_can_be_skipped_on_resume(
    tmp_path: Path,
) -> None:
    splits, bad = poisoned()
    assert bad and bad[0] > 0
    torch.manual_seed(0)
    with pytest.raises(NonFiniteError, match=rf"step {bad[0]}: .* {tmp_path / 'checkpoint.pt'}"):
        train_supernet(Supernet(TINY), splits, supernet_config(checkpoint_every=1), tmp_path)

    checkpoint = load_checkpoint(tmp_path / "checkpoint.pt")
    assert checkpoint["step"] == bad[0]  # everything before the bad step, nothing of it
    assert all(torch.isfinite(v.float()).all() for v in checkpoint["model"].values())

    # As the message suggests: the same folder with on_nonfinite=skip goes on from there.
    summary = train_supernet(Supernet(TINY), splits,
                             supernet_config(checkpoint_every=1, on_nonfinite="skip"), tmp_path)
    assert summary["steps"] == 8 and summary["ledger"]["skipped_steps"] == len(bad)


def test_standalone_training_skips_and_counts_non_finite_steps(tmp_path: Path) -> None:
    splits, bad = poisoned()
    config = TrainConfig(epochs=8 / 6, batch_size=8, warmup_steps=0, lr=0.05,
                         on_nonfinite="skip")
    model_arch = Architecture(TINY, (0, 1, 2))

    result = train_standalone(model_arch, splits, config, tmp_path)

    assert result["steps"] == 8 and result["skipped_steps"] == len(bad)
    for key, value in load_model_file(tmp_path / "model.pt")["model"].items():
        assert torch.isfinite(value.float()).all(), key  # BN statistics restored as well


# -- safe loading --------------------------------------------------------------------------------


def test_the_package_never_unpickles_or_loads_yaml_unsafely() -> None:
    """Every ``torch.load`` passes ``weights_only=True``; YAML goes through ``safe_load``;
    pickle is only used through the restricted unpickler that refuses anything but data."""
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in match.group(1):
                problems.append(f"{path.name}: {match.group(0)}")
        problems += [f"{path.name}: {m}" for m in
                     re.findall(r"yaml\.(?:load|unsafe_load|full_load)\(|pickle\.loads?\(", text)]
    assert problems == []


def test_a_config_with_python_tags_is_refused_without_running_them(
    tmp_path: Path, capsys: pytest.CaptureFixture,
) -> None:
    marker = tmp_path / "ran"
    config = tmp_path / "evil.yaml"
    config.write_text(f"space: !!python/object/apply:os.system ['touch {marker}']\n")

    assert main(["train-supernet", "--config", str(config)]) == 2
    assert "is not valid YAML" in capsys.readouterr().err and not marker.exists()


@pytest.fixture(scope="module")
def trained_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A supernet.pt and a model.pt of the tiny space, two steps each, and their config."""
    base = tmp_path_factory.mktemp("files")
    config = base / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "space": "tiny", "out_dir": str(base / "run"),
        "data": {"dataset": "folder", "root": str(write_image_folders(base / "images")),
                 "val_size": 8, "calib_size": 8},
        "supernet": {"max_steps": 2, "batch_size": 8, "warmup_steps": 0},
        "train": {"epochs": 0.5, "batch_size": 8, "warmup_steps": 0},
        "eval": {"calib_images": 8},
    }))
    assert main(["train-supernet", "--config", str(config)]) == 0
    assert main(["train", "--config", str(config), "--arch", "k3e1-k3e2-k5e1"]) == 0
    model = next((base / "run" / "train").glob("*/model.pt"))
    return {"config": config, "supernet": base / "run" / "supernet" / "supernet.pt",
            "model": model}


def run_json(capsys: pytest.CaptureFixture, *args: str) -> dict:
    assert main([*args, "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("kind", ["model", "supernet"])
def test_project_weights_export_to_safetensors_and_load_from_there(
    trained_files: dict[str, Path], kind: str, tmp_path: Path, capsys: pytest.CaptureFixture,
) -> None:
    source, output = trained_files[kind], tmp_path / f"{kind}.safetensors"
    exported = run_json(capsys, "export", "--format", "safetensors", "--checkpoint", str(source),
                        "--output", str(output))
    assert exported["identical"] and output.read_bytes()[8:9] == b"{"  # a safetensors header

    original, copy = load_model_file(source), load_model_file(output)
    assert copy["model"].keys() == original["model"].keys()
    assert all(torch.equal(copy["model"][k], v) for k, v in original["model"].items())

    config = ["--config", str(trained_files["config"])]
    if kind == "model":
        scores = [run_json(capsys, "evaluate", *config, "--model", str(path))["test_accuracy"]
                  for path in (source, output)]
    else:
        scores = [run_json(capsys, "evaluate", *config, "--arch", "k5e1-k3e1-k3e2",
                           "--supernet", str(path))["supernet_accuracy"]
                  for path in (source, output)]
    assert scores[0] == scores[1]


def test_resuming_on_other_data_is_refused_naming_the_key(
    trained_files: dict[str, Path], capsys: pytest.CaptureFixture,
) -> None:
    """The trainers checkpoint the data settings: the same steps on other images would make a
    resumed run meaningless, even where the supernet settings are unchanged."""
    config = ["--config", str(trained_files["config"]), "--set", "data.val_size=12"]
    for command in (["train-supernet"], ["train", "--arch", "k3e1-k3e2-k5e1"]):
        assert main([*command, *config]) == 2
        err = capsys.readouterr().err
        assert "refusing to resume" in err and "configuration changed in data.val_size" in err


def test_a_diverging_run_is_one_line_from_the_cli(
    trained_files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture,
) -> None:
    assert main(["train-supernet", "--config", str(trained_files["config"]), "--out-dir",
                 str(tmp_path), "--set", "supernet.lr=1e30", "--set", "supernet.momentum=0",
                 "--set", "supernet.max_steps=20"]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert re.match(r"fairnas train-supernet: error: supernet step \d+: non-finite", err), err
    assert "on_nonfinite=skip" in err
