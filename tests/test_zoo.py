"""The published variants: names, definitions, parameter counts and multiply-adds."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_pretrained import INDEX, official_listing

from fairnas.cli import main
from fairnas.costs import count_module
from fairnas.zoo import MODEL_NAMES, ZOO, architecture_tokens, get_model, resolve_model_name

_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")



def _profile(capsys, *args: str) -> dict:
    assert main(["profile", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_there_are_fifteen_variants_one_per_released_file():
    assert len(MODEL_NAMES) == 15
    assert sorted(resolve_model_name(info["checkpoint_file"]) for info in INDEX.values()) \
        == sorted(MODEL_NAMES)


@pytest.mark.parametrize("release", sorted(INDEX))
def test_parameter_count_equals_the_released_listing(release, capsys):
    listing = official_listing(release)
    listed = sum(math.prod(shape) for key, shape in listing.items()
                 if not key.endswith(_BUFFERS))
    model = get_model(release).build()

    assert sum(p.numel() for p in model.parameters()) == listed
    assert listed == INDEX[release]["num_parameters"]
    assert _profile(capsys, "--model", release)["params"] == listed


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_profile_madds_equal_a_measured_forward_pass(name, capsys):
    model = ZOO[name].build()
    measured = count_module(model, (3, 64, 64))

    result = _profile(capsys, "--model", name, "--input-size", "64")

    assert isinstance(result["madds"], int) and isinstance(result["params"], int)
    assert (result["madds"], result["params"]) == (measured.madds, measured.params)
    assert result["input_size"] == 64


@pytest.mark.parametrize("name, madds", [("fairnas_a", 388_122_848), ("fairnas_b", 345_297_632),
                                         ("fairnas_c", 321_024_992)])
def test_plain_models_have_the_papers_multiply_adds(name, madds, capsys):
    assert _profile(capsys, "--model", name)["madds"] == madds


@pytest.mark.parametrize("name, paper", [("fairnas_a_se", 392), ("fairnas_b_se", 349),
                                         ("fairnas_c_se", 325)])
def test_se_models_with_gates_round_to_the_papers_figures(name, paper, capsys):
    result = _profile(capsys, "--model", name)
    assert round(result["madds_with_se_gates"] / 1e6) == paper
    assert result["madds"] < result["madds_with_se_gates"]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_variant_runs(name):
    model = ZOO[name].build().eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10 if "transfer" in name else 1000)
    assert torch.isfinite(out).all()


def test_variant_options_follow_the_release():
    plain, se, half, transfer = (get_model(n).space for n in
                                 ("fairnas_a", "fairnas_a_se", "fairnas_a_se_0.5",
                                  "fairnas_a_se_transfer"))
    assert (plain.activation, plain.se_ratio, plain.dropout, plain.num_classes) == \
        ("relu6", 0.0, 0.2, 1000)
    assert (se.activation, se.stem_activation, se.head_activation, se.se_ratio, se.dropout) == \
        ("swish", "relu", "relu", 1.0, 0.0)
    assert half.se_ratio == 0.5
    assert (transfer.num_classes, transfer.dropout, transfer.input_size) == (10, 0.1, 224)
    assert get_model("fairnas_a").classifier_key == "classifier.1"
    assert get_model("fairnas_a_se").classifier_key == "classifier"


def test_architectures_transcribe_the_papers_table():
    assert architecture_tokens("a")[:3] == ["k7e3", "k3e3", "k7e3"]
    assert architecture_tokens("b")[-1] == architecture_tokens("c")[-1] == "k5e6"
    assert str(get_model("fairnas_c_se").architecture) == "-".join(architecture_tokens("c"))


@pytest.mark.parametrize("spelling, name", [
    ("FairNAS_A", "fairnas_a"), ("FairNasB", "fairnas_b"), ("fairnas-c", "fairnas_c"),
    ("FairNAS-A-SE", "fairnas_a_se"), ("fairnas_b_se_1.0", "fairnas_b_se"),
    ("fairnas_c_se_0.5", "fairnas_c_se_0.5"), ("fairnas_b_transfer", "fairnas_b_se_transfer"),
    ("pretrained/fairnas_c_transfer.pt.tar", "fairnas_c_se_transfer"),
    ("fairnas_a_se_0.5_transfer.pt.tar", "fairnas_a_se_0.5_transfer"),
    ("FairNasC.pth.tar", "fairnas_c"),
])
def test_release_spellings_resolve(spelling, name):
    assert resolve_model_name(spelling) == name


def test_profile_of_any_architecture_and_of_all_models(capsys):
    arch = "-".join(architecture_tokens("b"))
    result = _profile(capsys, "--space", "imagenet", "--arch", arch)
    assert (result["params"], result["madds"]) == (4_506_272, 345_297_632)

    every = _profile(capsys)["models"]
    assert [r["model"] for r in every] == list(MODEL_NAMES)

    small = _profile(capsys, "--space", "fmnist", "--arch", "k3e3-k3e6-k5e3-k5e6-k7e3-k7e6")
    assert small["space"] == "fmnist" and small["madds"] > 0


def test_profile_refuses_unknown_models(capsys):
    assert main(["profile", "--model", "resnet50"]) == 2
    assert "unknown model 'resnet50'" in capsys.readouterr().err
    assert main(["profile", "--space", "imagenet", "--arch", "k3e3"]) == 2
    assert "should have 19 tokens" in capsys.readouterr().err
