"""Training loops: the strict-fairness supernet and stand-alone networks.

Both share :class:`TrainingLoop`, which owns what every run needs and nothing model-specific:
the learning-rate schedule (linear warm-up, cosine decay, a pure function of the step), logging
(a progress bar, one line per interval, one JSONL row and TensorBoard scalars per epoch),
atomic checkpoints carrying everything a resume needs, and the refusal to resume under a
changed configuration. The step itself is a function passed in.

Data order, sampled paths and learning rate are all functions of the step number, so a run that
is killed and resumed from a checkpoint continues exactly as if it had never stopped. What is
not (the global random generator used by dropout, the running epoch loss, the optimizer's
momentum) travels in the checkpoint, and rows of ``metrics.jsonl`` written after the checkpoint
are dropped on resume, so every output of a resumed run equals the uninterrupted run's.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from fairnas.accelerator import make_feeder, place_model, precision_context
from fairnas.arch import Architecture
from fairnas.config import SupernetConfig, TrainConfig, differing_keys
from fairnas.data import BatchPlan, DataSplits, TensorSplit
from fairnas.distributed import (
    DistContext,
    bn_running_buffers,
    check_same_on_all_ranks,
    global_batch_norm,
)
from fairnas.evaluate import accuracy
from fairnas.io import (
    append_jsonl,
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    load_checkpoint,
    read_jsonl,
)
from fairnas.network import SinglePathNet, Supernet
from fairnas.samplers import FairnessLedger, PathSampler
from fairnas.steps import StepOutcome, SupernetStep, standalone_step

logger = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss or gradient."""


