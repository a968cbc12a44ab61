"""Configuration of a ranking study, and the per-sampler supernet settings derived from it.

The study trains one supernet per sampler under an *equal budget of single-path passes*: strict
and expectation fairness run ``m`` passes per optimizer step, uniform sampling (SPOS) runs one,
so uniform gets ``m`` times as many steps. Everything the template counts in steps (warm-up, log
interval) is counted in strict-fairness steps and converted the same way, so every sampler sees
the same learning-rate schedule as a function of the passes made.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from fairnas.config import (
    ConfigError,
    DataConfig,
    EvalConfig,
    SupernetConfig,
    TrainConfig,
    deep_merge,
    from_dict,
    load_yaml,
    parse_override,
)
from fairnas.samplers import SAMPLERS

logger = logging.getLogger(__name__)

BUDGET_UNITS = ("strict_steps", "passes")
GROUND_TRUTH_METRICS = ("test_accuracy", "val_accuracy")


@dataclass
class SupernetBudget:
    """How long every supernet trains, in single-path forward+backward passes.

    ``unit: strict_steps`` counts strict-fairness steps of ``m`` passes each (so ``amount: 300``
    in a 6-choice space is 1,800 passes); ``unit: passes`` counts the passes directly and must
    then be a multiple of ``m``, since strict and expectation fairness make ``m`` per step.
    """

    amount: int = 300
    unit: str = "strict_steps"  # strict_steps | passes


def _study_supernet_defaults() -> SupernetConfig:
    # NOTE: shared_batch is off here although the pipeline's default is on. With one batch per
    # pass every sampler reads the very same sequence of batches under an equal pass budget, so
    # the sampler is the only thing that differs between the supernets. With a shared batch a
    # strict step spends m passes on one batch and sees m times fewer distinct batches than
    # uniform sampling; set it to true to test that (the paper's likelier) reading instead.
    return SupernetConfig(shared_batch=False, warmup_steps=20, log_interval=50)


def _study_standalone_defaults() -> TrainConfig:
    return TrainConfig(epochs=1.0, warmup_steps=20, log_interval=50)


@dataclass
class RankStudyConfig:
    """Everything a ranking study depends on; the YAML file changes these defaults only."""

    space: Any = "fmnist"  # a preset name or a mapping describing a space
    out_dir: str = "runs/rank_study"
    device: str = "cpu"
    threads: int | None = None  # torch intra-op threads; None: torch's default
    data: DataConfig = field(default_factory=DataConfig)
    samplers: list = field(default_factory=lambda: list(SAMPLERS))
    num_archs: int = 20  # architectures ranked, stratified over multiply-adds
    arch_seed: int = 0  # the histogram sample uses arch_seed + 1
    seeds_per_arch: int = 1  # stand-alone trainings per architecture (>1 shows their noise)
    budget: SupernetBudget = field(default_factory=SupernetBudget)
    # Template for every sampler's supernet: ``sampler`` and ``max_steps`` are set per sampler
    # from the budget, ``epochs`` is ignored; warmup_steps and log_interval count strict steps.
    supernet: SupernetConfig = field(default_factory=_study_supernet_defaults)
    checkpoint_every: int | None = 100  # supernet checkpoint interval, in strict steps
    eval: EvalConfig = field(default_factory=EvalConfig)
    standalone: TrainConfig = field(default_factory=_study_standalone_defaults)
    ground_truth: str = "test_accuracy"  # test_accuracy | val_accuracy of the stand-alone model
    histogram_samples: int = 100  # one-shot accuracies of a larger stratified sample (0: none)
    bootstrap: int = 2000  # resamples of the architectures for the confidence intervals
    bootstrap_seed: int = 0
    confidence: float = 0.95
    top_k: list = field(default_factory=lambda: [5, 10])


def changed_keys(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted keys of ``saved`` whose value differs in ``current``.

    Keys only ``current`` has are settings added to the code after ``saved`` was written; their
    defaults keep the old behaviour, so they do not count as changes.
    """
    changed = []
    for key, old in saved.items():
        new = current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changed += [f"{key}.{sub}" for sub in changed_keys(old, new)]
        elif key not in current or old != new:
            changed.append(key)
    return changed


# Keys whose change leaves every finished result valid: outputs are keyed by sampler, by
# architecture and by seed, and the statistics are recomputed on every run.
RERUN_SAFE_KEYS = {
    "out_dir", "device", "threads", "data.root", "data.workers", "samplers", "seeds_per_arch",
    "histogram_samples", "bootstrap", "bootstrap_seed", "confidence", "top_k", "ground_truth",
    "checkpoint_every", "supernet.log_interval", "standalone.log_interval", "standalone.pick",
    "standalone.max_madds",
}


