"""The whole FairNAS pipeline in one run folder: supernet, search, retraining, report.

Layout of a run folder::

    config.yaml        the resolved configuration
    manifest.json      per stage: status, seconds, summary, files written
    supernet/          checkpoint.pt, supernet.pt, ledger.json, metrics.jsonl, tensorboard/
    search/            candidates.jsonl, generations/, state.json, front.{json,csv,png}
    retrain/           checkpoint.pt, model.pt, result.json, metrics.jsonl
    report.md          the Pareto front and the retrained architecture's test accuracy

Each stage resumes from its own checkpoint; a stage the manifest marks as done is skipped. A
re-run under a configuration that changes the result is refused, naming the changed keys, and
settings no architecture can meet are refused before the first stage starts.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import yaml

from fairnas.accelerator import place_model
from fairnas.arch import Architecture
from fairnas.config import DataConfig, RunConfig, config_to_dict, differing_keys, save_config
from fairnas.costs import cost_model
from fairnas.data import DataSplits, load_splits
from fairnas.distributed import (
    DistContext,
    broadcast_object,
    evaluate_across_ranks,
    gather_object,
)
from fairnas.evaluate import CandidateEvaluator
from fairnas.io import atomic_write_json, atomic_write_text, load_model_file
from fairnas.network import Supernet
from fairnas.space import SearchSpace, get_space
from fairnas.training import check_batch_size, train_standalone, train_supernet

logger = logging.getLogger(__name__)

STAGES = ("supernet", "search", "retrain")
# Keys whose change does not change what a finished stage produced.
HARMLESS_KEYS = {"out_dir", "device", "threads", "supernet.log_interval", "train.log_interval",
                 "data.root", "supernet.checkpoint_every", "train.checkpoint_every",
                 "supernet.on_nonfinite", "train.on_nonfinite",
                 # memory layout and host staging: the same numbers up to float rounding
                 "supernet.channels_last", "train.channels_last", "eval.channels_last",
                 "supernet.pin_memory", "train.pin_memory",
                 # streamed images do not depend on how many processes decode them
                 "data.workers"}
# Which config sections each stage's result depends on.
STAGE_KEYS = {
    "supernet": ("space", "data.", "supernet."),
    "search": ("space", "data.", "supernet.", "eval.", "search."),
    "retrain": ("space", "data.", "supernet.", "eval.", "search.", "train."),
}


class RunContext:
    """What every stage needs: the config, the space, the data, the device, the folders."""

    def __init__(self, config: RunConfig, *, dist: DistContext | None = None) -> None:
        self.config = config
        self.out_dir = Path(config.out_dir)
        self.device = torch.device(config.device)
        self.dist = dist or DistContext.single()
        if config.threads:
            torch.set_num_threads(config.threads)

    @cached_property
    def space(self) -> SearchSpace:
        return get_space(self.config.space)

    @cached_property
    def splits(self) -> DataSplits:
        return load_splits_for_space(self.config.data, self.space)

    @property
    def data_settings(self) -> dict[str, Any]:
        """The data configuration and a digest of the images themselves, checkpointed by the
        trainers so a resume on other data is refused (``root`` may change: the same files can
        move; the digest catches a ``root`` that points at other images)."""
        return {"data": data_result_settings(self.config.data), "data_content": self.data_digest}

    @cached_property
    def data_digest(self) -> str:
        """SHA-256 of every split's images and labels, in order (about a second per 60k); a
        streamed training split counts by file names and sizes
        (:meth:`~fairnas.data.DataSplits.content_digest`)."""
        return self.splits.content_digest()

    def stage_dir(self, stage: str) -> Path:
        return self.out_dir / stage


def data_result_settings(config: DataConfig) -> dict[str, Any]:
    """The data configuration a trained result depends on, as checkpoints and the search state
    record it. ``workers`` never changes an image; ``stream`` and ``augment`` are left out
    when not streaming (``augment`` then has no effect), so results made before those keys
    existed keep resuming."""
    settings = asdict(config)
    del settings["workers"]
    if not config.stream:
        del settings["stream"], settings["augment"]
    return settings


def load_splits_for_space(config: DataConfig, space: SearchSpace) -> DataSplits:
    """The configured data, shaped for ``space`` (folder images) and checked against it."""
    splits = load_splits(config, input_size=space.input_size,
                         input_channels=space.input_channels)
    check_space_fits_data(space, splits)
    return splits


def check_space_fits_data(space: SearchSpace, splits: DataSplits) -> None:
    problems, fixes = [], []
    if space.input_channels != splits.input_channels:
        problems.append(f"input channels {space.input_channels} vs {splits.input_channels}")
        fixes.append(f"space.input_channels={splits.input_channels}")
    if space.num_classes != splits.num_classes:
        problems.append(f"classes {space.num_classes} vs {splits.num_classes}")
        fixes.append(f"space.num_classes={splits.num_classes}")
    if space.input_size != splits.input_size:
        problems.append(f"input size {space.input_size} vs {splits.input_size}")
        fixes.append(f"space.input_size={splits.input_size}")
    if problems:
        raise ValueError(f"search space {space.name!r} does not fit the data: "
                         f"{'; '.join(problems)} (space vs data); build the space for the data "
                         f"with --set space.base={space.name} "
                         + " ".join(f"--set {fix}" for fix in fixes)
                         + f" (folder images are read with the space's input_channels, "
                           f"{space.input_channels} here: 1 grey, 3 colour)")


def space_differences(saved: Any, space: SearchSpace) -> list[str]:
    """Keys in which a space saved in a file differs from ``space``; rebuilt first, so a space
    that went through JSON (tuples as lists, integer keys as strings) compares equal."""
    return differing_keys(get_space(saved).to_dict(), space.to_dict())


def load_supernet(path: Path, space: SearchSpace, device: torch.device) -> tuple[Supernet, dict]:
    """A trained supernet from ``supernet.pt`` (or its safetensors export); refuses one
    trained on another space."""
    state = load_model_file(path)
    if not isinstance(state, dict) or "model" not in state or "space" not in state:
        raise ValueError(f"{path} is not a fairnas supernet file (expected keys model, space)")
    changed = space_differences(state["space"], space)
    if changed:
        raise ValueError(f"{path} was trained on another search space (differs in "
                         f"{', '.join(changed)}); use the space it was trained on")
    supernet = Supernet(space)
    supernet.load_state_dict(state["model"])
    return supernet.to(device).eval(), state


def run_supernet_stage(ctx: RunContext) -> dict[str, Any]:
    supernet = Supernet(ctx.space)
    torch.manual_seed(ctx.config.supernet.seed)
    supernet.reset_parameters()
    return train_supernet(supernet, ctx.splits, ctx.config.supernet, ctx.stage_dir("supernet"),
                          device=ctx.device, dist=ctx.dist, extra_config=ctx.data_settings)


def check_feasible(ctx: RunContext) -> None:
    """Refuse search and retraining limits that no architecture of the space meets, and batch
    sizes larger than the training data, before any stage runs: otherwise they would only fail
    after the supernet has trained."""
    from fairnas.search import check_limits

    check_limits(ctx.space, ctx.config.search)
    check_batch_size("supernet.batch_size", ctx.config.supernet.batch_size,
                     len(ctx.splits.train))
    check_batch_size("train.batch_size", ctx.config.train.batch_size, len(ctx.splits.train))
    max_madds = ctx.config.train.max_madds
    cheapest, _ = cost_model(ctx.space).bounds()
    if max_madds is not None and cheapest.madds > max_madds:
        raise ValueError(f"train.max_madds={max_madds:,} cannot be met in search space "
                         f"{ctx.space.name!r}: its cheapest architecture has "
                         f"{cheapest.madds:,} multiply-adds")


def run_search_stage(ctx: RunContext, supernet_path: Path | None = None) -> dict[str, Any]:
    from fairnas.search import check_limits, run_search

    check_limits(ctx.space, ctx.config.search)  # before loading anything
    path = supernet_path or ctx.stage_dir("supernet") / "supernet.pt"
    supernet, _ = load_supernet(path, ctx.space, ctx.device)
    place_model(supernet, ctx.device, channels_last=ctx.config.eval.channels_last)
    evaluator = CandidateEvaluator(supernet, ctx.splits, ctx.config.eval, device=ctx.device)
    # Rank 0 searches and alone writes the search files; every rank scores a share of each batch.
    result = evaluate_across_ranks(
        evaluator.evaluate_many,
        lambda evaluate: run_search(ctx.space, evaluate, config=ctx.config.search,
                                    out_dir=ctx.stage_dir("search"),
                                    fingerprint=_search_fingerprint(ctx, path)),
        ctx.dist,
    )
    timings = gather_object(evaluator.timing(), ctx.dist)
    return {"front": result.front, "evaluated": len(result.records),
            "evaluation": _combined_timing(timings)}


def _search_fingerprint(ctx: RunContext, supernet_path: Path) -> dict[str, Any]:
    """What the accuracies depend on besides the search config: a resumed search must match."""
    digest = hashlib.sha256(Path(supernet_path).read_bytes()).hexdigest()
    data = {k: v for k, v in data_result_settings(ctx.config.data).items() if k != "root"}
    return {"supernet_sha256": digest, "eval": asdict(ctx.config.eval), "data": data,
            "data_content": ctx.data_digest}


def _combined_timing(timings: list[dict[str, float]]) -> dict[str, float]:
    """Evaluation figures of all ranks together: counts and rates add up, shares are weighted."""
    if len(timings) == 1:
        return timings[0]
    seconds = sum(t["seconds"] for t in timings)
    return {
        "ranks": len(timings),
        "evaluated": sum(t["evaluated"] for t in timings),
        "seconds": seconds,
        "candidates_per_second": sum(t["candidates_per_second"] for t in timings),
        "calibration_share": (sum(t["calibration_share"] * t["seconds"] for t in timings)
                              / seconds if seconds else 0.0),
    }


def chosen_architecture(ctx: RunContext) -> tuple[Architecture, dict[str, Any]]:
    """The front member to retrain, by ``train.pick`` and ``train.max_madds``."""
    from fairnas.search import load_front, select_for_retraining

    front = load_front(ctx.stage_dir("search"))
    record = select_for_retraining(front, pick=ctx.config.train.pick,
                                   max_madds=ctx.config.train.max_madds)
    return Architecture.from_string(ctx.space, record["arch"]), record


def run_retrain_stage(ctx: RunContext) -> dict[str, Any]:
    arch, record = chosen_architecture(ctx)
    logger.info("retraining %s (supernet accuracy %.4f, %d multiply-adds)", arch,
                record["accuracy"], record["madds"])
    result = train_standalone(arch, ctx.splits, ctx.config.train, ctx.stage_dir("retrain"),
                              device=ctx.device, dist=ctx.dist, extra_config=ctx.data_settings)
    return {**result, "supernet_accuracy": record["accuracy"],
            **asdict(cost_model(ctx.space).cost(arch))}


STAGE_FUNCTIONS = {
    "supernet": run_supernet_stage,
    "search": run_search_stage,
    "retrain": run_retrain_stage,
}


class Manifest:
    """``manifest.json``: which stages are done, when, and what they wrote."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / "manifest.json"
        self.data: dict[str, Any] = {"stages": {}}
        if self.path.exists():
            import json

            self.data = json.loads(self.path.read_text(encoding="utf-8"))

    def done(self, stage: str) -> bool:
        return self.data["stages"].get(stage, {}).get("status") == "done"

    def record(self, stage: str, *, seconds: float, summary: dict[str, Any],
               folder: Path) -> None:
        files = sorted(str(p.relative_to(folder.parent)) for p in folder.rglob("*")
                       if p.is_file() and not p.name.startswith("."))
        self.data["stages"][stage] = {"status": "done", "seconds": round(seconds, 1),
                                      "files": files, "summary": summary}
        atomic_write_json(self.path, self.data)


