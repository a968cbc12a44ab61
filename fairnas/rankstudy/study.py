"""Running a ranking study: architectures, supernets, one-shot scores, stand-alone ground truth.

Layout of the output folder::

    config.yaml                       the resolved configuration
    archs.json                        the ranked architectures and the histogram sample
    supernets/<sampler>/              checkpoint.pt, supernet.pt, ledger.json, summary.json, ...
    scores/<sampler>.json             one-shot accuracy of every architecture on that supernet
    standalone/<arch>/seed<k>/        result.json, model.pt, checkpoint.pt, metrics.jsonl
    stats.json, report.md, *.png      rebuilt from the files above on every run

Every piece is written atomically once finished and skipped when found, so an interrupted study
resumes where it stopped: a supernet from its last checkpoint, a stand-alone model from its own
checkpoint, and nothing finished is trained again. Stand-alone models are trained seed by seed
(all architectures with seed 0 first), so an interrupted study already holds a full ranking.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import yaml

from fairnas import training
from fairnas.arch import Architecture
from fairnas.config import ConfigError, save_config
from fairnas.costs import cost_model
from fairnas.data import DataSplits
from fairnas.evaluate import CandidateEvaluator
from fairnas.io import atomic_write_json
from fairnas.network import Supernet
from fairnas.pipeline import check_space_fits_data, load_splits_for_space, load_supernet
from fairnas.rankstudy.archs import stratified_architectures
from fairnas.rankstudy.config import (
    RERUN_SAFE_KEYS,
    RankStudyConfig,
    budget_passes,
    changed_keys,
    checkpoint_interval,
    paths_per_step,
    supernet_config_for,
)
from fairnas.space import SearchSpace, get_space

logger = logging.getLogger(__name__)


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def parameter_checksum(model: torch.nn.Module) -> str:
    """A short hash of every parameter and buffer: equal for identically initialised models."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def data_usage(config: RankStudyConfig, sampler: str, num_choices: int,
               train_images: int) -> dict[str, Any]:
    """Which batches a sampler's supernet reads, following ``train_supernet``'s indexing.

    The study's batches come from one seeded order (``BatchPlan``); step ``s`` of a sampler that
    reads ``b`` batches per step uses global batches ``s*b .. s*b+b-1``, and an epoch of that
    sampler is ``(len(plan) // b) * b`` batches long, after which the next epoch's order starts.
    """
    template = config.supernet
    per_step = paths_per_step(sampler, num_choices)
    batches_per_step = 1 if template.shared_batch else per_step
    steps = budget_passes(config, num_choices) // per_step
    plan_batches = train_images // template.batch_size
    epoch_batches = (plan_batches // batches_per_step) * batches_per_step
    batches = steps * batches_per_step
    return {
        "paths_per_step": per_step,
        "batches_per_step": batches_per_step,
        "steps": steps,
        "batches": batches,
        "images": batches * template.batch_size,
        "epoch_batches": epoch_batches,
        "data_epochs": batches / max(epoch_batches, 1),
    }


class RankStudy:
    """One study folder: builds what is missing, then the statistics and the report."""

    def __init__(self, config: RankStudyConfig, *, splits: DataSplits | None = None) -> None:
        self.config = config
        self.out_dir = Path(config.out_dir)
        self.device = torch.device(config.device)
        if splits is not None:
            self.__dict__["splits"] = splits  # preloaded data (tests), checked like loaded data
            check_space_fits_data(self.space, splits)
        if config.threads:
            torch.set_num_threads(config.threads)

    @cached_property
    def space(self) -> SearchSpace:
        return get_space(self.config.space)

    @cached_property
    def splits(self) -> DataSplits:
        return load_splits_for_space(self.config.data, self.space)

    # -- set-up --------------------------------------------------------------------------------

    def check_rerun(self) -> None:
        """Refuse to mix results made under a configuration that changes what they mean."""
        saved_path = self.out_dir / "config.yaml"
        if not saved_path.exists():
            return
        saved = yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {}
        changed = [key for key in changed_keys(saved, asdict(self.config))
                   if key not in RERUN_SAFE_KEYS]
        if changed:
            raise ConfigError(
                f"{self.out_dir} holds a study made with a different configuration "
                f"({', '.join(changed)} changed). Use a new --out-dir, or restore those values."
            )

    @cached_property
    def architectures(self) -> list[Architecture]:
        return stratified_architectures(self.space, self.config.num_archs,
                                        seed=self.config.arch_seed)

    @cached_property
    def histogram_architectures(self) -> list[Architecture]:
        if self.config.histogram_samples == 0:
            return []
        return stratified_architectures(self.space, self.config.histogram_samples,
                                        seed=self.config.arch_seed + 1)

    def write_architectures(self) -> None:
        """``archs.json``; an existing file must list the same architectures."""
        costs = cost_model(self.space)
        rows = [{"arch": str(a), **asdict(costs.cost(a))} for a in self.architectures]
        path = self.out_dir / "archs.json"
        if path.exists():
            old = [row["arch"] for row in _read_json(path)["archs"]]
            if old != [row["arch"] for row in rows]:
                raise ValueError(f"{path} lists other architectures than this configuration "
                                 f"draws; use a new --out-dir")
        atomic_write_json(path, {
            "space": self.space.name,
            "stratified_by": "multiply-adds, equal-width strata, one architecture each",
            "archs": rows,
            "histogram": [str(a) for a in self.histogram_architectures],
        })

    # -- supernets -----------------------------------------------------------------------------

    def supernet_dir(self, sampler: str) -> Path:
        return self.out_dir / "supernets" / sampler

    def train_supernet(self, sampler: str) -> dict[str, Any]:
        """Train (or resume, or skip) one sampler's supernet; returns its ``summary.json``."""
        folder = self.supernet_dir(sampler)
        summary_path = folder / "summary.json"
        m = self.space.num_choices
        sn_config = supernet_config_for(self.config, sampler, m)
        if summary_path.exists() and (folder / "supernet.pt").exists():
            summary = _read_json(summary_path)
            changed = [k for k in changed_keys(summary["config"], asdict(sn_config))
                       if k != "log_interval"]
            if changed:
                raise ConfigError(f"{folder} was trained with another supernet configuration "
                                  f"({', '.join(changed)} changed); use a new --out-dir")
            return summary

        # Same seed for every sampler: the same initial weights and the same data order.
        torch.manual_seed(sn_config.seed)
        supernet = Supernet(self.space)
        init_checksum = parameter_checksum(supernet)
        logger.info("supernet %s: %d steps of %d paths (%d single-path passes)", sampler,
                    sn_config.max_steps, paths_per_step(sampler, m), budget_passes(self.config, m))
        result = training.train_supernet(
            supernet, self.splits, sn_config, folder, device=self.device,
            checkpoint_every=checkpoint_interval(self.config, sampler, m),
        )
        summary = {"sampler": sampler, "config": asdict(sn_config), "init_checksum": init_checksum,
                   "seconds": result["seconds"], "steps": result["steps"],
                   "ledger": result["ledger"],
                   "data": data_usage(self.config, sampler, m, len(self.splits.train))}
        atomic_write_json(summary_path, summary)
        return summary

    # -- one-shot scores -----------------------------------------------------------------------

    def scores_path(self, sampler: str) -> Path:
        return self.out_dir / "scores" / f"{sampler}.json"

    def score(self, sampler: str) -> dict[str, Any]:
        """One-shot accuracy of every study and histogram architecture on this supernet.

        Scores already in the file are kept; the file is rewritten once the missing ones are
        done (a changed histogram size scores only the new architectures).
        """
        path = self.scores_path(sampler)
        saved = _read_json(path) if path.exists() else {"scores": {}, "seconds": 0.0}
        if changed_keys(saved.get("eval", {}), asdict(self.config.eval)):
            raise ConfigError(f"{path} was scored with other eval settings; use a new --out-dir")
        wanted = list(dict.fromkeys(self.architectures + self.histogram_architectures))
        missing = [a for a in wanted if str(a) not in saved["scores"]]
        if not missing:
            return saved

        supernet, _ = load_supernet(self.supernet_dir(sampler) / "supernet.pt", self.space,
                                    self.device)
        evaluator = CandidateEvaluator(supernet, self.splits, self.config.eval,
                                       device=self.device)
        start = time.perf_counter()
        for number, arch in enumerate(missing, 1):
            saved["scores"][str(arch)] = evaluator.evaluate(arch)
            if number % 20 == 0 or number == len(missing):
                logger.info("scores %s: %d/%d architectures", sampler, number, len(missing))
        saved.update(sampler=sampler, eval=asdict(self.config.eval),
                     seconds=saved["seconds"] + time.perf_counter() - start)
        atomic_write_json(path, saved)
        return saved

    # -- stand-alone ground truth --------------------------------------------------------------

    def standalone_dir(self, arch: Architecture, seed_index: int) -> Path:
        return self.out_dir / "standalone" / str(arch) / f"seed{seed_index}"

    def train_standalone_models(self) -> None:
        """Train every (architecture, seed) without a ``result.json``, seed by seed."""
        jobs = [(k, arch) for k in range(self.config.seeds_per_arch)
                for arch in self.architectures]
        missing = [(k, a) for k, a in jobs
                   if not (self.standalone_dir(a, k) / "result.json").exists()]
        logger.info("stand-alone: %d of %d models finished, %d to train", len(jobs) - len(missing),
                    len(jobs), len(missing))
        for number, (k, arch) in enumerate(missing, 1):
            train_config = replace(self.config.standalone, seed=self.config.standalone.seed + k)
            result = training.train_standalone(arch, self.splits, train_config,
                                               self.standalone_dir(arch, k), device=self.device)
            logger.info("stand-alone %d/%d: %s seed %d: test %.4f, val %.4f (%.0f s)", number,
                        len(missing), arch, k, result["test_accuracy"], result["val_accuracy"],
                        result["seconds"])

    def ground_truth(self) -> dict[str, list[dict[str, Any] | None]]:
        """Per architecture, the ``result.json`` of each seed (``None`` where not finished)."""
        truth = {}
        for arch in self.architectures:
            results = []
            for k in range(self.config.seeds_per_arch):
                path = self.standalone_dir(arch, k) / "result.json"
                results.append(_read_json(path) if path.exists() else None)
            truth[str(arch)] = results
        return truth

    # -- the whole study -----------------------------------------------------------------------

    def run(self, *, report_only: bool = False) -> dict[str, Any]:
        """Build whatever is missing (unless ``report_only``), then statistics and report."""
        from fairnas.rankstudy.report import write_report

        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.check_rerun()
        save_config(self.out_dir / "config.yaml", self.config)
        self.write_architectures()
        if not report_only:
            for sampler in self.config.samplers:
                self.train_supernet(sampler)
            for sampler in self.config.samplers:
                self.score(sampler)
            self.train_standalone_models()
        return write_report(self)

    def supernet_summaries(self) -> dict[str, dict[str, Any]]:
        """``summary.json`` plus the full ``ledger.json`` of every finished supernet."""
        summaries = {}
        for sampler in self.config.samplers:
            folder = self.supernet_dir(sampler)
            if (folder / "summary.json").exists() and (folder / "ledger.json").exists():
                summaries[sampler] = {**_read_json(folder / "summary.json"),
                                      "ledger_table": _read_json(folder / "ledger.json")}
        return summaries

    def saved_scores(self) -> dict[str, dict[str, Any]]:
        """Per scored sampler, its ``scores/<sampler>.json`` (``scores``: arch -> accuracy)."""
        return {s: _read_json(self.scores_path(s)) for s in self.config.samplers
                if self.scores_path(s).exists()}


def run_rank_study(config: RankStudyConfig, *, splits: DataSplits | None = None,
                   report_only: bool = False) -> dict[str, Any]:
    """Run (or resume, or only report) a ranking study; returns the statistics."""
    return RankStudy(config, splits=splits).run(report_only=report_only)