def resolve_rank_study_config(
    path: str | Path | None = None, overrides: list[str] | None = None,
) -> RankStudyConfig:
    """Study defaults, then the YAML file, then ``--set`` overrides; validated."""
    data: dict[str, Any] = {}
    if path is not None:
        data = load_yaml(path)
    for text in overrides or []:
        data = deep_merge(data, parse_override(text))
    return rank_study_config_from_dict(data)


def rank_study_config_from_dict(data: dict[str, Any]) -> RankStudyConfig:
    """Build over the study's defaults and validate; unknown keys are refused with a suggestion.

    The defaults are merged in as data first because a section given in ``data`` would
    otherwise start from its class defaults (``SupernetConfig``'s, say), not the study's.
    """
    config = from_dict(RankStudyConfig, deep_merge(asdict(RankStudyConfig()), data))
    validate(config)
    return config


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(config: RankStudyConfig) -> None:
    """Checks ``from_dict`` cannot make: list contents, ranges, keys the study sets itself."""
    samplers = config.samplers
    _require(isinstance(samplers, list) and len(samplers) > 0 and all(
        s in SAMPLERS for s in samplers), f"samplers should be a non-empty list drawn from "
             f"{', '.join(SAMPLERS)}, got {samplers!r}")
    _require(len(set(samplers)) == len(samplers), f"samplers should not repeat, got {samplers!r}")
    _require(config.num_archs >= 3, f"num_archs should be >= 3, got {config.num_archs}")
    _require(config.seeds_per_arch >= 1,
             f"seeds_per_arch should be >= 1, got {config.seeds_per_arch}")
    _require(config.histogram_samples >= 0,
             f"histogram_samples should be >= 0, got {config.histogram_samples}")
    _require(config.bootstrap >= 0, f"bootstrap should be >= 0, got {config.bootstrap}")
    _require(0 < config.confidence < 1,
             f"confidence should be in (0, 1), got {config.confidence}")
    _require(isinstance(config.top_k, list) and all(
        isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in config.top_k),
             f"top_k should be a list of positive integers, got {config.top_k!r}")
    _require(config.budget.unit in BUDGET_UNITS,
             f"budget.unit should be one of {', '.join(BUDGET_UNITS)}, got {config.budget.unit!r}")
    _require(config.budget.amount >= 1, f"budget.amount should be >= 1, got {config.budget.amount}")
    _require(config.supernet.max_steps is None,
             "supernet.max_steps should be null: the study sets it per sampler from budget")
    _require(config.checkpoint_every is None or config.checkpoint_every >= 1,
             f"checkpoint_every should be >= 1 or null, got {config.checkpoint_every}")
    _require(config.ground_truth in GROUND_TRUTH_METRICS,
             f"ground_truth should be one of {', '.join(GROUND_TRUTH_METRICS)}, "
             f"got {config.ground_truth!r}")
    train = config.standalone
    for name in ("epochs", "batch_size", "lr", "log_interval"):
        value = getattr(train, name)
        _require(value > 0, f"standalone.{name} should be positive, got {value!r}")


def budget_passes(config: RankStudyConfig, num_choices: int) -> int:
    """The single-path passes every supernet makes."""
    if config.budget.unit == "strict_steps":
        return config.budget.amount * num_choices
    if config.budget.amount % num_choices:
        raise ConfigError(
            f"budget.amount should be a multiple of the {num_choices} choices per layer when "
            f"counted in passes (strict fairness makes {num_choices} per step), "
            f"got {config.budget.amount}"
        )
    return config.budget.amount


def paths_per_step(sampler: str, num_choices: int) -> int:
    """Single-path passes per optimizer step (as :class:`fairnas.samplers.PathSampler`)."""
    return 1 if sampler == "uniform" else num_choices


def supernet_config_for(config: RankStudyConfig, sampler: str, num_choices: int) -> SupernetConfig:
    """The template with the sampler, its step count and its step-counted settings filled in."""
    per_step = paths_per_step(sampler, num_choices)
    scale = num_choices // per_step  # 1 for strict and expectation, m for uniform
    template = config.supernet
    return replace(
        template,
        sampler=sampler,
        max_steps=budget_passes(config, num_choices) // per_step,
        warmup_steps=template.warmup_steps * scale,
        log_interval=template.log_interval * scale,
    )


def checkpoint_interval(config: RankStudyConfig, sampler: str, num_choices: int) -> int | None:
    """``checkpoint_every`` converted from strict steps to the sampler's own steps."""
    if config.checkpoint_every is None:
        return None
    return config.checkpoint_every * num_choices // paths_per_step(sampler, num_choices)
