"""The published FairNAS models, built by the project's own builder from their architectures.

FairNAS-A/B/C were released in three families, fifteen files in all:

* the plain models (ReLU6 everywhere, Dropout(0.2) before the classifier);
* the SE models, ratio 1.0 or 0.5: Swish and a squeeze-excite gate in every searched block,
  plain ReLU in the stem, the fixed first block and the head, no dropout;
* the CIFAR-10 transfer models: the SE models with a Dropout(0.1) + Linear(1280, 10) head,
  still fed 224x224 inputs.

Every variant is the ImageNet search space with a few space-level options changed, plus the
architecture from the paper's table. Nothing here describes layers by hand, so the published
models and any searched architecture go through the same builder, cost model and exporters.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import PurePath

from fairnas.arch import Architecture
from fairnas.network import SinglePathNet
from fairnas.space import SearchSpace, get_space, imagenet_space

logger = logging.getLogger(__name__)

# Expansion and kernel of blocks 1..19, as printed in the paper's table of published models.
PUBLISHED_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "a": ("3 3 3 6 6 3 3 6 6 3 6 3 3 6 6 6 6 6 6", "7 3 7 3 7 3 3 7 7 5 3 5 5 3 3 7 3 7 5"),
    "b": ("3 3 3 3 6 3 3 3 6 3 3 6 3 3 6 6 6 6 6", "5 3 5 3 3 5 7 3 3 5 3 3 7 3 7 5 7 3 5"),
    "c": ("3 3 3 3 3 3 3 3 3 6 3 3 3 3 6 6 6 6 6", "5 3 7 3 3 3 3 3 3 3 3 3 3 3 7 7 3 3 5"),
}

# Reported top-1 / top-5 (%) of each released variant (ImageNet, or CIFAR-10 for transfer).
_REPORTED: dict[str, tuple[float, float | None]] = {
    "fairnas_a": (75.34, 92.38), "fairnas_b": (75.10, 92.30), "fairnas_c": (74.69, 92.12),
    "fairnas_a_se": (77.55, 93.67), "fairnas_b_se": (77.19, 93.49),
    "fairnas_c_se": (76.67, 93.26), "fairnas_a_se_0.5": (77.40, 93.65),
    "fairnas_b_se_0.5": (77.11, 93.53), "fairnas_c_se_0.5": (76.76, 93.32),
    "fairnas_a_se_transfer": (98.3, None), "fairnas_b_se_transfer": (98.08, None),
    "fairnas_c_se_transfer": (98.01, None), "fairnas_a_se_0.5_transfer": (98.15, None),
    "fairnas_b_se_0.5_transfer": (98.15, None), "fairnas_c_se_0.5_transfer": (97.99, None),
}

# Which key scheme and wrapping each release family uses (see fairnas.pretrained).
PLAIN_SCHEME, TIMM_SCHEME = "fairnas", "timm"


def architecture_tokens(family: str) -> list[str]:
    """The 19 block tokens (``k7e3`` ...) of FairNAS-A, -B or -C."""
    expansions, kernels = PUBLISHED_ARCHITECTURES[family]
    return [f"k{k}e{e}" for e, k in zip(expansions.split(), kernels.split(), strict=True)]


@lru_cache(maxsize=8)
def variant_space(se_ratio: float = 0.0, transfer: bool = False) -> SearchSpace:
    """The ImageNet space with the options of one released family.

    ``se_ratio`` 0 is the plain family (the space's defaults: ReLU6, dropout 0.2). A positive
    ratio gives the SE family; ``transfer`` swaps in the CIFAR-10 head.
    """
    space = imagenet_space()
    if se_ratio <= 0:
        if transfer:
            raise ValueError("only the SE models were released as CIFAR-10 transfer models")
        return space
    ratio = f"{se_ratio:g}"
    space = space.with_options(
        name=f"imagenet_se{ratio}", se_ratio=se_ratio, activation="swish",
        stem_activation="relu", head_activation="relu", dropout=0.0,
    )
    if transfer:
        space = space.with_options(name=f"imagenet_se{ratio}_cifar10", num_classes=10, dropout=0.1)
    return space


@dataclass(frozen=True)
class ZooModel:
    """One released variant: how to build it and what its released file looks like."""

    name: str
    family: str  # "a", "b" or "c"
    se_ratio: float  # 0 for the plain models
    transfer: bool
    release_file: str  # file name in the authors' ``pretrained/`` folder
    wrapped: bool  # True: the state dict is under "model_state"; False: the file is the dict
    scheme: str  # PLAIN_SCHEME or TIMM_SCHEME key names
    top1: float
    top5: float | None

    @property
    def space(self) -> SearchSpace:
        return variant_space(self.se_ratio, self.transfer)

    @property
    def architecture(self) -> Architecture:
        return Architecture.from_tokens(self.space, architecture_tokens(self.family))

    @property
    def classifier_key(self) -> str:
        """The released name of the classifier: ``classifier.1`` when dropout sat before it."""
        return "classifier" if self.space.dropout == 0 else "classifier.1"

    @property
    def dataset(self) -> str:
        return "cifar10" if self.transfer else "imagenet"

    def build(self) -> SinglePathNet:
        return SinglePathNet(self.architecture)


def _make_zoo() -> dict[str, ZooModel]:
    zoo = {}
    for family in "abc":
        name = f"fairnas_{family}"
        zoo[name] = ZooModel(name, family, 0.0, False, f"FairNas{family.upper()}.pth.tar",
                             True, PLAIN_SCHEME, *_REPORTED[name])
        for ratio, suffix in ((1.0, "_se"), (0.5, "_se_0.5")):
            name = f"fairnas_{family}{suffix}"
            zoo[name] = ZooModel(name, family, ratio, False, f"{name}.pth.tar", False,
                                 TIMM_SCHEME, *_REPORTED[name])
            transfer = f"{name}_transfer"
            # NOTE: the release names B's and C's ratio-1.0 transfer files without "_se".
            stem = transfer if ratio != 1.0 or family == "a" else f"fairnas_{family}_transfer"
            zoo[transfer] = ZooModel(transfer, family, ratio, True, f"{stem}.pt.tar", True,
                                     TIMM_SCHEME, *_REPORTED[transfer])
    return zoo


ZOO: dict[str, ZooModel] = _make_zoo()
MODEL_NAMES: tuple[str, ...] = tuple(ZOO)

_NAME_RE = re.compile(
    r"^fairnas_?(?P<family>[abc])(?P<se>_?se(?:_?(?P<ratio>1\.0|1|0\.5|05))?)?"
    r"(?P<transfer>_transfer)?$"
)
_FILE_SUFFIXES = (".pth.tar", ".pt.tar", ".pth", ".pt", ".tar", ".safetensors")


def resolve_model_name(name: str) -> str:
    """The canonical zoo name for any accepted spelling.

    Accepts the canonical names (``fairnas_a_se_0.5``), the release's own spellings
    (``FairNAS_A``, ``FairNasA``, ``FairNAS-A-SE``) and its file names or stems
    (``fairnas_b_transfer.pt.tar`` is the ratio-1.0 SE transfer model of B).
    """
    text = PurePath(name.strip()).name.lower().replace("-", "_")
    for suffix in _FILE_SUFFIXES:
        if text.endswith(suffix):
            text = text[: -len(suffix)]
            break
    match = _NAME_RE.match(text)
    if match is None:
        raise ValueError(f"unknown model {name!r}; published models: {', '.join(MODEL_NAMES)}")
    ratio = match.group("ratio")
    canonical = f"fairnas_{match.group('family')}"
    # The transfer models are all SE models, so ``fairnas_b_transfer`` implies SE ratio 1.0.
    if match.group("se") or match.group("transfer"):
        canonical += "_se_0.5" if ratio in ("0.5", "05") else "_se"
    if match.group("transfer"):
        canonical += "_transfer"
    return canonical


def get_model(name: str) -> ZooModel:
    """The zoo entry for ``name`` (any accepted spelling)."""
    return ZOO[resolve_model_name(name)]


def build_model(name: str) -> SinglePathNet:
    """A freshly initialised network of a published variant."""
    return get_model(name).build()


def zoo_spaces() -> dict[str, SearchSpace]:
    """The spaces the released variants live in, by name."""
    return {entry.space.name: entry.space for entry in ZOO.values()}


def space_by_name(name: str) -> SearchSpace:
    """A preset search space, or the space of a released family (``imagenet_se0.5`` ...)."""
    spaces = zoo_spaces()
    if name in spaces:
        return spaces[name]
    try:
        return get_space(name)
    except ValueError:
        raise ValueError(
            f"unknown search space {name!r}; presets and published-model spaces: "
            f"{', '.join(sorted(set(spaces) | _preset_names()))}"
        ) from None


def _preset_names() -> set[str]:
    from fairnas.space import SPACES

    return set(SPACES)


def se_gate_multiplies(arch: Architecture) -> int:
    """Multiplies of the squeeze-excite gates: one per gated element of every SE block.

    The project's multiply-add count, like the paper's for the plain models, covers convolutions
    and the classifier only. The paper's SE figures (392 / 349 / 325 M) also count the gating
    products; adding this number to the multiply-adds reproduces them.
    """
    space = arch.space
    total = 0
    for spec, choice in zip(space.layers, arch.layer_choices(), strict=True):
        if int(round(spec.in_channels * space.block_se_ratio(choice))) > 0:
            total += int(round(spec.in_channels * choice.expansion)) * spec.output_size ** 2
    return total
