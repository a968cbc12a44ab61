"""The lookup-table cost model against built modules, and the published FairNAS figures."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from fairnas.arch import Architecture
from fairnas.costs import Cost, CostModel, cost_model, count_module
from fairnas.network import SinglePathNet, Supernet
from fairnas.space import SearchSpace, get_space

# Expansion and kernel of blocks 1..19 of the published models (FAIRNAS.md, section 3).
PUBLISHED = {
    "A": ("3 3 3 6 6 3 3 6 6 3 6 3 3 6 6 6 6 6 6", "7 3 7 3 7 3 3 7 7 5 3 5 5 3 3 7 3 7 5"),
    "B": ("3 3 3 3 6 3 3 3 6 3 3 6 3 3 6 6 6 6 6", "5 3 5 3 3 5 7 3 3 5 3 3 7 3 7 5 7 3 5"),
    "C": ("3 3 3 3 3 3 3 3 3 6 3 3 3 3 6 6 6 6 6", "5 3 7 3 3 3 3 3 3 3 3 3 3 3 7 7 3 3 5"),
}
# Multiply-adds (conv + FC multiply-accumulates) and parameters of the plain models.
PUBLISHED_COSTS = {
    "A": Cost(388_122_848, 4_651_352),
    "B": Cost(345_297_632, 4_506_272),
    "C": Cost(321_024_992, 4_397_864),
}
# Parameters of the SE variants (se_ratio 1.0 and 0.5): the sums of the weight shapes listed
# for the released checkpoints fairnas_{a,b,c}_se[_0.5].pth.tar, BN buffers excluded.
PUBLISHED_SE_PARAMS = {
    ("A", 1.0): 7_103_512, ("A", 0.5): 5_881_920,
    ("B", 1.0): 6_871_432, ("B", 0.5): 5_693_040,
    ("C", 1.0): 6_697_720, ("C", 0.5): 5_551_776,
}

# How many random architectures to measure per space (224x224 forwards are the slow part).
SAMPLES = {"imagenet": 5, "imagenet18": 5, "fmnist": 20, "tiny": 20}


def published_tokens(name: str) -> list[str]:
    expansions, kernels = PUBLISHED[name]
    return [f"k{k}e{e}" for e, k in zip(expansions.split(), kernels.split(), strict=True)]


def measured(arch: Architecture) -> Cost:
    space = arch.space
    return count_module(SinglePathNet(arch), (space.input_channels, space.input_size,
                                              space.input_size))


def se_space(se_ratio: float) -> SearchSpace:
    """The ImageNet space with the SE models' blocks: swish inside, plain ReLU outside."""
    return get_space("imagenet").with_options(
        se_ratio=se_ratio, activation="swish", stem_activation="relu", head_activation="relu",
        dropout=0.0,
    )


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_cost_model_equals_counted_modules(name: str) -> None:
    space = get_space(name)
    model = cost_model(space)
    rng = random.Random(name)
    for _ in range(SAMPLES[name]):
        indices = tuple(rng.randrange(space.num_choices) for _ in space.searchable_layers)
        arch = Architecture(space, indices)
        cost = model.cost(arch)
        assert cost == measured(arch), str(arch)
        assert model.cost(indices) == cost  # the integer form the search uses


def test_cost_model_with_squeeze_excite_equals_counted_modules() -> None:
    space = get_space("fmnist").with_options(se_ratio=0.25, activation="swish")
    rng = random.Random(0)
    for _ in range(10):
        arch = Architecture(space, tuple(rng.randrange(6) for _ in space.searchable_layers))
        assert CostModel(space).cost(arch) == measured(arch), str(arch)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_models_exact_costs(name: str) -> None:
    tokens = published_tokens(name)
    arch = Architecture.from_tokens(get_space("imagenet"), tokens)
    assert cost_model(arch.space).cost(arch) == PUBLISHED_COSTS[name]
    assert measured(arch) == PUBLISHED_COSTS[name]

    # Block 19 is k5e6 in all three: the 18-layer space with its fixed tail costs the same.
    assert tokens[18] == "k5e6"
    short = Architecture.from_tokens(get_space("imagenet18"), tokens[:18])
    assert cost_model(short.space).cost(short) == PUBLISHED_COSTS[name]


@pytest.mark.parametrize("name", sorted(PUBLISHED))
@pytest.mark.parametrize("se_ratio", [1.0, 0.5])
def test_published_se_models_parameter_counts(name: str, se_ratio: float) -> None:
    arch = Architecture.from_tokens(se_space(se_ratio), published_tokens(name))
    cost = CostModel(arch.space).cost(arch)
    assert cost.params == PUBLISHED_SE_PARAMS[name, se_ratio]
    # The SE gates add only their two small 1x1 convolutions to the plain model's madds.
    assert 0 < cost.madds - PUBLISHED_COSTS[name].madds < 3_000_000


def test_bounds_are_the_cheapest_and_dearest_architectures() -> None:
    space = get_space("tiny")
    model = cost_model(space)
    costs = [model.cost(indices)
             for indices in itertools.product(range(space.num_choices), repeat=3)]
    low, high = model.bounds()
    assert low == Cost(min(c.madds for c in costs), min(c.params for c in costs))
    assert high == Cost(max(c.madds for c in costs), max(c.params for c in costs))
    assert len({c.params for c in costs}) > 1


def test_path_parameters_match_the_supernet_blocks_it_uses() -> None:
    """The parameters a path touches in the supernet are exactly the stand-alone model's."""
    space = get_space("fmnist")
    torch.manual_seed(0)
    supernet = Supernet(space)
    rng = random.Random(1)
    for _ in range(5):
        arch = Architecture(space, tuple(rng.randrange(6) for _ in space.searchable_layers))
        used = {id(p): p for module in supernet.path_modules(arch)
                for p in module.parameters()}
        assert sum(p.numel() for p in used.values()) == cost_model(space).cost(arch).params
