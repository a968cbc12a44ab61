"""Cost-model lookups per second against building a candidate and counting its module.

The search costs every candidate it meets (and every infeasible one it rejects) from per-layer
tables; the slow alternative builds the stand-alone network and counts it with forward hooks.
Both give the same numbers (the cost tests hold them equal); this measures how much faster the
table is, in rounds that alternate the two.

    .venv/bin/python benchmarks/bench_costs.py
"""

from __future__ import annotations

import statistics
import sys

import torch
from _common import finish, interleaved, parser, setup, verdict

from fairnas.arch import Architecture
from fairnas.costs import cost_model, count_module
from fairnas.network import SinglePathNet
from fairnas.space import get_space


def measure(space_name: str, lookups: int, builds: int, rounds: int) -> tuple[float, float]:
    """(lookups per CPU second, builds-and-counts per CPU second), medians over rounds."""
    space = get_space(space_name)
    model = cost_model(space)
    generator = torch.Generator().manual_seed(0)
    layers = len(space.searchable_layers)
    rows = [tuple(torch.randint(space.num_choices, (layers,), generator=generator).tolist())
            for _ in range(lookups)]
    archs = [Architecture(space, row) for row in rows[:builds]]
    shape = (space.input_channels, space.input_size, space.input_size)

    def look_up() -> None:
        for row in rows:
            model.cost(row)

    def build_and_count() -> None:
        for arch in archs:
            count_module(SinglePathNet(arch), shape)

    times = interleaved({"lookup": look_up, "build": build_and_count}, rounds)
    return (lookups / statistics.median(times["lookup"]["cpu"]),
            builds / statistics.median(times["build"]["cpu"]))


def main() -> int:
    cli = parser(__doc__.splitlines()[0])
    cli.add_argument("--rounds", type=int, default=3)
    args = cli.parse_args()
    setup(args, "cost model", layout=False)
    passed = True
    for space_name, builds in (("imagenet", 2), ("fmnist", 10)):
        lookups_per_s, builds_per_s = measure(space_name, 20_000, builds, args.rounds)
        print(f"-- space {space_name}: {lookups_per_s:,.0f} lookups/s, "
              f"{builds_per_s:.2f} builds+counts/s (CPU time, median of {args.rounds} rounds)")
        passed &= verdict(f"[{space_name}] lookups per second / builds+counts per second",
                          lookups_per_s / builds_per_s, 1000, at_most=False, fmt="{:,.0f}")
    return finish(args, passed)


if __name__ == "__main__":
    sys.exit(main())
