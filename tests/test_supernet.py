"""Supernet paths equal their stand-alone models; blocks are independent; gradients stay local."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fairnas.arch import Architecture
from fairnas.network import SinglePathNet, Supernet
from fairnas.space import SearchSpace, get_space


def tiny_with_fixed_layer() -> SearchSpace:
    return get_space("tiny").with_options(name="tiny_fixed", fixed_layers={1: "k5e2"})


def randomise_batch_norms(model: nn.Module, seed: int) -> None:
    """Give every BN non-trivial statistics and affine terms, so a mixed-up copy shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(0.2 * torch.randn(n, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
                module.weight.copy_(0.5 + torch.rand(n, generator=generator))
                module.bias.copy_(0.2 * torch.randn(n, generator=generator))


def inputs(space: SearchSpace, n: int = 6, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, space.input_channels, space.input_size, space.input_size,
                       generator=generator)


def all_paths(space: SearchSpace) -> list[Architecture]:
    ranges = [range(space.num_choices)] * len(space.searchable_layers)
    return [Architecture(space, indices) for indices in itertools.product(*ranges)]


@pytest.mark.parametrize("space", [get_space("tiny"), tiny_with_fixed_layer(), get_space("fmnist")],
                         ids=lambda s: s.name)
def test_path_equals_extracted_standalone_model(space: SearchSpace) -> None:
    torch.manual_seed(0)
    supernet = Supernet(space).eval()
    randomise_batch_norms(supernet, seed=1)
    x = inputs(space)
    rng = random.Random(2)
    outputs = []
    for _ in range(6):
        arch = Architecture(space, tuple(rng.randrange(space.num_choices)
                                         for _ in space.searchable_layers))
        model = supernet.extract(arch).eval()
        assert isinstance(model, SinglePathNet)
        assert set(model.state_dict()) == set(supernet.path_state_dict(arch))
        with torch.no_grad():
            expected = model(x)
            got = supernet(x, arch)
            split = supernet.forward_path(supernet.forward_stem(x), arch)
        assert got.shape == (len(x), space.num_classes)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(split, got, rtol=0, atol=0)
        outputs.append(got)
    # Different paths really are different functions.
    assert not all(torch.allclose(outputs[0], other) for other in outputs[1:])


def test_extract_copies_instead_of_sharing() -> None:
    space = get_space("tiny")
    torch.manual_seed(0)
    supernet = Supernet(space)
    arch = Architecture(space, (1, 2, 0))
    before = {k: v.clone() for k, v in supernet.state_dict().items()}
    model = supernet.extract(arch)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    for key, value in supernet.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_fixed_layer_holds_one_block() -> None:
    space = tiny_with_fixed_layer()
    supernet = Supernet(space)
    assert [len(layer.choices) for layer in supernet.layers] == [3, 1, 3]
    arch = Architecture(space, (2, 1))
    state = supernet.path_state_dict(arch)
    fixed_keys = [k for k in supernet.state_dict() if k.startswith("layers.1.")]
    assert all(k.startswith("layers.1.choices.0.") for k in fixed_keys)
    assert {k for k in state if k.startswith("layers.1.")} == {
        k.replace("choices.0.", "") for k in fixed_keys
    }


def test_architecture_of_another_space_is_refused() -> None:
    supernet = Supernet(get_space("tiny"))
    other = Architecture(get_space("fmnist"), (0,) * 6)
    with pytest.raises(ValueError, match="'fmnist'"):
        supernet(inputs(get_space("tiny")), other)


def test_choice_blocks_have_independent_weights() -> None:
    space = get_space("tiny")
    torch.manual_seed(0)
    supernet = Supernet(space).eval()
    randomise_batch_norms(supernet, seed=3)
    x = inputs(space)
    paths = all_paths(space)

    storages = [p.untyped_storage().data_ptr() for p in supernet.parameters()]
    assert len(storages) == len(set(storages))

    with torch.no_grad():
        reference = [supernet(x, arch) for arch in paths]
        for layer, choice in itertools.product(range(space.num_layers),
                                               range(space.num_choices)):
            block = supernet.layers[layer].choices[choice]
            saved = block.project.conv.weight.clone()
            block.project.conv.weight.add_(0.5)
            for arch, before in zip(paths, reference, strict=True):
                after = supernet(x, arch)
                if arch.indices[layer] == choice:
                    assert not torch.allclose(after, before), (layer, choice, str(arch))
                else:
                    assert torch.equal(after, before), (layer, choice, str(arch))
            block.project.conv.weight.copy_(saved)


@pytest.mark.parametrize("space", [get_space("tiny"), tiny_with_fixed_layer()],
                         ids=lambda s: s.name)
def test_gradients_reach_exactly_the_path(space: SearchSpace) -> None:
    torch.manual_seed(0)
    supernet = Supernet(space).train()
    x = inputs(space, n=8)
    y = torch.arange(8) % space.num_classes
    for arch in all_paths(space)[::5]:
        supernet.zero_grad(set_to_none=True)
        logits = supernet(x, arch)
        assert torch.isfinite(logits).all()
        F.cross_entropy(logits, y).backward()

        used = {id(p) for module in supernet.path_modules(arch) for p in module.parameters()}
        for name, param in supernet.named_parameters():
            if id(param) in used:
                assert param.grad is not None, (str(arch), name)
                assert torch.isfinite(param.grad).all(), (str(arch), name)
                assert param.grad.abs().sum() > 0, (str(arch), name)
            else:
                assert param.grad is None, (str(arch), name)
        # Unused blocks are exactly the other m - 1 choices of every searchable layer.
        unused = [p for p in supernet.parameters() if id(p) not in used]
        other_blocks = [p for layer, choice in zip(supernet.layers,
                                                   arch.layer_choice_indices(), strict=True)
                        if choice is not None
                        for c, block in enumerate(layer.choices) if c != choice
                        for p in block.parameters()]
        assert {id(p) for p in unused} == {id(p) for p in other_blocks}
