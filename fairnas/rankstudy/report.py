"""Statistics, figures and the Markdown report of a ranking study, rebuilt from its files.

Works on a partial study too (some stand-alone models still missing): the statistics then cover
the architectures with at least one finished stand-alone model, and the report says how many.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from fairnas.costs import cost_model
from fairnas.io import atomic_write_json, atomic_write_text
from fairnas.rankstudy.config import budget_passes
from fairnas.rankstudy.stats import ORIENTATION, rank_agreement, seed_agreement

if TYPE_CHECKING:
    from fairnas.rankstudy.study import RankStudy

logger = logging.getLogger(__name__)

# Kendall tau between supernet and stand-alone top-1, ImageNet, about 13 models (paper, Fig. 1).
PAPER_TAU = {"strict": 0.9487, "uniform": 0.6153, "expectation": 0.4781}
SAMPLER_NAMES = {"strict": "strict fairness (FairNAS)", "uniform": "uniform single path (SPOS)",
                 "expectation": "expectation fairness"}


def _agreement(study: RankStudy, predicted: list[float], truth: list[float]) -> dict[str, Any]:
    """Both are accuracies (or sizes read as "bigger is better"): higher is better for both."""
    config = study.config
    return rank_agreement(predicted, truth, predicted_higher_is_better=True,
                          truth_higher_is_better=True, resamples=config.bootstrap,
                          seed=config.bootstrap_seed, confidence=config.confidence,
                          top_k=config.top_k)


def _ground_truth_table(study: RankStudy) -> list[dict[str, Any]]:
    """One row per architecture: costs, per-seed ground truth, mean and spread."""
    costs = cost_model(study.space)
    metric = study.config.ground_truth
    truth = study.ground_truth()
    rows = []
    for arch in study.architectures:
        results = truth[str(arch)]
        values = [r[metric] for r in results if r is not None]
        cost = costs.cost(arch)
        rows.append({
            "arch": str(arch), "madds": cost.madds, "params": cost.params,
            "seeds": [None if r is None else r[metric] for r in results],
            "mean": float(np.mean(values)) if values else None,
            "std": float(np.std(values, ddof=1)) if len(values) > 1 else None,
        })
    return rows


def _budgets(study: RankStudy, supernets: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What every supernet actually did, read back from its ledger."""
    per_sampler = {}
    for sampler, summary in supernets.items():
        ledger = summary["ledger_table"]
        per_sampler[sampler] = {
            "steps": ledger["steps"], "single_path_passes": ledger["single_path_passes"],
            "updates_min": ledger["updates_min"], "updates_max": ledger["updates_max"],
            "passes_min": ledger["passes_min"], "passes_max": ledger["passes_max"],
            "strictly_fair": ledger["strictly_fair"], "skipped_steps": ledger["skipped_steps"],
            "updates": ledger["updates"], "passes": ledger["passes"],
            "data": summary["data"], "init_checksum": summary["init_checksum"],
            "seconds": summary["seconds"],
        }
    passes = {b["single_path_passes"] for b in per_sampler.values()}
    inits = {b["init_checksum"] for b in per_sampler.values()}
    target = budget_passes(study.config, study.space.num_choices)
    return {
        "target_passes": target, "equal_passes": passes <= {target}, "same_init": len(inits) <= 1,
        "shared_batch": study.config.supernet.shared_batch, "samplers": per_sampler,
    }


def compute_statistics(study: RankStudy) -> dict[str, Any]:
    """Everything the report shows, as plain data (also written as ``stats.json``)."""
    table = _ground_truth_table(study)
    score_files = study.saved_scores()
    scores = {sampler: saved["scores"] for sampler, saved in score_files.items()}
    supernets = study.supernet_summaries()
    finished = [row for row in table if row["mean"] is not None]
    truth = [row["mean"] for row in finished]
    for row in table:
        row["supernet"] = {s: scores[s].get(row["arch"]) for s in scores}

    agreement, baselines = {}, {}
    if len(finished) >= 3:
        for sampler, by_arch in scores.items():
            agreement[sampler] = _agreement(study, [by_arch[r["arch"]] for r in finished], truth)
        # Cost as a predictor ("bigger is better"): a supernet that cannot beat it adds nothing.
        for cost in ("madds", "params"):
            baselines[cost] = _agreement(study, [r[cost] for r in finished], truth)
    complete = [row["seeds"] for row in table if all(v is not None for v in row["seeds"])]
    noise = seed_agreement(np.array(complete)) if len(complete) >= 3 else None

    histogram = {s: [by_arch[str(a)] for a in study.histogram_architectures if str(a) in by_arch]
                 for s, by_arch in scores.items()}
    return {
        "orientation": ORIENTATION,
        "predictor": "one-shot top-1 on the held-out validation split (higher is better)",
        "ground_truth": f"stand-alone {study.config.ground_truth}, mean over finished seeds "
                        f"(higher is better)",
        "architectures": len(table), "with_ground_truth": len(finished),
        "agreement": agreement, "baselines": baselines, "ground_truth_noise": noise,
        "budgets": _budgets(study, supernets),
        "histogram": {s: {"n": len(v), "mean": float(np.mean(v)), "std": float(np.std(v)),
                          "min": float(np.min(v)), "max": float(np.max(v)), "values": v}
                      for s, v in histogram.items() if v},
        "table": table,
        "seconds": {
            "supernets": {s: b["seconds"] for s, b in supernets.items()},
            "scores": {s: saved["seconds"] for s, saved in score_files.items()},
            "standalone": sum(r["seconds"] for results in study.ground_truth().values()
                              for r in results if r is not None),
        },
        "paper_kendall_tau": PAPER_TAU,
    }


def write_report(study: RankStudy) -> dict[str, Any]:
    """``stats.json``, the figures and ``report.md``; returns the statistics."""
    from fairnas.rankstudy.figures import histogram_figure, ledger_figure, scatter_figure
    from fairnas.rankstudy.markdown import render_report

    stats = compute_statistics(study)
    out = study.out_dir
    if not stats["budgets"]["equal_passes"]:
        logger.warning("the supernets made different numbers of single-path passes: %s",
                       {s: b["single_path_passes"]
                        for s, b in stats["budgets"]["samplers"].items()})
    figures = {
        "scatter": scatter_figure(stats, study.config.samplers, out / "scatter.png"),
        "histogram": histogram_figure(stats, study.config.samplers, out / "histogram.png"),
        "ledger": ledger_figure(stats, study.space, study.config.samplers, out / "ledger.png"),
    }
    stats["figures"] = {name: path.name for name, path in figures.items() if path is not None}
    atomic_write_json(out / "stats.json", stats)
    atomic_write_text(out / "report.md", render_report(study, stats))
    logger.info("report: %s (stats.json, %s)", out / "report.md",
                ", ".join(stats["figures"].values()))
    return stats
