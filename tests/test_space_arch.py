"""Search spaces and the architecture encoding: round trips, sizes and the errors users see."""

from __future__ import annotations

import json
import random

import pytest

from fairnas.arch import Architecture, architectures_from_lines
from fairnas.space import Choice, SearchSpace, get_space, space_from_dict

SPACE_NAMES = ("imagenet", "imagenet18", "fmnist", "tiny")


def random_arch(space: SearchSpace, rng: random.Random) -> Architecture:
    indices = tuple(rng.randrange(space.num_choices) for _ in space.searchable_layers)
    return Architecture(space, indices)


@pytest.mark.parametrize("name", SPACE_NAMES)
def test_string_json_and_index_forms_round_trip(name: str) -> None:
    space = get_space(name)
    rng = random.Random(name)
    for _ in range(50):
        arch = random_arch(space, rng)
        text = str(arch)
        assert len(text.split("-")) == len(space.searchable_layers)
        assert Architecture.from_string(space, text) == arch
        assert Architecture.parse(space, text) == arch
        assert Architecture.from_tokens(space, arch.tokens) == arch
        # JSON, with the space named in it or given explicitly.
        assert Architecture.from_json(arch.to_json()) == arch
        assert Architecture.from_json(arch.to_json(), space) == arch
        assert Architecture.parse(space, arch.to_json()) == arch
        assert json.loads(arch.to_json()) == {"space": name, "layers": list(arch.tokens)}
        assert Architecture(space, arch.indices).tokens == arch.tokens


def test_other_separators_and_spelling_are_accepted() -> None:
    space = get_space("tiny")
    arch = Architecture(space, (2, 0, 1))
    assert str(arch) == "k5e1-k3e1-k3e2"
    for text in ("k5e1 k3e1 k3e2", "k5e1,k3e1,k3e2", " K5E1 | k3e1.0 | k3e2\n"):
        assert Architecture.from_string(space, text) == arch
    lines = ["# a comment", "", str(arch), arch.to_json()]
    assert architectures_from_lines(space, lines) == [arch, arch]


def test_imagenet18_has_a_fixed_k5e6_last_block() -> None:
    space = get_space("imagenet18")
    assert space.searchable_layers == tuple(range(18))
    assert space.num_layers == 19
    arch = random_arch(space, random.Random(0))
    choices = arch.layer_choices()
    assert len(choices) == 19
    assert choices[18] == Choice(5, 6)
    assert arch.layer_choice_indices()[18] is None
    assert arch.layer_choice_indices()[:18] == arch.indices
    # 19 tokens are one too many for the 18-layer space.
    full = Architecture(get_space("imagenet"), (*arch.indices, 3))
    with pytest.raises(ValueError, match="18 tokens"):
        Architecture.from_string(space, str(full))


def test_space_sizes() -> None:
    assert get_space("imagenet").size == 6**19 == 609_359_740_010_496
    assert get_space("imagenet18").size == 6**18 == 101_559_956_668_416
    assert get_space("fmnist").size == 6**6
    assert get_space("tiny").size == 3**3
    assert get_space("imagenet").choice_tokens == ("k3e3", "k3e6", "k5e3", "k5e6", "k7e3", "k7e6")


@pytest.mark.parametrize("name", SPACE_NAMES)
def test_wrong_length_raises(name: str) -> None:
    space = get_space(name)
    tokens = list(random_arch(space, random.Random(1)).tokens)
    for bad in (tokens[:-1], [*tokens, tokens[0]]):
        with pytest.raises(ValueError, match=f"{len(tokens)} tokens") as error:
            Architecture.from_tokens(space, bad)
        assert f"got {len(bad)}" in str(error.value)
    with pytest.raises(ValueError, match=f"{len(tokens)} layer choices"):
        Architecture(space, (0,) * (len(tokens) + 1))


