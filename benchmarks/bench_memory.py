"""Peak memory of a strict-fairness step against a single-path step on the same supernet.

Memory is counted by the PyTorch profiler, which records every CPU allocation and free made
during the step; the peak of the running total is what the step added at its worst moment.
Added to it is what was alive before the step and stays alive through it: parameters, buffers,
the optimizer's momentum (one SGD optimizer, already holding momentum for every parameter) and
the batch. Gradients are cleared before each measured step, as the step itself does.

The strict-fairness step keeps one path's graph alive at a time (plus the shared stem's), so its
peak should exceed the largest single-path step among its m paths (whose graph it must hold at
some moment) mainly by the gradients of the blocks the other paths use. Each of the m paths is
measured as a single-path step of its own (the step a uniform, SPOS-style sampler takes).

    .venv/bin/python benchmarks/bench_memory.py
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable

import torch
from _common import channels_last, finish, parser, setup, supernet_and_batch, verdict
from torch.profiler import ProfilerActivity, profile

from fairnas.config import SupernetConfig
from fairnas.samplers import PathSampler
from fairnas.steps import SupernetStep
from fairnas.training import make_sgd

MIB = 2**20


def peak_added_bytes(fn: Callable[[], object]) -> int:
    """The most bytes ``fn`` had allocated and not yet freed at any moment (CPU tensors)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    handle, path = tempfile.mkstemp(suffix=".json")
    os.close(handle)
    try:
        prof.export_chrome_trace(path)
        with open(path, encoding="utf-8") as trace:
            events = json.load(trace)["traceEvents"]
    finally:
        os.remove(path)
    # The profiler's "Total Allocated" counter carries over blocks freed between profiling
    # sessions, so it drifts from one measurement to the next; summing the signed sizes of
    # this session's own allocations and frees, in order, does not.
    changes = sorted((e["ts"], e["args"].get("Ev Idx", 0), e["args"]["Bytes"])
                     for e in events if e.get("name") == "[memory]")
    running, peak = 0, 0
    for _, _, change in changes:
        running += change
        peak = max(peak, running)
    return peak


def tensor_bytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure(space_name: str, batch_size: int, nhwc: bool) -> dict[str, float]:
    space, supernet, (images, labels) = supernet_and_batch(space_name, batch_size, nhwc)
    optimizer = make_sgd(supernet, lr=0.01, momentum=0.9, nesterov=True, weight_decay=4e-5)
    paths = PathSampler(space, "strict", seed=0).sample(0)
    steps = {shared: SupernetStep(supernet, optimizer, shared_prefix=shared)
             for shared in (True, False)}
    steps[True](paths, [(images, labels)])  # every parameter now has its momentum buffer

    momentum = [s["momentum_buffer"] for s in optimizer.state.values()]
    resident = tensor_bytes([*supernet.parameters(), *supernet.buffers(), *momentum,
                             images, labels])
    results = {"resident": resident / MIB}
    cases = {"strict, shared prefix": (True, paths), "strict, sequential": (False, paths)}
    cases.update({f"single path {k}": (True, [path]) for k, path in enumerate(paths)})
    for name, (shared, step_paths) in cases.items():
        supernet.zero_grad(set_to_none=True)
        added = peak_added_bytes(lambda s=shared, p=step_paths: steps[s](p, [(images, labels)]))
        results[name] = (resident + added) / MIB
    singles = [results[f"single path {k}"] for k in range(len(paths))]
    results["single path, largest"] = max(singles)
    results["single path, mean"] = sum(singles) / len(singles)
    return results


def main() -> int:
    cli = parser(__doc__.splitlines()[0])
    cli.add_argument("--imagenet-batches", type=int, nargs="+", default=[4, 16])
    cli.add_argument("--fmnist-batch", type=int, default=128)
    args = cli.parse_args()
    nhwc = channels_last(args, SupernetConfig().channels_last)
    setup(args, "peak memory of a step", layout=nhwc)
    passed = True
    runs = [("imagenet", b) for b in args.imagenet_batches] + [("fmnist", args.fmnist_batch)]
    for space_name, batch_size in runs:
        r = measure(space_name, batch_size, nhwc)
        print(f"-- space {space_name}, batch {batch_size}: peak memory during the step "
              f"(resident before it: {r['resident']:.0f} MiB of parameters, buffers, momentum "
              f"and batch)")
        for name in ("strict, shared prefix", "strict, sequential", "single path, largest",
                     "single path, mean"):
            print(f"   {name:22s} {r[name]:8.0f} MiB")
        passed &= verdict(f"[{space_name} b{batch_size}] peak of a strict-fairness step / "
                          f"largest single-path step of its paths",
                          r["strict, shared prefix"] / r["single path, largest"], 1.2)
        print(f"   (against the mean single-path step: "
              f"{r['strict, shared prefix'] / r['single path, mean']:.3f})")
    return finish(args, passed)


if __name__ == "__main__":
    sys.exit(main())
