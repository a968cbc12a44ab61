"""Building blocks: conv-BN-activation, the fixed separable block, the inverted bottleneck."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
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


def _depthwise_input_grad(input_shape: torch.Size, weight: torch.Tensor, grad_out: torch.Tensor,
                          stride: tuple[int, int], padding: tuple[int, int]) -> torch.Tensor:
    """Input gradient of a depthwise convolution as a channels-last transposed convolution.

    The transposed convolution is the same linear map as ``conv2d_input`` (bit-identical in
    the probes), but on channels-last tensors it runs oneDNN's depthwise kernel: 5-9x faster on
    this kind of x86 CPU for stride 2 and large batches, where ``conv2d_input`` falls back to a
    generic loop. ``output_padding`` restores the rows and columns a strided convolution drops.
    """
    kernel = weight.shape[-2:]
    output_padding = tuple(
        size - ((out - 1) * s - 2 * p + k)
        for size, out, s, p, k in zip(input_shape[-2:], grad_out.shape[-2:], stride, padding,
                                      kernel, strict=True)
    )
    return F.conv_transpose2d(grad_out.contiguous(memory_format=torch.channels_last), weight,
                              None, stride, padding, output_padding, weight.shape[0])


def _correlation_is_faster(kernel: int) -> bool:
    """Whether this depthwise layer's weight gradient takes the forward-convolution route.

    Measured on a 2-core Xeon (AVX-512, oneDNN as in torch 2.14), channels-last. Layer by
    layer in isolation, the route took 0.22-0.96x oneDNN's time for 7x7 kernels at batch 4 to
    128, 0.30-0.60x for 5x5 kernels at batch 4 but 1.16-1.48x at batch 128, and was 5-25x
    slower for 3x3 kernels, where oneDNN has a fast kernel. In whole strict-fairness steps,
    taking it for every 5x5 and 7x7 layer was as fast as or faster than a rule that also
    weighs the batch (fmnist b128: 840 against 867 ms; imagenet b4: 1,822 against 1,805; b16:
    7,682 against 7,805; oneDNN throughout: 979, 2,316, 8,428), so the kernel alone decides.
    """
    return kernel >= 5


def _depthwise_weight_grad(x: torch.Tensor, weight_shape: torch.Size, grad_out: torch.Tensor,
                           stride: tuple[int, int], padding: tuple[int, int]) -> torch.Tensor:
    """Weight gradient of a depthwise convolution, by the fastest route measured on x86 CPUs.

    PyTorch computes it with oneDNN's backward-weights kernel, fast for 3x3 kernels but 10-20x
    slower than the forward pass for 5x5 and 7x7 ones. For those the gradient is computed as
    a forward convolution instead: channel c's gradient is the correlation of its input plane
    with its output-gradient plane, which is a depthwise convolution of the input (one group
    per image and channel) with the output gradient as a large kernel, dilated by the stride;
    summing over the batch gives the gradient. The kernel size decides the route
    (:func:`_correlation_is_faster`); oneDNN's kernel runs on channels-last copies, where it is
    fastest.
    """
    batch, channels = x.shape[:2]
    kernel = weight_shape[-2:]
    if not _correlation_is_faster(max(kernel)):
        return torch.nn.grad.conv2d_weight(
            x.contiguous(memory_format=torch.channels_last), weight_shape,
            grad_out.contiguous(memory_format=torch.channels_last), stride, padding, 1,
            channels)
    planes = x.contiguous().view(1, batch * channels, *x.shape[2:])
    kernels = grad_out.contiguous().view(batch * channels, 1, *grad_out.shape[2:])
    # Output size in + 2p - s(out - 1) >= k: the rows and columns past k are the ones a
    # strided forward pass never reached; they are dropped.
    correlation = F.conv2d(planes, kernels, None, 1, padding, stride, batch * channels)
    correlation = correlation.view(batch, channels, *correlation.shape[2:])
    return correlation[:, :, :kernel[0], :kernel[1]].sum(0).unsqueeze(1)


class _DepthwiseFastBackward(torch.autograd.Function):
    """Depthwise convolution with the faster CPU gradients above; the forward pass is PyTorch's.

    On x86 CPUs PyTorch's depthwise backward dominates a training step of an MBConv network
    (40% of a step of six ImageNet-space paths at batch 4, against 4% for the forward pass).
    Both gradients here are the same linear maps, computed by faster routes.
    """

    @staticmethod
    def forward(ctx, x, weight, stride, padding):  # noqa: ANN001, ANN205 - autograd signature
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding = stride, padding
        return F.conv2d(x, weight, None, stride, padding, 1, weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205 - autograd signature
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = _depthwise_input_grad(x.shape, weight, grad_out, ctx.stride, ctx.padding)
        if ctx.needs_input_grad[1]:
            grad_weight = _depthwise_weight_grad(x, weight.shape, grad_out, ctx.stride,
                                                 ctx.padding)
        return grad_x, grad_weight, None, None


class DepthwiseConv2d(nn.Conv2d):
    """A depthwise ``nn.Conv2d`` (same parameters and state dict) with a faster CPU backward."""

    def __init__(self, channels: int, kernel: int, stride: int = 1) -> None:
        super().__init__(channels, channels, kernel, stride, kernel // 2, groups=channels,
                         bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type == "cpu" and torch.is_grad_enabled() and self.weight.requires_grad
                and not torch.is_autocast_enabled("cpu")):
            return _DepthwiseFastBackward.apply(x, self.weight, self.stride, self.padding)
        return super().forward(x)


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
        if groups == in_channels == out_channels and groups > 1:
            self.conv: nn.Conv2d = DepthwiseConv2d(in_channels, kernel, stride)
        else:
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