def check_rerun_config(out_dir: Path, config: RunConfig, manifest: Manifest) -> None:
    """Refuse to continue a run folder whose finished stages used a different config."""
    saved_path = out_dir / "config.yaml"
    if not saved_path.exists():
        return
    saved = yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {}
    current, defaults = config_to_dict(config), config_to_dict(RunConfig())
    # A key the saved file lacks is a setting added since; at its default it changes nothing.
    changed = [k for k in differing_keys(saved, current) if k not in HARMLESS_KEYS
               and not (_lookup(saved, k) is _MISSING
                        and _lookup(current, k) == _lookup(defaults, k))]
    for stage in STAGES:
        if not manifest.done(stage) and not (out_dir / stage).exists():
            continue
        conflicts = [k for k in changed if k.startswith(STAGE_KEYS[stage])]
        if conflicts:
            raise ValueError(
                f"{out_dir} holds a '{stage}' stage made with a different configuration "
                f"({', '.join(conflicts)} changed). Use a new --out-dir, or restore those values."
            )


def check_same_data(manifest: Manifest, digest: str) -> None:
    """Finished stages were made from these very images (a moved ``data.root`` is fine)."""
    saved = manifest.data.get("data_content")
    if saved and saved != digest and any(manifest.done(stage) for stage in STAGES):
        raise ValueError(
            f"{manifest.path.parent} holds stages made from other images than those under "
            f"data.root now (their content differs). Use a new --out-dir, or the data it used."
        )
    manifest.data["data_content"] = digest


