"""The depthwise convolution's own CPU backward equals PyTorch's convolution gradients.

Kernels of 3 keep oneDNN's weight gradient; 5 and 7 take the forward-convolution route; strides
of 2 on sizes that drop rows and non-square inputs check the cropping and output padding.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fairnas.blocks import DepthwiseConv2d


@pytest.mark.parametrize("kernel,stride,size", [(3, 1, (9, 9)), (5, 2, (15, 15)), (7, 2, (14, 14)),
                                                (3, 2, (7, 7)), (5, 1, (6, 6)), (7, 1, (5, 11)),
                                                (5, 2, (9, 14))])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gradients_equal_the_reference_convolution(kernel: int, stride: int,
                                                   size: tuple[int, int],
                                                   channels_last: bool) -> None:
    torch.manual_seed(0)
    conv = DepthwiseConv2d(6, kernel, stride)
    images = torch.randn(3, 6, *size)
    if channels_last:
        conv = conv.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    images.requires_grad_()
    out = conv(images)
    upstream = torch.randn_like(out)
    out.backward(upstream)

    reference_images = images.detach().clone().requires_grad_()
    reference_weight = conv.weight.detach().clone().requires_grad_()
    reference = F.conv2d(reference_images, reference_weight, None, stride, kernel // 2, 1, 6)
    reference.backward(upstream)

    assert out.shape == reference.shape
    torch.testing.assert_close(out, reference)
    torch.testing.assert_close(images.grad, reference_images.grad)
    torch.testing.assert_close(conv.weight.grad, reference_weight.grad, rtol=1e-4, atol=1e-5)


def test_gradcheck_in_double_precision() -> None:
    conv = DepthwiseConv2d(2, 5, 2).double()
    images = torch.randn(1, 2, 7, 7, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(conv, (images,))


def test_frozen_weight_and_no_grad_use_the_plain_convolution() -> None:
    conv = DepthwiseConv2d(4, 3)
    conv.weight.requires_grad_(False)
    images = torch.randn(2, 4, 5, 5, requires_grad=True)
    conv(images).sum().backward()
    assert conv.weight.grad is None and images.grad is not None
    with torch.no_grad():
        assert not conv(images).requires_grad
