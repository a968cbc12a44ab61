"""Candidate evaluations per second in the search, and the share spent on BN recalibration.

Each candidate inherits the supernet's weights, gets its BN statistics recalibrated exactly on
the calibration images, then is scored on the validation images (``CandidateEvaluator``, as the
search stage uses it). Image content does not change the time, so the images are random, with
the shapes of the space. Also printed: the part of a candidate's time spent in the stem and fixed
first block, which compute the same thing for every candidate (an upper bound on what caching
their output across candidates could save).

    .venv/bin/python benchmarks/bench_search_eval.py
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from _common import channels_last, parser, setup

import fairnas.evaluate as evaluate_module
from fairnas.accelerator import place_model
from fairnas.arch import Architecture
from fairnas.config import EvalConfig
from fairnas.data import TensorSplit, iterate_in_order, split_train
from fairnas.evaluate import CandidateEvaluator
from fairnas.network import Supernet
from fairnas.space import get_space


class CpuClock:
    """Process CPU seconds spent inside the wrapped functions, by name."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.process_time() - start
        return timed


def random_splits(space_name: str, calib: int, val: int) -> Any:
    space = get_space(space_name)
    count = calib + 2 * val + 8
    images = torch.randn(count, space.input_channels, space.input_size, space.input_size)
    labels = torch.randint(space.num_classes, (count,))
    full = TensorSplit(images[:-8], labels[:-8], "random/train", torch.arange(count - 8))
    test = TensorSplit(images[-8:], labels[-8:], "random/test", torch.arange(8))
    return split_train(full, test, val_size=val, calib_size=calib, split_seed=0,
                       num_classes=space.num_classes)


def measure(space_name: str, config: EvalConfig, candidates: int, nhwc: bool) -> None:
    space = get_space(space_name)
    torch.manual_seed(0)
    supernet = Supernet(space).eval()
    place_model(supernet, "cpu", channels_last=nhwc)  # as the search stage does
    splits = random_splits(space_name, config.calib_images, config.val_images or 2000)
    evaluator = CandidateEvaluator(supernet, splits, config)
    generator = torch.Generator().manual_seed(0)
    archs = [Architecture(space, tuple(torch.randint(space.num_choices, (len(
        space.searchable_layers),), generator=generator).tolist())) for _ in range(candidates)]

    clock = CpuClock()
    real = evaluate_module.recalibrate_bn, evaluate_module.accuracy
    evaluate_module.recalibrate_bn = clock.wrap("recalibration", real[0])
    evaluate_module.accuracy = clock.wrap("scoring", real[1])
    try:
        evaluator.evaluate(archs[0])  # warm-up, not counted below
        clock.seconds.clear()
        wall, cpu = time.perf_counter(), time.process_time()
        evaluator.evaluate_many(archs)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        evaluate_module.recalibrate_bn, evaluate_module.accuracy = real

    stem_cpu = time.process_time()
    with torch.no_grad():
        for split in (evaluator.calib, evaluator.val):
            for images, _ in iterate_in_order(split, config.batch_size):
                supernet.forward_stem(images)
    stem_cpu = time.process_time() - stem_cpu

    per_candidate = cpu / candidates
    share = clock.seconds["recalibration"] / cpu
    print(f"-- space {space_name}: {candidates} candidates; {len(evaluator.calib)} calibration "
          f"and {len(evaluator.val)} validation images, batch {config.batch_size}")
    print(f"[{space_name}] candidate evaluations per second: {1 / per_candidate:.2f} "
          f"(CPU time; wall clock {candidates / wall:.2f})")
    print(f"[{space_name}] share of a candidate's time in BN recalibration: {share:.3f} "
          f"(scoring {clock.seconds['scoring'] / cpu:.3f})")
    print(f"[{space_name}] share in the stem and fixed first block (same for every candidate): "
          f"{stem_cpu / per_candidate:.3f} or more (measured without the recalibration hooks)")


def main() -> int:
    cli = parser(__doc__.splitlines()[0])
    cli.add_argument("--candidates", type=int, default=10)
    args = cli.parse_args()
    nhwc = channels_last(args, EvalConfig().channels_last)
    setup(args, "candidate evaluation", layout=nhwc)
    measure("fmnist", EvalConfig(), args.candidates, nhwc)  # the evaluation defaults
    measure("imagenet", EvalConfig(calib_images=64, val_images=64, batch_size=32), 3, nhwc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