_MISSING = object()


def _lookup(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def run_pipeline(config: RunConfig, *, dist: DistContext | None = None) -> dict[str, Any]:
    """Run (or continue) every stage; returns the report's content."""
    ctx = RunContext(config, dist=dist)
    check_feasible(ctx)
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(ctx.out_dir)
    check_rerun_config(ctx.out_dir, config, manifest)
    check_same_data(manifest, ctx.data_digest)
    if ctx.dist.is_main:
        save_config(ctx.out_dir / "config.yaml", config)
    for stage in STAGES:
        if manifest.done(stage):
            logger.info("stage %s: already done, skipped", stage)
            continue
        logger.info("stage %s: starting", stage)
        start = time.perf_counter()
        summary = STAGE_FUNCTIONS[stage](ctx)
        ctx.dist.barrier()
        if ctx.dist.is_main:
            manifest.record(stage, seconds=time.perf_counter() - start, summary=summary,
                            folder=ctx.stage_dir(stage))
    # Only rank 0 records stages; the other ranks take its manifest to build the same report.
    manifest.data = broadcast_object(manifest.data, ctx.dist)
    report = build_report(ctx, manifest)
    if ctx.dist.is_main:
        atomic_write_text(ctx.out_dir / "report.md", report["markdown"])
    return report


def build_report(ctx: RunContext, manifest: Manifest) -> dict[str, Any]:
    from fairnas.search import load_front

    front = sorted(load_front(ctx.stage_dir("search")), key=lambda r: r["madds"])
    retrain = manifest.data["stages"]["retrain"]["summary"]
    seconds = {s: manifest.data["stages"][s]["seconds"] for s in STAGES}
    lines = [
        f"# FairNAS run: {ctx.out_dir}",
        "",
        f"Space `{ctx.space.name}` ({ctx.space.size:,} architectures), sampler "
        f"`{ctx.config.supernet.sampler}`. Stage times (s): "
        + ", ".join(f"{k} {v}" for k, v in seconds.items()) + ".",
        "",
        "## Pareto front (supernet accuracy on held-out validation images)",
        "",
        "| architecture | supernet accuracy | multiply-adds | parameters |",
        "| --- | --- | ---: | ---: |",
    ]
    for record in front:
        lines.append(f"| `{record['arch']}` | {record['accuracy']:.4f} | {record['madds']:,} | "
                     f"{record['params']:,} |")
    lines += [
        "",
        "## Retrained from scratch",
        "",
        f"`{retrain['arch']}`: test accuracy **{retrain['test_accuracy']:.4f}** "
        f"(validation {retrain['val_accuracy']:.4f}, supernet {retrain['supernet_accuracy']:.4f}), "
        f"{retrain['madds']:,} multiply-adds, {retrain['params']:,} parameters, "
        f"{retrain['steps']} steps in {retrain['seconds']:.0f} s.",
        "",
    ]
    return {"front": front, "retrained": retrain, "seconds": seconds,
            "markdown": "\n".join(lines)}
