"""Channels-last against the default (NCHW) layout: the measurement behind its default.

Interleaved rounds of the same work in both layouts: a strict-fairness supernet step, a
stand-alone step, and scoring candidates (BN recalibration and validation). Networks and
batches are converted as training and the search stage convert them; the numbers are the same
up to float rounding (``tests/test_shared_prefix.py``). A ratio below 1 means channels-last is
faster here, which is what ``channels_last: true`` in the configuration assumes.

    .venv/bin/python benchmarks/bench_layout.py
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from _common import finish, interleaved, parser, ratio_of, setup, verdict
from bench_search_eval import random_splits

from fairnas.accelerator import place_model
from fairnas.config import EvalConfig
from fairnas.evaluate import CandidateEvaluator
from fairnas.network import Supernet
from fairnas.samplers import PathSampler
from fairnas.space import get_space
from fairnas.steps import SupernetStep, standalone_step
from fairnas.training import make_sgd


def training_steps(space_name: str, batch_size: int) -> dict[str, Callable[[], object]]:
    """One supernet step and one stand-alone step per layout."""
    space = get_space(space_name)
    paths = PathSampler(space, "strict", seed=0).sample(0)
    images = torch.randn(batch_size, space.input_channels, space.input_size, space.input_size)
    labels = torch.randint(space.num_classes, (batch_size,))
    cases = {}
    for nhwc in (False, True):
        torch.manual_seed(0)
        supernet = Supernet(space).train()
        standalone = supernet.extract(paths[0]).train()
        place_model(supernet, "cpu", channels_last=nhwc)
        place_model(standalone, "cpu", channels_last=nhwc)
        x = images.contiguous(memory_format=torch.channels_last) if nhwc else images
        step = SupernetStep(supernet, make_sgd(supernet, lr=0.01, momentum=0.9, nesterov=True,
                                               weight_decay=4e-5))
        optimizer = make_sgd(standalone, lr=0.01, momentum=0.9, nesterov=True, weight_decay=4e-5)
        layout = "nhwc" if nhwc else "nchw"
        cases[f"supernet {layout}"] = lambda s=step, x=x: s(paths, [(x, labels)])
        cases[f"stand-alone {layout}"] = \
            lambda m=standalone, o=optimizer, x=x: standalone_step(m, o, (x, labels))
    return cases


def scoring(candidates: int) -> dict[str, Callable[[], object]]:
    space = get_space("fmnist")
    splits = random_splits("fmnist", 1024, 2000)
    archs = PathSampler(space, "strict", seed=1).sample(0)[:candidates]
    cases = {}
    for nhwc in (False, True):
        torch.manual_seed(0)
        supernet = Supernet(space).eval()
        place_model(supernet, "cpu", channels_last=nhwc)
        evaluator = CandidateEvaluator(supernet, splits, EvalConfig())
        cases[f"scoring {'nhwc' if nhwc else 'nchw'}"] = \
            lambda e=evaluator: e.evaluate_many(archs)
    return cases


def main() -> int:
    cli = parser(__doc__.splitlines()[0])
    cli.add_argument("--rounds", type=int, default=3)
    args = cli.parse_args()
    setup(args, "memory layout", layout=True)
    faster = True
    runs = [("fmnist", 128, training_steps("fmnist", 128)),
            ("imagenet", 4, training_steps("imagenet", 4)),
            ("fmnist", 512, scoring(2))]
    for space_name, batch_size, cases in runs:
        times = interleaved(cases, args.rounds)
        for kind in sorted({name.rsplit(" ", 1)[0] for name in cases}):
            median, low, high = ratio_of(times[f"{kind} nhwc"]["cpu"],
                                         times[f"{kind} nchw"]["cpu"])
            faster &= verdict(f"[{space_name} b{batch_size}] {kind}: channels-last / NCHW time",
                              median, 1.0, spread=(low, high))
    print("channels_last: true is the faster default here" if faster else
          "channels_last: true is NOT faster everywhere here; see the lines above")
    return finish(args, faster)


if __name__ == "__main__":
    sys.exit(main())
