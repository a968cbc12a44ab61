"""Configuration: typed dataclasses; YAML files and ``--set key=value`` only change defaults.

Unknown keys are refused with a suggestion of the intended key, values are type-checked, and
the resolved configuration is saved beside every output so a run can be repeated or resumed.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key and what is expected."""


@dataclass
class DataConfig:
    dataset: str = "fashion-mnist"  # fashion-mnist | folder (CIFAR-10: see fairnas transfer)
    root: str | None = None  # None: $FAIRNAS_DATA or ./data
    val_size: int = 5000  # held out from the training images; candidates are scored on it
    calib_size: int = 2048  # fixed, seeded pool of training images for BN recalibration
    split_seed: int = 0
    train_limit: int | None = None  # use only the first N training images (smoke runs)
    test_limit: int | None = None
    # dataset folder: skip image files that cannot be decoded (each named in the log, and
    # counted) instead of stopping at the first one
    skip_bad_images: bool = False
    # dataset folder: read training images from disk batch by batch instead of decoding them all
    # into memory first (ImageNet-sized folders). Validation, calibration and test images are
    # still decoded into memory; see docs/data.md.
    stream: bool = False
    workers: int = 4  # data.stream: DataLoader worker processes decoding images; 0: in-process
    # data.stream: training images get RandomResizedCrop + horizontal flip (seeded per image);
    # off: the same centre crop as validation images
    augment: bool = True

    def __post_init__(self) -> None:
        # Checked here rather than per key: whether ``stream`` is allowed depends on ``dataset``,
        # and a DataConfig built in code (tests, the ranking study) must be refused as well.
        if self.stream and self.dataset != "folder":
            raise ConfigError(
                f"data.stream=true needs data.dataset: folder (it streams image files from "
                f"data.root/train/<class>/), got data.dataset {self.dataset!r}, which is read "
                f"into memory whole; remove data.stream or point data.root at an image folder"
            )


@dataclass
class SupernetConfig:
    sampler: str = "strict"  # strict | uniform | expectation
    epochs: float = 1.0  # passes over the training data (fractions allowed)
    max_steps: int | None = None  # stop after this many optimizer steps (overrides epochs)
    batch_size: int = 128
    shared_batch: bool = True  # strict/expectation: all m paths of a step see the same batch
    # With shared_batch: the stem and fixed first block run once per step and the m paths branch
    # from their output; gradients equal the plain sequential step up to float rounding. The stem's
    # BN running statistics then move once per step instead of m times (on the same batch).
    shared_prefix: bool = True
    # How the m paths' gradients combine: shared_mean (choice blocks: sum, i.e. each block's
    # own gradient; shared layers: mean over paths) | sum (everything summed; shared layers
    # then take m-times larger steps) | mean (everything averaged)
    grad_reduction: str = "shared_mean"
    lr: float = 0.1
    warmup_steps: int = 50
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 4e-5
    label_smoothing: float = 0.1
    seed: int = 0
    log_interval: int = 20
    checkpoint_every: int | None = None  # also checkpoint every N steps (always at epoch ends)
    on_nonfinite: str = "stop"  # stop | skip
    # Several processes: BN normalises with the statistics of the global batch, so a run equals
    # one process on the combined batch. Off (plain data parallelism): per-rank statistics, and
    # the running statistics are averaged across ranks every step so every rank holds the same.
    sync_bn: bool = False
    # Device settings; defaults measured on CPU (docs/performance.md), none on a GPU.
    amp: bool = False  # bf16 autocast for forward passes and loss (CPU or CUDA)
    # NHWC weights and activations: same numbers up to rounding; training steps took 0.66-0.72x
    # the time on a 2-core Xeon (benchmarks/bench_layout.py), and GPUs' tensor cores want it.
    channels_last: bool = True
    pin_memory: bool = False  # CUDA only: batches staged in pinned memory, copied non-blocking


@dataclass
class EvalConfig:
    calib_images: int = 1024  # images (from the calibration pool) used to recalibrate BN
    val_images: int | None = 2000  # None: the whole validation split
    batch_size: int = 512
    channels_last: bool = True  # the supernet in NHWC while scoring: 0.75x the time on CPU


@dataclass
class SearchConfig:
    population: int = 24
    generations: int = 6
    seed: int = 0
    use_params: bool = False  # add parameters as a third objective
    max_madds: int | None = None
    max_params: int | None = None
    mutation_prob: float | None = None  # per-layer; None: 1 / number of layers
    crossover_prob: float = 0.9
    # candidates per evaluate() call; None: a whole generation at once. Smaller batches persist
    # progress more often (a resume redoes at most one batch) and never change the result
    eval_batch: int | None = None


@dataclass
class TrainConfig:
    epochs: float = 4.0
    batch_size: int = 256
    lr: float = 0.2
    warmup_steps: int = 100
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 4e-5
    label_smoothing: float = 0.1
    seed: int = 0
    log_interval: int = 50
    checkpoint_every: int | None = None  # as supernet.checkpoint_every
    on_nonfinite: str = "stop"  # as supernet.on_nonfinite
    sync_bn: bool = False  # as supernet.sync_bn
    amp: bool = False  # as supernet.amp
    channels_last: bool = True  # as supernet.channels_last
    pin_memory: bool = False  # as supernet.pin_memory
    pick: str = "best"  # which front member to retrain: best | knee
    max_madds: int | None = None  # retrain the most accurate front member under this cost