@pytest.mark.parametrize("name", SPACE_NAMES)
@pytest.mark.parametrize("bad", ["k9e3", "k4e3", "k3e4", "3x3", "k3e6_se0.25"])
def test_unknown_token_names_layer_token_and_allowed_values(name: str, bad: str) -> None:
    space = get_space(name)
    tokens = list(random_arch(space, random.Random(2)).tokens)
    position = len(tokens) // 2
    tokens[position] = bad
    with pytest.raises(ValueError) as error:
        Architecture.from_tokens(space, tokens)
    message = str(error.value)
    assert f"layer {space.searchable_layers[position]}" in message
    assert repr(bad) in message
    assert ", ".join(space.choice_tokens) in message


@pytest.mark.parametrize("name", SPACE_NAMES)
def test_bad_index_names_layer_and_range(name: str) -> None:
    space = get_space(name)
    indices = [0] * len(space.searchable_layers)
    for bad in (space.num_choices, -1):
        indices[-1] = bad
        with pytest.raises(ValueError) as error:
            Architecture(space, tuple(indices))
        message = str(error.value)
        assert f"layer {space.searchable_layers[-1]}" in message
        assert f"[0, {space.num_choices})" in message
        assert f"got {bad}" in message


def test_json_errors() -> None:
    space = get_space("fmnist")
    arch = random_arch(space, random.Random(3))
    with pytest.raises(ValueError, match="'layers'"):
        Architecture.from_json('{"space": "fmnist"}')
    with pytest.raises(ValueError, match="names no 'space'"):
        Architecture.from_json(json.dumps({"layers": list(arch.tokens)}))
    with pytest.raises(ValueError, match="'tiny'"):
        Architecture.from_json(arch.to_json(), get_space("tiny"))


def test_choice_tokens() -> None:
    assert Choice(7, 3).token == "k7e3"
    assert Choice(3, 2.5).token == "k3e2.5"
    full = Choice(3, 6, se_ratio=0.25, activation="swish")
    assert full.token == "k3e6_se0.25_swish"
    assert Choice.from_token(full.token) == full
    assert Choice.from_token("K5E6") == Choice(5, 6)
    for bad, pattern in (("k4e3", "kernel"), ("k3e6_xyz", "'xyz'"), ("kernel3", "k3e6")):
        with pytest.raises(ValueError, match=pattern):
            Choice.from_token(bad)


@pytest.mark.parametrize("name", SPACE_NAMES)
def test_space_dict_round_trip(name: str) -> None:
    space = get_space(name)
    data = space.to_dict()
    rebuilt = space_from_dict(data)
    assert rebuilt == space
    assert hash(rebuilt) == hash(space)
    assert rebuilt.layers == space.layers
    assert get_space(json.loads(json.dumps(data))) == space  # survives JSON (string keys)


def test_space_from_dict_with_base_and_overrides() -> None:
    space = space_from_dict({"base": "fmnist", "num_classes": 7, "dropout": 0.0})
    assert space.num_classes == 7 and space.dropout == 0.0
    assert space.stages == get_space("fmnist").stages
    assert space == get_space("fmnist").with_options(num_classes=7, dropout=0.0)


def test_bad_space_dicts_are_rejected() -> None:
    good = get_space("tiny").to_dict()
    with pytest.raises(ValueError, match="'stagez'"):
        space_from_dict({**good, "stagez": good["stages"]})
    without = {k: v for k, v in good.items() if k not in ("stages", "head_channels")}
    with pytest.raises(ValueError, match=r"missing keys \['head_channels', 'stages'\]"):
        space_from_dict(without)
    with pytest.raises(ValueError, match="out_channels, layers, stride"):
        space_from_dict({**good, "stages": [[8, 1]]})
    with pytest.raises(ValueError, match="stride 1 or 2"):
        space_from_dict({**good, "stages": [[8, 1, 3]]})
    with pytest.raises(ValueError, match="distinct"):
        space_from_dict({**good, "choices": ["k3e1", "k3e1.0"]})
    with pytest.raises(ValueError, match="fixed layer index"):
        space_from_dict({**good, "fixed_layers": {3: "k3e1"}})
    with pytest.raises(ValueError, match="activation"):
        space_from_dict({**good, "activation": "gelu"})
    with pytest.raises(ValueError, match="unknown search space 'nope'"):
        get_space("nope")
