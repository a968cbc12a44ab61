"""Rank agreement between a predictor (the supernet) and the ground truth (stand-alone training).

Every score is first *oriented* so that larger means better: a loss, or any lower-is-better
score, is negated. After that a positive correlation always means "ranks like the ground
truth", +1 is the same order and -1 the reverse, whatever the raw scores measured. The
statistics are scipy's (Kendall tau-b, Spearman rho, Pearson r); the confidence intervals come
from a seeded bootstrap over architectures, which on a dozen architectures is wide, and says so.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats

logger = logging.getLogger(__name__)

CORRELATIONS = {
    "kendall_tau": stats.kendalltau,
    "spearman_rho": stats.spearmanr,
    "pearson_r": stats.pearsonr,
}
ORIENTATION = ("both scores oriented so that larger is better; +1 = the ground truth's order, "
               "-1 = its reverse, 0 = unrelated")


def oriented(values: Sequence[float], *, higher_is_better: bool) -> np.ndarray:
    """``values`` as floats, negated when lower is better."""
    array = np.asarray(values, dtype=float)
    return array if higher_is_better else -array


def _finite(value: float) -> float | None:
    """JSON has no NaN: an undefined statistic (a constant score) is stored as ``None``."""
    return float(value) if np.isfinite(value) else None


def _correlation(name: str, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    with warnings.catch_warnings():  # constant input: scipy warns and returns nan, kept as nan
        warnings.simplefilter("ignore")
        result = CORRELATIONS[name](x, y)
    return float(result.statistic), float(result.pvalue)


def bootstrap_intervals(
    x: np.ndarray, y: np.ndarray, *, resamples: int, seed: int, confidence: float,
) -> dict[str, dict[str, float | int]]:
    """Percentile intervals of every correlation, resampling architectures with replacement.

    Resamples in which a score is constant (the correlation is undefined) are dropped and
    counted; the same resamples serve all three correlations.
    """
    rng = np.random.default_rng(seed)
    rows = rng.integers(len(x), size=(resamples, len(x)))
    tail = (1 - confidence) / 2 * 100
    intervals = {}
    for name in CORRELATIONS:
        values = np.array([_correlation(name, x[row], y[row])[0] for row in rows])
        values = values[np.isfinite(values)]
        low, high = (np.percentile(values, [tail, 100 - tail]) if len(values)
                     else (np.nan, np.nan))
        intervals[name] = {"low": _finite(low), "high": _finite(high),
                           "resamples": int(len(values))}
    return intervals


def top_k_overlap(predicted: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Share of the ground truth's best ``k`` that are also among the predictor's best ``k``.

    Ties are broken by position (stable sort); chance level is ``k / n``.
    """
    best_predicted = set(np.argsort(-predicted, kind="stable")[:k].tolist())
    best_truth = set(np.argsort(-truth, kind="stable")[:k].tolist())
    return len(best_predicted & best_truth) / k


def rank_agreement(
    predicted: Sequence[float],
    truth: Sequence[float],
    *,
    predicted_higher_is_better: bool = True,
    truth_higher_is_better: bool = True,
    resamples: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
    top_k: Sequence[int] = (5, 10),
) -> dict[str, Any]:
    """Kendall tau, Spearman rho and Pearson r with p-values and bootstrap intervals; top-k.

    Also the ground-truth rank (1 = best) of the predictor's favourite, the architecture a
    search with this predictor would pick.
    """
    x = oriented(predicted, higher_is_better=predicted_higher_is_better)
    y = oriented(truth, higher_is_better=truth_higher_is_better)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"predicted and truth should be equal-length vectors, got "
                         f"{x.shape} and {y.shape}")
    if len(x) < 3:
        raise ValueError(f"rank agreement needs at least 3 architectures, got {len(x)}")
    result: dict[str, Any] = {"n": len(x), "orientation": ORIENTATION}
    intervals = (bootstrap_intervals(x, y, resamples=resamples, seed=seed, confidence=confidence)
                 if resamples > 0 else {})
    for name in CORRELATIONS:
        value, p_value = _correlation(name, x, y)
        result[name] = {"value": _finite(value), "p_value": _finite(p_value),
                        "ci": intervals.get(name)}
    result["confidence"] = confidence
    result["top_k"] = {str(k): {"overlap": top_k_overlap(x, y, k), "chance": k / len(x)}
                       for k in top_k if k < len(x)}
    favourite = int(np.argmax(x))
    result["predicted_best_truth_rank"] = int((y > y[favourite]).sum()) + 1
    return result


def seed_agreement(accuracies: np.ndarray) -> dict[str, Any] | None:
    """How well one stand-alone seed ranks like another: the ceiling any predictor faces.

    ``accuracies`` is (architectures, seeds); returns the mean Kendall tau over seed pairs and
    the mean per-architecture standard deviation, or ``None`` with fewer than two seeds.
    """
    _, seeds = accuracies.shape
    if seeds < 2:
        return None
    taus = [_correlation("kendall_tau", accuracies[:, a], accuracies[:, b])[0]
            for a in range(seeds) for b in range(a + 1, seeds)]
    return {
        "seeds": seeds,
        "kendall_tau_between_seeds": _finite(np.nanmean(taus)) if np.isfinite(taus).any()
        else None,
        "pairs": len(taus),
        "mean_std": float(accuracies.std(axis=1, ddof=1).mean()),
        "spread_of_means": float(accuracies.mean(axis=1).max() - accuracies.mean(axis=1).min()),
    }
