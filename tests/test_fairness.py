"""Strict fairness: path sampling, one update per step, the ledger, and exact resumption."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from scipy.stats import chisquare

from fairnas import training
from fairnas.config import SupernetConfig
from fairnas.data import DataSplits, TensorSplit, split_train
from fairnas.io import load_checkpoint
from fairnas.network import Supernet
from fairnas.samplers import FairnessLedger, PathSampler
from fairnas.space import SearchSpace, get_space
from fairnas.training import train_supernet

TINY = get_space("tiny")


def synthetic_splits(space: SearchSpace = TINY, *, train: int = 64, seed: int = 0) -> DataSplits:
    """Random images with labels a tiny network can partly fit: 48 train, 16 val, 16 calib."""
    generator = torch.Generator().manual_seed(seed)
    shape = (space.input_channels, space.input_size, space.input_size)
    images = torch.randn(train + 16, *shape, generator=generator)
    labels = torch.randint(space.num_classes, (train + 16,), generator=generator)
    images += labels.view(-1, 1, 1, 1).float() * 0.3
    full = TensorSplit(images[:train], labels[:train], "synthetic/train", torch.arange(train))
    test = TensorSplit(images[train:], labels[train:], "synthetic/test", torch.arange(16))
    return split_train(full, test, val_size=16, calib_size=16, split_seed=seed,
                       num_classes=space.num_classes)


def supernet_config(**changes) -> SupernetConfig:
    defaults = dict(batch_size=8, max_steps=3, warmup_steps=0, lr=0.05, log_interval=1000,
                    seed=0, label_smoothing=0.0)
    return SupernetConfig(**{**defaults, **changes})


def fresh_supernet(seed: int = 0, space: SearchSpace = TINY) -> Supernet:
    torch.manual_seed(seed)
    return Supernet(space)


def parameters_of(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# -- the sampler ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny", "fmnist", "imagenet18"])
def test_strict_paths_use_every_block_exactly_once(name: str) -> None:
    space = get_space(name)
    sampler = PathSampler(space, "strict", seed=7)
    m = space.num_choices
    assert sampler.paths_per_step == m
    for step in range(50):
        paths = sampler.sample(step)
        assert len(paths) == m
        for layer in range(len(space.searchable_layers)):
            assert sorted(path.indices[layer] for path in paths) == list(range(m))


def test_uniform_and_expectation_path_counts() -> None:
    space = get_space("fmnist")
    uniform = PathSampler(space, "uniform", seed=0)
    expectation = PathSampler(space, "expectation", seed=0)
    assert uniform.paths_per_step == 1
    assert expectation.paths_per_step == space.num_choices
    repeats = 0
    for step in range(100):
        assert len(uniform.sample(step)) == 1
        paths = expectation.sample(step)
        assert len(paths) == space.num_choices
        repeats += any(len({p.indices[layer] for p in paths}) < space.num_choices
                       for layer in range(6))
    # Independent draws almost always repeat some block within a step; strict never does.
    assert repeats > 90
    with pytest.raises(ValueError, match="strict, uniform, expectation"):
        PathSampler(space, "fair", seed=0)


@pytest.mark.parametrize("kind", ["strict", "uniform", "expectation"])
def test_paths_are_a_function_of_seed_and_step(kind: str) -> None:
    space = get_space("fmnist")
    first, second = PathSampler(space, kind, seed=3), PathSampler(space, kind, seed=3)
    for step in (0, 1, 17, 10_000):
        assert first.sample(step) == second.sample(step)
    # Asking in another order, or after other steps, gives the same answer.
    assert first.sample(5) == PathSampler(space, kind, seed=3).sample(5)
    assert first.sample(5) != first.sample(6)
    assert first.sample(5) != PathSampler(space, kind, seed=4).sample(5)


def test_strict_paths_are_uniformly_distributed() -> None:
    """Per layer the permutation is uniform over all m! orders, independently across layers."""
    sampler = PathSampler(TINY, "strict", seed=11)
    steps = 1200
    orders = list(itertools.permutations(range(3)))
    per_layer = [Counter() for _ in range(3)]
    pairs = Counter()
    for step in range(steps):
        paths = sampler.sample(step)
        perms = [tuple(p.indices[layer] for p in paths) for layer in range(3)]
        for layer, perm in enumerate(perms):
            per_layer[layer][perm] += 1
        pairs[perms[0], perms[1]] += 1
    for counts in per_layer:
        observed = [counts[order] for order in orders]
        assert chisquare(observed).pvalue > 1e-3, observed
    joint = [pairs[a, b] for a in orders for b in orders]
    assert chisquare(joint).pvalue > 1e-3, joint


def test_uniform_sampler_choices_are_uniform() -> None:
    sampler = PathSampler(get_space("fmnist"), "uniform", seed=5)
    counts = torch.zeros(6, 6)
    for step in range(900):
        (path,) = sampler.sample(step)
        counts[torch.arange(6), torch.tensor(path.indices)] += 1
    for row in counts:
        assert chisquare(row.tolist()).pvalue > 1e-3, row


def test_ledger_counts_and_state_round_trip() -> None:
    ledger = FairnessLedger(3, 3)
    sampler = PathSampler(TINY, "strict", seed=0)
    for step in range(4):
        ledger.record(sampler.sample(step))
    assert ledger.is_strictly_fair()
    assert ledger.single_path_passes == 12
    copy = FairnessLedger(3, 3)
    copy.load_state_dict(ledger.state_dict())
    assert copy.summary() == ledger.summary()
    ledger.record(PathSampler(TINY, "uniform", seed=0).sample(0))
    assert not ledger.is_strictly_fair()
    with pytest.raises(ValueError, match="another space"):
        FairnessLedger(6, 6).load_state_dict(copy.state_dict())


# -- training --------------------------------------------------------------------------------


def test_strict_training_updates_every_block_once_per_step(tmp_path: Path) -> None:
    steps = 4
    summary = train_supernet(fresh_supernet(), synthetic_splits(), supernet_config(
        max_steps=steps), tmp_path)
    assert summary["steps"] == steps
    assert summary["ledger"]["strictly_fair"]
    assert summary["ledger"]["single_path_passes"] == steps * 3
    ledger = json.loads((tmp_path / "ledger.json").read_text())
    assert ledger["updates"] == [[steps] * 3] * 3
    assert ledger["passes"] == [[steps] * 3] * 3
    saved = load_checkpoint(tmp_path / "supernet.pt")
    assert torch.equal(saved["ledger"]["updates"], torch.full((3, 3), steps))


@pytest.mark.parametrize(("kind", "paths_per_step"), [("uniform", 1), ("expectation", 3)])
def test_other_samplers_in_training(tmp_path: Path, kind: str, paths_per_step: int) -> None:
    steps = 4
    summary = train_supernet(fresh_supernet(), synthetic_splits(),
                             supernet_config(sampler=kind, max_steps=steps), tmp_path)
    ledger = json.loads((tmp_path / "ledger.json").read_text())
    passes, updates = torch.tensor(ledger["passes"]), torch.tensor(ledger["updates"])
    assert summary["ledger"]["single_path_passes"] == steps * paths_per_step
    assert passes.sum(1).tolist() == [steps * paths_per_step] * 3
    assert (updates <= steps).all() and (updates <= passes).all()
    if kind == "uniform":
        assert torch.equal(updates, passes)
    # The ledger agrees with the sampler the run used.
    expected = FairnessLedger(3, 3)
    sampler = PathSampler(TINY, kind, seed=0)
    for step in range(steps):
        expected.record(sampler.sample(step))
    assert torch.equal(passes, expected.passes) and torch.equal(updates, expected.updates)


def test_weights_change_only_in_the_single_update(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    steps, m = 3, TINY.num_choices
    supernet = fresh_supernet()
    choice_params = [p for layer in supernet.layers for p in layer.parameters()]
    state = {"weights": parameters_of(supernet), "passes": 0, "updates": 0}

    real_forward_path = supernet.forward_path

    def forward_path_spy(h, path):
        # Every path of a step sees the weights left by the previous update, untouched.
        for now, before in zip(supernet.parameters(), state["weights"], strict=True):
            assert torch.equal(now, before), f"weights moved before update {state['updates']}"
        state["passes"] += 1
        return real_forward_path(h, path)

    def before_step(optimizer, args, kwargs):
        assert state["passes"] == m * (state["updates"] + 1)
        assert all(p.grad is not None for p in choice_params)  # all m paths accumulated

    def after_step(optimizer, args, kwargs):
        state["updates"] += 1
        now = parameters_of(supernet)
        assert any(not torch.equal(a, b) for a, b in zip(now, state["weights"], strict=True))
        state["weights"] = now

    real_make_sgd = training.make_sgd

    def make_sgd_spy(*args, **kwargs):
        optimizer = real_make_sgd(*args, **kwargs)
        optimizer.register_step_pre_hook(before_step)
        optimizer.register_step_post_hook(after_step)
        return optimizer

    monkeypatch.setattr(supernet, "forward_path", forward_path_spy)
    monkeypatch.setattr(training, "make_sgd", make_sgd_spy)
    train_supernet(supernet, synthetic_splits(), supernet_config(max_steps=steps), tmp_path)
    assert state["updates"] == steps
    assert state["passes"] == steps * m


@pytest.mark.parametrize("reduction", ["sum", "shared_mean"])
def test_order_of_paths_within_a_step_does_not_matter(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      reduction: str) -> None:
    splits = synthetic_splits()
    config = supernet_config(max_steps=2, grad_reduction=reduction)
    initial = parameters_of(fresh_supernet())

    in_order = fresh_supernet()
    train_supernet(in_order, splits, config, tmp_path / "in_order")

    real_sample = PathSampler.sample
    monkeypatch.setattr(PathSampler, "sample", lambda self, step: real_sample(self, step)[::-1])
    reversed_order = fresh_supernet()
    train_supernet(reversed_order, splits, config, tmp_path / "reversed")

    moved = 0
    for a, b, start in zip(in_order.parameters(), reversed_order.parameters(), initial,
                           strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        moved += not torch.equal(a, start)
    # Every parameter took part, so the comparison means something. (Under shared_mean one BN
    # scale of this tiny net gets a gradient below float resolution of its value in 2 steps.)
    assert moved >= len(initial) - (1 if reduction == "shared_mean" else 0)


def test_mean_reduction_divides_the_summed_gradient(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    grads: dict[str, list[torch.Tensor]] = {}
    real_make_sgd = training.make_sgd

    def make_sgd_spy(model, **kwargs):
        def keep_gradients(*_) -> None:
            grads[reduction] = [p.grad.clone() for p in model.parameters()]

        optimizer = real_make_sgd(model, **kwargs)
        optimizer.register_step_pre_hook(keep_gradients)
        return optimizer

    monkeypatch.setattr(training, "make_sgd", make_sgd_spy)
    for reduction in ("sum", "mean", "shared_mean"):
        train_supernet(fresh_supernet(), synthetic_splits(),
                       supernet_config(grad_reduction=reduction, max_steps=1),
                       tmp_path / reduction)
    for total, mean in zip(grads["sum"], grads["mean"], strict=True):
        torch.testing.assert_close(total, 3 * mean, rtol=1e-5, atol=1e-8)
    # shared_mean: choice blocks keep their summed gradient, shared layers get the mean.
    names = [name for name, _ in fresh_supernet().named_parameters()]
    for name, total, mixed in zip(names, grads["sum"], grads["shared_mean"], strict=True):
        shared = not name.startswith("layers.")
        torch.testing.assert_close(mixed, total / 3 if shared else total, rtol=1e-5, atol=1e-8)


class KilledError(Exception):
    """Stands in for a process killed in the middle of a run."""


def test_resume_continues_exactly_with_the_ledger(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed after 3 of 8 steps and resumed: bit-identical to a run that never stopped."""
    splits, config = synthetic_splits(), supernet_config(max_steps=8, lr=0.1)
    assert len(splits.train) // config.batch_size == 6  # the run crosses an epoch boundary

    straight = fresh_supernet()
    train_supernet(straight, splits, config, tmp_path / "straight")

    real_sample = PathSampler.sample

    def sample_until_killed(self, step):
        if step == 3:
            raise KilledError
        return real_sample(self, step)

    with monkeypatch.context() as patch:
        patch.setattr(PathSampler, "sample", sample_until_killed)
        with pytest.raises(KilledError):
            train_supernet(fresh_supernet(), splits, config, tmp_path / "resumed",
                           checkpoint_every=3)
    checkpoint = load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")
    assert checkpoint["step"] == 3
    assert checkpoint["extra"]["ledger"]["steps"] == 3

    resumed = fresh_supernet(seed=123)  # other initial weights: everything must come from disk
    summary = train_supernet(resumed, splits, config, tmp_path / "resumed")
    assert summary["steps"] == 8
    assert summary["ledger"]["strictly_fair"] and summary["ledger"]["steps"] == 8

    assert ((tmp_path / "straight" / "ledger.json").read_text()
            == (tmp_path / "resumed" / "ledger.json").read_text())
    for (key, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(),
                           strict=True):
        assert torch.equal(a, b), key


def test_resume_refuses_a_changed_step_budget(tmp_path: Path) -> None:
    """The cosine schedule depends on the total, so a longer run is a new run, not a resume."""
    splits = synthetic_splits()
    train_supernet(fresh_supernet(), splits, supernet_config(max_steps=2), tmp_path)
    with pytest.raises(ValueError, match="max_steps"):
        train_supernet(fresh_supernet(), splits, supernet_config(max_steps=4), tmp_path)
