"""Scoring candidates with inherited weights: exact BN recalibration, then held-out accuracy."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch
from torch import nn

from fairnas.arch import Architecture
from fairnas.bn import batch_norms, preserved_bn_state, recalibrate_bn
from fairnas.config import EvalConfig
from fairnas.data import DataSplits, TensorSplit, iterate_in_order
from fairnas.network import Supernet

logger = logging.getLogger(__name__)


@torch.no_grad()
def accuracy(model: nn.Module, split: TensorSplit, *, batch_size: int = 512,
             device: str | torch.device = "cpu", forward=None) -> float:
    """Top-1 accuracy of ``model`` (in eval mode) on a split, in fixed order."""
    forward = forward or model
    was_training = model.training
    model.eval()
    correct = 0
    try:
        for images, labels in iterate_in_order(split, batch_size):
            logits = forward(images.to(device, non_blocking=True))
            correct += (logits.argmax(1).cpu() == labels).sum().item()
    finally:
        model.train(was_training)
    return correct / max(len(split), 1)


class CandidateEvaluator:
    """Scores architectures on the supernet without changing it.

    Every candidate's BN layers are recalibrated on the same fixed calibration images and the
    candidate is scored on the same validation images; BN buffers and module modes are restored
    afterwards, so the supernet is unchanged and a candidate scores the same every time.
    """

    def __init__(self, supernet: Supernet, splits: DataSplits, config: EvalConfig,
                 *, device: str | torch.device = "cpu") -> None:
        self.supernet, self.config, self.device = supernet, config, torch.device(device)
        calib_count = min(config.calib_images, len(splits.calib))
        self.calib = splits.calib.subset(torch.arange(calib_count))
        val_count = len(splits.val) if config.val_images is None else min(config.val_images,
                                                                           len(splits.val))
        self.val = splits.val.subset(torch.arange(val_count))
        self.calibration_seconds = 0.0
        self.scoring_seconds = 0.0
        self.evaluated = 0

    def evaluate(self, arch: Architecture) -> float:
        supernet = self.supernet
        bns = batch_norms(supernet.path_modules(arch))
        with preserved_bn_state(supernet, bns):
            start = time.perf_counter()
            batches = (x.to(self.device) for x, _ in iterate_in_order(self.calib,
                                                                       self.config.batch_size))
            recalibrate_bn(supernet, batches, lambda x: supernet(x, arch), bns)
            middle = time.perf_counter()
            score = accuracy(supernet, self.val, batch_size=self.config.batch_size,
                             device=self.device, forward=lambda x: supernet(x, arch))
            self.calibration_seconds += middle - start
            self.scoring_seconds += time.perf_counter() - middle
        self.evaluated += 1
        return score

    def evaluate_many(self, archs: Sequence[Architecture]) -> list[float]:
        return [self.evaluate(arch) for arch in archs]

    def timing(self) -> dict[str, float]:
        total = self.calibration_seconds + self.scoring_seconds
        return {
            "evaluated": self.evaluated,
            "seconds": total,
            "candidates_per_second": self.evaluated / total if total else 0.0,
            "calibration_share": self.calibration_seconds / total if total else 0.0,
        }
