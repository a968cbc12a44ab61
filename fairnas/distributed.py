"""Many processes with torch.distributed (``torchrun``): gloo on CPU, NCCL on GPU.

Training: every rank draws the same paths at every step (they are a function of the step), reads
its own slice of the same global batch, and after all paths of a step have accumulated their
gradients, the gradients are averaged across ranks once, in one flat all-reduce that also carries
the loss (so every rank takes the same decision about a non-finite step) and, without
synchronised BN, the BN running statistics (so every rank holds the same buffers, not only the
same weights). Doing this by hand instead of through DistributedDataParallel avoids its trap with
several backward passes per update: DDP all-reduces inside every backward unless ``no_sync`` is
used, and with unused-parameter detection it may mark blocks of earlier paths as unused; here
there is nothing to get wrong, and every rank applies the same update.

Search: rank 0 runs the search and alone writes its files; every batch of candidates it asks for
is split across all ranks (:func:`shard_evaluate`) and the scores are gathered back in order
(:func:`evaluate_across_ranks`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

logger = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")


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


# -- one synchronisation per optimizer step ------------------------------------------------------


def bn_running_buffers(model: nn.Module) -> list[torch.Tensor]:
    """Running means and variances of every BN layer: what plain data parallelism lets drift."""
    buffers = []
    for module in model.modules():
        if isinstance(module, _BatchNorm) and module.track_running_stats:
            buffers += [module.running_mean, module.running_var]
    return buffers


def reduce_step(
    model: nn.Module, loss: torch.Tensor, dist: DistContext,
    buffers: Sequence[torch.Tensor] = (),
) -> tuple[float, bool]:
    """Average gradients, ``buffers`` and ``loss`` across ranks; return (loss, all finite).

    One all-reduce and one device-to-host transfer per step, whatever the number of paths: the
    loss of every path stays on the device until here. "Finite" covers the loss and every
    gradient (not the buffers: a running statistic poisoned once would otherwise fail every later
    step); after the all-reduce it is the same on every rank.
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not dist.enabled:
        # Largest magnitude per gradient: inf or NaN exactly when an element is (no overflow).
        peaks = torch._foreach_norm(grads, float("inf")) if grads else []
        finite = torch.isfinite(torch.stack([loss.detach().float(), *peaks])).all()
        value, ok = torch.stack([loss.detach().float(), finite.float()]).tolist()
        return value, bool(ok)

    tensors = [*grads, *buffers]
    flat = torch.cat([t.reshape(-1).float() for t in tensors] + [loss.detach().reshape(1)
                                                                  .float()])
    torch_dist.all_reduce(flat)
    flat /= dist.world_size
    grad_count = sum(g.numel() for g in grads)
    finite = torch.isfinite(flat[:grad_count]).all() & torch.isfinite(flat[-1])
    offset = 0
    for tensor in tensors:
        count = tensor.numel()
        tensor.copy_(flat[offset:offset + count].view_as(tensor))
        offset += count
    value, ok = torch.stack([flat[-1], finite.float()]).tolist()
    return value, bool(ok)


def broadcast_object(obj: object, dist: DistContext) -> object:
    """Rank 0's ``obj`` on every rank."""
    if not dist.enabled:
        return obj
    holder = [obj]
    torch_dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather_object(obj: Result, dist: DistContext) -> list[Result]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not dist.enabled:
        return [obj]
    gathered: list[Any] = [None] * dist.world_size
    torch_dist.all_gather_object(gathered, obj)
    return gathered


def check_same_on_all_ranks(value: object, what: str, dist: DistContext) -> None:
    """Raise on every rank if ranks disagree on ``value`` (for example the step they resumed at)."""
    values = gather_object(value, dist)
    if any(v != values[0] for v in values):
        raise RuntimeError(f"ranks disagree on {what}: {values} (by rank). Do all ranks see the "
                           f"same run folder? It must be on a file system they share.")


# -- batch norm over the global batch ------------------------------------------------------------


