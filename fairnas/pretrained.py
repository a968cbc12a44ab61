"""Loading the released FairNAS weights (and the project's own) into the project's modules.

The fifteen released files use two key schemes and three wrappings:

* ``fairnas``: the plain models' names (``stem.0``, ``separable_conv.{0,1,3,4}``,
  ``mb_module.{i}.{conv1,bn1,...}``, ``conv_before_pooling.{0,1}``, ``classifier.1``);
* ``timm``: the SE and transfer models' EfficientNet names (``conv_stem``, ``bn1``,
  ``blocks.{stage}.{i}.{conv_pw,bn1,conv_dw,...}``, ``conv_head``, ``bn2``, ``classifier``);
* the state dict under ``model_state``, under ``state_dict``, or the file itself; keys may carry
  the ``module.`` prefix that DataParallel adds.

Rather than renaming project modules after one release, a key map is derived from the
architecture: for every project module, the name the release gives it. The same map turns a
project model into timm's names for export. Loading is strict and never runs pickled code; a
file that does not fit says what it is and lists every mismatch with both shapes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fairnas.arch import Architecture
from fairnas.io import CheckpointError, load_checkpoint
from fairnas.network import SinglePathNet
from fairnas.space import SearchSpace, imagenet_space
from fairnas.zoo import PLAIN_SCHEME, TIMM_SCHEME, ZOO, ZooModel, get_model

logger = logging.getLogger(__name__)

PROJECT_SCHEME = "project"
SCHEMES = (PROJECT_SCHEME, PLAIN_SCHEME, TIMM_SCHEME)
_WRAPPERS = ("model_state", "state_dict", "model")  # checked in this order
_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DDP, torch.compile
_SHOWN = 12  # how many problems of each kind an error message lists


def timm_stage_sizes(space: SearchSpace) -> tuple[int, ...]:
    """How the searched layers are grouped into timm stages (after the first-block stage).

    The released SE files group FairNAS's 19 blocks as 1, 1, 4, 8, 5; an architecture of the
    ImageNet space is grouped the same way so its timm names equal the released ones. Other
    spaces get one timm stage per stage of the space.
    """
    if space.stages == imagenet_space().stages:
        return (1, 1, 4, 8, 5)
    return tuple(stage.layers for stage in space.stages)


def _module_map(arch: Architecture, scheme: str, classifier_key: str) -> dict[str, str]:
    """Project module name -> released module name, for every module holding weights."""
    if scheme == PROJECT_SCHEME:
        return {}
    plain = scheme == PLAIN_SCHEME
    names = {
        "stem.conv": "stem.0" if plain else "conv_stem",
        "stem.bn": "stem.1" if plain else "bn1",
        "first_block.depthwise.conv": "separable_conv.0" if plain else "blocks.0.0.conv_dw",
        "first_block.depthwise.bn": "separable_conv.1" if plain else "blocks.0.0.bn1",
        "first_block.project.conv": "separable_conv.3" if plain else "blocks.0.0.conv_pw",
        "first_block.project.bn": "separable_conv.4" if plain else "blocks.0.0.bn2",
        "head.conv": "conv_before_pooling.0" if plain else "conv_head",
        "head.bn": "conv_before_pooling.1" if plain else "bn2",
        "classifier": classifier_key,
    }
    positions = [(stage + 1, i) for stage, size in enumerate(timm_stage_sizes(arch.space))
                 for i in range(size)]
    for spec, choice, (stage, i) in zip(arch.space.layers, arch.layer_choices(), positions,
                                        strict=True):
        ours = f"layers.{spec.index}"
        theirs = f"mb_module.{spec.index}" if plain else f"blocks.{stage}.{i}"
        expands = int(round(spec.in_channels * choice.expansion)) != spec.in_channels
        if plain:
            parts = {"expand.conv": "conv1", "expand.bn": "bn1", "depthwise.conv": "conv2",
                     "depthwise.bn": "bn2", "project.conv": "conv3", "project.bn": "bn3"}
        elif expands:  # timm's InvertedResidual
            parts = {"expand.conv": "conv_pw", "expand.bn": "bn1", "depthwise.conv": "conv_dw",
                     "depthwise.bn": "bn2", "project.conv": "conv_pwl", "project.bn": "bn3"}
        else:  # without expansion the block is timm's DepthwiseSeparableConv
            parts = {"depthwise.conv": "conv_dw", "depthwise.bn": "bn1",
                     "project.conv": "conv_pw", "project.bn": "bn2"}
        parts.update({"se.reduce": "se.conv_reduce", "se.expand": "se.conv_expand"})
        names.update({f"{ours}.{a}": f"{theirs}.{b}" for a, b in parts.items()})
    return names


def release_key_map(
    model: SinglePathNet, scheme: str, *, classifier_key: str = "classifier"
) -> dict[str, str]:
    """Project state-dict key -> key in ``scheme``, for every entry of ``model.state_dict()``."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme should be one of {SCHEMES}, got {scheme!r}")
    modules = _module_map(model.arch, scheme, classifier_key)
    mapping = {}
    for key in model.state_dict():
        module, _, leaf = key.rpartition(".")
        mapping[key] = f"{modules.get(module, module)}.{leaf}"
    return mapping


