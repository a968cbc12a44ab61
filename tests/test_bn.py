"""Exact BN recalibration, and candidate evaluation that leaves the supernet untouched."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fairnas.arch import Architecture
from fairnas.bn import batch_norms, recalibrate_bn
from fairnas.config import EvalConfig
from fairnas.data import DataSplits, TensorSplit, iterate_in_order
from fairnas.evaluate import CandidateEvaluator, accuracy
from fairnas.network import SinglePathNet, Supernet
from fairnas.space import SearchSpace, get_space

TINY = get_space("tiny")


def images(space: SearchSpace, n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, space.input_channels, space.input_size, space.input_size,
                       generator=generator)


def unequal_batches(x: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """Split ``x`` into batches of the given sizes, each shifted differently.

    The shifts make the batch means differ a lot, so averaging per-batch variances (what
    torch's ``momentum=None`` does) is visibly wrong and only the exact pooled value passes.
    """
    assert sum(sizes) == len(x)
    batches = list(torch.split(x, sizes))
    return [batch + 0.7 * k for k, batch in enumerate(batches)]


def cumulative_torch_statistics(model: nn.Module, batches: list[torch.Tensor]) -> nn.Module:
    """A copy of ``model`` whose BN buffers hold torch's own cumulative batch statistics."""
    reference = copy.deepcopy(model).train()
    for bn in batch_norms([reference]):
        bn.reset_running_stats()
        bn.momentum = None
    with torch.no_grad():
        for batch in batches:
            reference(batch)
    return reference


def randomise_batch_norms(model: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in batch_norms([model]):
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=generator))
            bn.running_var.copy_(0.5 + torch.rand(bn.num_features, generator=generator))
            bn.weight.copy_(0.5 + torch.rand(bn.num_features, generator=generator))
            bn.bias.copy_(0.3 * torch.randn(bn.num_features, generator=generator))
            bn.num_batches_tracked.fill_(17)


def test_first_bn_gets_the_exact_statistics_of_unequal_batches() -> None:
    torch.manual_seed(0)
    model = SinglePathNet(Architecture(TINY, (0, 1, 2)))
    randomise_batch_norms(model, seed=1)
    batches = unequal_batches(images(TINY, 50, seed=2), [7, 20, 3, 20])

    seen = recalibrate_bn(model, batches)
    assert seen == 50

    # The stem convolution of the whole set at once, in float64.
    conv = model.stem.conv
    whole = torch.cat(batches).double()
    out = F.conv2d(whole, conv.weight.double(), stride=conv.stride, padding=conv.padding)
    mean = out.mean((0, 2, 3))
    var = out.var((0, 2, 3), unbiased=True)
    bn = model.stem.bn
    torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-5, atol=1e-5)
    assert int(bn.num_batches_tracked) == 4

    # Torch's cumulative average weighs batches equally whatever their size and averages
    # per-batch variances, missing the spread of batch means: both statistics come out wrong.
    torch_bn = cumulative_torch_statistics(model, batches).stem.bn
    assert (torch_bn.running_mean.double() - mean).abs().max() > 1e-2
    assert (torch_bn.running_var.double() - var).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["tiny", "fmnist"])
