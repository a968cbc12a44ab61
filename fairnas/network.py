"""The builder: stand-alone single-path networks and the weight-sharing supernet.

Both are made from a :class:`~fairnas.space.SearchSpace` by the same code, so a supernet path and
the stand-alone model of the same architecture have identical parameter names below the layer
level: ``layers.{i}.choices.{j}.*`` in the supernet is ``layers.{i}.*`` in the stand-alone model.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fairnas.arch import Architecture
from fairnas.blocks import ConvBNAct, DepthwiseSeparable, InvertedResidual
from fairnas.space import Choice, LayerSpec, SearchSpace

logger = logging.getLogger(__name__)


def build_block(space: SearchSpace, layer: LayerSpec, choice: Choice) -> InvertedResidual:
    """The inverted bottleneck for one layer of ``space`` with the given choice."""
    return InvertedResidual(
        layer.in_channels,
        layer.out_channels,
        kernel=choice.kernel,
        stride=layer.stride,
        expansion=choice.expansion,
        activation=space.block_activation(choice),
        se_ratio=space.block_se_ratio(choice),
    )


class _Backbone(nn.Module):
    """The parts every network of a space shares: stem, first block, head, classifier."""

    def __init__(self, space: SearchSpace) -> None:
        super().__init__()
        self.space = space
        stem_act = space.stem_activation or space.activation
        head_act = space.head_activation or space.activation
        self.stem = ConvBNAct(
            space.input_channels, space.stem_channels, kernel=3, stride=space.stem_stride,
            activation=stem_act,
        )
        self.first_block = DepthwiseSeparable(
            space.stem_channels, space.first_block_channels, stride=space.first_block_stride,
            activation=stem_act,
        )
        self.head = ConvBNAct(space.last_channels, space.head_channels, activation=head_act)
        self.dropout = space.dropout
        self.classifier = nn.Linear(space.head_channels, space.num_classes)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        """Everything before the first searchable layer's choice (shared by all paths)."""
        return self.first_block(self.stem(x))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(x).mean((2, 3))
        if self.dropout > 0:
            x = F.dropout(x, self.dropout, self.training)
        return self.classifier(x)

    def reset_parameters(self) -> None:
        """He init for convolutions, unit BN, small normal classifier: the MobileNet recipe."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.zeros_(module.bias)


class SinglePathNet(_Backbone):
    """A stand-alone network: one block per layer, as given by an architecture."""

    def __init__(self, arch: Architecture) -> None:
        super().__init__(arch.space)
        self.arch = arch
        self.layers = nn.Sequential(
            *(
                build_block(arch.space, spec, choice)
                for spec, choice in zip(arch.space.layers, arch.layer_choices(), strict=True)
            )
        )
        self.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.layers(self.forward_stem(x)))


class ChoiceLayer(nn.Module):
    """All candidate blocks of one layer, each with its own weights."""

    def __init__(self, blocks: Sequence[nn.Module]) -> None:
        super().__init__()
        self.choices = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, choice: int) -> torch.Tensor:
        return self.choices[choice](x)


class Supernet(_Backbone):
    """The weight-sharing supernet: ``m`` independent blocks in every searchable layer.

    Fixed layers hold a single block (choice 0). ``forward(x, arch)`` runs the single-path model
    of ``arch``; :meth:`forward_stem` and :meth:`forward_path` split that call so the shared
    prefix can be computed once for several paths.
    """

    def __init__(self, space: SearchSpace) -> None:
        super().__init__(space)
        layers = []
        for spec in space.layers:
            if spec.index in space.fixed_layers:
                blocks = [build_block(space, spec, space.fixed_choice(spec.index))]
            else:
                blocks = [build_block(space, spec, choice) for choice in space.choices]
            layers.append(ChoiceLayer(blocks))
        self.layers = nn.ModuleList(layers)
        self.reset_parameters()

    def _path_indices(self, arch: Architecture) -> list[int]:
        if arch.space.name != self.space.name or arch.space.num_layers != self.space.num_layers:
            raise ValueError(
                f"architecture is for space {arch.space.name!r}, supernet is {self.space.name!r}"
            )
        return [0 if i is None else i for i in arch.layer_choice_indices()]

    def forward_path(self, x: torch.Tensor, arch: Architecture) -> torch.Tensor:
        """Run the searchable layers and head of one path on the stem's output ``x``."""
        for layer, choice in zip(self.layers, self._path_indices(arch), strict=True):
            x = layer(x, choice)
        return self.forward_head(x)

    def forward(self, x: torch.Tensor, arch: Architecture) -> torch.Tensor:
        return self.forward_path(self.forward_stem(x), arch)

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters every path uses: stem, first block, fixed layers, head, classifier."""
        for module in (self.stem, self.first_block, self.head, self.classifier):
            yield from module.parameters()
        for index in self.space.fixed_layers:
            yield from self.layers[index].parameters()

    def path_modules(self, arch: Architecture) -> Iterator[nn.Module]:
        """The modules a path uses: shared parts and one block per layer."""
        yield self.stem
        yield self.first_block
        for layer, choice in zip(self.layers, self._path_indices(arch), strict=True):
            yield layer.choices[choice]
        yield self.head
        yield self.classifier

    def path_state_dict(self, arch: Architecture) -> dict[str, torch.Tensor]:
        """The stand-alone model's state dict for ``arch``, taken from the supernet's weights."""
        choices = self._path_indices(arch)
        state = {}
        for key, value in self.state_dict().items():
            if key.startswith("layers."):
                _, layer, _, choice, rest = key.split(".", 4)
                if int(choice) != choices[int(layer)]:
                    continue
                key = f"layers.{layer}.{rest}"
            state[key] = value
        return state

    def extract(self, arch: Architecture) -> SinglePathNet:
        """A stand-alone network for ``arch`` holding a copy of the supernet's weights."""
        model = SinglePathNet(arch)
        model.load_state_dict(self.path_state_dict(arch))
        return model.to(next(self.parameters()).device)