def lr_at(step: int, *, base_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up to ``base_lr`` over ``warmup_steps``, then cosine decay to zero."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return 0.5 * base_lr * (1 + math.cos(math.pi * min(progress, 1.0)))


def check_batch_size(key: str, batch_size: int, num_images: int) -> None:
    """Refuse a batch size larger than the training data, naming the key that sets it."""
    if batch_size > num_images:
        raise ValueError(f"{key}={batch_size} is larger than the {num_images} training images "
                         f"(after the validation images are held out); lower {key}")


def batch_plan(num_images: int, batch_size: int, key: str, *, seed: int,
               dist: DistContext) -> BatchPlan:
    """The run's :class:`BatchPlan`; a batch size the data or the processes cannot take is
    refused naming the configuration key that sets it."""
    check_batch_size(key, batch_size, num_images)
    try:
        return BatchPlan(num_images, batch_size, seed=seed, rank=dist.rank,
                         world_size=dist.world_size)
    except ValueError as error:
        raise ValueError(f"{key}: {error}") from error


def make_sgd(model: nn.Module, *, lr: float, momentum: float, nesterov: bool,
             weight_decay: float) -> torch.optim.SGD:
    """SGD with weight decay on weights only: BN affine terms and biases are not decayed."""
    decay, no_decay = [], []
    for param in model.parameters():
        (no_decay if param.dim() <= 1 else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)


@dataclass
class StepResult:
    loss: float
    images: int


class TrainingLoop:
    """Runs ``step_fn(step)`` from the last checkpoint to ``total_steps``.

    ``state_fns`` = (get, set) for extra resumable state (the fairness ledger, for example).
    Checkpoints are written at every epoch end, every ``checkpoint_every`` steps if set, and at
    the end; only rank 0 writes files.
    """

    def __init__(
        self,
        *,
        name: str,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        out_dir: Path,
        total_steps: int,
        steps_per_epoch: int,
        base_lr: float,
        warmup_steps: int,
        log_interval: int,
        config: dict[str, Any],
        dist: DistContext,
        checkpoint_every: int | None = None,
        state_fns: tuple[Callable[[], dict], Callable[[dict], None]] | None = None,
        epoch_end: Callable[[int], dict[str, float]] | None = None,
    ) -> None:
        self.name, self.model, self.optimizer = name, model, optimizer
        self.out_dir = Path(out_dir)
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
        self.base_lr, self.warmup_steps, self.log_interval = base_lr, warmup_steps, log_interval
        self.config, self.dist = config, dist
        self.checkpoint_every = checkpoint_every
        self.state_fns, self.epoch_end = state_fns, epoch_end
        self.checkpoint_path = self.out_dir / "checkpoint.pt"
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.step = 0
        # The current epoch's loss so far; checkpointed, so a mid-epoch resume logs the same mean.
        self.epoch_loss, self.epoch_steps = 0.0, 0

    # -- checkpoints ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": self.name,
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            # Dropout on a GPU draws from the CUDA generators: keep them too.
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
            "config": self.config,
            "extra": self.state_fns[0]() if self.state_fns else {},
            "epoch_progress": {"loss": self.epoch_loss, "steps": self.epoch_steps},
        }

    def save(self) -> None:
        if self.dist.is_main:
            atomic_torch_save(self.checkpoint_path, self.state_dict())

    def resume(self) -> bool:
        """Load the checkpoint if one exists; refuse one made under a different config."""
        if not self.checkpoint_path.exists():
            return False
        state = load_checkpoint(self.checkpoint_path)
        if state.get("kind") != self.name:
            raise ValueError(f"{self.checkpoint_path} is a {state.get('kind')!r} checkpoint, "
                             f"expected {self.name!r}")
        saved = state["config"]
        # NOTE: a section absent from the saved config (added to the code after the checkpoint
        # was written) is not compared, so older checkpoints still resume.
        changed = [k for k in differing_keys(saved, self.config)
                   if k.split(".")[-1] not in RESUME_SAFE_KEYS and k.split(".")[0] in saved]
        if changed:
            raise ValueError(
                f"refusing to resume {self.checkpoint_path}: the configuration changed in "
                f"{', '.join(changed)}. Use a new output folder, or restore those values."
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        if self.state_fns:
            self.state_fns[1](state["extra"])
        self.step = int(state["step"])
        progress = state.get("epoch_progress", {})
        self.epoch_loss, self.epoch_steps = progress.get("loss", 0.0), progress.get("steps", 0)
        if self.dist.is_main:
            self._drop_metrics_after(self.step)
        logger.info("%s: resumed from %s at step %d/%d", self.name, self.checkpoint_path,
                    self.step, self.total_steps)
        return True

    def _drop_metrics_after(self, step: int) -> None:
        """Rows logged after the checkpoint (a kill between the row and the checkpoint) are
        written again by the resumed run; keeping them would duplicate those epochs."""
        if not self.metrics_path.exists():
            return
        kept = "".join(json.dumps(row) + "\n" for row in read_jsonl(self.metrics_path)
                       if row.get("step", 0) <= step)
        if kept != self.metrics_path.read_text(encoding="utf-8"):  # also drops a torn line
            atomic_write_text(self.metrics_path, kept)

    # -- the loop ------------------------------------------------------------------------------

    def run(self, step_fn: Callable[[int], StepResult | None]) -> None:
        writer = self._tensorboard()
        bar = tqdm(total=self.total_steps, initial=self.step, desc=self.name, unit="step",
                   disable=not self.dist.is_main, dynamic_ncols=True, mininterval=2.0)
        window_loss, window_steps, window_images = 0.0, 0, 0
        window_start = time.perf_counter()
        try:
            while self.step < self.total_steps:
                lr = lr_at(self.step, base_lr=self.base_lr, warmup_steps=self.warmup_steps,
                           total_steps=self.total_steps)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr

                result = step_fn(self.step)
                self.step += 1
                bar.update(1)

                if result is not None:
                    window_loss += result.loss
                    window_steps += 1
                    self.epoch_loss += result.loss
                    window_images += result.images
                    self.epoch_steps += 1
                if self.step % self.log_interval == 0 or self.step == self.total_steps:
                    elapsed = time.perf_counter() - window_start
                    recent = window_loss / max(window_steps, 1)
                    running = self.epoch_loss / max(self.epoch_steps, 1)
                    logger.info("%s step %d/%d loss %.4f (epoch mean %.4f) images/s %.0f "
                                "lr %.5f", self.name, self.step, self.total_steps, recent,
                                running, window_images / elapsed, lr)
                    bar.set_postfix(loss=f"{recent:.3f}", lr=f"{lr:.4f}")
                    window_loss, window_steps, window_images = 0.0, 0, 0
                    window_start = time.perf_counter()
                epoch_done = self.step % self.steps_per_epoch == 0
                if epoch_done or self.step == self.total_steps:
                    self._end_epoch(self.epoch_loss / max(self.epoch_steps, 1), lr, writer)
                    self.epoch_loss, self.epoch_steps = 0.0, 0
                    self.save()
                elif self.checkpoint_every and self.step % self.checkpoint_every == 0:
                    self.save()
        finally:
            bar.close()
            if writer is not None:
                writer.close()

    def _end_epoch(self, mean_loss: float, lr: float, writer: Any) -> None:
        epoch = math.ceil(self.step / self.steps_per_epoch)
        row: dict[str, Any] = {"epoch": epoch, "step": self.step, "loss": mean_loss, "lr": lr}
        if self.epoch_end is not None:
            row.update(self.epoch_end(epoch))
        if not self.dist.is_main:
            return
        append_jsonl(self.metrics_path, row)
        if writer is not None:
            for key, value in row.items():
                if key not in ("epoch", "step") and isinstance(value, (int, float)):
                    writer.add_scalar(f"{self.name}/{key}", value, self.step)
        logger.info("%s epoch %d: %s", self.name, epoch,
                    ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                              for k, v in row.items() if k != "epoch"))

    def _tensorboard(self) -> Any:
        if not self.dist.is_main:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is a dependency, but curves are not worth a crash
            logger.warning("tensorboard is not installed; no curves are written")
            return None
        # purge_step: TensorBoard discards events a killed run logged after the checkpoint.
        return SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=self.step or None)


