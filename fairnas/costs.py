"""Cost model: multiply-adds and parameters from per-layer lookup tables.

Multiply-adds follow the paper's convention: the multiply-accumulates of convolutions and
fully-connected layers only (no BN, bias, pooling, activation or gating). Parameters count every
trainable tensor, BN affine terms included. Both are computed from closed-form per-block
formulas once per space, so costing an architecture is a sum of table entries: the search calls
it thousands of times. :func:`count_module` measures a built module the slow way, and the tests
hold the two equal.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from fairnas.arch import Architecture
from fairnas.space import Choice, LayerSpec, SearchSpace, conv_output_size

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cost:
    """Multiply-adds and parameters of a network or a part of one."""

    madds: int
    params: int

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.madds + other.madds, self.params + other.params)


ZERO = Cost(0, 0)


def conv_cost(
    in_channels: int, out_channels: int, kernel: int, output_size: int, *, groups: int = 1,
    bias: bool = False, batch_norm: bool = True,
) -> Cost:
    """A square 'same'-padded convolution, optionally followed by batch norm."""
    weights = out_channels * (in_channels // groups) * kernel * kernel
    params = weights + (out_channels if bias else 0) + (2 * out_channels if batch_norm else 0)
    return Cost(weights * output_size * output_size, params)


def block_cost(space: SearchSpace, layer: LayerSpec, choice: Choice) -> Cost:
    """One inverted bottleneck (see :class:`fairnas.blocks.InvertedResidual`)."""
    hidden = int(round(layer.in_channels * choice.expansion))
    out_size = layer.output_size
    cost = ZERO
    if hidden != layer.in_channels:
        cost += conv_cost(layer.in_channels, hidden, 1, layer.input_size)
    cost += conv_cost(hidden, hidden, choice.kernel, out_size, groups=hidden)
    reduced = int(round(layer.in_channels * space.block_se_ratio(choice)))
    if reduced > 0:
        cost += conv_cost(hidden, reduced, 1, 1, bias=True, batch_norm=False)
        cost += conv_cost(reduced, hidden, 1, 1, bias=True, batch_norm=False)
    return cost + conv_cost(hidden, layer.out_channels, 1, out_size)


def fixed_cost(space: SearchSpace) -> Cost:
    """Stem, fixed first block, head and classifier: the same for every architecture."""
    stem_size = space.stem_output_size
    first_size = space.first_block_output_size
    last_size = space.layers[-1].output_size
    cost = conv_cost(space.input_channels, space.stem_channels, 3, stem_size)
    cost += conv_cost(space.stem_channels, space.stem_channels, 3, first_size,
                      groups=space.stem_channels)
    cost += conv_cost(space.stem_channels, space.first_block_channels, 1, first_size)
    cost += conv_cost(space.last_channels, space.head_channels, 1, last_size)
    classifier = space.head_channels * space.num_classes
    return cost + Cost(classifier, classifier + space.num_classes)


class CostModel:
    """Per-layer lookup of block costs; ``cost(arch)`` is a sum over the table."""

    def __init__(self, space: SearchSpace) -> None:
        self.space = space
        self.fixed = fixed_cost(space)
        for layer in space.fixed_layers:
            self.fixed += block_cost(space, space.layers[layer], space.fixed_choice(layer))
        specs = space.layers
        self.table = [
            [block_cost(space, specs[layer], choice) for choice in space.choices]
            for layer in space.searchable_layers
        ]
        self._madds = [[c.madds for c in row] for row in self.table]
        self._params = [[c.params for c in row] for row in self.table]

    def cost(self, arch: Architecture | tuple[int, ...]) -> Cost:
        indices = arch.indices if isinstance(arch, Architecture) else arch
        madds = self.fixed.madds + sum(row[i] for row, i in zip(self._madds, indices, strict=True))
        params = self.fixed.params + sum(
            row[i] for row, i in zip(self._params, indices, strict=True)
        )
        return Cost(madds, params)

    def bounds(self) -> tuple[Cost, Cost]:
        """The cheapest and the most expensive cost reachable in the space (per objective)."""
        low = Cost(self.fixed.madds + sum(min(r) for r in self._madds),
                   self.fixed.params + sum(min(r) for r in self._params))
        high = Cost(self.fixed.madds + sum(max(r) for r in self._madds),
                    self.fixed.params + sum(max(r) for r in self._params))
        return low, high


@lru_cache(maxsize=16)
def cost_model(space: SearchSpace) -> CostModel:
    """The (cached) cost model of a space."""
    return CostModel(space)


def count_module(model: nn.Module, input_shape: tuple[int, ...]) -> Cost:
    """Measure a built module: hooks count conv/linear multiply-adds on one forward pass."""
    madds = 0

    def on_conv(module: nn.Conv2d, _inputs: tuple, output: torch.Tensor) -> None:
        nonlocal madds
        per_output = (module.in_channels // module.groups) * module.kernel_size[0] \
            * module.kernel_size[1]
        madds += output[0].numel() * per_output

    def on_linear(module: nn.Linear, _inputs: tuple, output: torch.Tensor) -> None:
        nonlocal madds
        madds += module.in_features * module.out_features * (output.numel() // output.shape[-1]
                                                             // output.shape[0])

    handles = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(on_conv))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(on_linear))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return Cost(madds, sum(p.numel() for p in model.parameters()))


def output_size_after(size: int, strides: list[int]) -> int:
    """Spatial side after a sequence of 'same'-padded strided convolutions."""
    for stride in strides:
        size = conv_output_size(size, stride)
    return size