def test_one_batch_matches_torch_batch_statistics_in_every_layer(name: str) -> None:
    space = get_space(name)
    torch.manual_seed(0)
    model = SinglePathNet(Architecture(space, tuple(
        i % space.num_choices for i in range(len(space.searchable_layers)))))
    randomise_batch_norms(model, seed=3)
    batch = images(space, 40, seed=4)

    reference = cumulative_torch_statistics(model, [batch])
    recalibrate_bn(model, [batch])
    bns, torch_bns = batch_norms([model]), batch_norms([reference])
    assert len(bns) == len(torch_bns) > 5
    for bn, torch_bn in zip(bns, torch_bns, strict=True):
        torch.testing.assert_close(bn.running_mean, torch_bn.running_mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(bn.running_var, torch_bn.running_var, rtol=1e-4, atol=1e-5)


def test_recalibration_restores_module_modes() -> None:
    torch.manual_seed(0)
    model = SinglePathNet(Architecture(TINY, (2, 2, 2))).train()
    recalibrate_bn(model, [images(TINY, 8, seed=5)])
    assert all(module.training for module in model.modules())
    model.eval()
    recalibrate_bn(model, [images(TINY, 8, seed=5)])
    assert not any(module.training for module in model.modules())


def test_only_the_given_batch_norms_change() -> None:
    torch.manual_seed(0)
    supernet = Supernet(TINY)
    randomise_batch_norms(supernet, seed=6)
    before = {k: v.clone() for k, v in supernet.state_dict().items()}
    arch = Architecture(TINY, (1, 0, 2))
    path_bns = batch_norms(supernet.path_modules(arch))
    recalibrate_bn(supernet, [images(TINY, 10, seed=7)], lambda x: supernet(x, arch), path_bns)
    changed = {k for k, v in supernet.state_dict().items() if not torch.equal(v, before[k])}
    path_keys = set()
    for name, module in supernet.named_modules():
        if any(module is bn for bn in path_bns):
            path_keys |= {f"{name}.running_mean", f"{name}.running_var",
                          f"{name}.num_batches_tracked"}
    assert changed == path_keys


def test_empty_calibration_set_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one"):
        recalibrate_bn(SinglePathNet(Architecture(TINY, (0, 0, 0))), [])


# -- candidate evaluation ----------------------------------------------------------------------


def evaluation_splits(space: SearchSpace = TINY) -> DataSplits:
    def split(n: int, seed: int, source: str) -> TensorSplit:
        x = images(space, n, seed)
        labels = (x.mean((1, 2, 3)) > 0).long() + 2 * (x[:, 0, 0, 0] > 0).long()
        return TensorSplit(x, labels, source, torch.arange(n))

    calib, val = split(40, 8, "synthetic/calib"), split(96, 9, "synthetic/val")
    return DataSplits(train=calib, val=val, calib=calib, test=val, num_classes=4,
                      input_channels=1, input_size=space.input_size)


@pytest.mark.parametrize("train_mode", [True, False])
def test_evaluator_leaves_the_supernet_bit_identical(train_mode: bool) -> None:
    torch.manual_seed(0)
    supernet = Supernet(TINY).train(train_mode)
    randomise_batch_norms(supernet, seed=10)
    before = {k: v.clone() for k, v in supernet.state_dict().items()}
    modes = [m.training for m in supernet.modules()]
    evaluator = CandidateEvaluator(supernet, evaluation_splits(),
                                   EvalConfig(calib_images=40, val_images=96, batch_size=16))
    archs = [Architecture(TINY, indices) for indices in itertools.product(range(3), repeat=3)]

    scores = evaluator.evaluate_many(archs)
    again = [evaluator.evaluate(arch) for arch in reversed(archs)][::-1]

    assert scores == again
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert len(set(scores)) > 3
    assert evaluator.evaluated == 2 * len(archs)
    for key, value in supernet.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert [m.training for m in supernet.modules()] == modes


def test_evaluator_score_is_the_recalibrated_extracted_model_accuracy() -> None:
    torch.manual_seed(0)
    supernet = Supernet(TINY)
    randomise_batch_norms(supernet, seed=11)
    splits = evaluation_splits()
    config = EvalConfig(calib_images=40, val_images=96, batch_size=16)
    evaluator = CandidateEvaluator(supernet, splits, config)
    for indices in [(0, 1, 2), (2, 2, 0), (1, 0, 1)]:
        arch = Architecture(TINY, indices)
        model = supernet.extract(arch)
        recalibrate_bn(model, (x for x, _ in iterate_in_order(splits.calib, 16)))
        assert evaluator.evaluate(arch) == accuracy(model, splits.val)
