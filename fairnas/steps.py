"""One optimizer step: the strict-fairness supernet step and the stand-alone step.

The supernet step runs the forward and backward pass of every path of the step, accumulating
gradients, then synchronises once and updates once. It is built to cost what the paths cost and
little more:

* With one shared batch the stem and fixed first block (everything before the first searchable
  layer) compute the same thing for every path. They run once; every path starts from a detached
  copy of their output, whose gradient accumulates over the paths and is sent back through the
  stem in one backward pass at the end. The result equals m full backward passes up to float
  rounding (backward is linear in the incoming gradient), and only one path's graph is alive at
  a time, not m graphs kept by ``retain_graph``.
* Path losses stay on the device; the loss and the finite-check leave it once per step, together
  (one synchronisation instead of one per path and one per parameter).
* Across processes, gradients, loss and BN running statistics travel in one all-reduce.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fairnas.arch import Architecture
from fairnas.distributed import DistContext, reduce_step
from fairnas.network import Supernet

logger = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]
GRAD_REDUCTIONS = ("shared_mean", "sum", "mean")
Precision = Callable[[], contextlib.AbstractContextManager]


def backward_paths(
    supernet: Supernet, paths: Sequence[Architecture], batches: Sequence[Batch], *,
    shared_prefix: bool = True, scale: float = 1.0, label_smoothing: float = 0.0,
    precision: Precision = contextlib.nullcontext,
) -> list[torch.Tensor]:
    """Forward and backward of every path, gradients accumulating; returns the detached losses.

    ``batches`` holds one batch shared by all paths, or one batch per path. ``shared_prefix``
    (one shared batch only) computes the stem once and lets the paths branch from its output;
    off, every path runs the whole network, as a plain sequence of single-path steps does.
    """
    if len(batches) not in (1, len(paths)):
        raise ValueError(f"batches should hold 1 or {len(paths)} batches, got {len(batches)}")
    if len(batches) == 1 and shared_prefix:
        images, labels = batches[0]
        with precision():
            prefix = supernet.forward_stem(images)
        # A leaf the paths branch from; its gradient (kept in float32) sums theirs.
        branch = prefix.detach().float().requires_grad_()
        losses = [_path_backward(supernet, branch, labels, path, scale, label_smoothing,
                                 precision) for path in paths]
        if prefix.requires_grad:
            prefix.backward(branch.grad.to(prefix.dtype))
        return losses

    losses = []
    for k, path in enumerate(paths):
        images, labels = batches[0] if len(batches) == 1 else batches[k]
        with precision():
            start = supernet.forward_stem(images)
        losses.append(_path_backward(supernet, start, labels, path, scale, label_smoothing,
                                     precision))
    return losses


def _path_backward(supernet: Supernet, start: torch.Tensor, labels: torch.Tensor,
                   path: Architecture, scale: float, label_smoothing: float,
                   precision: Precision) -> torch.Tensor:
    with precision():
        logits = supernet.forward_path(start, path)
        loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    (loss * scale if scale != 1.0 else loss).backward()
    return loss.detach()


@dataclass
class StepOutcome:
    loss: float  # mean over the step's paths (and over ranks)
    finite: bool  # loss and every gradient finite; the update was made only if so
    path_losses: list[torch.Tensor]  # this rank's, detached, for error messages


class SupernetStep:
    """``step(paths, batches)``: zero gradients, all paths' passes, one sync, one update.

    ``grad_reduction`` says how the m paths' gradients combine. ``sum`` adds them everywhere
    (the literal accumulate-then-update rule): every choice block gets its own path's gradient,
    but the layers all paths share (stem, first block, fixed layers, head, classifier) get m
    gradients added up, an m times larger step. ``mean`` divides everything by m, so choice
    blocks learn m times slower. ``shared_mean`` (the default) sums for choice blocks and averages
    for shared layers, so under strict fairness (each block in exactly one path) every parameter
    moves by one single-path SGD step's worth; with ``expectation`` a block drawn k times in a
    step gets its k gradients added.

    ``sync_buffers`` are averaged across ranks with the gradients (BN running statistics
    under plain data parallelism). With ``restore_buffers`` a non-finite step also puts the
    buffers back as they were, since the forward passes already moved the running statistics.
    """

    def __init__(
        self, supernet: Supernet, optimizer: torch.optim.Optimizer, *, shared_prefix: bool = True,
        grad_reduction: str = "shared_mean", label_smoothing: float = 0.0,
        dist: DistContext | None = None, precision: Precision = contextlib.nullcontext,
        sync_buffers: Sequence[torch.Tensor] = (), restore_buffers: bool = False,
    ) -> None:
        if grad_reduction not in GRAD_REDUCTIONS:
            raise ValueError(f"grad_reduction should be one of {', '.join(GRAD_REDUCTIONS)}, "
                             f"got {grad_reduction!r}")
        self.supernet, self.optimizer = supernet, optimizer
        self.shared_prefix, self.grad_reduction = shared_prefix, grad_reduction
        self.label_smoothing, self.precision = label_smoothing, precision
        self.dist = dist or DistContext.single()
        self.sync_buffers, self.restore_buffers = list(sync_buffers), restore_buffers
        self.shared_params = list(supernet.shared_parameters())

    def __call__(self, paths: Sequence[Architecture], batches: Sequence[Batch]) -> StepOutcome:
        self.optimizer.zero_grad(set_to_none=True)
        saved = ([b.clone() for b in self.supernet.buffers()] if self.restore_buffers else [])
        scale = 1.0 / len(paths) if self.grad_reduction == "mean" else 1.0

        losses = backward_paths(self.supernet, paths, batches, shared_prefix=self.shared_prefix,
                                scale=scale, label_smoothing=self.label_smoothing,
                                precision=self.precision)
        if self.grad_reduction == "shared_mean" and len(paths) > 1:
            for param in self.shared_params:
                if param.grad is not None:
                    param.grad.div_(len(paths))

        total, finite = reduce_step(self.supernet, torch.stack(losses).sum(), self.dist,
                                    self.sync_buffers)
        if finite:
            self.optimizer.step()
        else:
            self.optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for buffer, value in zip(self.supernet.buffers(), saved, strict=False):
                    buffer.copy_(value)
        return StepOutcome(total / len(paths), finite, losses)


def standalone_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, batch: Batch, *,
    label_smoothing: float = 0.0, dist: DistContext | None = None,
    precision: Precision = contextlib.nullcontext, sync_buffers: Sequence[torch.Tensor] = (),
) -> tuple[float, bool]:
    """One step of a single network; returns (loss, finite). No update if not finite."""
    images, labels = batch
    optimizer.zero_grad(set_to_none=True)
    with precision():
        loss = F.cross_entropy(model(images), labels, label_smoothing=label_smoothing)
    loss.backward()
    value, finite = reduce_step(model, loss, dist or DistContext.single(), sync_buffers)
    if finite:
        optimizer.step()
    return value, finite
