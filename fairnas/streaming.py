"""Streamed training batches (``data.stream``): image files decoded by DataLoader workers.

:class:`StreamedBatchFeeder` answers ``feeder(number)`` like
:class:`~fairnas.accelerator.BatchFeeder` does for in-memory data: this rank's part of batch
``number`` on the device. A :class:`torch.utils.data.DataLoader` with ``data.workers`` worker
processes decodes the batches ahead of the device; its batch sampler yields exactly the
positions :class:`~fairnas.data.BatchPlan` gives for consecutive batch numbers, starting at the
one asked for, so a run resumed mid-epoch reads the same batches as one that never stopped.

Augmentation is a function of (seed, epoch, position of the image in the epoch's global batch
order) alone: every image seeds its own random crop and flip, inside a saved-and-restored random
state. Hence the same batch holds the same pixels whichever worker decodes it, with 0 workers
or 8, before or after a resume, on one process or as one rank's slice of a distributed batch,
and training code that draws from torch's global generator (dropout) is not disturbed.

An unreadable file stops the run with its name (raised in the main process, so the message is
one line). With ``data.skip_bad_images`` it is replaced, in that batch only, by the next
readable file of the training list (same seed, that file's label), and every replaced file is
logged once and counted: batch sizes stay fixed and the result stays deterministic.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fairnas.data import (
    DECODE_ERRORS,
    BatchPlan,
    FileSplit,
    centre_fit,
    decode_error_text,
    normalise_pixels,
    open_image,
    unreadable_message,
)

logger = logging.getLogger(__name__)

_MODES = {1: "L", 3: "RGB"}
# Each worker keeps this many batches in flight: enough to absorb a slow file or a batch of
# large JPEGs, while the decoded batches waiting in shared memory stay a few per worker.
PREFETCH_FACTOR = 2
# With data.skip_bad_images, how many following files are tried in place of an unreadable one.
MAX_REPLACEMENTS = 32


def image_seed(seed: int, epoch: int, position: int) -> int:
    """A 63-bit seed for one image's augmentation, from (seed, epoch, position in the epoch).

    Hashed rather than added up so that neighbouring positions and epochs give unrelated
    random streams.
    """
    digest = hashlib.blake2b(struct.pack("<qqq", seed, epoch, position), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class StreamedImages(Dataset):
    """Training files as tensors, indexed by (file position, epoch, position in the epoch).

    Returns (uint8 C x H x W image, label, unreadable file position or -1, error text). Images
    leave the workers as bytes, not floats: a quarter of the shared memory and of the copy to the
    device, and the feeder normalises whole batches (on the GPU when training on one), which
    costs a fraction of doing it image by image in the workers.

    The file list is held as one numpy bytes array rather than a list of strings: worker
    processes forked from the main one would otherwise copy the pages of every string they
    touch (reference counts change), a copy per worker of an ImageNet-sized list.
    """

    def __init__(self, split: FileSplit, *, seed: int) -> None:
        if split.input_channels not in _MODES:
            raise ValueError(f"images can be read as 1 or 3 channels, not {split.input_channels}")
        self._paths = np.array([os.fsencode(name) for name in split.files])
        self._labels = split.labels.clone()
        self.size, self.mode = split.input_size, _MODES[split.input_channels]
        self.augment, self.skip_bad_images, self.seed = split.augment, split.skip_bad_images, seed
        self.channels = split.input_channels
        self._random_transform: Any = None

    def __len__(self) -> int:
        return len(self._labels)

    def path(self, position: int) -> str:
        return os.fsdecode(bytes(self._paths[position]))

    def __getitem__(self, key: tuple[int, int, int]) -> tuple[torch.Tensor, int, int, str]:
        position, epoch, slot = key
        seed = image_seed(self.seed, epoch, slot)
        first_error = ""
        for attempt in range(MAX_REPLACEMENTS + 1):
            candidate = (position + attempt) % len(self)
            try:
                image = self.load(candidate, seed)
            except DECODE_ERRORS as error:
                if attempt == 0:
                    first_error = decode_error_text(error)
                if not self.skip_bad_images:
                    break
                continue
            return image, int(self._labels[candidate]), position if attempt else -1, first_error
        if not self.skip_bad_images:
            blank = torch.zeros(self.channels, self.size, self.size, dtype=torch.uint8)
            return blank, int(self._labels[position]), position, first_error
        raise ValueError(f"image file {self.path(position)} and the {MAX_REPLACEMENTS} files "
                         f"after it in the training list cannot be read; check the folder")

    def load(self, position: int, seed: int) -> torch.Tensor:
        """One file as a C x H x W uint8 tensor, augmented with ``seed``."""
        with open(self.path(position), "rb") as file:
            image = open_image(file.read(), self.mode)
        if self.augment:
            # fork_rng: the transforms draw from torch's global generator, which in the main
            # process (0 workers) is also the training's; it is restored afterwards.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                image = self._transform()(image)
            pixels = np.asarray(image, dtype=np.uint8)
        else:
            pixels = centre_fit(image, self.size)
        tensor = torch.from_numpy(pixels.copy())
        return tensor.unsqueeze(0) if tensor.dim() == 2 else tensor.permute(2, 0, 1).contiguous()

    def _transform(self) -> Any:
        """RandomResizedCrop (scale 0.08-1, aspect 3/4-4/3, bilinear) and a horizontal flip,
        the Inception-style augmentation FairNAS and most ImageNet training use."""
        if self._random_transform is None:
            from torchvision.transforms import InterpolationMode, v2

            self._random_transform = v2.Compose([
                v2.RandomResizedCrop(self.size, interpolation=InterpolationMode.BILINEAR,
                                     antialias=True),
                v2.RandomHorizontalFlip(),
            ])
        return self._random_transform


class PlanBatches:
    """The batch sampler: keys of this rank's part of batches ``start, start + 1, ...``.

    Batch ``n`` is batch ``n % batches_per_epoch`` of epoch ``n // batches_per_epoch`` of the
    plan, as for :class:`~fairnas.accelerator.BatchFeeder`. Each key carries the image's
    position in the epoch's *global* batch order, so the augmentation does not depend on the
    number of processes either. Endless: the feeder asks for as many batches as it needs.
    """

    def __init__(self, plan: BatchPlan, batches_per_epoch: int) -> None:
        self.plan, self.batches_per_epoch = plan, batches_per_epoch
        self.start = 0

    def batch(self, number: int, order: list[torch.Tensor]) -> list[tuple[int, int, int]]:
        epoch, position = divmod(number, self.batches_per_epoch)
        local = self.plan.batch_size // self.plan.world_size
        first = position * self.plan.batch_size + self.plan.rank * local
        return [(index, epoch, first + offset)
                for offset, index in enumerate(order[position].tolist())]

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        number, epoch, order = self.start, None, []
        while True:
            if number // self.batches_per_epoch != epoch:
                epoch = number // self.batches_per_epoch
                order = list(self.plan.batches(epoch))
            yield self.batch(number, order)
            number += 1


class StreamedBatchFeeder:
    """This rank's batch number ``n`` of a :class:`~fairnas.data.FileSplit`, on the device.

    Batches are asked for in order by the training loop; a number other than the next one
    (the first call of a resumed run, a test) restarts the DataLoader's iterator there, which
    with persistent workers drops the batches decoded ahead and keeps the processes.
    """

    def __init__(
        self, split: FileSplit, plan: BatchPlan, *, batches_per_epoch: int,
        device: str | torch.device = "cpu", pin_memory: bool = False,
        channels_last: bool = False, workers: int | None = None,
    ) -> None:
        if not 0 < batches_per_epoch <= len(plan):
            raise ValueError(f"batches_per_epoch should be in [1, {len(plan)}], "
                             f"got {batches_per_epoch}")
        if plan.num_items != len(split):
            raise ValueError(f"the plan covers {plan.num_items} images, the split {len(split)}")
        self.split, self.plan, self.batches_per_epoch = split, plan, batches_per_epoch
        self.device = torch.device(device)
        self.pinned = pin_memory and self.device.type == "cuda"
        self.channels_last = channels_last
        self.workers = split.workers if workers is None else workers
        if self.workers < 0:
            raise ValueError(f"workers should be >= 0, got {self.workers}")
        self.sampler = PlanBatches(plan, batches_per_epoch)
        self.dataset = StreamedImages(split, seed=plan.seed)
        if len(split.mean) != split.input_channels or len(split.std) != split.input_channels:
            raise ValueError("the file split has no normalisation statistics for its channels")
        self._mean = torch.tensor(split.mean, dtype=torch.float32, device=self.device)
        self._std = torch.tensor(split.std, dtype=torch.float32, device=self.device)
        self.loader: DataLoader | None = DataLoader(
            self.dataset, batch_sampler=self.sampler, num_workers=self.workers,
            pin_memory=self.pinned, persistent_workers=self.workers > 0,
            prefetch_factor=PREFETCH_FACTOR if self.workers > 0 else None,
            # The loader draws its workers' base seed from this generator, not from torch's
            # global one, which the training's checkpoints carry (the images never use it).
            generator=torch.Generator().manual_seed(plan.seed),
        )
        self._iterator: Iterator | None = None
        self._next: int | None = None
        self.replaced: dict[str, int] = {}  # unreadable file -> times replaced (skip_bad_images)

    def indices(self, number: int) -> torch.Tensor:
        """Positions in the split of this rank's part of batch ``number``."""
        epoch = number // self.batches_per_epoch
        order = list(self.plan.batches(epoch))
        return torch.tensor([key[0] for key in self.sampler.batch(number, order)])

    def __call__(self, number: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.loader is None:
            raise RuntimeError("the feeder is closed")
        if self._iterator is None or number != self._next:
            if self._iterator is not None:
                logger.debug("streamed batches: restarting at %d (expected %s)", number,
                             self._next)
            self.sampler.start = number
            self._iterator = iter(self.loader)
        images, labels, bad, errors = next(self._iterator)
        self._next = number + 1
        if bool((bad >= 0).any()):
            self._unreadable(bad, errors)
        images = images.to(self.device, non_blocking=self.pinned)
        labels = labels.to(self.device, non_blocking=self.pinned)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        # The operations, in the order, that normalise the in-memory splits: a streamed image
        # without augmentation equals its decoded copy bit for bit.
        return normalise_pixels(images, self._mean, self._std), labels

    def _unreadable(self, bad: torch.Tensor, errors: list[str]) -> None:
        for position, error in zip(bad.tolist(), errors, strict=True):
            if position < 0:
                continue
            path = self.dataset.path(position)
            if not self.split.skip_bad_images:
                raise ValueError(unreadable_message(path, error))
            if path not in self.replaced:
                logger.warning("unreadable image file %s (%s) replaced by the next readable "
                               "training file wherever it is drawn (data.skip_bad_images); "
                               "%d unreadable files so far", path, error, len(self.replaced) + 1)
            self.replaced[path] = self.replaced.get(path, 0) + 1

    def close(self) -> None:
        """Stop the worker processes (they would also stop with the feeder's last reference)."""
        if self.replaced:
            logger.warning("%d unreadable training files were replaced %d times in all "
                           "(data.skip_bad_images)", len(self.replaced),
                           sum(self.replaced.values()))
        shutdown = getattr(self._iterator, "_shutdown_workers", None)
        if shutdown is not None:  # persistent workers: not left to the garbage collector
            shutdown()
        self._iterator = None
        self.loader = None
