"""The shared-prefix strict-fairness step equals the plain sequential step.

Sharing the stem changes how often the stem's BN running statistics move (once per step instead
of m times on the same batch); gradients and updated weights are the same up to float rounding.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fairnas.config import SupernetConfig
from fairnas.data import DataSplits, TensorSplit, split_train
from fairnas.network import Supernet
from fairnas.samplers import PathSampler
from fairnas.space import SearchSpace, get_space
from fairnas.steps import SupernetStep, backward_paths
from fairnas.training import make_sgd, train_supernet

TINY = get_space("tiny")



def fresh_supernet(space: SearchSpace) -> Supernet:
    torch.manual_seed(0)
    return Supernet(space).train()


def batch(space: SearchSpace, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(size, space.input_channels, space.input_size, space.input_size,
                         generator=generator)
    return images, torch.randint(space.num_classes, (size,), generator=generator)


def gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def stem_keys(model: Supernet) -> set[str]:
    return {f"stem.{k}" for k in model.stem.state_dict()} | \
        {f"first_block.{k}" for k in model.first_block.state_dict()}


@pytest.mark.parametrize("name", ["tiny", "fmnist"])
def test_shared_prefix_gradients_equal_the_summed_loss_and_the_sequential_step(name) -> None:
    space = get_space(name)
    x, y = batch(space)
    paths = PathSampler(space, "strict", seed=0).sample(0)
    results = {}
    for mode in ("shared", "sequential", "summed"):
        supernet = fresh_supernet(space)
        if mode == "summed":  # the definition: one backward of the sum of the paths' losses
            sum(F.cross_entropy(supernet(x, path), y) for path in paths).backward()
        else:
            backward_paths(supernet, paths, [(x, y)], shared_prefix=mode == "shared")
        results[mode] = gradients(supernet)

    assert results["shared"].keys() == results["summed"].keys() == results["sequential"].keys()
    assert len(results["shared"]) == sum(1 for _ in fresh_supernet(space).parameters())
    for key, reference in results["summed"].items():
        torch.testing.assert_close(results["shared"][key], reference, rtol=1e-4, atol=1e-6,
                                   msg=key)
        torch.testing.assert_close(results["sequential"][key], reference, rtol=1e-4, atol=1e-6,
                                   msg=key)


def test_shared_prefix_step_updates_weights_like_the_sequential_step() -> None:
    x, y = batch(TINY)
    sampler = PathSampler(TINY, "strict", seed=4)
    models = {}
    for shared in (True, False):
        supernet = fresh_supernet(TINY)
        optimizer = make_sgd(supernet, lr=0.1, momentum=0.9, nesterov=True, weight_decay=4e-5)
        step = SupernetStep(supernet, optimizer, shared_prefix=shared)
        for number in range(3):
            outcome = step(sampler.sample(number), [(x, y)])
            assert outcome.finite
        models[shared] = supernet.state_dict()

    stem = stem_keys(fresh_supernet(TINY))
    initial = fresh_supernet(TINY).state_dict()
    for key, value in models[False].items():
        if key in stem and ("running" in key or "num_batches" in key):
            continue  # the statistics the shared stem updates once per step instead of m times
        torch.testing.assert_close(models[True][key], value, rtol=1e-4, atol=1e-6, msg=key)
        if "weight" in key:
            assert not torch.equal(value, initial[key]), key


def test_shared_stem_batch_norm_statistics_move_once_per_step() -> None:
    x, y = batch(TINY)
    paths = PathSampler(TINY, "strict", seed=0).sample(0)
    m = len(paths)
    counts = {}
    for shared in (True, False):
        supernet = fresh_supernet(TINY)
        backward_paths(supernet, paths, [(x, y)], shared_prefix=shared)
        counts[shared] = int(supernet.stem.bn.num_batches_tracked)
        first_layer = supernet.layers[0].choices[0].depthwise.bn.num_batches_tracked
        assert int(first_layer) == 1  # a choice block runs once per step either way
    assert counts == {True: 1, False: m}


def test_supernet_training_with_and_without_shared_prefix_ends_alike(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(80, 1, 12, 12, generator=generator)
    labels = torch.randint(4, (80,), generator=generator)
    full = TensorSplit(images[:64], labels[:64], "synthetic/train", torch.arange(64))
    test = TensorSplit(images[64:], labels[64:], "synthetic/test", torch.arange(16))
    splits: DataSplits = split_train(full, test, val_size=16, calib_size=16, split_seed=0,
                                     num_classes=4)
    states = {}
    for shared in (True, False):
        config = SupernetConfig(batch_size=8, max_steps=4, warmup_steps=0, lr=0.05,
                                log_interval=1000, shared_prefix=shared)
        supernet = fresh_supernet(TINY)
        train_supernet(supernet, splits, config, tmp_path / str(shared))
        states[shared] = dict(supernet.named_parameters())
    for key, value in states[False].items():
        torch.testing.assert_close(states[True][key], value, rtol=1e-4, atol=1e-6, msg=key)


def tiny_splits() -> DataSplits:
    generator = torch.Generator().manual_seed(0)
    full = TensorSplit(torch.randn(48, 1, 12, 12, generator=generator),
                       torch.randint(4, (48,), generator=generator), "synthetic/train",
                       torch.arange(48))
    return split_train(full, full.subset(torch.arange(8)), val_size=8, calib_size=8,
                       split_seed=0, num_classes=4)


def train_tiny(tmp_path: Path, **settings) -> dict[str, torch.Tensor]:
    config = SupernetConfig(batch_size=8, max_steps=2, warmup_steps=0, lr=0.05,
                            log_interval=1000, **settings)
    supernet = fresh_supernet(TINY)
    train_supernet(supernet, tiny_splits(), config, tmp_path / "-".join(map(str, settings.items())))
    return {k: v.detach().contiguous() for k, v in supernet.named_parameters()}


def test_layout_and_pinned_memory_on_cpu_give_the_same_numbers(tmp_path: Path) -> None:
    """Channels-last changes the layout, not the numbers; pinned memory is CUDA-only."""
    reference = train_tiny(tmp_path, channels_last=False)
    changed = train_tiny(tmp_path, channels_last=True, pin_memory=True)
    for key, value in reference.items():
        torch.testing.assert_close(changed[key], value, rtol=1e-4, atol=1e-6, msg=key)


def test_amp_trains_in_bf16_autocast_on_cpu_with_float32_weights(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    initial = {k: v.detach() for k, v in fresh_supernet(TINY).named_parameters()}
    reference = train_tiny(tmp_path, amp=False)
    with caplog.at_level(logging.INFO, logger="fairnas.accelerator"):
        mixed = train_tiny(tmp_path, amp=True)
    assert "bf16 autocast on cpu" in caplog.text
    assert all(value.dtype == torch.float32 for value in mixed.values())
    # bf16 rounding shows in the weights (autocast really ran) but is small next to how far
    # the two steps moved them.
    assert any(not torch.equal(mixed[key], value) for key, value in reference.items())
    def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
        return float(torch.cat([(a[k] - b[k]).flatten() for k in reference]).norm())

    assert distance(mixed, reference) <= 0.05 * distance(reference, initial)
