"""Commands for models as artefacts: ``profile``, ``validate``, ``prepare-imagenet``,
``transfer`` and ``export``.

Each takes a published model by name (``--model fairnas_a_se``) or any architecture of a space
(``--space imagenet --arch k7e3-k3e3-...``, or ``--arch FILE.json`` as written by ``export``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from fairnas.arch import Architecture
from fairnas.cli import emit
from fairnas.costs import cost_model
from fairnas.space import get_space

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_profile(subparsers)
    _register_validate(subparsers)
    _register_prepare_imagenet(subparsers)
    _register_export(subparsers)
    _register_transfer(subparsers)


# -- choosing a model ---------------------------------------------------------------------------


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="NAME",
                        help="a published model: fairnas_a, fairnas_b_se, fairnas_c_se_0.5, "
                             "fairnas_a_se_transfer, ... (release spellings such as FairNAS_A "
                             "and file names are accepted)")
    parser.add_argument("--space", metavar="NAME",
                        help="search space of --arch: a preset (imagenet, imagenet18, fmnist, "
                             "tiny) or a published family's space (imagenet_se1, ...); default "
                             "imagenet, or the space named in an --arch JSON file")
    parser.add_argument("--arch", metavar="ARCH",
                        help="architecture string (k7e3-k3e3-...), JSON, or a JSON file")


def selected_architecture(args: argparse.Namespace) -> tuple[str, Architecture]:
    """The model the arguments name: a label for messages and its architecture."""
    from fairnas.zoo import get_model

    if args.model and (args.arch or args.space):
        raise ValueError("give either --model, or --arch (with --space), not both")
    if args.model:
        entry = get_model(args.model)
        return entry.name, entry.architecture
    if not args.arch:
        raise ValueError("no model given: use --model NAME, or --space NAME --arch STRING")
    return "architecture", parse_architecture(args.arch, args.space)


def parse_architecture(text: str, space_name: str | None = None) -> Architecture:
    """An architecture from a string, a JSON object, or a file holding either."""
    from fairnas.zoo import space_by_name

    if not text.lstrip().startswith("{") and os.path.isfile(text):
        text = Path(text).read_text(encoding="utf-8")
    if not text.lstrip().startswith("{"):
        return Architecture.from_string(space_by_name(space_name or "imagenet"), text)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"--arch is neither an architecture string nor valid JSON: {error}") \
            from error
    named = obj.get("space") if isinstance(obj, dict) else None
    if space_name:
        space = space_by_name(space_name)
    elif isinstance(named, str):
        space = space_by_name(named)
    elif isinstance(named, dict):
        space = get_space(named)
    else:
        space = space_by_name("imagenet")
    return Architecture.from_json(obj, space)


def _checkpoint_model(args: argparse.Namespace) -> tuple[str, Any]:
    """The selected network with the weights of ``--checkpoint`` loaded strictly."""
    from fairnas.network import SinglePathNet
    from fairnas.pretrained import load_pretrained

    label, arch = selected_architecture(args)
    model = load_pretrained(args.model if args.model else SinglePathNet(arch), args.checkpoint)
    return label, model


# -- profile ------------------------------------------------------------------------------------


def _register_profile(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "profile", help="parameters and multiply-adds of a published model or an architecture",
        description="Parameters and multiply-adds (convolutions and the classifier, as the "
                    "paper counts them). Without --model or --arch, every published model.",
    )
    _add_model_arguments(parser)
    parser.add_argument("--input-size", type=int, metavar="N",
                        help="input side in pixels (default: the space's, 224 for ImageNet)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run_profile)


def profile_architecture(arch: Architecture, input_size: int | None = None) -> dict[str, Any]:
    """Parameters and multiply-adds of ``arch`` at ``input_size`` (default: the space's)."""
    from fairnas.zoo import se_gate_multiplies

    if input_size is not None:
        if input_size < 1:
            raise ValueError(f"input size should be a positive integer, got {input_size}")
        arch = Architecture(arch.space.with_options(input_size=input_size), arch.indices)
    cost = cost_model(arch.space).cost(arch)
    result = {"space": arch.space.name, "arch": str(arch), "input_size": arch.space.input_size,
              "params": cost.params, "madds": cost.madds}
    gates = se_gate_multiplies(arch)
    if gates:
        result["se_gate_multiplies"] = gates
        result["madds_with_se_gates"] = cost.madds + gates
    return result


def _profile_line(label: str, result: dict[str, Any]) -> str:
    size = result["input_size"]
    line = (f"{label:<28} {result['params']:>11,} params  {result['madds']:>14,} madds "
            f"({result['madds'] / 1e6:.2f} M at {size}x{size})")
    if "madds_with_se_gates" in result:
        line += f"  {result['madds_with_se_gates'] / 1e6:.2f} M with SE gates"
    return line


def run_profile(args: argparse.Namespace) -> int:
    from fairnas.zoo import ZOO

    if args.model or args.arch:
        label, arch = selected_architecture(args)
        result = {"model": label, **profile_architecture(arch, args.input_size)}
        emit(result, args.json, _profile_line(label, result))
        return 0
    results = [{"model": name, **profile_architecture(entry.architecture, args.input_size)}
               for name, entry in ZOO.items()]
    emit({"models": results}, args.json,
         "\n".join(_profile_line(r["model"], r) for r in results))
    return 0


# -- validate -----------------------------------------------------------------------------------


def _register_validate(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "validate", help="top-1/top-5 of a checkpoint with the published evaluation protocol",
        description="Evaluate a checkpoint the way the released models were measured: resize "
                    "256 (bilinear), center crop 224, ImageNet mean and std; top-1 and top-5 "
                    "over every image. Data: a tree of class folders (ImageNet validation "
                    "after prepare-imagenet) or CIFAR-10 in torchvision's local format.",
    )
    _add_model_arguments(parser)
    parser.add_argument("--checkpoint", required=True, metavar="FILE",
                        help="released file (any of its layouts) or a project checkpoint")
    parser.add_argument("--data-root", required=True, metavar="DIR",
                        help="class-folder tree (or its parent with val/), or CIFAR-10's folder")
    parser.add_argument("--dataset", default="auto",
                        choices=("auto", "folder", "cifar10", "fashion-mnist"),
                        help="data layout (default: detected; Fashion-MNIST must be named)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--batch-size", type=int, default=256, metavar="N")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), metavar="N",
                        help="data-loading processes")
    parser.add_argument("--resize", type=int, default=256, metavar="N",
                        help="shorter side before cropping (protocol: 256)")
    parser.add_argument("--crop", type=int, default=224, metavar="N",
                        help="center crop (protocol: 224)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run_validate)


def run_validate(args: argparse.Namespace) -> int:
    from fairnas.imagenet import (
        eval_transform,
        evaluate,
        num_classes_of,
        open_dataset,
        resolve_device,
    )
    from fairnas.zoo import get_model

    device = resolve_device(args.device)
    label, model = _checkpoint_model(args)
    transform = eval_transform(resize=args.resize, crop=args.crop,
                               channels=model.space.input_channels)
    dataset, description = open_dataset(args.dataset, args.data_root, train=False,
                                        transform=transform)
    classes = num_classes_of(dataset)
    if classes > model.space.num_classes:
        raise ValueError(f"{description} has {classes} classes, but {label} predicts "
                         f"{model.space.num_classes}")
    if classes != model.space.num_classes:
        logger.warning("%s has %d classes, %s predicts %d: labels are the sorted class "
                       "folders' positions", description, classes, label,
                       model.space.num_classes)
    scores = evaluate(model, dataset, batch_size=args.batch_size, workers=args.workers,
                      device=device)
    result = {"model": label, "checkpoint": str(args.checkpoint), "data": description, **scores}
    text = (f"{label} on {description}: top-1 {scores['top1']:.2f}%, top-5 "
            f"{scores['top5']:.2f}% over {scores['images']} images "
            f"({scores['images_per_second']:.0f} images/s)")
    if args.model:
        entry = get_model(args.model)
        result["reported_top1"], result["reported_top5"] = entry.top1, entry.top5
        text += f"; reported on {entry.dataset}: top-1 {entry.top1}"
    emit(result, args.json, text)
    return 0


# -- prepare-imagenet ---------------------------------------------------------------------------


def _register_prepare_imagenet(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "prepare-imagenet", help="move the ILSVRC2012 validation images into class folders",
        description="Arrange the 50,000 flat ILSVRC2012_val_*.JPEG images into one folder per "
                    "class (wnid) using the ground truth of the official devkit archive. Safe "
                    "to interrupt and to run again.",
    )
    parser.add_argument("--root", required=True, metavar="DIR",
                        help="folder with ILSVRC2012_devkit_t12.tar.gz and val/ (flat images) "
                             "or ILSVRC2012_img_val.tar")
    parser.add_argument("--devkit", metavar="FILE",
                        help="devkit archive or folder (default ROOT/ILSVRC2012_devkit_t12.tar.gz)")
    parser.add_argument("--val-archive", metavar="FILE",
                        help="images archive (default ROOT/ILSVRC2012_img_val.tar, if present)")
    parser.add_argument("--val-dir", metavar="DIR",
                        help="where the class folders go (default ROOT/val)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run_prepare_imagenet)


def run_prepare_imagenet(args: argparse.Namespace) -> int:
    from fairnas.imagenet import prepare_imagenet

    summary = prepare_imagenet(args.root, devkit=args.devkit, val_archive=args.val_archive,
                               val_dir=args.val_dir)
    text = (f"{summary['images']} images in {summary['classes']} class folders under "
            f"{summary['val_dir']} (moved {summary['moved']}, extracted {summary['extracted']}, "
            f"missing {summary['missing']})")
    emit(summary, args.json, text)
    return 0


# -- export -------------------------------------------------------------------------------------


def _register_export(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export", help="write an architecture as JSON, a timm EfficientNet definition, or ONNX; "
                       "weights as safetensors",
        description="Export a published model or any architecture. timm and ONNX exports are "
                    "checked: the exported model must reproduce PyTorch's outputs on random "
                    "inputs (within 1e-4). --format safetensors writes the weights of "
                    "--checkpoint as safetensors, which load without unpickling anything: "
                    "the project's model.pt or supernet.pt as they are (architecture and space "
                    "kept in the metadata; `fairnas evaluate --model/--supernet` reads them), "
                    "or a released file with --model/--arch, in the project's names.",
    )
    _add_model_arguments(parser)
    parser.add_argument("--checkpoint", metavar="FILE",
                        help="weights to carry over (timm: written beside the definition as "
                             ".safetensors in timm's names; ONNX: embedded)")
    parser.add_argument("--format", required=True,
                        choices=("json", "timm", "onnx", "safetensors"))
    parser.add_argument("--output", required=True, metavar="FILE", help="file to write")
    parser.add_argument("--input-size", type=int, metavar="N",
                        help="input side for ONNX and the checks (default: the space's)")
    parser.add_argument("--no-check", action="store_true",
                        help="skip running the exported model against PyTorch")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from fairnas import export
    from fairnas.io import atomic_write_json, save_safetensors
    from fairnas.network import SinglePathNet

    if args.format == "safetensors":
        return _export_weights(args)
    if args.checkpoint:
        label, model = _checkpoint_model(args)
    else:
        label, arch = selected_architecture(args)
        model = SinglePathNet(arch).eval()
    output = Path(args.output)
    result: dict[str, Any] = {"model": label, "format": args.format, "output": str(output)}
    try:
        if args.format == "json":
            atomic_write_json(output, export.architecture_json(model.arch, name=label))
        elif args.format == "timm":
            definition, timm_model = export.to_timm(model)
            atomic_write_json(output, definition)
            if args.checkpoint:
                weights = output.with_suffix(".safetensors")
                save_safetensors(weights, export.timm_state_dict(model))
                result["weights"] = str(weights)
            if not args.no_check:
                result.update(export.check_timm_export(model, timm_model,
                                                       input_size=args.input_size))
        else:
            export.export_onnx(model, output, input_size=args.input_size)
            if not args.no_check:
                result.update(export.check_onnx_export(model, output,
                                                       input_size=args.input_size))
    except export.ExportCheckError as error:
        print(f"fairnas export: check failed: {error}", file=sys.stderr)
        return 1
    checks = [f"{k} {v:.2g}" for k, v in result.items() if k.endswith("max_abs_diff")]
    text = f"wrote {output} ({args.format} export of {label})"
    text += f"; checked against PyTorch: {', '.join(checks)}" if checks else ""
    emit(result, args.json, text)
    return 0


def _export_weights(args: argparse.Namespace) -> int:
    """``--format safetensors``: the weights of ``--checkpoint`` with what describes them."""
    import torch

    from fairnas.io import load_model_file, save_model_file_as_safetensors

    if not args.checkpoint:
        raise ValueError("--format safetensors writes the weights of --checkpoint FILE "
                         "(a model.pt or supernet.pt of this project, or a released file)")
    state = load_model_file(args.checkpoint)
    project_file = (isinstance(state, dict) and isinstance(state.get("model"), dict)
                    and ("arch" in state or "space" in state))
    if isinstance(state, dict) and "optimizer" in state and "kind" in state:
        raise ValueError(f"{args.checkpoint} is a training checkpoint; export the model.pt or "
                         f"supernet.pt written when training finished")
    if project_file and not (args.model or args.arch):
        label = "supernet" if "arch" not in state else str(state["arch"])
        kept = {k: v for k, v in state.items() if k in ("model", "arch", "space", "ledger")}
    else:
        label, model = _checkpoint_model(args)
        kept = {"model": model.state_dict(), "arch": str(model.arch),
                "space": model.arch.space.to_dict()}
    output = Path(args.output)
    save_model_file_as_safetensors(output, kept)
    result: dict[str, Any] = {"model": label, "format": "safetensors", "output": str(output),
                              "tensors": len(kept["model"])}
    if not args.no_check:  # read back: the same tensors, bit for bit
        written = load_model_file(output)["model"]
        result["identical"] = written.keys() == kept["model"].keys() and all(
            torch.equal(written[k], v) for k, v in kept["model"].items())
        if not result["identical"]:
            print(f"fairnas export: check failed: {output} does not hold the same tensors as "
                  f"{args.checkpoint}", file=sys.stderr)
            return 1
    emit(result, args.json, f"wrote {output} (the {result['tensors']} tensors of "
                            f"{args.checkpoint}, as safetensors)")
    return 0


# -- transfer -----------------------------------------------------------------------------------


def _register_transfer(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "transfer", help="fine-tune a model on another data set with a new head (resumable)",
        description="Fine-tune a published model or any architecture on class folders "
                    "(DIR/train and DIR/val or DIR/test), CIFAR-10 or Fashion-MNIST: the "
                    "classifier is replaced by Dropout + Linear for the new classes and the "
                    "whole network is trained. Rerun the same command to resume.",
    )
    _add_model_arguments(parser)
    parser.add_argument("--checkpoint", metavar="FILE",
                        help="weights to start from (a released file or a project checkpoint);"
                             " without it the network starts from scratch")
    parser.add_argument("--dataset", default="auto",
                        choices=("auto", "folder", "cifar10", "fashion-mnist"))
    parser.add_argument("--data-root", required=True, metavar="DIR")
    parser.add_argument("--out-dir", required=True, metavar="DIR")
    parser.add_argument("--image-size", type=int, default=224, metavar="N",
                        help="crop fed to the network (default 224, as the released models)")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=64, metavar="N")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--warmup-steps", type=int, default=0, metavar="N")
    parser.add_argument("--weight-decay", type=float, default=4e-5)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--dropout", type=float, default=0.1, help="before the new classifier")
    parser.add_argument("--val-size", type=int, default=0, metavar="N",
                        help="training images held out for per-epoch validation")
    parser.add_argument("--train-limit", type=int, metavar="N")
    parser.add_argument("--test-limit", type=int, metavar="N")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-interval", type=int, default=20, metavar="N")
    parser.add_argument("--checkpoint-every", type=int, metavar="N",
                        help="also checkpoint every N steps (always at epoch ends)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--no-resume", action="store_true",
                        help="refuse to continue a run already in --out-dir")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run_transfer)


