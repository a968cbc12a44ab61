"""Loading the released checkpoint files.

No released weights exist here, so every test writes files that follow the official key listings
(``official-keys/*.json``: every key and shape of the fifteen released files) filled with random
values, in the released wrappings. The loaded network is checked against a reference forward
pass that reads those tensors by their released names with ``torch.nn.functional`` alone, so
the key mapping is checked against the published structure, not against itself.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fairnas.cli import main
from fairnas.network import SinglePathNet
from fairnas.pretrained import (
    describe_state_dict,
    identify_state_dict,
    load_pretrained,
    read_state_dict,
    to_release_state_dict,
    unwrap_state_dict,
)
from fairnas.zoo import ZOO, get_model, resolve_model_name

# The released files' key listings (every key and shape, in order), kept with the tests.
KEYS_DIR = Path(__file__).parent / "data" / "official-keys"
INDEX = json.loads((KEYS_DIR / "index.json").read_text())
RELEASES = sorted(INDEX)
STRIDE_TWO_BLOCKS = {0, 2, 6, 14}  # blocks 1, 3, 7 and 15 of the paper's table, 0-based


def official_listing(release: str) -> dict[str, list[int]]:
    """Key -> shape of a released file, in the file's order."""
    return json.loads((KEYS_DIR / INDEX[release]["json_file"]).read_text())


