"""Many processes with torch.distributed (``torchrun``): gloo on CPU, NCCL on GPU.

Every rank draws the same paths at every step (they are a function of the step), reads its own
slice of the same global batch, and after all paths of a step have accumulated their gradients,
the gradients are averaged across ranks once. Doing this by hand instead of through
DistributedDataParallel avoids its known trap with several backward passes per update (with
``no_sync`` and unused-parameter detection only the last path's parameters were synchronised in
some PyTorch versions), and it is exact: every rank then applies the same update.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch import nn

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @classmethod
    def single(cls) -> DistContext:
        return cls()

    @classmethod
    def from_env(cls, device: str = "cpu") -> DistContext:
        """Join the process group ``torchrun`` describes in the environment, if any."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls.single()
        rank = int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if not torch_dist.is_initialized():
            backend = "nccl" if device.startswith("cuda") else "gloo"
            torch_dist.init_process_group(backend=backend)
            logger.info("joined process group: rank %d of %d (%s)", rank, world_size, backend)
        if device.startswith("cuda"):
            torch.cuda.set_device(local_rank)
        return cls(rank, world_size, local_rank)

    def barrier(self) -> None:
        if self.enabled:
            torch_dist.barrier()


def all_reduce_gradients(model: nn.Module, dist: DistContext) -> None:
    """Average every present gradient across ranks, in one flat buffer per dtype."""
    if not dist.enabled:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch_dist.all_reduce(flat)
    flat /= dist.world_size
    offset = 0
    for grad in grads:
        count = grad.numel()
        grad.copy_(flat[offset:offset + count].view_as(grad))
        offset += count


def broadcast_object(obj: object, dist: DistContext) -> object:
    """Rank 0's ``obj`` on every rank."""
    if not dist.enabled:
        return obj
    holder = [obj]
    torch_dist.broadcast_object_list(holder, src=0)
    return holder[0]
