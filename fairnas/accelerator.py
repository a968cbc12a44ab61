"""Feeding the device: batches from in-memory splits, bf16 autocast, channels-last.

Streamed file splits (``data.stream``) have their own feeder with the same interface,
:class:`fairnas.streaming.StreamedBatchFeeder`; :func:`make_feeder` picks the one a split needs.

Pinned memory exists for GPU runs, where the host must stay ahead of the device: a batch is
gathered into pinned memory and copied without blocking, so the gather of the next batch overlaps
the device's work on the current one. bf16 autocast works on CPU and CUDA; channels-last on both.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from fairnas.data import BatchPlan, FileSplit, TensorSplit

if TYPE_CHECKING:
    from fairnas.streaming import StreamedBatchFeeder

logger = logging.getLogger(__name__)


def precision_context(
    device: str | torch.device, amp: bool
) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the context each forward pass runs in: bf16 autocast with ``amp``, else none.

    bf16 keeps float32's exponent range, so no loss scaling is needed (unlike float16);
    parameters, gradients and optimizer state stay float32. On CPUs without bf16 arithmetic
    units (no AVX512-BF16 or AMX) autocast emulates it: a training step measured 2.8x slower
    than float32 on such a Xeon, hence the off default there (``benchmarks/bench_precision.py``).
    """
    if not amp:
        return contextlib.nullcontext
    device_type = torch.device(device).type
    if device_type not in ("cuda", "cpu"):
        logger.warning("amp supports cuda and cpu; training on %s in float32", device)
        return contextlib.nullcontext
    logger.info("amp: forward passes in bf16 autocast on %s", device_type)
    return functools.partial(torch.autocast, device_type, dtype=torch.bfloat16)


def place_model(model: nn.Module, device: str | torch.device, *, channels_last: bool) -> None:
    """Move ``model`` to ``device``, in channels-last layout if asked (parameters keep names)."""
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)


class BatchFeeder:
    """This rank's batch number ``n`` of a split, on the device.

    Batch ``n`` is batch ``n % batches_per_epoch`` of epoch ``n // batches_per_epoch`` in
    ``plan``. The epoch's order is drawn once and kept, not redrawn for every batch (a full
    permutation of the training set per step is measurable host work on large data sets).
    With ``pin_memory`` on CUDA the images are gathered into one of two pinned buffers and copied
    without blocking; a buffer is reused only after the copy that read it has finished.
    """

    def __init__(
        self, split: TensorSplit, plan: BatchPlan, *, batches_per_epoch: int,
        device: str | torch.device = "cpu", pin_memory: bool = False,
        channels_last: bool = False,
    ) -> None:
        if not 0 < batches_per_epoch <= len(plan):
            raise ValueError(f"batches_per_epoch should be in [1, {len(plan)}], "
                             f"got {batches_per_epoch}")
        self.split, self.plan, self.batches_per_epoch = split, plan, batches_per_epoch
        self.device = torch.device(device)
        self.pinned = pin_memory and self.device.type == "cuda"
        self.channels_last = channels_last
        self._epoch: int | None = None
        self._order: list[torch.Tensor] = []
        self._staging: list[tuple[torch.Tensor, torch.Tensor, torch.cuda.Event]] = []
        self._slot = 0

    def indices(self, number: int) -> torch.Tensor:
        """Positions in the split of this rank's part of batch ``number``."""
        epoch, position = divmod(number, self.batches_per_epoch)
        if epoch != self._epoch:
            self._order = list(self.plan.batches(epoch))
            self._epoch = epoch
        return self._order[position]

    def __call__(self, number: int) -> tuple[torch.Tensor, torch.Tensor]:
        indices = self.indices(number)
        if self.pinned:
            images, labels = self._pinned_copy(indices)
        else:
            images = self.split.images[indices].to(self.device)
            labels = self.split.labels[indices].to(self.device)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.split.normalised(images), labels  # unchanged unless stored as uint8

    def _pinned_copy(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (len(indices), *self.split.images.shape[1:])
        slot, self._slot = self._slot, (self._slot + 1) % 2
        if len(self._staging) <= slot or self._staging[slot][0].shape != shape:
            staging = (torch.empty(shape, dtype=self.split.images.dtype).pin_memory(),
                       torch.empty(len(indices), dtype=self.split.labels.dtype).pin_memory(),
                       torch.cuda.Event())
            if len(self._staging) <= slot:
                self._staging.append(staging)
            else:
                self._staging[slot] = staging
        images_buffer, labels_buffer, copied = self._staging[slot]
        copied.synchronize()  # the previous copy out of this buffer has finished

        torch.index_select(self.split.images, 0, indices, out=images_buffer)
        torch.index_select(self.split.labels, 0, indices, out=labels_buffer)
        images = images_buffer.to(self.device, non_blocking=True)
        labels = labels_buffer.to(self.device, non_blocking=True)
        copied.record()
        return images, labels

    def close(self) -> None:
        """Nothing to release; the same call as the streamed feeder's."""


def make_feeder(
    split: TensorSplit | FileSplit, plan: BatchPlan, *, batches_per_epoch: int,
    device: str | torch.device = "cpu", pin_memory: bool = False, channels_last: bool = False,
) -> BatchFeeder | StreamedBatchFeeder:
    """The feeder for ``split``: in-memory gathering, or DataLoader workers for a file split."""
    if isinstance(split, FileSplit):
        from fairnas.streaming import StreamedBatchFeeder  # torchvision only when streaming

        return StreamedBatchFeeder(split, plan, batches_per_epoch=batches_per_epoch,
                                   device=device, pin_memory=pin_memory,
                                   channels_last=channels_last)
    return BatchFeeder(split, plan, batches_per_epoch=batches_per_epoch, device=device,
                       pin_memory=pin_memory, channels_last=channels_last)