class _GlobalBatchNorm(torch.autograd.Function):
    """Batch norm with statistics over the batches of all ranks (training mode only).

    Forward: per-rank means and variances are gathered and merged exactly (Chan's formula, in
    float64: no cancellation of E[x^2] - E[x]^2). Backward: the two per-channel sums the input
    gradient needs are all-reduced, so it is the gradient of the *sum* of all ranks' losses,
    which the gradient average then turns into that of the global mean loss.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps,  # noqa: ANN001, ANN205
                factor):
        dims = [0, *range(2, x.dim())]
        local_count = x.numel() // x.shape[1]
        var, mean = torch.var_mean(x.float(), dim=dims, correction=0)
        local = torch.cat([mean, var, mean.new_tensor([local_count])]).double()
        gathered = [torch.empty_like(local) for _ in range(torch_dist.get_world_size())]
        torch_dist.all_gather(gathered, local)
        stats = torch.stack(gathered)
        channels = x.shape[1]
        counts = stats[:, -1:]
        total = counts.sum()
        global_mean = (stats[:, :channels] * counts).sum(0) / total
        spread = (stats[:, :channels] - global_mean) ** 2
        global_var = ((stats[:, channels:2 * channels] + spread) * counts).sum(0) / total

        invstd = torch.rsqrt(global_var + eps).float()
        mean32 = global_mean.float()
        shape = [1, channels] + [1] * (x.dim() - 2)
        scale = invstd if weight is None else invstd * weight
        y = (x - mean32.view(shape).to(x.dtype)) * scale.view(shape).to(x.dtype)
        if bias is not None:
            y = y + bias.view(shape).to(x.dtype)
        if running_mean is not None:
            unbiased = global_var * (total / max(float(total) - 1, 1.0))
            running_mean.lerp_(mean32, factor)
            running_var.lerp_(unbiased.float(), factor)
        ctx.save_for_backward(x, weight, mean32, invstd)
        ctx.total = float(total)
        return y

    @staticmethod
    def backward(ctx, grad_y):  # noqa: ANN001, ANN205 - autograd signature
        x, weight, mean, invstd = ctx.saved_tensors
        channels = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = [1, channels] + [1] * (x.dim() - 2)
        grad_y32 = grad_y.float()
        x_hat = (x.float() - mean.view(shape)) * invstd.view(shape)
        sum_dy = grad_y32.sum(dims)
        sum_dy_xhat = (grad_y32 * x_hat).sum(dims)

        sums = torch.cat([sum_dy, sum_dy_xhat])
        torch_dist.all_reduce(sums)
        mean_dy = (sums[:channels] / ctx.total).view(shape)
        mean_dy_xhat = (sums[channels:] / ctx.total).view(shape)
        scale = invstd if weight is None else invstd * weight
        grad_x = (grad_y32 - mean_dy - x_hat * mean_dy_xhat) * scale.view(shape)
        grad_weight = sum_dy_xhat if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = sum_dy if ctx.needs_input_grad[2] else None
        return grad_x.to(x.dtype), grad_weight, grad_bias, None, None, None, None


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` (same parameters, buffers and state dict) normalising over all ranks.

    Unlike ``nn.SyncBatchNorm`` it runs on CPU with gloo as well as on GPU. Outside training mode,
    or without a process group of several ranks, it is plain batch norm.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and torch_dist.is_initialized()
                and torch_dist.get_world_size() > 1):
            return super().forward(x)
        factor = 0.0
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                      else self.momentum)
        return _GlobalBatchNorm.apply(
            x, self.weight, self.bias,
            self.running_mean if self.track_running_stats else None,
            self.running_var if self.track_running_stats else None, self.eps, factor,
        )


@contextmanager
def global_batch_norm(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Inside the block, every ``nn.BatchNorm2d`` of ``model`` is a :class:`GlobalBatchNorm2d`.

    Only the class changes, so parameters, buffers and state-dict keys stay and checkpoints
    written inside load anywhere; the plain class is restored on exit. Yields the number of
    layers changed.
    """
    changed = [m for m in model.modules() if enabled and type(m) is nn.BatchNorm2d]
    for module in changed:
        module.__class__ = GlobalBatchNorm2d
    try:
        yield len(changed)
    finally:
        for module in changed:
            module.__class__ = nn.BatchNorm2d


# -- candidate evaluation split across ranks -----------------------------------------------------


def shard_evaluate(
    evaluate: Callable[[Sequence[Item]], Sequence[float]], items: Sequence[Item],
    dist: DistContext,
) -> list[float]:
    """Every rank calls this with the same ``items``; rank r scores ``items[r::world_size]``.

    Returns all scores, in the order of ``items``, on every rank. A rank whose ``evaluate``
    fails still takes part in the gather (so no rank waits forever) and every rank raises.
    """
    items = list(items)
    if not dist.enabled:
        return [float(s) for s in evaluate(items)]
    mine = items[dist.rank::dist.world_size]
    try:
        reply: Any = [float(s) for s in evaluate(mine)] if mine else []
        if len(reply) != len(mine):
            reply = f"evaluate returned {len(reply)} scores for {len(mine)} candidates"
    except Exception as error:  # noqa: BLE001 - reported to every rank below
        reply = f"{type(error).__name__}: {error}"
    replies = gather_object(reply, dist)
    failures = [f"rank {r}: {text}" for r, text in enumerate(replies) if isinstance(text, str)]
    if failures:
        raise RuntimeError("candidate evaluation failed on " + "; ".join(failures))
    scores: list[float] = [0.0] * len(items)
    for rank, part in enumerate(replies):
        scores[rank::dist.world_size] = part
    return scores


def evaluate_across_ranks(
    evaluate: Callable[[Sequence[Item]], Sequence[float]],
    main: Callable[[Callable[[Sequence[Item]], list[float]]], Result],
    dist: DistContext,
) -> Result:
    """Run ``main(sharded_evaluate)`` on rank 0 while the other ranks score their shares.

    ``main`` (the search) runs on rank 0 only, so only rank 0 writes its files; each call of
    ``sharded_evaluate`` is announced to the other ranks, which score their share and gather the
    scores back. When ``main`` returns, its result is sent to every rank and returned there; if it
    raises, the other ranks raise too instead of waiting.
    """
    if not dist.enabled:
        return main(lambda items: [float(s) for s in evaluate(items)])
    if dist.is_main:
        def sharded(items: Sequence[Item]) -> list[float]:
            broadcast_object(("evaluate", list(items)), dist)
            return shard_evaluate(evaluate, items, dist)

        try:
            result = main(sharded)
        except BaseException as error:
            broadcast_object(("failed", f"{type(error).__name__}: {error}"), dist)
            raise
        broadcast_object(("done", result), dist)
        return result

    while True:
        kind, payload = broadcast_object(None, dist)
        if kind == "done":
            return payload
        if kind == "failed":
            raise RuntimeError(f"rank 0 stopped: {payload}")
        try:
            shard_evaluate(evaluate, payload, dist)
        except RuntimeError as error:  # rank 0 raised the same error and will say "failed"
            logger.warning("rank %d: %s", dist.rank, error)
