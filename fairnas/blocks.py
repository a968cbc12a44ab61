"""Building blocks: conv-BN-activation, the fixed separable block, the inverted bottleneck."""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)


def make_activation(name: str) -> nn.Module:
    """The activation modules used by FairNAS and its SE variants."""
    if name == "relu":
        return nn.ReLU(inplace=True)
    if name == "relu6":
        return nn.ReLU6(inplace=True)
    if name == "swish":
        return nn.SiLU(inplace=True)
    if name == "hswish":
        return nn.Hardswish(inplace=True)
    raise ValueError(f"activation should be relu, relu6, swish or hswish, got {name!r}")


class ConvBNAct(nn.Module):
    """Convolution without bias, batch norm, and an optional activation."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        kernel: int = 1,
        stride: int = 1,
        groups: int = 1,
        activation: str | None = None,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False
        )
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = make_activation(activation) if activation else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class SqueezeExcite(nn.Module):
    """Channel gate: pool, reduce to ``reduced`` channels, activate, expand, sigmoid."""

    def __init__(self, channels: int, reduced: int, *, activation: str) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1, bias=True)
        self.act = make_activation(activation)
        self.expand = nn.Conv2d(reduced, channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = x.mean((2, 3), keepdim=True)
        scale = self.expand(self.act(self.reduce(scale)))
        return x * scale.sigmoid()


class DepthwiseSeparable(nn.Module):
    """The fixed first block: depthwise 3x3, BN, activation, pointwise projection, BN."""

    def __init__(
        self, in_channels: int, out_channels: int, *, stride: int = 1, activation: str
    ) -> None:
        super().__init__()
        self.depthwise = ConvBNAct(
            in_channels, in_channels, kernel=3, stride=stride, groups=in_channels,
            activation=activation,
        )
        self.project = ConvBNAct(in_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.depthwise(x))


class InvertedResidual(nn.Module):
    """MobileNetV2 inverted bottleneck, the FairNAS choice block.

    Expand 1x1 to ``in_channels * expansion``, depthwise k x k with the layer's stride, an
    optional squeeze-excite gate whose width is ``round(in_channels * se_ratio)``, then a linear
    1x1 projection. The identity shortcut is used when the shape is kept.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        kernel: int,
        stride: int,
        expansion: float,
        activation: str,
        se_ratio: float = 0.0,
    ) -> None:
        super().__init__()
        hidden = int(round(in_channels * expansion))
        self.use_shortcut = stride == 1 and in_channels == out_channels

        # Expand: skipped when the block keeps its width, as in MobileNetV2.
        self.expand = (
            ConvBNAct(in_channels, hidden, activation=activation) if hidden != in_channels
            else nn.Identity()
        )
        # Depthwise: spatial filtering, carrying the layer's stride.
        self.depthwise = ConvBNAct(
            hidden, hidden, kernel=kernel, stride=stride, groups=hidden, activation=activation
        )
        # Squeeze-excite on the depthwise output, sized from the block's input width.
        reduced = int(round(in_channels * se_ratio))
        self.se = (
            SqueezeExcite(hidden, reduced, activation=activation) if reduced > 0 else nn.Identity()
        )
        # Project: linear bottleneck back to the output width.
        self.project = ConvBNAct(hidden, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.se(self.depthwise(self.expand(x))))
        return out + x if self.use_shortcut else out