def to_release_state_dict(
    model: SinglePathNet, scheme: str, *, classifier_key: str = "classifier"
) -> dict[str, torch.Tensor]:
    """``model``'s weights under the names of ``scheme`` (the released or timm names)."""
    mapping = release_key_map(model, scheme, classifier_key=classifier_key)
    state = model.state_dict()
    return {mapping[key]: state[key] for key in sorted(state, key=_forward_rank)}


_FORWARD_ORDER = ("stem.", "first_block.", "layers.", "head.", "classifier")


def _forward_rank(key: str) -> int:
    """Position of a key's part in the forward pass; the released files list keys that way."""
    return next((i for i, p in enumerate(_FORWARD_ORDER) if key.startswith(p)), len(_FORWARD_ORDER))


# -- reading files ------------------------------------------------------------------------------


def unwrap_state_dict(obj: Any, source: str = "checkpoint") -> tuple[dict[str, Any], str]:
    """The state dict inside a loaded file, and a word on where it was found.

    Accepts ``{"model_state": sd}``, ``{"state_dict": sd}``, ``{"model": sd}`` (the project's
    training checkpoints) and a bare ``sd``; strips ``module.`` and ``_orig_mod.`` prefixes.
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{source} holds a {type(obj).__name__}, not a state dict or a dict containing one"
        )
    layout = "a bare state dict"
    for wrapper in _WRAPPERS:
        inner = obj.get(wrapper)
        if isinstance(inner, Mapping) and inner and _is_tensor_dict(inner):
            obj, layout = inner, f"a dict with the state dict under {wrapper!r}"
            break
    if not obj or not _is_tensor_dict(obj):
        keys = ", ".join(sorted(map(str, obj))[:10])
        raise CheckpointError(
            f"{source} holds a dict (keys: {keys}) without a state dict: expected tensors, or a "
            f"dict with the state dict under one of {', '.join(_WRAPPERS)}"
        )
    state = dict(obj)
    for prefix in _PREFIXES:
        if all(key.startswith(prefix) for key in state):
            state = {key[len(prefix):]: value for key, value in state.items()}
            layout += f" with the {prefix!r} prefix"
    return state, layout


def _is_tensor_dict(obj: Mapping) -> bool:
    return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def detect_scheme(keys: Mapping[str, Any] | list[str]) -> str | None:
    """Which naming a state dict uses: ``project``, ``fairnas`` (plain release) or ``timm``."""
    keys = set(keys)
    if "stem.conv.weight" in keys:
        return PROJECT_SCHEME
    if "stem.0.weight" in keys or any(k.startswith("mb_module.") for k in keys):
        return PLAIN_SCHEME
    if "conv_stem.weight" in keys or any(k.startswith("blocks.") for k in keys):
        return TIMM_SCHEME
    return None


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(value.shape)


@lru_cache(maxsize=32)
def _release_signature(name: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """Released key -> shape of a zoo model (built on the meta device: no memory, fast)."""
    entry = ZOO[name]
    with torch.device("meta"):
        model = entry.build()
    state = to_release_state_dict(model, entry.scheme, classifier_key=entry.classifier_key)
    return tuple((key, _shape(value)) for key, value in state.items())


def identify_state_dict(state: Mapping[str, Any]) -> str | None:
    """The published model whose released file has exactly these keys and shapes, if any."""
    shapes = {key: _shape(value) for key, value in state.items()}
    for name in ZOO:
        if shapes == dict(_release_signature(name)):
            return name
    return None


def describe_state_dict(state: Mapping[str, Any]) -> str:
    """One phrase on what a state dict holds, for error messages."""
    name = identify_state_dict(state)
    if name is not None:
        return f"the released weights of {name} ({ZOO[name].release_file})"
    scheme = detect_scheme(state) or "an unknown"
    classes = next((_shape(v)[0] for k, v in state.items()
                    if k.startswith("classifier") and k.endswith(".weight")), None)
    text = f"{len(state)} entries in {scheme} key names"
    return text + (f", a {classes}-class classifier" if classes else "")


# -- converting and loading ---------------------------------------------------------------------


def convert_state_dict(
    state: Mapping[str, torch.Tensor], model: SinglePathNet
) -> tuple[dict[str, torch.Tensor], list[str], list[str], list[str]]:
    """Rename a state dict of any known scheme to ``model``'s keys.

    Returns the converted dict and three lists of problems, in the file's key names: missing
    keys, unexpected keys, and shape mismatches (``key: file [..], model [..]``). The classifier
    may be ``classifier`` or ``classifier.1`` whichever head the model has: dropout holds no
    weights, and the shapes still tell a 10-class file from a 1000-class one.
    """
    scheme = detect_scheme(state) or PROJECT_SCHEME
    mapping = release_key_map(model, scheme)
    reverse = {theirs: ours for ours, theirs in mapping.items()}
    for leaf in ("weight", "bias"):
        reverse.setdefault(f"classifier.1.{leaf}", f"classifier.{leaf}")
    expected = model.state_dict()
    converted: dict[str, torch.Tensor] = {}
    seen: set[str] = set()
    unexpected, mismatched = [], []
    for key, value in state.items():
        ours = reverse.get(key)
        if ours is None or ours in seen:
            unexpected.append(key)
            continue
        seen.add(ours)
        if _shape(value) != _shape(expected[ours]):
            mismatched.append(f"{key}: file {list(value.shape)}, model "
                              f"{list(expected[ours].shape)}")
        else:
            converted[ours] = value
    missing = [
        mapping[key] for key in expected
        # BatchNorm fills in a missing counter itself; older files do not have it.
        if key not in seen and not key.endswith("num_batches_tracked")
    ]
    return converted, missing, unexpected, mismatched


def load_state_into(
    model: SinglePathNet, state: Mapping[str, torch.Tensor], *, source: str = "checkpoint",
    model_name: str | None = None,
) -> None:
    """Load a state dict of any known scheme into ``model`` strictly, or explain why not."""
    converted, missing, unexpected, mismatched = convert_state_dict(state, model)
    if missing or unexpected or mismatched:
        raise CheckpointError(_mismatch_message(state, source, model_name or "this model",
                                                missing, unexpected, mismatched))
    incompatible = model.load_state_dict(converted, strict=False)
    leftover = [k for k in incompatible.missing_keys if not k.endswith("num_batches_tracked")]
    assert not leftover and not incompatible.unexpected_keys, incompatible


def _mismatch_message(state: Mapping[str, Any], source: str, model_name: str,
                      missing: list[str], unexpected: list[str], mismatched: list[str]) -> str:
    what = describe_state_dict(state)
    text = f"{source} does not fit {model_name}: it holds {what}."
    found = identify_state_dict(state)
    if found is not None:
        text += f" Use --model {found}, or pass the file made for {model_name}."
    else:
        text += " Check that the file and the model (or architecture) belong together."
    for label, items in (("shape mismatches", mismatched), ("missing keys", missing),
                         ("unexpected keys", unexpected)):
        if items:
            shown = "; ".join(items[:_SHOWN])
            more = f"; and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
            text += f" {len(items)} {label}: {shown}{more}."
    return text


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict inside a checkpoint file (any layout), loaded without running code."""
    path = Path(path)
    obj = load_checkpoint(path, map_location="cpu")
    state, layout = unwrap_state_dict(obj, str(path))
    logger.debug("%s: %s, %d entries", path, layout, len(state))
    return state, layout


def load_pretrained(
    model: str | ZooModel | SinglePathNet, checkpoint: str | os.PathLike
) -> SinglePathNet:
    """A network with the weights of ``checkpoint``, in eval mode.

    ``model`` is a published model's name (any accepted spelling), its zoo entry, or an
    already built network (a searched architecture, for example).
    """
    name = None
    if isinstance(model, str):
        model = get_model(model)
    if isinstance(model, ZooModel):
        name, model = model.name, model.build()
    state, layout = read_state_dict(checkpoint)
    load_state_into(model, state, source=str(checkpoint), model_name=name)
    logger.info("loaded %s into %s (%s)", checkpoint, name or "the model", layout)
    return model.eval()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
