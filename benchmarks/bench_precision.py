"""bf16 autocast against float32: the measurement behind ``amp: false`` on this CPU.

Interleaved rounds of the same strict-fairness supernet step and stand-alone step in float32 and
under bf16 autocast (``amp: true``), as training runs them. Parameters, gradients and optimizer
state stay float32 either way; only forward passes and the loss run in bf16. A ratio above 1
means bf16 is slower here: CPUs without bf16 arithmetic (AVX512-BF16 or AMX) emulate it. On GPUs
with bf16 tensor cores the ratio is expected below 1, but that is not measured by this script
unless it runs there (``--device cuda``).

    .venv/bin/python benchmarks/bench_precision.py
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from _common import channels_last, finish, interleaved, parser, ratio_of, setup, verdict

from fairnas.accelerator import place_model, precision_context
from fairnas.config import SupernetConfig
from fairnas.network import Supernet
from fairnas.samplers import PathSampler
from fairnas.space import get_space
from fairnas.steps import SupernetStep, standalone_step
from fairnas.training import make_sgd


def cpu_bf16_flags() -> str:
    """The CPU features that decide whether bf16 is native (Linux only)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            flags = next((line.split(":", 1)[1].split() for line in info
                          if line.startswith("flags")), [])
    except OSError:
        return "unknown"
    native = sorted(f for f in flags if f in ("avx512_bf16", "amx_bf16", "avx_ne_convert"))
    return ", ".join(native) if native else "none (bf16 is emulated)"


def training_steps(space_name: str, batch_size: int, device: str,
                   nhwc: bool) -> dict[str, Callable[[], object]]:
    """One supernet step and one stand-alone step in each precision."""
    space = get_space(space_name)
    paths = PathSampler(space, "strict", seed=0).sample(0)
    images = torch.randn(batch_size, space.input_channels, space.input_size,
                         space.input_size).to(device)
    if nhwc:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(space.num_classes, (batch_size,)).to(device)
    cases = {}
    for amp in (False, True):
        torch.manual_seed(0)
        supernet = Supernet(space).train()
        standalone = supernet.extract(paths[0]).train()
        place_model(supernet, device, channels_last=nhwc)
        place_model(standalone, device, channels_last=nhwc)
        precision = precision_context(device, amp)
        step = SupernetStep(supernet, make_sgd(supernet, lr=0.01, momentum=0.9, nesterov=True,
                                               weight_decay=4e-5), precision=precision)
        optimizer = make_sgd(standalone, lr=0.01, momentum=0.9, nesterov=True, weight_decay=4e-5)
        name = "bf16" if amp else "fp32"
        cases[f"supernet {name}"] = lambda s=step: s(paths, [(images, labels)])
        cases[f"stand-alone {name}"] = lambda m=standalone, o=optimizer, p=precision: \
            standalone_step(m, o, (images, labels), precision=p)
    return cases


def main() -> int:
    cli = parser(__doc__.splitlines()[0])
    cli.add_argument("--rounds", type=int, default=3)
    cli.add_argument("--device", default="cpu")
    args = cli.parse_args()
    nhwc = channels_last(args, SupernetConfig().channels_last)
    setup(args, "precision", layout=nhwc)
    print(f"native bf16 CPU features: {cpu_bf16_flags()}")
    slower = True
    for space_name, batch_size in (("fmnist", 128), ("imagenet", 4)):
        cases = training_steps(space_name, batch_size, args.device, nhwc)
        times = interleaved(cases, args.rounds)
        clock = "cpu" if args.device == "cpu" else "wall"
        for kind in ("supernet", "stand-alone"):
            median, low, high = ratio_of(times[f"{kind} bf16"][clock],
                                         times[f"{kind} fp32"][clock])
            # The check is on the default: amp off is right where bf16 is not faster.
            slower &= verdict(f"[{space_name} b{batch_size}] {kind} step: bf16 / fp32 time",
                              median, 1.0, at_most=False, spread=(low, high))
    print("amp: false is the faster default here" if slower else
          "bf16 autocast is faster here: set amp: true")
    return finish(args, slower)


if __name__ == "__main__":
    sys.exit(main())