@dataclass
class RunConfig:
    space: Any = "fmnist"  # a preset name or a mapping describing a space
    out_dir: str = "runs/fmnist"
    device: str = "cpu"
    threads: int | None = None  # torch intra-op threads; None: torch's default
    data: DataConfig = field(default_factory=DataConfig)
    supernet: SupernetConfig = field(default_factory=SupernetConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


_CHOICES = {
    "supernet.sampler": ("strict", "uniform", "expectation"),
    "supernet.grad_reduction": ("shared_mean", "sum", "mean"),
    "supernet.on_nonfinite": ("stop", "skip"),
    "train.on_nonfinite": ("stop", "skip"),
    "train.pick": ("best", "knee"),
    "data.dataset": ("fashion-mnist", "folder"),
}
_POSITIVE = {
    "data.val_size", "data.calib_size", "supernet.batch_size", "supernet.lr", "supernet.epochs",
    "eval.calib_images", "eval.batch_size", "search.population", "search.generations",
    "train.epochs", "train.batch_size", "train.lr", "supernet.log_interval",
    "train.log_interval", "supernet.max_steps", "eval.val_images", "threads",
    "data.train_limit", "data.test_limit", "supernet.checkpoint_every", "train.checkpoint_every",
    "search.max_madds", "search.max_params", "search.eval_batch", "train.max_madds",
    "search.mutation_prob",
}
# Inclusive (low, high) bounds; None leaves that side open. Checked here so that a value the
# search or the optimizer would refuse hours into a run is refused before anything starts.
_BOUNDS: dict[str, tuple[float | None, float | None]] = {
    "supernet.warmup_steps": (0, None), "train.warmup_steps": (0, None),
    "supernet.weight_decay": (0, None), "train.weight_decay": (0, None),
    "supernet.momentum": (0, 1), "train.momentum": (0, 1),
    "supernet.label_smoothing": (0, 1), "train.label_smoothing": (0, 1),
    "search.crossover_prob": (0, 1), "search.mutation_prob": (0, 1),
    "search.population": (2, None),
    "data.workers": (0, None),
}


def _type_matches(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_matches(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} should be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key not in fields:
            # A key of a section given at the wrong level ('stream' for 'data.stream') is the
            # likelier mistake than a typo of a key at this level.
            nested = _nested_keys(cls, hints, key)
            close = [f"{prefix}{field}" for field in difflib.get_close_matches(key, fields, n=1)
                     or [field for field in fields
                         if field.startswith(key) or key.startswith(field)][:1]]
            suggestions = nested or close
            hint = (f"; did you mean {' or '.join(repr(s) for s in suggestions)}?"
                    if suggestions else ".")
            raise ConfigError(f"unknown config key '{name}'{hint} Known keys: "
                              f"{', '.join(prefix + k for k in fields)}")
        hint_type = hints[key]
        if dataclasses.is_dataclass(hint_type):
            values[key] = _from_dict(hint_type, value or {}, f"{name}.")
            continue
        takes_float = hint_type is float or float in typing.get_args(hint_type)
        if takes_float and isinstance(value, str):
            value = _number_or_text(value)
        if not _type_matches(value, hint_type):
            expected = ("true or false" if hint_type is bool
                        else f"of type {_type_name(hint_type)}")
            raise ConfigError(f"{name} should be {expected}, got {value!r}")
        if takes_float:
            value = float(value) if value is not None else None
        _check_value(name, value)
        values[key] = value
    return cls(**values)


def _nested_keys(cls: type, hints: dict[str, Any], key: str) -> list[str]:
    """Dotted names of the sections of ``cls`` that have a key called ``key``."""
    return [f"{entry.name}.{key}" for entry in dataclasses.fields(cls)
            if dataclasses.is_dataclass(hints[entry.name])
            and key in {f.name for f in dataclasses.fields(hints[entry.name])}]


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _number_or_text(text: str) -> Any:
    """YAML 1.1 reads ``1e-3`` (no dot) as text; for a number-valued key it means the number."""
    try:
        number = float(text)
    except ValueError:
        return text
    return number if math.isfinite(number) else text


def _check_value(name: str, value: Any) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name} should be a finite number, got {value!r}")
    if name in _CHOICES and value not in _CHOICES[name]:
        raise ConfigError(f"{name} should be one of {', '.join(_CHOICES[name])}, got {value!r}")
    if name in _POSITIVE and value is not None and value <= 0:
        raise ConfigError(f"{name} should be positive, got {value!r}")
    low, high = _BOUNDS.get(name, (None, None))
    if value is None or (low is None or value >= low) and (high is None or value <= high):
        return
    expected = f">= {low}" if high is None else f"in [{low}, {high}]"
    raise ConfigError(f"{name} should be {expected}, got {value!r}")


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_override(text: str) -> dict[str, Any]:
    """``supernet.epochs=2`` -> ``{"supernet": {"epochs": 2}}`` (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override should look like 'section.key=value', got {text!r}")
    dotted, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else None
    result: dict[str, Any] = {}
    node = result
    parts = dotted.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return result


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        place = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"config file {path} is not valid YAML{place}: {problem}") from error
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} should hold a mapping at the top level")
    return data


def resolve_config(
    path: str | Path | None = None, overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
) -> RunConfig:
    """Defaults, then ``base``, then the YAML file, then ``--set`` overrides, in that order."""
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        data = _deep_merge(data, load_yaml(path))
    for text in overrides or []:
        data = _deep_merge(data, parse_override(text))
    return _from_dict(RunConfig, data)


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    return _from_dict(RunConfig, data)


def differing_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two resolved configurations."""
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += differing_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


def save_config(path: str | Path, config: Any) -> None:
    from fairnas.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config_to_dict(config), sort_keys=False))


# Public names for the helpers other configuration dataclasses (for example the ranking study's)
# build on; same functions, unchanged behaviour.
from_dict = _from_dict
deep_merge = _deep_merge
