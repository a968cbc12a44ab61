"""Exact batch-norm recalibration for candidates that inherit supernet weights.

A supernet's BN running statistics are a blend over every path it trained, so they are wrong
for any single candidate. Before scoring, each candidate's BN layers get the statistics of the
calibration images flowing through *that* candidate. PyTorch's ``momentum=None`` averages
per-batch variances, which misses the spread between batch means; here each batch's per-channel
mean and variance are merged exactly (in float64) into those of all calibration images so far,
and the running mean and (unbiased) variance are set to the values for the whole set.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

logger = logging.getLogger(__name__)

_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def batch_norms(modules: Iterable[nn.Module]) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every BN layer inside ``modules``, each once."""
    found: dict[int, nn.modules.batchnorm._BatchNorm] = {}
    for module in modules:
        for sub in module.modules():
            if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                found[id(sub)] = sub
    return list(found.values())


@contextmanager
def preserved_bn_state(
    model: nn.Module, bns: list[nn.modules.batchnorm._BatchNorm]
) -> Iterator[None]:
    """Restore BN buffers and every module's train/eval flag on exit."""
    saved = [{name: getattr(bn, name).clone() for name in _BUFFERS} for bn in bns]
    modes = [(module, module.training) for module in model.modules()]
    try:
        yield
    finally:
        for bn, buffers in zip(bns, saved, strict=True):
            for name, value in buffers.items():
                getattr(bn, name).copy_(value)
        for module, mode in modes:
            module.training = mode


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    forward: Callable[[torch.Tensor], object] | None = None,
    bns: list[nn.modules.batchnorm._BatchNorm] | None = None,
) -> int:
    """Set ``bns`` (default: all BN layers of ``model``) to the exact statistics of ``batches``.

    During the pass BN layers normalise with batch statistics (train mode), as in training;
    dropout and other layers run in eval mode. Every module's train/eval flag is restored
    afterwards. Returns the number of images seen.
    """
    forward = forward or model
    bns = bns if bns is not None else batch_norms([model])
    # Per BN layer: images' count, mean and sum of squared deviations (float64, per channel).
    moments: dict[int, tuple[int, torch.Tensor, torch.Tensor]] = {}

    def accumulate(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        # One pass over the batch in its own precision, then an exact merge of the batch's
        # moments into the running ones (Chan et al.'s pairwise update) in float64.
        x = inputs[0].detach()
        dims = [d for d in range(x.dim()) if d != 1]
        var, mean = torch.var_mean(x, dims, correction=0)
        count = x.numel() // x.shape[1]
        mean, squares = mean.double(), var.double() * count
        if id(module) not in moments:
            moments[id(module)] = (count, mean, squares)
            return
        seen, old_mean, old_squares = moments[id(module)]
        total = seen + count
        delta = mean - old_mean
        moments[id(module)] = (total, old_mean + delta * (count / total),
                               old_squares + squares + delta * delta * (seen * count / total))

    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    for bn in bns:
        bn.train()
    handles = [bn.register_forward_pre_hook(accumulate) for bn in bns]
    images = batches_seen = 0
    try:
        for x in batches:
            forward(x)
            images += len(x)
            batches_seen += 1
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes:
            module.training = mode
    if images == 0:
        raise ValueError("BN recalibration needs at least one calibration image")
    for bn in bns:
        if id(bn) not in moments:
            continue  # a BN layer the forward never reached keeps its statistics
        count, mean, squares = moments[id(bn)]
        var = squares / max(count - 1, 1)
        bn.running_mean.copy_(mean.to(bn.running_mean.dtype))
        bn.running_var.copy_(var.clamp_min(0).to(bn.running_var.dtype))
        bn.num_batches_tracked.fill_(batches_seen)
    return images
