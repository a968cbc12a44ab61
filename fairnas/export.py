"""Exporting any architecture: JSON, a timm EfficientNet definition, ONNX.

* JSON: the architecture with its whole space, so it rebuilds anywhere (``--arch FILE``).
* timm: an ``arch_def`` (one block string per layer) plus constructor arguments for timm's
  ``EfficientNet``. The released SE models were timm EfficientNets, and this is the same
  description for any architecture; with the weights renamed by the release key map, timm's
  model computes what the project's does. :func:`check_timm_export` proves it on random inputs.
* ONNX: traced from the project's network and run in onnxruntime against PyTorch.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fairnas.arch import Architecture
from fairnas.costs import cost_model
from fairnas.io import atomic_write_bytes
from fairnas.network import SinglePathNet
from fairnas.pretrained import TIMM_SCHEME, timm_stage_sizes, to_release_state_dict

logger = logging.getLogger(__name__)

# The project's activation names in timm's block strings and in its model arguments.
_TIMM_BLOCK_ACT = {"relu": "re", "relu6": "r6", "swish": "sw", "hswish": "hs"}
_TIMM_MODEL_ACT = {"relu": "relu", "relu6": "relu6", "swish": "swish", "hswish": "hard_swish"}


class ExportCheckError(RuntimeError):
    """An exported model does not compute what the project's model computes."""


def architecture_json(arch: Architecture, *, name: str | None = None) -> dict[str, Any]:
    """The architecture, its whole space and its costs; ``--arch`` reads it back."""
    cost = cost_model(arch.space).cost(arch)
    return {"name": name, "arch": str(arch), "space": arch.space.to_dict(),
            "layers": list(arch.tokens), "params": cost.params, "madds": cost.madds}


def _number(value: float) -> str:
    return f"{value:g}"


def timm_definition(arch: Architecture) -> dict[str, Any]:
    """A description timm's EfficientNet builder turns into the same network.

    The fixed first block is a ``ds`` block that never adds its input (the project's has no
    shortcut); an inverted bottleneck without expansion is a ``ds`` block too, as timm's ``ir``
    always has an expansion convolution. Channels are kept as given (no rounding).
    """
    space = arch.space
    stem_act = space.stem_activation or space.activation
    head_act = space.head_activation or space.activation
    if stem_act != head_act:
        raise ValueError(f"timm's EfficientNet uses one activation for stem and head; this "
                         f"space has {stem_act} and {head_act}")
    first = (f"ds_r1_k3_s{space.first_block_stride}_e1_c{space.first_block_channels}"
             f"_n{_TIMM_BLOCK_ACT[stem_act]}_noskip")
    blocks = []
    for spec, choice in zip(space.layers, arch.layer_choices(), strict=True):
        hidden = int(round(spec.in_channels * choice.expansion))
        se_ratio = space.block_se_ratio(choice)
        kind = "ir" if hidden != spec.in_channels else "ds"
        text = f"{kind}_r1_k{choice.kernel}_s{spec.stride}"
        text += f"_e{_number(choice.expansion)}" if kind == "ir" else ""
        text += f"_c{spec.out_channels}"
        text += f"_se{_number(se_ratio)}" if int(round(spec.in_channels * se_ratio)) > 0 else ""
        blocks.append(text + f"_n{_TIMM_BLOCK_ACT[space.block_activation(choice)]}")
    stages, start = [[first]], 0
    for size in timm_stage_sizes(space):
        stages.append(blocks[start:start + size])
        start += size
    return {
        "arch_def": stages,
        "kwargs": {"num_classes": space.num_classes, "num_features": space.head_channels,
                   "in_chans": space.input_channels, "stem_size": space.stem_channels,
                   "fix_stem": True, "act_layer": _TIMM_MODEL_ACT[head_act],
                   "drop_rate": space.dropout},
        "stem_stride": space.stem_stride,
        "input_size": [space.input_channels, space.input_size, space.input_size],
        "arch": str(arch),
    }


def _same_channels(channels: int) -> int:
    return int(channels)


def build_timm_model(definition: dict[str, Any]) -> nn.Module:
    """timm's EfficientNet from a :func:`timm_definition` (needs the ``timm`` package)."""
    from timm.models._efficientnet_builder import decode_arch_def
    from timm.models.efficientnet import EfficientNet

    model = EfficientNet(block_args=decode_arch_def(definition["arch_def"]),
                         round_chs_fn=_same_channels, **definition["kwargs"])
    stride = int(definition.get("stem_stride", 2))
    if stride != 2:  # timm's stem always has stride 2; the definition records the space's
        model.conv_stem.stride = (stride, stride)
    return model


