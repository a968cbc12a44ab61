"""Pipeline commands: train-supernet, search, train, evaluate, run."""

from __future__ import annotations

import argparse
import hashlib
import logging
from dataclasses import asdict
from pathlib import Path

from fairnas.arch import Architecture
from fairnas.cli import add_config_arguments, config_overrides, emit
from fairnas.config import RunConfig, resolve_config, save_config
from fairnas.costs import cost_model
from fairnas.distributed import DistContext
from fairnas.evaluate import CandidateEvaluator, accuracy
from fairnas.io import load_model_file
from fairnas.network import SinglePathNet
from fairnas.pipeline import (
    RunContext,
    load_supernet,
    run_pipeline,
    run_search_stage,
    run_supernet_stage,
    space_differences,
)
from fairnas.training import train_standalone

logger = logging.getLogger(__name__)


def _config(args: argparse.Namespace) -> RunConfig:
    return resolve_config(args.config, config_overrides(args))


def _context(args: argparse.Namespace) -> RunContext:
    config = _config(args)
    return RunContext(config, dist=DistContext.from_env(config.device))


def cmd_train_supernet(args: argparse.Namespace) -> int:
    ctx = _context(args)
    if ctx.dist.is_main:
        save_config(ctx.stage_dir("supernet") / "config.yaml", ctx.config)
    summary = run_supernet_stage(ctx)
    if ctx.dist.is_main:
        emit(summary, args.json, f"supernet trained: {summary['steps']} steps in "
             f"{summary['seconds']:.0f} s; ledger {summary['ledger']}; files in "
             f"{ctx.stage_dir('supernet')}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    ctx = _context(args)
    if ctx.dist.is_main:
        save_config(ctx.stage_dir("search") / "config.yaml", ctx.config)
    summary = run_search_stage(ctx, Path(args.supernet) if args.supernet else None)
    if ctx.dist.is_main:
        rows = [f"{r['accuracy']:.4f}  {r['madds']:>12,}  {r['params']:>10,}  {r['arch']}"
                for r in sorted(summary["front"], key=lambda r: r["madds"])]
        emit(summary, args.json, "accuracy  multiply-adds  parameters  architecture\n"
             + "\n".join(rows) + f"\n{summary['evaluated']} candidates evaluated; files in "
             f"{ctx.stage_dir('search')}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    ctx = _context(args)
    if args.arch:
        arch = Architecture.parse(ctx.space, args.arch)
        slug = hashlib.sha1(str(arch).encode()).hexdigest()[:10]
        out_dir = ctx.out_dir / "train" / slug
    else:
        from fairnas.pipeline import chosen_architecture

        arch, _ = chosen_architecture(ctx)
        out_dir = ctx.stage_dir("retrain")
    if ctx.dist.is_main:
        save_config(out_dir / "config.yaml", ctx.config)  # with this command's overrides
    result = train_standalone(arch, ctx.splits, ctx.config.train, out_dir, device=ctx.device,
                              dist=ctx.dist, extra_config=ctx.data_settings)
    result.update(asdict(cost_model(ctx.space).cost(arch)))
    if ctx.dist.is_main:
        emit(result, args.json, f"{arch}: test accuracy {result['test_accuracy']:.4f}, "
             f"validation {result['val_accuracy']:.4f}; files in {out_dir}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    ctx = _context(args)
    if args.model:
        state = load_model_file(args.model)
        if not isinstance(state, dict) or "arch" not in state or "model" not in state:
            raise ValueError(f"{args.model} is not a fairnas stand-alone model file "
                             f"(expected keys arch, model)")
        if "space" in state and space_differences(state["space"], ctx.space):
            raise ValueError(f"{args.model} is a model of another search space (differs in "
                             f"{', '.join(space_differences(state['space'], ctx.space))}); "
                             f"set space to the one it was trained in")
        arch = Architecture.parse(ctx.space, state["arch"])
        model = SinglePathNet(arch)
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as error:  # an older file without its space, of another space
            raise ValueError(f"the weights in {args.model} do not fit {arch} in search space "
                             f"{ctx.space.name!r}: {str(error).splitlines()[0]}") from error
        model.to(ctx.device)
        result = {"arch": str(arch), "test_accuracy": accuracy(model, ctx.splits.test,
                                                               device=ctx.device)}
    else:
        if not args.arch:
            raise ValueError("evaluate needs --arch (scored on the supernet) or --model FILE")
        arch = Architecture.parse(ctx.space, args.arch)
        path = Path(args.supernet) if args.supernet else ctx.stage_dir("supernet") / "supernet.pt"
        supernet, _ = load_supernet(path, ctx.space, ctx.device)
        evaluator = CandidateEvaluator(supernet, ctx.splits, ctx.config.eval, device=ctx.device)
        result = {"arch": str(arch), "supernet_accuracy": evaluator.evaluate(arch)}
    result.update(asdict(cost_model(ctx.space).cost(arch)))
    emit(result, args.json)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    config = _config(args)
    dist = DistContext.from_env(config.device)
    report = run_pipeline(config, dist=dist)
    if dist.is_main:
        emit({k: v for k, v in report.items() if k != "markdown"}, args.json, report["markdown"]
             + f"\nFiles in {config.out_dir} (manifest.json lists them).")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train-supernet", help="train the weight-sharing supernet")
    add_config_arguments(parser)
    parser.set_defaults(func=cmd_train_supernet)

    parser = subparsers.add_parser("search", help="NSGA-II search on a trained supernet")
    add_config_arguments(parser)
    parser.add_argument("--supernet", help="supernet.pt (default: OUT_DIR/supernet/supernet.pt)")
    parser.set_defaults(func=cmd_search)

    parser = subparsers.add_parser("train", help="train an architecture from scratch")
    add_config_arguments(parser)
    parser.add_argument("--arch", help="architecture string or JSON (default: the search's pick)")
    parser.set_defaults(func=cmd_train)

    parser = subparsers.add_parser(
        "evaluate", help="score an architecture on the supernet, or a trained model on test data"
    )
    add_config_arguments(parser)
    parser.add_argument("--arch", help="architecture string or JSON")
    parser.add_argument("--supernet", help="supernet.pt (default: OUT_DIR/supernet/supernet.pt)")
    parser.add_argument("--model", help="a stand-alone model.pt written by `fairnas train` "
                                        "(or its safetensors export)")
    parser.set_defaults(func=cmd_evaluate)

    parser = subparsers.add_parser(
        "run", help="the whole pipeline: supernet, search, retraining (resumable)"
    )
    add_config_arguments(parser)
    parser.set_defaults(func=cmd_run)