def run_transfer(args: argparse.Namespace) -> int:
    from fairnas.config import TrainConfig
    from fairnas.imagenet import resolve_device
    from fairnas.network import SinglePathNet
    from fairnas.transfer import TransferSettings, transfer

    device = resolve_device(args.device)
    if args.checkpoint:
        label, model = _checkpoint_model(args)
    else:
        label, arch = selected_architecture(args)
        model = SinglePathNet(arch)
        logger.warning("no --checkpoint: fine-tuning %s from freshly initialised weights", label)
    for name in ("epochs", "batch_size", "log_interval"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} should be positive, got "
                             f"{getattr(args, name)}")
    if args.lr < 0:  # 0 is allowed: only the BN statistics adapt
        raise ValueError(f"--lr should be >= 0, got {args.lr}")
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
                         label_smoothing=args.label_smoothing, seed=args.seed,
                         log_interval=args.log_interval)
    settings = TransferSettings(
        dataset=args.dataset, data_root=str(args.data_root), image_size=args.image_size,
        dropout=args.dropout, val_size=args.val_size, train_limit=args.train_limit,
        test_limit=args.test_limit,
        source=f"{label} ({args.checkpoint})" if args.checkpoint else label,
    )
    result = transfer(model, settings, config, args.out_dir, device=device,
                      resume=not args.no_resume, checkpoint_every=args.checkpoint_every)
    text = (f"{label} fine-tuned on {result['num_classes']} classes: test top-1 "
            f"{result['test_top1']:.2f}% over {result['test_images']} images after "
            f"{result['steps']} steps; model {result['model_file']}, architecture "
            f"{result['arch_file']}")
    emit({"model": label, **result}, args.json, text)
    return 0
