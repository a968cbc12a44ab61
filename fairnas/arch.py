"""Architecture encoding: one choice token per searchable layer.

Three forms round-trip into each other:

* the compact string ``k7e3-k3e3-k7e3-...`` (one token per searchable layer, ``-`` between),
* the JSON form ``{"space": "imagenet", "layers": ["k7e3", ...]}``,
* the integer form used by the search: the index of each layer's choice in the space's list.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from fairnas.space import Choice, SearchSpace, get_space

logger = logging.getLogger(__name__)

_SEPARATORS = re.compile(r"[\s,|;/-]+")


@dataclass(frozen=True)
class Architecture:
    """A single-path model of a search space: the choice index of every searchable layer."""

    space: SearchSpace
    indices: tuple[int, ...]

    def __post_init__(self) -> None:
        expected = len(self.space.searchable_layers)
        if len(self.indices) != expected:
            raise ValueError(
                f"architecture for space {self.space.name!r} should have {expected} layer choices, "
                f"got {len(self.indices)}"
            )
        for position, index in enumerate(self.indices):
            if not 0 <= int(index) < self.space.num_choices:
                layer = self.space.searchable_layers[position]
                raise ValueError(
                    f"layer {layer}: choice index should be in [0, {self.space.num_choices}), "
                    f"got {index}"
                )
        object.__setattr__(self, "indices", tuple(int(i) for i in self.indices))

    # -- constructors ------------------------------------------------------------------------

    @classmethod
    def from_tokens(cls, space: SearchSpace, tokens: Sequence[str]) -> Architecture:
        searchable = space.searchable_layers
        if len(tokens) != len(searchable):
            raise ValueError(
                f"architecture for space {space.name!r} should have {len(searchable)} tokens "
                f"(one per searchable layer), got {len(tokens)}: {'-'.join(tokens)!r}"
            )
        lookup = {token: i for i, token in enumerate(space.choice_tokens)}
        indices = []
        for layer, token in zip(searchable, tokens, strict=True):
            normalised = _normalise_token(token)
            if normalised not in lookup:
                raise ValueError(
                    f"layer {layer} (counting from 0): unknown choice {token!r}; allowed values: "
                    f"{', '.join(space.choice_tokens)}"
                )
            indices.append(lookup[normalised])
        return cls(space, tuple(indices))

    @classmethod
    def from_string(cls, space: SearchSpace, text: str) -> Architecture:
        """Parse the compact form; ``-``, ``,``, ``|`` and spaces all separate tokens."""
        tokens = [t for t in _SEPARATORS.split(text.strip()) if t]
        return cls.from_tokens(space, tokens)

    @classmethod
    def from_json(
        cls, data: str | dict[str, Any], space: SearchSpace | None = None
    ) -> Architecture:
        """Parse the JSON form; the space named in it is used unless one is given."""
        obj = json.loads(data) if isinstance(data, str) else data
        if not isinstance(obj, dict) or "layers" not in obj:
            raise ValueError(f"architecture JSON should be an object with 'layers', got {obj!r}")
        if space is None:
            if "space" not in obj:
                raise ValueError("architecture JSON names no 'space' and none was given")
            space = get_space(obj["space"])
        elif "space" in obj and isinstance(obj["space"], str) and obj["space"] != space.name:
            raise ValueError(
                f"architecture JSON is for space {obj['space']!r}, expected {space.name!r}"
            )
        return cls.from_tokens(space, [str(t) for t in obj["layers"]])

    @classmethod
    def parse(cls, space: SearchSpace, text: str) -> Architecture:
        """Accept either the compact string or the JSON form."""
        stripped = text.strip()
        if stripped.startswith("{"):
            return cls.from_json(stripped, space)
        return cls.from_string(space, stripped)

    # -- views ---------------------------------------------------------------------------------

    @property
    def tokens(self) -> tuple[str, ...]:
        return tuple(self.space.choice_tokens[i] for i in self.indices)

    def __str__(self) -> str:
        return "-".join(self.tokens)

    def to_json_dict(self) -> dict[str, Any]:
        return {"space": self.space.name, "layers": list(self.tokens)}

    def to_json(self) -> str:
        return json.dumps(self.to_json_dict())

    def layer_choices(self) -> tuple[Choice, ...]:
        """The block of every layer, fixed layers included, in network order."""
        choices = []
        searched = dict(zip(self.space.searchable_layers, self.indices, strict=True))
        for layer in range(self.space.num_layers):
            if layer in searched:
                choices.append(self.space.choices[searched[layer]])
            else:
                choices.append(self.space.fixed_choice(layer))
        return tuple(choices)

    def layer_choice_indices(self) -> tuple[int | None, ...]:
        """Per network layer, the supernet choice index, or ``None`` for a fixed layer."""
        searched = dict(zip(self.space.searchable_layers, self.indices, strict=True))
        return tuple(searched.get(layer) for layer in range(self.space.num_layers))


def _normalise_token(token: str) -> str:
    token = token.strip().lower()
    try:
        return Choice.from_token(token).token
    except ValueError:
        return token


def architectures_from_lines(space: SearchSpace, lines: Iterable[str]) -> list[Architecture]:
    """Parse one architecture per non-empty, non-comment line."""
    return [
        Architecture.parse(space, line)
        for line in lines
        if line.strip() and not line.lstrip().startswith("#")
    ]
