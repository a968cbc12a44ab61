"""Ranking study: rank statistics against scipy and by hand, equal budgets, resume, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats

from fairnas import training
from fairnas.cli import main
from fairnas.config import ConfigError
from fairnas.costs import cost_model
from fairnas.data import BatchPlan, DataSplits, TensorSplit, split_train
from fairnas.network import Supernet
from fairnas.rankstudy.archs import stratified_architectures
from fairnas.rankstudy.config import (
    rank_study_config_from_dict,
    resolve_rank_study_config,
    supernet_config_for,
)
from fairnas.rankstudy.stats import rank_agreement, seed_agreement, top_k_overlap
from fairnas.rankstudy.study import RankStudy, parameter_checksum, run_rank_study
from fairnas.space import get_space

REPO = Path(__file__).resolve().parents[1]
TINY = get_space("tiny")  # 3 layers x 3 choices, 12x12 inputs, 4 classes


def synthetic_splits(*, train: int = 96, seed: int = 0) -> DataSplits:
    """Tiny-space images whose brightness hints at the label; 96 training images = 12 x 8."""
    generator = torch.Generator().manual_seed(seed)
    total = train + 24 + 16
    images = torch.randn(total, 1, 12, 12, generator=generator)
    labels = torch.randint(TINY.num_classes, (total,), generator=generator)
    images += labels.view(-1, 1, 1, 1).float() * 0.5
    full = TensorSplit(images[:train + 24], labels[:train + 24], "synthetic/train",
                       torch.arange(train + 24))
    test = TensorSplit(images[train + 24:], labels[train + 24:], "synthetic/test",
                       torch.arange(16))
    return split_train(full, test, val_size=24, calib_size=16, split_seed=seed,
                       num_classes=TINY.num_classes)


def tiny_study_config(out_dir: Path, **changes) -> dict:
    config = {
        "space": "tiny", "out_dir": str(out_dir), "threads": 1,
        "num_archs": 5, "seeds_per_arch": 1, "histogram_samples": 8,
        "budget": {"unit": "strict_steps", "amount": 4},
        "supernet": {"batch_size": 8, "lr": 0.05, "warmup_steps": 1, "label_smoothing": 0.0},
        "eval": {"calib_images": 16, "val_images": 24, "batch_size": 64},
        "standalone": {"epochs": 1.0, "batch_size": 16, "lr": 0.05, "warmup_steps": 1},
        "bootstrap": 100, "top_k": [2],
    }
    config.update(changes)
    return config


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[RankStudy, dict]:
    config = rank_study_config_from_dict(tiny_study_config(tmp_path_factory.mktemp("study")))
    study = RankStudy(config, splits=synthetic_splits())
    return study, study.run()


# -- statistics ----------------------------------------------------------------------------------


def test_a_ranking_agrees_with_itself_and_disagrees_with_its_reverse() -> None:
    scores = [0.71, 0.64, 0.80, 0.58, 0.77, 0.69, 0.62]
    ranks = np.argsort(np.argsort(scores))  # 0 = worst
    reverse_ranks = len(scores) - 1 - ranks  # the same architectures in the opposite order
    same = rank_agreement(scores, scores, resamples=50)
    reverse = rank_agreement(reverse_ranks, scores, resamples=50)
    for name in ("kendall_tau", "spearman_rho"):
        assert same[name]["value"] == pytest.approx(1.0)
        assert same[name]["ci"]["low"] == pytest.approx(1.0)
        assert reverse[name]["value"] == pytest.approx(-1.0)
        assert reverse[name]["ci"]["high"] == pytest.approx(-1.0)
    assert same["pearson_r"]["value"] == pytest.approx(1.0)
    assert same["top_k"]["5"]["overlap"] == 1.0 and reverse["top_k"]["5"]["overlap"] < 1.0


def test_small_example_matches_scipy_and_a_count_by_hand() -> None:
    predicted, truth = [1, 2, 3, 4, 5], [3, 1, 2, 5, 4]
    # 7 concordant and 3 discordant pairs of 10: tau = 0.4; rank differences squared sum to 8:
    # rho = 1 - 6 * 8 / (5 * 24) = 0.6.
    result = rank_agreement(predicted, truth, resamples=0)
    assert result["kendall_tau"]["value"] == pytest.approx(0.4)
    assert result["spearman_rho"]["value"] == pytest.approx(0.6)
    for name, function in (("kendall_tau", scipy_stats.kendalltau),
                           ("spearman_rho", scipy_stats.spearmanr),
                           ("pearson_r", scipy_stats.pearsonr)):
        expected = function(predicted, truth)
        assert result[name]["value"] == pytest.approx(expected.statistic)
        assert result[name]["p_value"] == pytest.approx(expected.pvalue)


def test_a_loss_is_oriented_before_it_is_ranked() -> None:
    accuracy = np.array([0.91, 0.88, 0.93, 0.85, 0.90])
    loss = 1.0 - accuracy  # the same ranking, by a lower-is-better score
    as_loss = rank_agreement(loss, accuracy, predicted_higher_is_better=False, resamples=0)
    as_if_accuracy = rank_agreement(loss, accuracy, resamples=0)
    assert as_loss["kendall_tau"]["value"] == pytest.approx(1.0)
    assert as_if_accuracy["kendall_tau"]["value"] == pytest.approx(-1.0)
    assert "larger is better" in as_loss["orientation"]


def test_random_scores_for_13_architectures_give_a_wide_interval_around_zero() -> None:
    rng = np.random.default_rng(5)
    result = rank_agreement(rng.random(13), rng.random(13), resamples=1000, seed=0)
    for name in ("kendall_tau", "spearman_rho", "pearson_r"):
        ci = result[name]["ci"]
        assert ci["low"] < 0 < ci["high"], (name, ci)
        assert ci["high"] - ci["low"] > 0.6, (name, ci)
        assert ci["resamples"] == 1000
    assert result["kendall_tau"]["p_value"] > 0.05


def test_top_k_overlap_and_the_pick_rank() -> None:
    predicted = np.array([0.9, 0.8, 0.1, 0.7, 0.2])
    truth = np.array([0.3, 0.9, 0.8, 0.7, 0.1])
    assert top_k_overlap(predicted, truth, 2) == pytest.approx(0.5)  # {0, 1} vs {1, 2}
    assert top_k_overlap(predicted, truth, 3) == pytest.approx(2 / 3)  # {0, 1, 3} vs {1, 2, 3}
    result = rank_agreement(predicted, truth, resamples=0, top_k=(2, 3, 9))
    assert set(result["top_k"]) == {"2", "3"}
    assert result["top_k"]["2"]["chance"] == pytest.approx(0.4)
    assert result["predicted_best_truth_rank"] == 4  # architecture 0 is 4th by the truth


def test_seed_agreement_measures_the_ground_truths_own_noise() -> None:
    accuracies = np.array([[0.80, 0.81], [0.82, 0.83], [0.84, 0.79], [0.86, 0.87]])
    noise = seed_agreement(accuracies)
    assert noise["kendall_tau_between_seeds"] == pytest.approx(
        scipy_stats.kendalltau(accuracies[:, 0], accuracies[:, 1]).statistic)
    assert noise["mean_std"] == pytest.approx(accuracies.std(axis=1, ddof=1).mean())
    assert seed_agreement(accuracies[:, :1]) is None


# -- architectures and configuration -----------------------------------------------------------


@pytest.mark.parametrize("name", ["fmnist", "imagenet18"])
def test_architectures_are_stratified_over_multiply_adds(name: str) -> None:
    space = get_space(name)
    archs = stratified_architectures(space, 20, seed=0)
    madds = [cost_model(space).cost(a).madds for a in archs]
    assert len(set(archs)) == 20
    assert madds == sorted(madds)
    low, high = cost_model(space).bounds()
    # one per equal-width stratum of the range covered: the ends of the range are reached
    assert madds[0] - low.madds < (high.madds - low.madds) / 10
    assert high.madds - madds[-1] < (high.madds - low.madds) / 10
    assert archs == stratified_architectures(space, 20, seed=0)
    assert archs != stratified_architectures(space, 20, seed=1)


def test_equal_budgets_convert_strict_steps_to_each_samplers_steps() -> None:
    config = rank_study_config_from_dict({"budget": {"unit": "strict_steps", "amount": 300},
                                          "supernet": {"warmup_steps": 20}})
    strict = supernet_config_for(config, "strict", 6)
    uniform = supernet_config_for(config, "uniform", 6)
    expectation = supernet_config_for(config, "expectation", 6)
    assert (strict.max_steps, uniform.max_steps, expectation.max_steps) == (300, 1800, 300)
    assert (strict.warmup_steps, uniform.warmup_steps) == (20, 120)
    assert uniform.sampler == "uniform" and not uniform.shared_batch
    passes = rank_study_config_from_dict({"budget": {"unit": "passes", "amount": 1800}})
    assert supernet_config_for(passes, "uniform", 6).max_steps == 1800
    assert supernet_config_for(passes, "strict", 6).max_steps == 300
    odd = rank_study_config_from_dict({"budget": {"unit": "passes", "amount": 1801}})
    with pytest.raises(ConfigError, match="multiple of the 6 choices"):
        supernet_config_for(odd, "strict", 6)


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match="did you mean 'num_archs'"):
        rank_study_config_from_dict({"num_arch": 10})
    with pytest.raises(ConfigError, match="did you mean 'supernet.batch_size'"):
        rank_study_config_from_dict({"supernet": {"batchsize": 10}})
    with pytest.raises(ConfigError, match="samplers"):
        rank_study_config_from_dict({"samplers": ["strict", "random"]})
    with pytest.raises(ConfigError, match="max_steps"):
        rank_study_config_from_dict({"supernet": {"max_steps": 10}})
    with pytest.raises(ConfigError, match="num_archs should be >= 3"):
        rank_study_config_from_dict({"num_archs": 2})


def test_shipped_configs_load() -> None:
    tiny = resolve_rank_study_config(REPO / "configs" / "rank_study_tiny.yaml")
    assert tiny.samplers == ["strict", "uniform", "expectation"]
    assert not tiny.supernet.shared_batch
    full = resolve_rank_study_config(REPO / "configs" / "rank_study_fmnist.yaml",
                                     ["num_archs=24"])
    assert full.num_archs == 24 and full.space == "fmnist"
    assert full.data.train_limit % (full.supernet.batch_size * 6) == 0


# -- the study -----------------------------------------------------------------------------------


def test_every_sampler_made_the_same_number_of_single_path_passes(finished_study) -> None:
    study, stats = finished_study
    ledgers = {s: json.loads((study.supernet_dir(s) / "ledger.json").read_text())
               for s in study.config.samplers}
    assert {s: ledger["single_path_passes"] for s, ledger in ledgers.items()} == {
        "strict": 12, "uniform": 12, "expectation": 12}
    assert {s: ledger["steps"] for s, ledger in ledgers.items()} == {
        "strict": 4, "uniform": 12, "expectation": 4}
    assert ledgers["strict"]["strictly_fair"]
    assert np.array(ledgers["strict"]["updates"]).tolist() == [[4] * 3] * 3
    assert sum(ledgers["uniform"]["passes"][0]) == 12
    assert stats["budgets"]["equal_passes"] and stats["budgets"]["same_init"]
    torch.manual_seed(study.config.supernet.seed)
    assert stats["budgets"]["samplers"]["strict"]["init_checksum"] == parameter_checksum(
        Supernet(TINY))


def test_study_outputs_scores_statistics_report_and_figures(finished_study) -> None:
    study, stats = finished_study
    out = study.out_dir
    archs = json.loads((out / "archs.json").read_text())
    assert len(archs["archs"]) == 5 and len(archs["histogram"]) == 8
    for sampler in study.config.samplers:
        scores = json.loads((out / "scores" / f"{sampler}.json").read_text())["scores"]
        assert {row["arch"] for row in archs["archs"]} <= set(scores)
        assert all(0.0 <= value <= 1.0 for value in scores.values())
        agreement = stats["agreement"][sampler]
        assert agreement["n"] == 5
        tau = agreement["kendall_tau"]["value"]
        assert tau is None or -1.0 <= tau <= 1.0
    assert set(stats["baselines"]) == {"madds", "params"}
    assert json.loads((out / "stats.json").read_text())["with_ground_truth"] == 5
    report = (out / "report.md").read_text()
    assert "passes are **equal**" in report and "Kendall tau" in report
    assert "Every supernet read the very same sequence of batches" in report
    for figure in ("scatter.png", "histogram.png", "ledger.png"):
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_samplers_read_the_same_batches_one_per_pass(tmp_path, monkeypatch) -> None:
    config = rank_study_config_from_dict(tiny_study_config(tmp_path))
    splits = synthetic_splits()
    original = BatchPlan.batches
    read: list[list[int]] = []

    def recording(self, epoch, start=0):
        for batch in original(self, epoch, start):
            read.append(batch.tolist())
            yield batch

    monkeypatch.setattr(BatchPlan, "batches", recording)
    sequences = {}
    for sampler in ("strict", "uniform"):
        read.clear()
        training.train_supernet(Supernet(TINY), splits, supernet_config_for(config, sampler, 3),
                                tmp_path / sampler, resume=False)
        sequences[sampler] = list(read)
    assert len(sequences["strict"]) == 12  # 4 steps x 3 passes, one batch each
    assert sequences["strict"] == sequences["uniform"]


def test_an_interrupted_study_trains_only_the_missing_models(tmp_path, monkeypatch) -> None:
    config = rank_study_config_from_dict(tiny_study_config(tmp_path, seeds_per_arch=2,
                                                           num_archs=3, histogram_samples=0))
    splits = synthetic_splits()
    real = training.train_standalone
    trained: list[tuple[str, str]] = []

    def interrupted_after_two(arch, *args, **kwargs):
        if len(trained) == 2:
            raise KeyboardInterrupt
        trained.append((str(arch), Path(args[2]).name))
        return real(arch, *args, **kwargs)

    monkeypatch.setattr(training, "train_standalone", interrupted_after_two)
    with pytest.raises(KeyboardInterrupt):
        run_rank_study(config, splits=splits)
    first = list(trained)
    assert len(list(tmp_path.glob("standalone/*/seed*/result.json"))) == 2
    partial = run_rank_study(config, splits=splits, report_only=True)
    assert partial["with_ground_truth"] == 2 and partial["agreement"] == {}
    assert "No statistics yet" in (tmp_path / "report.md").read_text()

    def no_supernet(*args, **kwargs):
        raise AssertionError("a finished supernet was trained again")

    def counting(arch, *args, **kwargs):
        trained.append((str(arch), Path(args[2]).name))
        return real(arch, *args, **kwargs)

    trained.clear()
    monkeypatch.setattr(training, "train_standalone", counting)
    monkeypatch.setattr(training, "train_supernet", no_supernet)
    stats = run_rank_study(config, splits=splits)
    jobs = {(str(a), f"seed{k}") for k in range(2)
            for a in stratified_architectures(TINY, 3, seed=0)}
    assert len(trained) == 4 and set(trained) == jobs - set(first)
    assert stats["with_ground_truth"] == 3
    assert stats["ground_truth_noise"]["seeds"] == 2


def test_a_changed_configuration_is_refused(finished_study) -> None:
    study, _ = finished_study
    changed = tiny_study_config(study.out_dir, standalone={"epochs": 2.0, "batch_size": 16})
    with pytest.raises(ConfigError, match="standalone.epochs"):
        RankStudy(rank_study_config_from_dict(changed), splits=synthetic_splits()).run(
            report_only=True)


def test_cli_runs_the_tiny_config_on_fashion_mnist(tmp_path, capsys) -> None:
    out = tmp_path / "cli"
    args = ["rank-study", "--config", str(REPO / "configs" / "rank_study_tiny.yaml"),
            "--out-dir", str(out), "--set", "seeds_per_arch=1", "--set", "num_archs=4",
            "--set", "histogram_samples=4", "--set", "budget.amount=4",
            "--set", "standalone.epochs=1"]
    assert main([*args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["with_ground_truth"] == 4 and result["equal_passes"]
    assert set(result["agreement"]) == {"strict", "uniform", "expectation"}
    assert main([*args, "--report-only"]) == 0
    assert "report:" in capsys.readouterr().out
    assert main([*args, "--set", "eval.val_images=100"]) == 2
    assert "eval.val_images" in capsys.readouterr().err
