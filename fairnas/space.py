"""Search spaces described as data.

A search space fixes everything about a network except one choice block per searchable layer:
the stem, a fixed depthwise-separable first block, stages of inverted-bottleneck layers (output
channels, number of layers, stride of the first layer), the head and the classifier. Keeping the
space as plain data (instead of code) lets one builder serve the supernet, stand-alone models,
the cost model and the published FairNAS variants, and lets users describe their own spaces in
YAML.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

logger = logging.getLogger(__name__)

ACTIVATIONS = ("relu", "relu6", "swish", "hswish")

_TOKEN_RE = re.compile(r"^k(?P<k>\d+)e(?P<e>\d+(?:\.\d+)?)(?P<rest>(?:_[a-z0-9.]+)*)$")


def _number_text(value: float) -> str:
    """Write 3.0 as '3' and 2.5 as '2.5' so tokens stay short and stable."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


@dataclass(frozen=True)
class Choice:
    """One candidate block of a searchable layer: an inverted bottleneck of a given shape.

    ``se_ratio`` and ``activation`` left as ``None`` inherit the space's block defaults, so the
    six FairNAS choices keep their short tokens (``k3e6``) in every variant of the space.
    """

    kernel: int
    expansion: float
    se_ratio: float | None = None
    activation: str | None = None

    def __post_init__(self) -> None:
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"kernel should be an odd positive integer, got {self.kernel}")
        if self.expansion <= 0:
            raise ValueError(f"expansion should be positive, got {self.expansion}")
        if self.se_ratio is not None and not 0 <= self.se_ratio <= 4:
            raise ValueError(f"se_ratio should be in [0, 4], got {self.se_ratio}")
        if self.activation is not None and self.activation not in ACTIVATIONS:
            raise ValueError(f"activation should be one of {ACTIVATIONS}, got {self.activation!r}")

    @property
    def token(self) -> str:
        """The compact name of this choice, for example ``k5e3`` or ``k3e6_se0.25_swish``."""
        text = f"k{self.kernel}e{_number_text(self.expansion)}"
        if self.se_ratio is not None:
            text += f"_se{_number_text(self.se_ratio)}"
        if self.activation is not None:
            text += f"_{self.activation}"
        return text

    @classmethod
    def from_token(cls, token: str) -> Choice:
        """Parse a token such as ``k7e3`` or ``k3e6_se0.5_swish``."""
        match = _TOKEN_RE.match(token.strip().lower())
        if match is None:
            raise ValueError(
                f"choice token should look like 'k3e6' (kernel, expansion) optionally followed "
                f"by '_se<ratio>' and '_<activation>', got {token!r}"
            )
        se_ratio: float | None = None
        activation: str | None = None
        for part in filter(None, match.group("rest").split("_")):
            if part.startswith("se"):
                se_ratio = float(part[2:])
            elif part in ACTIVATIONS:
                activation = part
            else:
                raise ValueError(
                    f"unknown option {part!r} in choice token {token!r}; expected 'se<ratio>' "
                    f"or one of {ACTIVATIONS}"
                )
        return cls(int(match.group("k")), float(match.group("e")), se_ratio, activation)


@dataclass(frozen=True)
class Stage:
    """A run of inverted-bottleneck layers with the same output width."""

    out_channels: int
    layers: int
    stride: int  # stride of the first layer of the stage; the others use 1

    def __post_init__(self) -> None:
        if self.out_channels < 1 or self.layers < 1 or self.stride not in (1, 2):
            raise ValueError(
                f"stage should have out_channels >= 1, layers >= 1 and stride 1 or 2, got {self}"
            )


@dataclass(frozen=True)
class LayerSpec:
    """Everything the builder needs about one inverted-bottleneck layer of the space."""

    index: int
    in_channels: int
    out_channels: int
    stride: int
    input_size: int  # spatial side of the layer's input

    @property
    def output_size(self) -> int:
        return conv_output_size(self.input_size, self.stride)


def conv_output_size(size: int, stride: int) -> int:
    """Side of a 'same'-padded convolution's output (odd kernels, padding k // 2)."""
    return math.ceil(size / stride)


