"""Does feeding keep up? Time to deliver a batch against the time a strict-fairness step takes.

Training reads its batches through ``BatchFeeder``: the epoch's order is drawn once, a batch is
gathered from the in-memory split, moved to the device and put in the configured layout. This
script times that call against one strict-fairness supernet step on the same batch size,
interleaved round by round. The ratio is the share of a step the host spends feeding; well below
1 means the device never waits for data. (Streamed image folders decode in worker processes
instead; their throughput per worker is in docs/data.md.)

    .venv/bin/python benchmarks/bench_feed.py
"""

from __future__ import annotations

import statistics
import sys

import torch
from _common import (
    channels_last,
    finish,
    interleaved,
    median_ms,
    parser,
    ratio_of,
    setup,
    verdict,
)

from fairnas.accelerator import BatchFeeder, place_model
from fairnas.config import SupernetConfig
from fairnas.data import BatchPlan, TensorSplit
from fairnas.network import Supernet
from fairnas.samplers import PathSampler
from fairnas.space import get_space
from fairnas.steps import SupernetStep
from fairnas.training import make_sgd


def cases(space_name: str, num_images: int, batch_size: int, nhwc: bool) -> dict:
    space = get_space(space_name)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(num_images, space.input_channels, space.input_size, space.input_size,
                         generator=generator)
    labels = torch.randint(space.num_classes, (num_images,), generator=generator)
    split = TensorSplit(images, labels, "random", torch.arange(num_images))
    plan = BatchPlan(num_images, batch_size, seed=0)
    feeder = BatchFeeder(split, plan, batches_per_epoch=len(plan), channels_last=nhwc)
    torch.manual_seed(0)
    supernet = Supernet(space).train()
    place_model(supernet, "cpu", channels_last=nhwc)
    step = SupernetStep(supernet, make_sgd(supernet, lr=0.01, momentum=0.9, nesterov=True,
                                           weight_decay=4e-5))
    sampler = PathSampler(space, "strict", seed=0)
    counter = iter(range(10**9))

    def feed() -> None:
        feeder(next(counter))

    return {"feed": feed, "step": lambda: step(sampler.sample(0), [feeder(0)])}


def main() -> int:
    cli = parser(__doc__.splitlines()[0])
    cli.add_argument("--rounds", type=int, default=5)
    args = cli.parse_args()
    nhwc = channels_last(args, SupernetConfig().channels_last)
    setup(args, "feeding", layout=nhwc)
    passed = True
    # Fashion-MNIST's 55,000 training images at the supernet's batch size; 2,000 ImageNet-sized
    # images (1.2 GB in memory) at a small batch.
    for space_name, num_images, batch_size in (("fmnist", 55_000, 128), ("imagenet", 2_000, 16)):
        times = interleaved(cases(space_name, num_images, batch_size, nhwc), args.rounds)
        cpu = {name: t["cpu"] for name, t in times.items()}
        wall = {name: t["wall"] for name, t in times.items()}
        feed_s = statistics.median(cpu["feed"])
        print(f"-- {space_name}, batch {batch_size}: median CPU time feed {median_ms(cpu['feed'])}"
              f", step {median_ms(cpu['step'])}; the feeder alone delivers "
              f"{batch_size / feed_s:,.0f} images/s on one core")
        median, low, high = ratio_of(cpu["feed"], cpu["step"])
        passed &= verdict(f"[{space_name} b{batch_size}] feeding time / step time", median,
                          0.05, spread=(low, high), fmt="{:.5f}")
        print(f"   (wall clock: {ratio_of(wall['feed'], wall['step'])[0]:.5f})")
    return finish(args, passed)


if __name__ == "__main__":
    sys.exit(main())