# Keys that may change between a run and its resume without changing the result's meaning.
# ``on_nonfinite`` only decides what happens at a non-finite step, and the steps already taken
# were finite either way: switching to ``skip`` after a stop is how such a run is continued.
RESUME_SAFE_KEYS = {"log_interval", "threads", "device", "root", "out_dir", "pin_memory",
                    "channels_last",  # memory layout: the same numbers up to float rounding
                    "checkpoint_every", "on_nonfinite"}


def _steps(epochs: float, max_steps: int | None, steps_per_epoch: int) -> int:
    return max_steps if max_steps is not None else max(1, math.ceil(epochs * steps_per_epoch))


def _checkpoint_every(argument: int | None, config: SupernetConfig | TrainConfig) -> int | None:
    return argument if argument is not None else config.checkpoint_every


def train_supernet(
    supernet: Supernet,
    splits: DataSplits,
    config: SupernetConfig,
    out_dir: Path,
    *,
    device: str | torch.device = "cpu",
    dist: DistContext | None = None,
    checkpoint_every: int | None = None,
    resume: bool = True,
    extra_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train the supernet with the configured sampler; returns a summary with the ledger.

    ``checkpoint_every`` (default ``config.checkpoint_every``) adds checkpoints between epoch
    ends. ``extra_config`` holds settings outside ``config`` that the result depends on (the
    data configuration): saved in the checkpoint and compared on resume like ``config``.

    One step (:class:`~fairnas.steps.SupernetStep`): draw the step's paths; for each path
    forward, loss, backward (gradients of all paths accumulate); synchronise across processes
    once; one optimizer update. With ``shared_batch`` all paths see the same batch, and with
    ``shared_prefix`` the stem and fixed first block run once for the step. ``grad_reduction``
    says how the paths' gradients combine (see :class:`~fairnas.steps.SupernetStep`).
    """
    dist = dist or DistContext.single()
    out_dir = Path(out_dir)
    sampler = PathSampler(supernet.space, config.sampler, seed=config.seed)
    ledger = FairnessLedger(sampler.num_layers, sampler.num_choices)
    batches_per_step = 1 if config.shared_batch else sampler.paths_per_step
    plan = batch_plan(len(splits.train), config.batch_size, "supernet.batch_size",
                      seed=config.seed, dist=dist)
    steps_per_epoch = max(1, len(plan) // batches_per_step)
    total_steps = _steps(config.epochs, config.max_steps, steps_per_epoch)
    optimizer = make_sgd(supernet, lr=config.lr, momentum=config.momentum,
                         nesterov=config.nesterov, weight_decay=config.weight_decay)
    loop = TrainingLoop(
        name="supernet", model=supernet, optimizer=optimizer, out_dir=out_dir,
        total_steps=total_steps, steps_per_epoch=steps_per_epoch, base_lr=config.lr,
        warmup_steps=config.warmup_steps, log_interval=config.log_interval,
        config={**asdict(config), "space": supernet.space.to_dict(), **(extra_config or {})},
        dist=dist, checkpoint_every=_checkpoint_every(checkpoint_every, config),
        state_fns=(lambda: {"ledger": ledger.state_dict()},
                   lambda state: ledger.load_state_dict(state["ledger"])),
    )
    # On the device before resuming: the optimizer's state then loads beside its parameters.
    place_model(supernet, device, channels_last=config.channels_last)
    if resume:
        loop.resume()
    check_same_on_all_ranks(loop.step, "the step to start from", dist)
    supernet.train()
    # In-memory gathering, or DataLoader workers decoding files for a streamed split.
    feeder = make_feeder(splits.train, plan, batches_per_epoch=steps_per_epoch * batches_per_step,
                         device=device, pin_memory=config.pin_memory,
                         channels_last=config.channels_last)
    step = SupernetStep(
        supernet, optimizer, shared_prefix=config.shared_prefix,
        grad_reduction=config.grad_reduction, label_smoothing=config.label_smoothing, dist=dist,
        precision=precision_context(device, config.amp),
        sync_buffers=bn_running_buffers(supernet) if dist.enabled and not config.sync_bn else (),
        restore_buffers=config.on_nonfinite == "skip",
    )

    def step_fn(number: int) -> StepResult | None:
        paths = sampler.sample(number)
        batches = [feeder(number * batches_per_step + k) for k in range(batches_per_step)]
        outcome = step(paths, batches)
        if not outcome.finite:
            return _non_finite(number, paths, outcome)
        ledger.record(paths)
        images = len(paths) * len(batches[0][1]) * dist.world_size
        return StepResult(outcome.loss, images)

    def _non_finite(number: int, paths: list[Architecture], outcome: StepOutcome) -> None:
        bad = [p for p, loss in zip(paths, outcome.path_losses, strict=True)
               if not torch.isfinite(loss)]
        what = (f"loss on path {bad[0]}" if bad else
                f"loss or gradient in the step of paths {[str(p) for p in paths]}")
        if config.on_nonfinite == "skip":
            logger.warning("supernet step %d: non-finite %s; step skipped", number, what)
            ledger.skipped_steps += 1
            return None
        raise NonFiniteError(
            f"supernet step {number}: non-finite {what}. Training stopped; the last good "
            f"checkpoint is {loop.checkpoint_path}. Lower supernet.lr, or set "
            f"supernet.on_nonfinite=skip to skip such steps."
        )

    start = time.perf_counter()
    try:
        with global_batch_norm(supernet, config.sync_bn and dist.enabled):
            loop.run(step_fn)
    finally:
        feeder.close()
    summary = {"steps": loop.step, "seconds": time.perf_counter() - start,
               "sampler": config.sampler, "ledger": ledger.summary()}
    if dist.is_main:
        atomic_write_json(out_dir / "ledger.json", ledger.to_json())
        atomic_torch_save(out_dir / "supernet.pt", {"model": supernet.state_dict(),
                                                    "space": supernet.space.to_dict(),
                                                    "ledger": ledger.state_dict()})
    return summary


class _NonFiniteSteps:
    """A stand-alone run's answer to a non-finite step: stop, naming the step and the last good
    checkpoint, or (``skip``) undo what the step changed and count it."""

    def __init__(self, model: nn.Module, policy: str, checkpoint: Path) -> None:
        self.model, self.skip, self.checkpoint = model, policy == "skip", checkpoint
        self.skipped = 0
        self._buffers: list[torch.Tensor] = []

    def before_step(self) -> None:
        if self.skip:  # the forward pass moves the BN running statistics, finite or not
            self._buffers = [b.clone() for b in self.model.buffers()]

    def handle(self, what: str) -> None:
        if not self.skip:
            raise NonFiniteError(f"{what}; training stopped, the last good checkpoint is "
                                 f"{self.checkpoint}. Lower train.lr, or set "
                                 f"train.on_nonfinite=skip to skip such steps.")
        with torch.no_grad():
            for buffer, value in zip(self.model.buffers(), self._buffers, strict=True):
                buffer.copy_(value)
        self.skipped += 1
        logger.warning("%s; step skipped (%d so far)", what, self.skipped)


def train_standalone(
    arch: Architecture | nn.Module,
    splits: DataSplits,
    config: TrainConfig,
    out_dir: Path,
    *,
    device: str | torch.device = "cpu",
    dist: DistContext | None = None,
    checkpoint_every: int | None = None,
    resume: bool = True,
    test_split: TensorSplit | None = None,
    extra_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train one network from scratch (or fine-tune a given module); report test accuracy.

    ``checkpoint_every`` and ``extra_config`` as for :func:`train_supernet`. With
    ``config.on_nonfinite`` ``skip`` a non-finite step changes nothing (BN statistics included)
    and is counted in the result's ``skipped_steps``.
    """
    dist = dist or DistContext.single()
    out_dir = Path(out_dir)
    torch.manual_seed(config.seed)
    model = SinglePathNet(arch) if isinstance(arch, Architecture) else arch
    place_model(model, device, channels_last=config.channels_last)
    model.train()
    plan = batch_plan(len(splits.train), config.batch_size, "train.batch_size",
                      seed=config.seed, dist=dist)
    steps_per_epoch = len(plan)
    total_steps = _steps(config.epochs, None, steps_per_epoch)
    optimizer = make_sgd(model, lr=config.lr, momentum=config.momentum,
                         nesterov=config.nesterov, weight_decay=config.weight_decay)
    arch_text = str(arch) if isinstance(arch, Architecture) else type(arch).__name__
    nonfinite = _NonFiniteSteps(model, config.on_nonfinite, out_dir / "checkpoint.pt")
    loop = TrainingLoop(
        name="standalone", model=model, optimizer=optimizer, out_dir=out_dir,
        total_steps=total_steps, steps_per_epoch=steps_per_epoch, base_lr=config.lr,
        warmup_steps=config.warmup_steps, log_interval=config.log_interval,
        config={**asdict(config), "arch": arch_text, **(extra_config or {})}, dist=dist,
        checkpoint_every=_checkpoint_every(checkpoint_every, config),
        state_fns=(lambda: {"skipped_steps": nonfinite.skipped},
                   lambda state: setattr(nonfinite, "skipped", state.get("skipped_steps", 0))),
        epoch_end=lambda epoch: {"val_accuracy": accuracy(model, splits.val, device=device)},
    )
    if resume:
        loop.resume()
    check_same_on_all_ranks(loop.step, "the step to start from", dist)
    feeder = make_feeder(splits.train, plan, batches_per_epoch=steps_per_epoch, device=device,
                         pin_memory=config.pin_memory, channels_last=config.channels_last)
    precision = precision_context(device, config.amp)
    sync_buffers = bn_running_buffers(model) if dist.enabled and not config.sync_bn else ()

    def step_fn(step: int) -> StepResult | None:
        batch = feeder(step)
        nonfinite.before_step()
        loss, finite = standalone_step(model, optimizer, batch,
                                       label_smoothing=config.label_smoothing, dist=dist,
                                       precision=precision, sync_buffers=sync_buffers)
        if not finite:
            nonfinite.handle(f"stand-alone step {step}: non-finite loss or gradient for "
                             f"{arch_text}")
            return None
        return StepResult(loss, len(batch[1]) * dist.world_size)

    start = time.perf_counter()
    try:
        with global_batch_norm(model, config.sync_bn and dist.enabled):
            loop.run(step_fn)
    finally:
        feeder.close()
    test = test_split if test_split is not None else splits.test
    result = {
        "arch": arch_text,
        "steps": loop.step,
        "seconds": time.perf_counter() - start,
        "val_accuracy": accuracy(model, splits.val, device=device),
        "test_accuracy": accuracy(model, test, device=device),
        "skipped_steps": nonfinite.skipped,
    }
    if dist.is_main:
        saved = {"model": model.state_dict(), "arch": arch_text}
        if isinstance(arch, Architecture):  # the space too, so the file alone rebuilds the model
            saved["space"] = arch.space.to_dict()
        atomic_torch_save(out_dir / "model.pt", saved)
        atomic_write_json(out_dir / "result.json", result)
    return result
