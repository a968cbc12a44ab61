"""Time of a strict-fairness step against m stand-alone steps and against the sequential step.

For each space, one batch and the m paths of one strict-fairness step; interleaved in every round:

* ``shared``: the supernet step as training runs it (sampling, the m paths branching from one
  stem pass, one sync, one update, the ledger),
* ``sequential``: the same step with ``shared_prefix`` off (every path runs the stem),
* ``stand-alone``: the m paths as m separate networks, one full training step each,
* ``stem``: the stem and fixed first block alone, forward and backward.

Sharing can save at most (m - 1) stem passes, so ``1 - (m - 1) * stem / sequential`` is the
lowest the shared/sequential ratio can go on this machine; it is printed next to the ratio.

    .venv/bin/python benchmarks/bench_fairness_step.py
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
    supernet_and_batch,
    verdict,
)

from fairnas.accelerator import place_model
from fairnas.config import SupernetConfig
from fairnas.samplers import FairnessLedger, PathSampler
from fairnas.space import get_space
from fairnas.steps import SupernetStep, standalone_step
from fairnas.training import make_sgd


def optimizer_for(model: torch.nn.Module) -> torch.optim.Optimizer:
    return make_sgd(model, lr=0.01, momentum=0.9, nesterov=True, weight_decay=4e-5)


def measure(space_name: str, batch_size: int, rounds: int,
            nhwc: bool) -> dict[str, dict[str, list[float]]]:
    space, supernet, batch = supernet_and_batch(space_name, batch_size, nhwc)
    images = batch[0]
    sampler = PathSampler(space, "strict", seed=0)
    ledger = FairnessLedger(sampler.num_layers, sampler.num_choices)
    paths = sampler.sample(0)
    standalone = [supernet.extract(path).train() for path in paths]
    for model in standalone:
        place_model(model, "cpu", channels_last=nhwc)
    standalone_optimizers = [optimizer_for(model) for model in standalone]
    steps = {shared: SupernetStep(supernet, optimizer_for(supernet), shared_prefix=shared)
             for shared in (True, False)}

    def supernet_step(shared: bool) -> None:
        step_paths = sampler.sample(0)  # the same paths as the stand-alone networks
        steps[shared](step_paths, [batch])
        ledger.record(step_paths)

    def standalone_steps() -> None:
        for model, optimizer in zip(standalone, standalone_optimizers, strict=True):
            standalone_step(model, optimizer, batch)

    def stem() -> None:
        supernet.zero_grad(set_to_none=True)
        out = supernet.forward_stem(images)
        out.backward(torch.ones_like(out))

    cases = {"shared": lambda: supernet_step(True), "sequential": lambda: supernet_step(False),
             "stand-alone": standalone_steps, "stem": stem}
    return interleaved(cases, rounds)


def report(space_name: str, batch_size: int, times: dict[str, dict[str, list[float]]],
           *, prefix_target: float | None) -> bool:
    m = get_space(space_name).num_choices
    cpu = {name: t["cpu"] for name, t in times.items()}
    wall = {name: t["wall"] for name, t in times.items()}
    print(f"-- space {space_name}, batch {batch_size}, m = {m} paths, "
          f"{len(cpu['shared'])} rounds; median CPU time per step: "
          + ", ".join(f"{name} {median_ms(values)}" for name, values in cpu.items()))
    print("   median wall time: " + ", ".join(f"{name} {median_ms(values)}"
                                             for name, values in wall.items()))

    median, low, high = ratio_of(cpu["shared"], cpu["stand-alone"])
    passed = verdict(f"[{space_name}] strict-fairness step / sum of {m} stand-alone steps",
                     median, 1.05, spread=(low, high))
    print(f"   (wall clock: {ratio_of(wall['shared'], wall['stand-alone'])[0]:.3f})")

    median, low, high = ratio_of(cpu["shared"], cpu["sequential"])
    name = f"[{space_name}] shared-prefix step / sequential step"
    if prefix_target is None:
        print(f"{name}: {median:.3f} (rounds {low:.3f}..{high:.3f})   no target on this space")
    else:
        passed &= verdict(name, median, prefix_target, spread=(low, high))
    print(f"   (wall clock: {ratio_of(wall['shared'], wall['sequential'])[0]:.3f})")
    bound = 1 - (m - 1) * statistics.median(cpu["stem"]) / statistics.median(cpu["sequential"])
    print(f"[{space_name}] lowest shared/sequential reachable by sharing the stem "
          f"(1 - (m-1) * stem / sequential): {bound:.3f}")
    return passed


def main() -> int:
    cli = parser(__doc__.splitlines()[0])
    cli.add_argument("--imagenet-batch", type=int, default=4)
    cli.add_argument("--fmnist-batch", type=int, default=128, help="the supernet default")
    cli.add_argument("--rounds", type=int, default=5)
    args = cli.parse_args()
    nhwc = channels_last(args, SupernetConfig().channels_last)
    setup(args, "strict-fairness step", layout=nhwc)
    passed = True
    for space_name, batch_size, target in (("imagenet", args.imagenet_batch, 0.9),
                                           ("fmnist", args.fmnist_batch, None)):
        times = measure(space_name, batch_size, args.rounds, nhwc)
        passed &= report(space_name, batch_size, times, prefix_target=target)
    return finish(args, passed)


if __name__ == "__main__":
    sys.exit(main())
