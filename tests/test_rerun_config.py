"""A run folder continues under the same configuration, including one saved by an older version."""

from pathlib import Path

import pytest
import yaml

from fairnas.config import config_to_dict, resolve_config
from fairnas.pipeline import Manifest, check_rerun_config


def _folder_with_finished_supernet(tmp_path: Path, saved: dict) -> Manifest:
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    manifest = Manifest(tmp_path)
    manifest.record("supernet", seconds=1.0, summary={}, folder=tmp_path / "supernet")
    return manifest


def test_settings_added_since_the_folder_was_made_count_at_their_default(tmp_path: Path) -> None:
    config = resolve_config(overrides=["supernet.lr=0.05"])
    saved = config_to_dict(config)
    del saved["supernet"]["sync_bn"]  # a setting the older version did not have
    manifest = _folder_with_finished_supernet(tmp_path, saved)

    check_rerun_config(tmp_path, config, manifest)  # at its default: nothing changed

    changed = resolve_config(overrides=["supernet.lr=0.05", "supernet.sync_bn=true"])
    with pytest.raises(ValueError, match=r"supernet\.sync_bn changed"):
        check_rerun_config(tmp_path, changed, manifest)


def test_a_changed_setting_of_a_finished_stage_is_refused_by_name(tmp_path: Path) -> None:
    manifest = _folder_with_finished_supernet(tmp_path, config_to_dict(resolve_config()))
    with pytest.raises(ValueError, match=r"supernet\.lr changed"):
        check_rerun_config(tmp_path, resolve_config(overrides=["supernet.lr=0.01"]), manifest)
    # Settings of later stages, and harmless ones, may change.
    check_rerun_config(tmp_path, resolve_config(overrides=["train.epochs=1", "threads=1"]),
                       manifest)


def test_finished_stages_made_from_other_images_are_refused(tmp_path: Path) -> None:
    from fairnas.pipeline import check_same_data

    manifest = _folder_with_finished_supernet(tmp_path, config_to_dict(resolve_config()))
    check_same_data(manifest, "digest-a")  # first use: remembered
    manifest.record("search", seconds=1.0, summary={}, folder=tmp_path / "search")
    reloaded = Manifest(tmp_path)
    check_same_data(reloaded, "digest-a")
    with pytest.raises(ValueError, match="other images"):
        check_same_data(reloaded, "digest-b")
