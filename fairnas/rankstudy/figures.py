"""PNG figures of a ranking study: supernet against stand-alone, one-shot histograms, ledgers.

One panel per sampler in every figure, in the configured sampler order, with shared axes so the
panels can be compared by eye. Matplotlib runs on the Agg backend: no display is needed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fairnas.io import atomic_write  # noqa: E402
from fairnas.space import SearchSpace  # noqa: E402

logger = logging.getLogger(__name__)


def _save(figure: plt.Figure, path: Path) -> Path:
    atomic_write(path, lambda handle: figure.savefig(handle, format="png", dpi=110))
    plt.close(figure)
    return path


def _panels(count: int, *, width: float = 4.2, height: float = 3.8,
            **options: Any) -> tuple[plt.Figure, list[plt.Axes]]:
    figure, axes = plt.subplots(1, count, figsize=(width * count, height), squeeze=False,
                                layout="constrained", **options)
    return figure, list(axes[0])


def _tau_title(sampler: str, agreement: dict[str, Any] | None) -> str:
    if agreement is None:
        return f"{sampler}: no ground truth yet"
    tau = agreement["kendall_tau"]
    if tau["value"] is None:
        return f"{sampler}: Kendall tau undefined (constant scores), n={agreement['n']}"
    text = f"{sampler}: Kendall tau {tau['value']:.3f}, n={agreement['n']}"
    if tau["ci"] is not None and tau["ci"]["low"] is not None:
        low, high = tau["ci"]["low"], tau["ci"]["high"]
        text += f"\n{agreement['confidence']:.0%} CI [{low:.2f}, {high:.2f}]"
    return text


def scatter_figure(stats: dict[str, Any], samplers: list[str], path: Path) -> Path | None:
    """Supernet (one-shot) accuracy against stand-alone accuracy, coloured by multiply-adds."""
    rows = [r for r in stats["table"] if r["mean"] is not None]
    shown = [s for s in samplers if s in stats["agreement"]]
    if not rows or not shown:
        return None
    figure, axes = _panels(len(shown), sharex=True)
    truth = np.array([r["mean"] for r in rows])
    spread = np.array([r["std"] or 0.0 for r in rows])
    madds = np.array([r["madds"] for r in rows]) / 1e6
    for ax, sampler in zip(axes, shown, strict=True):
        one_shot = np.array([r["supernet"][sampler] for r in rows])
        ax.errorbar(truth, one_shot, xerr=spread, fmt="none", ecolor="0.6", lw=0.8, zorder=1)
        points = ax.scatter(truth, one_shot, c=madds, cmap="viridis", s=28, zorder=2)
        ax.set_title(_tau_title(sampler, stats["agreement"][sampler]), fontsize=10)
        ax.set_xlabel("stand-alone accuracy (mean over seeds)")
        ax.set_ylabel("one-shot accuracy (supernet)")
        ax.grid(alpha=0.3)
    figure.colorbar(points, ax=axes, label="multiply-adds (M)", fraction=0.03)
    return _save(figure, path)


def histogram_figure(stats: dict[str, Any], samplers: list[str], path: Path) -> Path | None:
    """One-shot accuracies of the larger stratified sample, one histogram per sampler."""
    shown = [s for s in samplers if s in stats["histogram"]]
    if not shown:
        return None
    values = np.concatenate([stats["histogram"][s]["values"] for s in shown])
    bins = np.linspace(values.min(), values.max() + 1e-9, 25)
    figure, axes = _panels(len(shown), height=3.2, sharex=True)
    for ax, sampler in zip(axes, shown, strict=True):
        summary = stats["histogram"][sampler]
        ax.hist(summary["values"], bins=bins, color="tab:blue", alpha=0.8)
        ax.axvline(summary["mean"], color="k", ls="--", lw=1)
        ax.set_title(f"{sampler}: mean {summary['mean']:.3f}, n={summary['n']}", fontsize=10)
        ax.set_xlabel("one-shot accuracy")
        ax.set_ylabel("architectures")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    return _save(figure, path)


def ledger_figure(stats: dict[str, Any], space: SearchSpace, samplers: list[str],
                  path: Path) -> Path | None:
    """Optimizer updates per choice block (layers x choices), numbers written in the cells."""
    budgets = stats["budgets"]["samplers"]
    shown = [s for s in samplers if s in budgets]
    if not shown:
        return None
    largest = max(max(max(row) for row in budgets[s]["updates"]) for s in shown)
    layers, choices = len(space.searchable_layers), space.num_choices
    figure, axes = _panels(len(shown), width=0.6 * choices + 2.2, height=0.45 * layers + 1.8)
    for ax, sampler in zip(axes, shown, strict=True):
        ledger = budgets[sampler]
        updates = np.array(ledger["updates"])
        ax.imshow(updates, cmap="Blues", vmin=0, vmax=largest, aspect="auto")
        for (layer, choice), value in np.ndenumerate(updates):
            ax.text(choice, layer, str(value), ha="center", va="center", fontsize=7,
                    color="white" if value > 0.6 * largest else "black")
        ax.set_xticks(range(choices), space.choice_tokens, rotation=45, fontsize=8)
        ax.set_yticks(range(layers), [str(i) for i in space.searchable_layers], fontsize=8)
        ax.set_xlabel("choice")
        ax.set_ylabel("layer")
        ax.set_title(f"{sampler}: {ledger['steps']} updates, {ledger['single_path_passes']} "
                     f"passes\nupdates per block {ledger['updates_min']}-"
                     f"{ledger['updates_max']}", fontsize=9)
    return _save(figure, path)