def random_release_state(listing: dict[str, list[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors of the listed shapes, scaled so a deep forward pass stays finite."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in listing.items():
        prefix, _, leaf = key.rpartition(".")
        is_bn = f"{prefix}.running_mean" in listing
        if leaf == "num_batches_tracked":
            value = torch.tensor(1234)
        elif leaf == "running_var" or (is_bn and leaf == "weight"):
            value = 0.75 + 0.5 * torch.rand(shape, generator=generator)
        elif leaf in ("running_mean", "bias"):
            value = 0.1 * torch.randn(shape, generator=generator)
        else:
            fan_in = math.prod(shape[1:])
            value = torch.randn(shape, generator=generator) / math.sqrt(fan_in)
        state[key] = value
    return state


def _bn(x: torch.Tensor, state: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    return F.batch_norm(x, state[f"{name}.running_mean"], state[f"{name}.running_var"],
                        state[f"{name}.weight"], state[f"{name}.bias"], False, 0.0, 1e-5)


def _conv(x: torch.Tensor, weight: torch.Tensor, stride: int = 1, bias=None) -> torch.Tensor:
    groups = x.shape[1] // weight.shape[1]
    return F.conv2d(x, weight, bias, stride, weight.shape[-1] // 2, 1, groups)


def reference_forward(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The released networks, read off their tensors by released name (eval mode)."""
    if "stem.0.weight" in state:  # plain FairNAS-A/B/C: ReLU6 everywhere
        act = F.relu6
        x = act(_bn(_conv(x, state["stem.0.weight"], 2), state, "stem.1"))
        x = act(_bn(_conv(x, state["separable_conv.0.weight"]), state, "separable_conv.1"))
        x = _bn(_conv(x, state["separable_conv.3.weight"]), state, "separable_conv.4")
        for block in range(19):
            p = f"mb_module.{block}"
            stride = 2 if block in STRIDE_TWO_BLOCKS else 1
            h = act(_bn(_conv(x, state[f"{p}.conv1.weight"]), state, f"{p}.bn1"))
            h = act(_bn(_conv(h, state[f"{p}.conv2.weight"], stride), state, f"{p}.bn2"))
            h = _bn(_conv(h, state[f"{p}.conv3.weight"]), state, f"{p}.bn3")
            x = h + x if h.shape == x.shape else h
        x = act(_bn(_conv(x, state["conv_before_pooling.0.weight"]), state,
                    "conv_before_pooling.1"))
    else:  # SE models in timm's names: Swish and SE in the blocks, ReLU elsewhere
        x = F.relu(_bn(_conv(x, state["conv_stem.weight"], 2), state, "bn1"))
        x = F.relu(_bn(_conv(x, state["blocks.0.0.conv_dw.weight"]), state, "blocks.0.0.bn1"))
        x = _bn(_conv(x, state["blocks.0.0.conv_pw.weight"]), state, "blocks.0.0.bn2")
        names = sorted({tuple(int(v) for v in k.split(".")[1:3]) for k in state
                        if k.startswith("blocks.") and not k.startswith("blocks.0.")})
        assert len(names) == 19
        for block, (stage, index) in enumerate(names):
            p = f"blocks.{stage}.{index}"
            stride = 2 if block in STRIDE_TWO_BLOCKS else 1
            h = F.silu(_bn(_conv(x, state[f"{p}.conv_pw.weight"]), state, f"{p}.bn1"))
            h = F.silu(_bn(_conv(h, state[f"{p}.conv_dw.weight"], stride), state, f"{p}.bn2"))
            gate = h.mean((2, 3), keepdim=True)
            gate = F.silu(_conv(gate, state[f"{p}.se.conv_reduce.weight"],
                                bias=state[f"{p}.se.conv_reduce.bias"]))
            gate = _conv(gate, state[f"{p}.se.conv_expand.weight"],
                         bias=state[f"{p}.se.conv_expand.bias"])
            h = h * gate.sigmoid()
            h = _bn(_conv(h, state[f"{p}.conv_pwl.weight"]), state, f"{p}.bn3")
            x = h + x if h.shape == x.shape else h
        x = F.relu(_bn(_conv(x, state["conv_head.weight"]), state, "bn2"))
    x = x.mean((2, 3))
    classifier = "classifier.1" if "classifier.1.weight" in state else "classifier"
    return F.linear(x, state[f"{classifier}.weight"], state[f"{classifier}.bias"])


def write_release_file(path: Path, state: dict[str, torch.Tensor], layout: str,
                       prefix: str = "") -> Path:
    """Save ``state`` as the release does: ``model_state`` dict, bare, or ``state_dict`` dict."""
    state = {prefix + key: value for key, value in state.items()}
    if layout == "model_state":
        obj = {"model_state": state, "epoch": 250}
    elif layout == "state_dict":
        obj = {"state_dict": state, "arch": "fairnas"}
    else:
        obj = state
    torch.save(obj, path)
    return path


def released_layout(release: str) -> str:
    return "model_state" if "['model_state']" in INDEX[release]["checkpoint_layout"] else "bare"


def assert_same_outputs(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, reference = model.eval()(x), reference_forward(state, x)
    assert torch.isfinite(reference).all() and reference.abs().max() > 1e-3
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("release", RELEASES)
def test_released_file_loads_and_matches_the_reference(release, tmp_path):
    info = INDEX[release]
    state = random_release_state(official_listing(release), seed=len(release))
    path = write_release_file(tmp_path / Path(info["checkpoint_file"]).name, state,
                              released_layout(release))

    model = load_pretrained(release, path)  # the release's own spelling of the name

    assert resolve_model_name(release) == resolve_model_name(info["checkpoint_file"])
    assert sum(p.numel() for p in model.parameters()) == info["num_parameters"]
    assert_same_outputs(model, state)


@pytest.mark.parametrize("release", ["FairNAS_B", "fairnas_c_se_0.5_transfer"])
@pytest.mark.parametrize("layout", ["model_state", "bare", "state_dict"])
@pytest.mark.parametrize("prefix", ["", "module."])
def test_every_layout_and_prefix_loads(release, layout, prefix, tmp_path):
    state = random_release_state(official_listing(release), seed=3)
    path = write_release_file(tmp_path / "weights.pth.tar", state, layout, prefix)

    model = load_pretrained(release, path)

    assert_same_outputs(model, state)


def test_safetensors_file_loads(tmp_path):
    from safetensors.torch import save_file

    state = random_release_state(official_listing("fairnas_a_se"), seed=4)
    save_file(state, str(tmp_path / "fairnas_a_se.safetensors"))
    assert_same_outputs(load_pretrained("fairnas_a_se", tmp_path / "fairnas_a_se.safetensors"),
                        state)


def test_project_checkpoint_of_a_searched_architecture_loads(tmp_path):
    entry = get_model("fairnas_c")
    original = SinglePathNet(entry.architecture).eval()
    torch.save({"model": original.state_dict(), "step": 10}, tmp_path / "model.pt")

    loaded = load_pretrained(SinglePathNet(entry.architecture), tmp_path / "model.pt")

    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), original(x))


@pytest.mark.parametrize("release", RELEASES)
def test_listing_identifies_its_model(release):
    shapes = {k: torch.empty(v, device="meta") for k, v in official_listing(release).items()}
    assert identify_state_dict(shapes) == resolve_model_name(release)


def test_release_names_round_trip_through_the_key_map():
    entry = get_model("fairnas_b_se_0.5")
    with torch.device("meta"):
        model = entry.build()
    state = to_release_state_dict(model, entry.scheme, classifier_key=entry.classifier_key)
    listing = official_listing("fairnas_b_se_0.5")
    assert list(state) == list(listing)
    assert all(list(state[k].shape) == listing[k] for k in listing)


def test_unwrap_strips_prefixes_and_refuses_non_state_dicts():
    state, layout = unwrap_state_dict({"state_dict": {"module.a": torch.zeros(1)}})
    assert state.keys() == {"a"} and "state_dict" in layout and "module." in layout
    with pytest.raises(Exception, match="without a state dict"):
        unwrap_state_dict({"epoch": 3, "lr": 0.1})


# -- bad files through the command line ---------------------------------------------------------


def _validate(capsys, model: str, checkpoint: Path, data_root: Path) -> tuple[int, str]:
    code = main(["validate", "--model", model, "--checkpoint", str(checkpoint),
                 "--data-root", str(data_root)])
    return code, capsys.readouterr().err


def test_lfs_pointer_file_says_to_fetch_it(tmp_path, capsys):
    pointer = tmp_path / "FairNasA.pth.tar"
    size = INDEX["FairNAS_A"]["state_dict_tensor_bytes"]
    pointer.write_text("version https://git-lfs.github.com/spec/v1\n"
                       f"oid sha256:{'ab' * 32}\nsize {size}\n")

    code, err = _validate(capsys, "fairnas_a", pointer, tmp_path)

    assert code == 2
    assert "Git LFS pointer" in err and "git lfs pull" in err and str(pointer) in err
    assert len(err.strip().splitlines()) == 1


def test_truncated_file_says_so(tmp_path, capsys):
    full = write_release_file(tmp_path / "full.pth.tar",
                              random_release_state(official_listing("FairNAS_C")), "model_state")
    truncated = tmp_path / "FairNasC.pth.tar"
    truncated.write_bytes(full.read_bytes()[: full.stat().st_size // 3])

    code, err = _validate(capsys, "fairnas_c", truncated, tmp_path)

    assert code == 2
    assert "truncated" in err and "download or copy it again" in err


def test_file_of_another_model_names_it_and_lists_both_shapes(tmp_path, capsys):
    path = write_release_file(tmp_path / "FairNasB.pth.tar",
                              random_release_state(official_listing("FairNAS_B")), "model_state")

    code, err = _validate(capsys, "fairnas_a", path, tmp_path)

    assert code == 2
    assert "released weights of fairnas_b" in err and "--model fairnas_b" in err
    # block 1 is k7e3 in A and k5e3 in B
    assert "mb_module.0.conv2.weight: file [48, 1, 5, 5], model [48, 1, 7, 7]" in err


def test_transfer_file_for_the_imagenet_model_lists_the_classifier(tmp_path, capsys):
    path = write_release_file(
        tmp_path / "fairnas_a_se_transfer.pt.tar",
        random_release_state(official_listing("fairnas_a_se_transfer")), "model_state")

    code, err = _validate(capsys, "fairnas_a_se", path, tmp_path)

    assert code == 2
    assert "fairnas_a_se_transfer" in err
    assert "classifier.1.weight: file [10, 1280], model [1000, 1280]" in err


def test_pickled_code_is_never_run(tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pth.tar"
    torch.save({"model_state": {"stem.0.weight": torch.zeros(1)}, "x": Payload()}, path)

    code, err = _validate(capsys, "fairnas_a", path, tmp_path)

    assert code == 2 and not marker.exists()
    assert "not plain weights" in err and "no pickled code is executed" in err


def test_description_of_unknown_weights():
    text = describe_state_dict({"classifier.weight": torch.zeros(7, 4), "x.weight": torch.zeros(1)})
    assert "2 entries" in text and "7-class classifier" in text


def test_read_state_dict_reports_layout(tmp_path):
    state = random_release_state(official_listing("fairnas_b_se"))
    write_release_file(tmp_path / "f.pth", state, "bare", "module.")
    loaded, layout = read_state_dict(tmp_path / "f.pth")
    assert loaded.keys() == state.keys() and "bare" in layout and "module." in layout
    assert ZOO["fairnas_b_se"].wrapped is False
