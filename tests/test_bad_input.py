"""Bad input to the pipeline commands ends with exit status 2 and one line that says what is
wrong: configuration keys and values, data folders, architecture strings, search limits no
architecture meets, and checkpoint files that are not what they should be.

None of these needs a trained network: each error comes before any training or data loading
(the last two tests aside), which is also the point: a mistake costs seconds, not a run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from test_folder_data import write_image_folders

from fairnas.arch import Architecture
from fairnas.cli import main
from fairnas.io import LFS_POINTER_PREFIX, atomic_torch_save
from fairnas.network import SinglePathNet, Supernet
from fairnas.space import get_space

FMNIST_ARCH = "k3e3-k5e6-k7e3-k3e6-k5e3-k7e6"
TINY = get_space("tiny")
COMMANDS = {  # every pipeline command, with the arguments it needs besides the config
    "run": [], "train-supernet": [], "search": [], "train": ["--arch", FMNIST_ARCH],
    "evaluate": ["--arch", FMNIST_ARCH],
}


def fails(capsys: pytest.CaptureFixture, *args: str) -> str:
    """Run the CLI, expect exit status 2, return its one line on stderr."""
    assert main(list(args)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"fairnas {args[0]}: error: "), err
    return err


@pytest.mark.parametrize("command", COMMANDS)
def test_unknown_keys_suggest_the_intended_key(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture,
) -> None:
    err = fails(capsys, command, *COMMANDS[command], "--out-dir", str(tmp_path),
                "--set", "supernet.lrr=0.1")
    assert "unknown config key 'supernet.lrr'; did you mean 'supernet.lr'?" in err

    config = tmp_path / "typo.yaml"
    config.write_text("serach:\n  population: 4\n")
    err = fails(capsys, command, *COMMANDS[command], "--config", str(config))
    assert "unknown config key 'serach'; did you mean 'search'?" in err
    assert not (tmp_path / "supernet").exists()


@pytest.mark.parametrize("override, message", [
    ("supernet.batch_size=0", "supernet.batch_size should be positive, got 0"),
    ("supernet.momentum=1.5", r"supernet.momentum should be in [0, 1], got 1.5"),
    ("train.label_smoothing=-0.1", r"train.label_smoothing should be in [0, 1], got -0.1"),
    ("search.population=1", "search.population should be >= 2, got 1"),
    ("supernet.checkpoint_every=0", "supernet.checkpoint_every should be positive, got 0"),
    ("data.dataset=imagenet", "data.dataset should be one of fashion-mnist, folder, "
                              "got 'imagenet'"),
    ("data.stream=1", "data.stream should be true or false, got 1"),
    ("stream=true", "unknown config key 'stream'; did you mean 'data.stream'?"),
    ("seed=3", "did you mean 'supernet.seed' or 'search.seed' or 'train.seed'?"),
    ("supernet.batch_size=100000", "supernet.batch_size=100000 is larger than the"),
    ("supernet.lr=fast", "supernet.lr should be of type float, got 'fast'"),
    ("supernet.lr=.nan", "supernet.lr should be a finite number, got nan"),
])
def test_values_out_of_range_are_refused(
    override: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture,
) -> None:
    assert message in fails(capsys, "run", "--out-dir", str(tmp_path), "--set", override)


def test_a_missing_or_empty_data_folder_is_named(tmp_path: Path, capsys) -> None:
    folder = ["--set", "space=tiny", "--set", "data.dataset=folder", "--out-dir", str(tmp_path)]
    missing = tmp_path / "nowhere"
    err = fails(capsys, "train-supernet", *folder, "--set", f"data.root={missing}")
    assert f"data folder {missing} does not exist" in err

    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "test").mkdir()
    err = fails(capsys, "train-supernet", *folder, "--set", f"data.root={tmp_path / 'empty'}")
    assert "train holds no class folders" in err


def test_a_folder_the_space_does_not_fit_and_a_batch_too_large_name_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture,
) -> None:
    root = write_image_folders(tmp_path / "images", size=(12, 12),
                               classes=("ant", "bee", "cat"))  # 30 training images
    folder = ["--set", "space=tiny", "--set", "data.dataset=folder", "--set",
              f"data.root={root}", "--set", "data.val_size=6", "--set", "data.calib_size=8",
              "--out-dir", str(tmp_path / "out")]
    err = fails(capsys, "train-supernet", *folder)
    assert "classes 4 vs 3 (space vs data)" in err
    assert "--set space.base=tiny --set space.num_classes=3" in err

    fitted = [*folder, "--set", "space={base: tiny, num_classes: 3}", "--set",
              "supernet.batch_size=8", "--set", "train.batch_size=8"]
    for command, key in (("train-supernet", "supernet.batch_size"), ("run", "train.batch_size")):
        err = fails(capsys, command, *fitted, "--set", f"{key}=64")
        assert f"{key}=64 is larger than the 24 training images" in err
    assert not (tmp_path / "out" / "supernet" / "supernet.pt").exists()


@pytest.mark.parametrize("command", ["evaluate", "train"])
@pytest.mark.parametrize("arch, message", [
    ("k3e3-k5e6", "should have 6 tokens (one per searchable layer), got 2: 'k3e3-k5e6'"),
    ("k3e3-k5e6-k7e3-k3e6-k5e3-k9e9",
     "layer 5 (counting from 0): unknown choice 'k9e9'; allowed values: k3e3, "),
])
def test_bad_architecture_strings_name_the_problem(
    command: str, arch: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture,
) -> None:
    assert message in fails(capsys, command, "--out-dir", str(tmp_path), "--arch", arch)


@pytest.mark.parametrize("command", ["run", "search"])
def test_limits_no_architecture_meets_stop_before_anything_runs(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture,
) -> None:
    """``run`` refuses before training a supernet; ``search`` before looking for one."""
    out = tmp_path / "out"
    err = fails(capsys, command, "--out-dir", str(out), "--set", "search.max_madds=1000")
    assert "max_madds=1,000 cannot be met in search space 'fmnist': its cheapest architecture "\
           "has" in err
    err = fails(capsys, command, "--out-dir", str(out), "--set", "search.max_params=10",
                "--set", "search.max_madds=10000000")
    assert "max_params=10 cannot be met" in err
    assert not (out / "supernet").exists()


def test_a_retraining_budget_no_architecture_meets_is_refused_first(tmp_path: Path,
                                                                   capsys) -> None:
    err = fails(capsys, "run", "--out-dir", str(tmp_path / "out"), "--set", "train.max_madds=10")
    assert "train.max_madds=10 cannot be met in search space 'fmnist'" in err
    assert not (tmp_path / "out").exists()


# -- checkpoint files ----------------------------------------------------------------------------


def bad_files(folder: Path) -> dict[str, Path]:
    """A supernet of another space, an LFS pointer, a truncated file, a bare state dict."""
    files = {name: folder / f"{name}.pt" for name in ("other_space", "lfs", "truncated", "bare")}
    atomic_torch_save(files["other_space"], {"model": Supernet(TINY).state_dict(),
                                             "space": TINY.to_dict()})
    files["lfs"].write_bytes(LFS_POINTER_PREFIX + b"\noid sha256:00\nsize 123\n")
    whole = files["other_space"].read_bytes()
    files["truncated"].write_bytes(whole[: len(whole) // 3])
    torch.save(Supernet(TINY).state_dict(), files["bare"])
    return files


@pytest.mark.parametrize("command", ["evaluate", "search"])
@pytest.mark.parametrize("name, message", [
    ("other_space", "was trained on another search space (differs in "),
    ("lfs", "is a Git LFS pointer file (66 bytes), not the weights: fetch the real file with "
            "`git lfs pull`"),
    ("truncated", "is truncated or corrupt"),
    ("bare", "is not a fairnas supernet file (expected keys model, space)"),
])
def test_a_supernet_file_that_is_not_a_supernet_of_this_space(
    command: str, name: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture,
) -> None:
    path = bad_files(tmp_path)[name]
    err = fails(capsys, command, *COMMANDS[command], "--out-dir", str(tmp_path),
                "--supernet", str(path))
    assert str(path) in err and message in err
    if name == "other_space":
        assert "input_size, name, num_classes, stages" in err


def test_a_model_file_of_another_space_is_refused(tmp_path: Path, capsys) -> None:
    """Same layers and choices, other widths: the architecture string alone would pass."""
    arch = "k3e1-k3e2-k5e1"
    model = SinglePathNet(Architecture.from_string(TINY, arch))
    with_space, without = tmp_path / "with_space.pt", tmp_path / "older.pt"
    atomic_torch_save(with_space, {"model": model.state_dict(), "arch": arch,
                                   "space": TINY.to_dict()})
    atomic_torch_save(without, {"model": model.state_dict(), "arch": arch})
    config = tmp_path / "wide.yaml"
    config.write_text(yaml.safe_dump({"space": {"base": "tiny", "name": "tiny_wide",
                                                "head_channels": 24}}))
    settings = ["--out-dir", str(tmp_path), "--config", str(config)]

    err = fails(capsys, "evaluate", *settings, "--model", str(with_space))
    assert "is a model of another search space (differs in head_channels, name)" in err
    err = fails(capsys, "evaluate", *settings, "--model", str(without))
    assert "do not fit k3e1-k3e2-k5e1 in search space 'tiny_wide': Error(s) in loading" in err


def test_a_truncated_checkpoint_in_the_run_folder_is_named(tmp_path: Path, capsys) -> None:
    """A resume that finds a damaged checkpoint says so instead of starting over or crashing."""
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "space": "tiny", "out_dir": str(tmp_path / "run"),
        "data": {"dataset": "folder", "root": str(write_image_folders(tmp_path / "images")),
                 "val_size": 8, "calib_size": 8},
        "supernet": {"max_steps": 2, "batch_size": 8, "warmup_steps": 0},
    }))
    assert main(["train-supernet", "--config", str(config)]) == 0
    checkpoint = tmp_path / "run" / "supernet" / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    capsys.readouterr()

    err = fails(capsys, "train-supernet", "--config", str(config))
    assert f"checkpoint {checkpoint} is truncated or corrupt (1000 bytes" in err
