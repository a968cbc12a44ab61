"""Exports: JSON round trip, timm's EfficientNet builder, ONNX in onnxruntime."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_pretrained import official_listing, random_release_state, write_release_file

from fairnas.arch import Architecture
from fairnas.cli import main
from fairnas.export import build_timm_model, check_timm_export, timm_definition, to_timm
from fairnas.network import SinglePathNet
from fairnas.pretrained import load_pretrained
from fairnas.space import get_space, space_from_dict
from fairnas.zoo import get_model

pytest.importorskip("timm")



def _inputs(channels: int = 3, size: int = 64) -> torch.Tensor:
    return torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(7))


def _randomise(model: torch.nn.Module) -> torch.nn.Module:
    """Weights and BN statistics away from their initial values, so outputs are of order one."""
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var"):
                tensor.copy_(0.75 + 0.5 * torch.rand(tensor.shape, generator=generator))
            elif tensor.dim() > 1:
                fan_in = tensor[0].numel()
                tensor.copy_(torch.randn(tensor.shape, generator=generator) / fan_in ** 0.5)
            else:
                tensor.copy_(0.5 + 0.1 * torch.randn(tensor.shape, generator=generator))
    return model.eval()


@pytest.mark.parametrize("release", ["FairNAS_A", "fairnas_b_se_0.5", "fairnas_c_transfer"])
def test_timm_definition_with_released_weights_matches(release, tmp_path, capsys):
    state = random_release_state(official_listing(release), seed=5)
    checkpoint = write_release_file(tmp_path / "weights.pth.tar", state, "model_state")
    output = tmp_path / "timm.json"

    assert main(["export", "--model", release, "--checkpoint", str(checkpoint),
                 "--format", "timm", "--output", str(output), "--input-size", "64",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)

    from safetensors.torch import load_file

    timm_model = build_timm_model(json.loads(output.read_text()))
    timm_model.load_state_dict(load_file(result["weights"]), strict=True)
    ours = load_pretrained(release, checkpoint)
    x = _inputs()
    with torch.no_grad():
        expected, actual = ours(x), timm_model.eval()(x)
    assert expected.abs().max() > 0.1
    assert (actual - expected).abs().max() <= 1e-4
    assert sum(p.numel() for p in timm_model.parameters()) == \
        sum(p.numel() for p in ours.parameters())
    assert result["timm_max_abs_diff"] <= 1e-4


def test_released_se_file_loads_straight_into_timm():
    """The SE release is a timm EfficientNet: our definition reproduces its exact names."""
    state = random_release_state(official_listing("fairnas_a_se"), seed=6)
    timm_model = build_timm_model(timm_definition(get_model("fairnas_a_se").architecture))
    timm_model.load_state_dict(state, strict=True)
    from test_pretrained import reference_forward

    x = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(timm_model.eval()(x), reference_forward(state, x),
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("space_name", ["fmnist", "tiny"])
def test_searched_architectures_export_to_timm(space_name):
    space = get_space(space_name)
    arch = Architecture(space, tuple((3 * i + 1) % space.num_choices
                                     for i in range(len(space.searchable_layers))))
    model = _randomise(SinglePathNet(arch))

    definition, timm_model = to_timm(model)

    x = _inputs(space.input_channels, space.input_size)
    with torch.no_grad():
        difference = (timm_model(x) - model(x)).abs().max()
    assert difference <= 1e-4
    assert check_timm_export(model, timm_model)["timm_params"] == \
        sum(p.numel() for p in model.parameters())
    json.dumps(definition)  # plain data


def test_timm_export_refuses_widths_timm_would_round():
    space = space_from_dict({"base": "tiny", "name": "odd", "choices": ["k3e1.5", "k3e2"]})
    arch = Architecture(space, (0, 0, 0))
    with pytest.raises(ValueError, match="multiples of 8"):
        to_timm(SinglePathNet(arch))


@pytest.mark.parametrize("release", ["fairnas_a_se", "FairNAS_C"])
def test_onnx_export_matches_pytorch_in_onnxruntime(release, tmp_path, capsys):
    onnxruntime = pytest.importorskip("onnxruntime")
    state = random_release_state(official_listing(release), seed=8)
    checkpoint = write_release_file(tmp_path / "w.pth.tar", state, "bare")
    output = tmp_path / "model.onnx"

    assert main(["export", "--model", release, "--checkpoint", str(checkpoint),
                 "--format", "onnx", "--output", str(output), "--input-size", "64"]) == 0
    assert "checked against PyTorch" in capsys.readouterr().out

    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    x = _inputs()
    (logits,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = load_pretrained(release, checkpoint)(x).numpy()
    assert np.abs(expected).max() > 0.1
    assert np.abs(logits - expected).max() <= 1e-4


def test_json_export_round_trips_through_arch_files(tmp_path, capsys):
    output = tmp_path / "arch.json"
    assert main(["export", "--model", "fairnas_b_se_0.5", "--format", "json",
                 "--output", str(output)]) == 0
    capsys.readouterr()
    data = json.loads(output.read_text())
    assert data["params"] == 5_693_040 and data["layers"][0] == "k5e3"

    assert main(["profile", "--arch", str(output), "--json"]) == 0
    profile = json.loads(capsys.readouterr().out)
    assert (profile["params"], profile["madds"]) == (data["params"], data["madds"])
    assert profile["space"] == get_model("fairnas_b_se_0.5").space.name


def test_export_needs_a_model(tmp_path, capsys):
    assert main(["export", "--format", "json", "--output", str(tmp_path / "x.json")]) == 2
    assert "no model given" in capsys.readouterr().err