@dataclass(frozen=True)
class SearchSpace:
    """A FairNAS-style space: fixed widths and strides, one searched block per layer.

    The same ``m`` choices are offered in every searchable layer, which strict fairness needs:
    each step trains ``m`` paths that together use every block of every layer exactly once.
    """

    name: str
    input_size: int
    input_channels: int
    num_classes: int
    stem_channels: int
    stem_stride: int
    first_block_channels: int
    stages: tuple[Stage, ...]
    choices: tuple[Choice, ...]
    head_channels: int
    first_block_stride: int = 1
    activation: str = "relu6"  # activation inside the searched blocks
    stem_activation: str | None = None  # None: same as ``activation``
    head_activation: str | None = None  # None: same as ``activation``
    se_ratio: float = 0.0  # squeeze-excite width as a fraction of the block's input channels
    dropout: float = 0.0
    fixed_layers: Mapping[int, str] = field(default_factory=dict)  # layer index -> token

    def __post_init__(self) -> None:
        for name in ("input_size", "input_channels", "num_classes", "stem_channels",
                     "first_block_channels", "head_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} should be a positive integer, got {getattr(self, name)}")
        for name in ("activation", "stem_activation", "head_activation"):
            value = getattr(self, name)
            if value is not None and value not in ACTIVATIONS:
                raise ValueError(f"{name} should be one of {ACTIVATIONS}, got {value!r}")
        if not self.stages:
            raise ValueError("a search space needs at least one stage")
        if len(self.choices) < 1 or len(set(self.choice_tokens)) != len(self.choices):
            raise ValueError(f"choices should be distinct and non-empty, got {self.choice_tokens}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout should be in [0, 1), got {self.dropout}")
        object.__setattr__(self, "fixed_layers", dict(self.fixed_layers))
        for index, token in self.fixed_layers.items():
            if not 0 <= index < self.num_layers:
                raise ValueError(
                    f"fixed layer index should be in [0, {self.num_layers}), got {index}"
                )
            Choice.from_token(token)

    def __hash__(self) -> int:
        return hash(repr(sorted(self.to_dict().items())))

    # -- derived structure -------------------------------------------------------------------

    @property
    def choice_tokens(self) -> tuple[str, ...]:
        return tuple(choice.token for choice in self.choices)

    @property
    def num_choices(self) -> int:
        return len(self.choices)

    @property
    def num_layers(self) -> int:
        return sum(stage.layers for stage in self.stages)

    @property
    def searchable_layers(self) -> tuple[int, ...]:
        """Indices of the layers whose block is searched (the others are fixed)."""
        return tuple(i for i in range(self.num_layers) if i not in self.fixed_layers)

    @property
    def size(self) -> int:
        """Number of distinct architectures in the space."""
        return self.num_choices ** len(self.searchable_layers)

    @property
    def stem_output_size(self) -> int:
        return conv_output_size(self.input_size, self.stem_stride)

    @property
    def first_block_output_size(self) -> int:
        return conv_output_size(self.stem_output_size, self.first_block_stride)

    @property
    def layers(self) -> tuple[LayerSpec, ...]:
        """Shape of every inverted-bottleneck layer, in order."""
        specs = []
        channels, size = self.first_block_channels, self.first_block_output_size
        for stage in self.stages:
            for position in range(stage.layers):
                stride = stage.stride if position == 0 else 1
                specs.append(LayerSpec(len(specs), channels, stage.out_channels, stride, size))
                channels, size = stage.out_channels, conv_output_size(size, stride)
        return tuple(specs)

    @property
    def last_channels(self) -> int:
        return self.stages[-1].out_channels

    def block_activation(self, choice: Choice) -> str:
        return choice.activation or self.activation

    def block_se_ratio(self, choice: Choice) -> float:
        return self.se_ratio if choice.se_ratio is None else choice.se_ratio

    def fixed_choice(self, layer: int) -> Choice:
        return Choice.from_token(self.fixed_layers[layer])

    def to_dict(self) -> dict[str, Any]:
        """A YAML/JSON-friendly description from which :func:`space_from_dict` rebuilds it."""
        return {
            "name": self.name,
            "input_size": self.input_size,
            "input_channels": self.input_channels,
            "num_classes": self.num_classes,
            "stem_channels": self.stem_channels,
            "stem_stride": self.stem_stride,
            "first_block_channels": self.first_block_channels,
            "first_block_stride": self.first_block_stride,
            "stages": [[s.out_channels, s.layers, s.stride] for s in self.stages],
            "choices": list(self.choice_tokens),
            "head_channels": self.head_channels,
            "activation": self.activation,
            "stem_activation": self.stem_activation,
            "head_activation": self.head_activation,
            "se_ratio": self.se_ratio,
            "dropout": self.dropout,
            "fixed_layers": {int(k): v for k, v in self.fixed_layers.items()},
        }

    def with_options(self, **changes: Any) -> SearchSpace:
        """A copy with some fields changed (for example ``num_classes`` or ``dropout``)."""
        return replace(self, **changes)


# The six FairNAS choices: kernel {3, 5, 7} x expansion {3, 6}.
FAIRNAS_CHOICES = tuple(Choice(k, e) for k in (3, 5, 7) for e in (3, 6))

# The paper's ImageNet space: 19 inverted-bottleneck layers after a fixed separable block.
_IMAGENET_STAGES = (
    Stage(32, 2, 2),   # 112 -> 56
    Stage(40, 4, 2),   # 56 -> 28
    Stage(80, 4, 2),   # 28 -> 14
    Stage(96, 4, 1),   # 14
    Stage(192, 4, 2),  # 14 -> 7
    Stage(320, 1, 1),  # 7
)