def timm_state_dict(model: SinglePathNet) -> dict[str, torch.Tensor]:
    """The project model's weights under timm's EfficientNet names."""
    return to_release_state_dict(model, TIMM_SCHEME, classifier_key="classifier")


def to_timm(model: SinglePathNet) -> tuple[dict[str, Any], nn.Module]:
    """The timm definition of ``model`` and a timm model holding its weights."""
    definition = timm_definition(model.arch)
    timm_model = build_timm_model(definition)
    ours = timm_state_dict(model)
    theirs = timm_model.state_dict()
    wrong = [f"{k}: timm {list(theirs[k].shape) if k in theirs else None}, project "
             f"{list(v.shape)}" for k, v in ours.items()
             if k not in theirs or theirs[k].shape != v.shape]
    extra = sorted(set(theirs) - set(ours))
    if wrong or extra:
        raise ValueError(
            f"timm's builder makes a different network for {model.arch}: "
            f"{'; '.join(wrong[:5])} {extra[:5]} (timm rounds expanded widths to multiples "
            f"of 8, so every block's in_channels x expansion must be one)"
        )
    timm_model.load_state_dict(ours, strict=True)
    return definition, timm_model.eval()


def _max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def _check(name: str, difference: float, reference: torch.Tensor, tolerance: float) -> None:
    # Relative to the largest output: within ``tolerance`` absolute for logits of order one,
    # and still meaningful for the tiny logits of freshly initialised weights.
    allowed = tolerance * max(float(reference.abs().max()), 1e-6)
    if not difference <= allowed:
        raise ExportCheckError(f"{name} outputs differ from PyTorch's by {difference:.3g} "
                               f"(allowed {allowed:.3g})")


def _random_inputs(model: SinglePathNet, batch: int, input_size: int | None,
                   seed: int) -> torch.Tensor:
    space = model.space
    size = input_size or space.input_size
    return torch.randn(batch, space.input_channels, size, size,
                       generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def check_timm_export(model: SinglePathNet, timm_model: nn.Module, *, input_size: int | None = None,
                      batch: int = 2, tolerance: float = 1e-4, seed: int = 0) -> dict[str, Any]:
    """Compare timm's outputs with the project's on random inputs; raise if they differ."""
    model.eval()
    x = _random_inputs(model, batch, input_size, seed)
    ours, theirs = model(x), timm_model.eval()(x)
    difference = _max_difference(ours, theirs)
    _check("timm", difference, ours, tolerance)
    params = sum(p.numel() for p in timm_model.parameters())
    if params != sum(p.numel() for p in model.parameters()):
        raise ExportCheckError(f"timm model has {params} parameters, the project's differ")
    return {"timm_max_abs_diff": difference, "timm_params": params,
            "max_abs_logit": float(ours.abs().max())}


def export_onnx(model: SinglePathNet, path: str | os.PathLike, *, input_size: int | None = None,
                opset: int = 17) -> Path:
    """Write ``model`` (eval mode, dynamic batch) as ONNX, atomically."""
    model.eval()
    buffer = io.BytesIO()
    x = _random_inputs(model, 1, input_size, 0)
    with warnings.catch_warnings():
        # NOTE: the TorchScript-based exporter; the torch.export one needs onnxscript, which
        # is not a dependency. It is deprecated, not wrong, for these plain conv networks.
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buffer, dynamo=False, opset_version=opset,
                          input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    return atomic_write_bytes(path, buffer.getvalue())


@torch.no_grad()
def check_onnx_export(model: SinglePathNet, path: str | os.PathLike, *,
                      input_size: int | None = None, batch: int = 2, tolerance: float = 1e-4,
                      seed: int = 0) -> dict[str, Any]:
    """Run the ONNX file in onnxruntime against PyTorch on random inputs; raise if they differ."""
    import onnx
    import onnxruntime

    onnx.checker.check_model(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = _random_inputs(model, batch, input_size, seed)
    ours = model.eval()(x)
    (theirs,) = session.run(["logits"], {"images": x.numpy()})
    difference = _max_difference(ours, torch.from_numpy(theirs))
    _check("onnxruntime", difference, ours, tolerance)
    return {"onnx_max_abs_diff": difference, "max_abs_logit": float(ours.abs().max())}
