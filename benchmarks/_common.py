"""What every benchmark prints: the machine, interleaved timings, ratios against targets.

The machine these numbers come from is shared, so absolute times drift with other people's jobs.
Each benchmark therefore measures the things it compares in the same run, interleaved round by
round, and reports the median of the per-round ratios with their spread.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_line() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"machine: {cpu_model()}, {os.cpu_count()} cores, load {load:.1f}; "
            f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads; "
            f"python {platform.python_version()}")


def parser(description: str) -> argparse.ArgumentParser:
    cli = argparse.ArgumentParser(description=description)
    cli.add_argument("--threads", type=int, default=1,
                     help="torch intra-op threads (default 1: on a shared 2-core machine two "
                          "threads per op mostly measure the other jobs)")
    cli.add_argument("--check", action="store_true",
                     help="exit with status 1 if a target is missed (default: always 0, so "
                          "`make bench` runs every benchmark)")
    cli.add_argument("--layout", choices=("config", "nchw", "nhwc"), default="config",
                     help="memory layout of networks and batches (default: the configured "
                          "channels_last, as training and search run)")
    return cli


def channels_last(args: argparse.Namespace, configured: bool) -> bool:
    return configured if args.layout == "config" else args.layout == "nhwc"


def setup(args: argparse.Namespace, title: str, *, layout: bool) -> None:
    torch.set_num_threads(args.threads)
    print(f"== {title}")
    print(machine_line() + f"; {'channels-last' if layout else 'NCHW'} layout")


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of one call.

    On a machine shared with other jobs the wall clock also counts the time the scheduler gave
    to them; the process's CPU time does not, and with one intra-op thread it is the time the
    work itself took. Both are reported; the ratios that decide PASS/FAIL use CPU time.
    """
    synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def synchronize() -> None:
    """Wait for queued GPU work, so a CUDA run's wall clock covers the work it started."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def interleaved(cases: dict[str, Callable[[], object]], rounds: int,
                warmup: int = 1) -> dict[str, dict[str, list[float]]]:
    """``times[case]["cpu" | "wall"]``: seconds per round; each round runs every case once."""
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    times: dict[str, dict[str, list[float]]] = {n: {"wall": [], "cpu": []} for n in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            wall, cpu = timed(fn)
            times[name]["wall"].append(wall)
            times[name]["cpu"].append(cpu)
    return times


def ratio_of(numerator: list[float], denominator: list[float]) -> tuple[float, float, float]:
    """Median, lowest and highest of the per-round ratios."""
    ratios = [a / b for a, b in zip(numerator, denominator, strict=True)]
    return statistics.median(ratios), min(ratios), max(ratios)


def verdict(name: str, value: float, target: float, *, at_most: bool = True,
            spread: tuple[float, float] | None = None, fmt: str = "{:.3f}") -> bool:
    """Print one result line with its target and PASS/FAIL; returns whether it passed."""
    passed = value <= target if at_most else value >= target
    text = fmt.format(value)
    if spread is not None:
        text += f" (rounds {fmt.format(spread[0])}..{fmt.format(spread[1])})"
    sign = "<=" if at_most else ">="
    print(f"{name}: {text}   target {sign} {fmt.format(target)}   "
          f"{'PASS' if passed else 'FAIL'}")
    return passed


def median_ms(values: list[float]) -> str:
    return f"{1000 * statistics.median(values):.1f} ms"


def finish(args: argparse.Namespace, passed: bool) -> int:
    """The exit status: 1 for a missed target only with ``--check``."""
    print("all targets met" if passed else "some targets missed (FAIL above)")
    return 1 if args.check and not passed else 0


def supernet_and_batch(space_name: str, batch_size: int, nhwc: bool) -> tuple:
    """A seeded supernet in train mode and a random batch, both in the chosen memory layout."""
    from fairnas.accelerator import place_model
    from fairnas.network import Supernet
    from fairnas.space import get_space

    space = get_space(space_name)
    torch.manual_seed(0)
    supernet = Supernet(space).train()
    place_model(supernet, "cpu", channels_last=nhwc)
    images = torch.randn(batch_size, space.input_channels, space.input_size, space.input_size)
    if nhwc:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(space.num_classes, (batch_size,))
    return space, supernet, (images, labels)