def imagenet_space(*, fixed_last_layer: bool = False, num_classes: int = 1000) -> SearchSpace:
    """The FairNAS ImageNet space (19 searchable layers, or 18 plus the fixed ``k5e6`` tail)."""
    return SearchSpace(
        name="imagenet18" if fixed_last_layer else "imagenet",
        input_size=224,
        input_channels=3,
        num_classes=num_classes,
        stem_channels=32,
        stem_stride=2,
        first_block_channels=16,
        stages=_IMAGENET_STAGES,
        choices=FAIRNAS_CHOICES,
        head_channels=1280,
        activation="relu6",
        dropout=0.2,
        # NOTE: the paper counts (6!)^18 orderings per step; block 19 is k5e6 in A, B and C.
        fixed_layers={18: "k5e6"} if fixed_last_layer else {},
    )


def fmnist_space() -> SearchSpace:
    """A CPU-sized space for 28x28 grayscale images with the same six-choice block family.

    Resolution drops fast (28 -> 14 in the stem, 14 -> 7 in the first searched layer): on
    2-core CPUs the depthwise convolutions, and above all their weight gradients, cost several
    times more per pixel at 14x14 than at 7x7, and Fashion-MNIST still reaches 91% this way.
    Six searchable layers give 6^6 = 46,656 architectures.
    """
    return SearchSpace(
        name="fmnist",
        input_size=28,
        input_channels=1,
        num_classes=10,
        stem_channels=16,
        stem_stride=2,
        first_block_channels=16,
        stages=(
            Stage(24, 2, 2),  # 14 -> 7
            Stage(48, 2, 1),  # 7
            Stage(64, 2, 2),  # 7 -> 4
        ),
        choices=FAIRNAS_CHOICES,
        head_channels=256,
        activation="relu6",
        dropout=0.1,
    )


def tiny_space() -> SearchSpace:
    """A very small space for unit tests: three searchable layers, 12x12 inputs."""
    return SearchSpace(
        name="tiny",
        input_size=12,
        input_channels=1,
        num_classes=4,
        stem_channels=8,
        stem_stride=1,
        first_block_channels=8,
        stages=(Stage(8, 1, 1), Stage(12, 2, 2)),
        choices=(Choice(3, 1), Choice(3, 2), Choice(5, 1)),
        head_channels=16,
        activation="relu",
        dropout=0.0,
    )


SPACES = {
    "imagenet": imagenet_space,
    "imagenet18": lambda: imagenet_space(fixed_last_layer=True),
    "fmnist": fmnist_space,
    "tiny": tiny_space,
}


def get_space(name_or_spec: str | Mapping[str, Any] | SearchSpace) -> SearchSpace:
    """Look up a preset by name, or build a space from a dict (as read from YAML)."""
    if isinstance(name_or_spec, SearchSpace):
        return name_or_spec
    if isinstance(name_or_spec, Mapping):
        return space_from_dict(name_or_spec)
    if name_or_spec not in SPACES:
        raise ValueError(f"unknown search space {name_or_spec!r}; expected one of {sorted(SPACES)}")
    return SPACES[name_or_spec]()


_SPACE_KEYS = {
    "name", "input_size", "input_channels", "num_classes", "stem_channels", "stem_stride",
    "first_block_channels", "first_block_stride", "stages", "choices", "head_channels",
    "activation", "stem_activation", "head_activation", "se_ratio", "dropout", "fixed_layers",
    "base",
}


def space_from_dict(spec: Mapping[str, Any]) -> SearchSpace:
    """Build a space from plain data; ``base`` names a preset whose fields are the defaults."""
    unknown = set(spec) - _SPACE_KEYS
    if unknown:
        # '{base:fmnist}' is read by YAML as one key 'base:fmnist': a space must follow ':'.
        colon = any(":" in str(key) for key in unknown)
        raise ValueError(
            f"unknown search-space keys {sorted(unknown)}; known: {sorted(_SPACE_KEYS)}"
            + ("; in YAML a space must follow ':' ({base: fmnist}, not {base:fmnist})"
               if colon else "")
        )
    values: dict[str, Any] = {}
    if "base" in spec:
        values = get_space(spec["base"]).to_dict()
    values.update({k: v for k, v in spec.items() if k != "base"})
    missing = _SPACE_KEYS - {"base", "first_block_stride", "stem_activation", "head_activation",
                             "se_ratio", "dropout", "fixed_layers", "activation"} - set(values)
    if missing:
        raise ValueError(f"search space is missing keys {sorted(missing)}")
    stages = tuple(_stage_from(item) for item in values.pop("stages"))
    choices = tuple(Choice.from_token(token) for token in values.pop("choices"))
    fixed = {int(k): str(v) for k, v in (values.pop("fixed_layers", None) or {}).items()}
    return SearchSpace(stages=stages, choices=choices, fixed_layers=fixed, **values)


def _stage_from(item: Sequence[int] | Mapping[str, int]) -> Stage:
    if isinstance(item, Mapping):
        return Stage(int(item["out_channels"]), int(item["layers"]), int(item["stride"]))
    if len(item) != 3:
        raise ValueError(f"stage should be [out_channels, layers, stride], got {item!r}")
    return Stage(*(int(v) for v in item))
