"""The Markdown report of a ranking study, from the statistics ``report.compute_statistics`` makes.

Written for a reader who did not run the study: what was compared, under which budgets and
data, how to read the signs, how wide the uncertainty is, and what the paper reported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fairnas.rankstudy.report import PAPER_TAU, SAMPLER_NAMES

if TYPE_CHECKING:
    from fairnas.rankstudy.study import RankStudy

METRIC_NAMES = {"kendall_tau": "Kendall tau", "spearman_rho": "Spearman rho",
                "pearson_r": "Pearson r"}


def _number(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _metric_cell(metric: dict[str, Any]) -> str:
    if metric["value"] is None:
        return "undefined (a score is constant)"
    text = _number(metric["value"], "+.3f")
    ci = metric["ci"]
    if ci is not None:
        text += f" [{_number(ci['low'], '+.2f')}, {_number(ci['high'], '+.2f')}]"
    return text + f" (p={_number(metric['p_value'], '.2g')})"


def _agreement_row(label: str, agreement: dict[str, Any], top_k: list[str]) -> str:
    cells = [_metric_cell(agreement[name]) for name in METRIC_NAMES]
    cells += [f"{agreement['top_k'][k]['overlap']:.2f} ({agreement['top_k'][k]['chance']:.2f})"
              for k in top_k]
    cells.append(str(agreement["predicted_best_truth_rank"]))
    return f"| {label} | " + " | ".join(cells) + " |"


def _results_section(stats: dict[str, Any], samplers: list[str]) -> list[str]:
    agreement = stats["agreement"]
    if not agreement:
        return ["No statistics yet: fewer than 3 architectures have a finished stand-alone "
                "model, or no supernet has been scored.", ""]
    any_row = next(iter(agreement.values()))
    top_k = list(any_row["top_k"])
    confidence = f"{any_row['confidence']:.0%}"
    lines = [
        f"Each cell: value [{confidence} bootstrap interval] (p-value). Top-k: share of the "
        f"stand-alone top k that the predictor also puts in its top k (chance level in "
        f"parentheses). Pick rank: stand-alone rank (1 = best of {any_row['n']}) of the "
        f"architecture the predictor ranks first.",
        "",
    ]
    header = ["predictor", *METRIC_NAMES.values(), *(f"top-{k}" for k in top_k), "pick rank"]
    lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for sampler in samplers:
        if sampler in agreement:
            lines.append(_agreement_row(f"supernet, {sampler}", agreement[sampler], top_k))
    for cost, agreement_row in stats["baselines"].items():
        lines.append(_agreement_row(f"baseline: {cost} (more is better)", agreement_row, top_k))
    lines += [
        "",
        f"Direction: {stats['orientation']}. Predictor: {stats['predictor']}. Ground truth: "
        f"{stats['ground_truth']}. The cost baselines rank by size alone; a supernet that does "
        f"not beat them tells a search nothing that counting multiply-adds would not.",
        "",
    ]
    return lines


def _budget_section(study: RankStudy, stats: dict[str, Any]) -> list[str]:
    budgets = stats["budgets"]
    samplers = [s for s in study.config.samplers if s in budgets["samplers"]]
    m = study.space.num_choices
    lines = [
        f"Every supernet was given {budgets['target_passes']:,} single-path forward+backward "
        f"passes (strict fairness and expectation fairness make {m} per optimizer step, uniform "
        f"sampling one, so uniform takes {m} times the steps). Read back from the ledgers, the "
        f"passes are **{'equal' if budgets['equal_passes'] else 'NOT equal'}** across samplers; "
        f"initial weights are **{'identical' if budgets['same_init'] else 'DIFFERENT'}** "
        f"(same seed, parameter checksum below). Warm-up is scaled with the steps, so the "
        f"learning rate is the same function of the passes made for every sampler.",
        "",
        "| sampler | paths/step | optimizer steps | single-path passes | updates per block | "
        "passes per block | strictly fair | batches read | images | data epochs | init |",
        "| --- | ---: | ---: | ---: | --- | --- | --- | ---: | ---: | ---: | --- |",
    ]
    for sampler in samplers:
        b = budgets["samplers"][sampler]
        data = b["data"]
        lines.append(
            f"| {sampler} | {data['paths_per_step']} | {b['steps']:,} | "
            f"{b['single_path_passes']:,} | {b['updates_min']}-{b['updates_max']} | "
            f"{b['passes_min']}-{b['passes_max']} | {'yes' if b['strictly_fair'] else 'no'} | "
            f"{data['batches']:,} | {data['images']:,} | {data['data_epochs']:.2f} | "
            f"`{b['init_checksum'][:8]}` |"
        )
    return lines + ["", _data_sentence(study, budgets, samplers), ""]


def _data_sentence(study: RankStudy, budgets: dict[str, Any], samplers: list[str]) -> str:
    """What "the same data" means under equal passes, for the configured batch sharing."""
    data = [budgets["samplers"][s]["data"] for s in samplers]
    if not data:
        return ""
    m = study.space.num_choices
    if budgets["shared_batch"]:
        return (f"Data (`shared_batch: true`): all samplers read the same seeded batch order, "
                f"but the {m} paths of a strict or expectation step share one batch, so those "
                f"supernets read {m} times fewer distinct batches than uniform sampling, which "
                f"reads one batch per pass. The budgets of passes are equal; the data seen are "
                f"not.")
    periods = {d["epoch_batches"] for d in data}
    same = len(periods) == 1 or max(d["batches"] for d in data) <= min(periods)
    text = ("Data (`shared_batch: false`, the study's default): one batch per single-path "
            "pass, taken in turn from one seeded order, so pass j of every sampler reads "
            "batch j. The samplers differ only in which paths they draw and how passes are "
            "grouped into optimizer updates.")
    if same:
        return text + " Every supernet read the very same sequence of batches."
    return text + (f" CAUTION: the training set holds a number of batches that is not a "
                   f"multiple of {m}, and the budget spans more than one epoch, so after the "
                   f"first epoch the samplers' batch sequences drift apart. Set data.train_limit "
                   f"to a multiple of {m} x supernet.batch_size to make them identical.")


def _noise_section(stats: dict[str, Any]) -> list[str]:
    noise = stats["ground_truth_noise"]
    if noise is None:
        return ["One stand-alone seed per architecture: the noise of the ground truth itself is "
                "not measured (set seeds_per_arch to 2 or more to measure it).", ""]
    return [
        f"Two stand-alone trainings of the same architecture with different seeds agree with "
        f"Kendall tau **{_number(noise['kendall_tau_between_seeds'], '.3f')}** (mean over "
        f"{noise['pairs']} "
        f"seed pair(s)); the mean standard deviation across seeds is {noise['mean_std']:.4f}, "
        f"against a spread of {noise['spread_of_means']:.4f} between the best and worst "
        f"architecture. No predictor can be expected to rank much better than one seed ranks "
        f"another; the ground truth used here averages the seeds, which is steadier.",
        "",
    ]


def _table_section(stats: dict[str, Any], samplers: list[str]) -> list[str]:
    shown = [s for s in samplers if any(s in r["supernet"] for r in stats["table"])]
    lines = ["| architecture | multiply-adds | parameters | stand-alone (per seed) | mean | "
             + " | ".join(f"one-shot {s}" for s in shown) + " |",
             "| --- | ---: | ---: | --- | ---: | " + " | ".join("---:" for _ in shown) + " |"]
    for row in sorted(stats["table"], key=lambda r: r["madds"]):
        seeds = ", ".join("-" if v is None else f"{v:.4f}" for v in row["seeds"])
        mean = "-" if row["mean"] is None else f"{row['mean']:.4f}"
        scores = " | ".join("-" if row["supernet"].get(s) is None else f"{row['supernet'][s]:.4f}"
                            for s in shown)
        lines.append(f"| `{row['arch']}` | {row['madds']:,} | {row['params']:,} | {seeds} | "
                     f"{mean} | {scores} |")
    return lines + [""]


def _setup_lines(study: RankStudy, stats: dict[str, Any]) -> list[str]:
    config, splits = study.config, study.splits
    train = config.standalone
    return [
        f"- Space `{study.space.name}`: {len(study.space.searchable_layers)} searchable layers x "
        f"{study.space.num_choices} choices ({study.space.size:,} architectures).",
        f"- Data `{config.data.dataset}`: {len(splits.train):,} training images; supernets are "
        f"scored on {config.eval.val_images or len(splits.val):,} held-out validation images "
        f"after exact BN recalibration on {config.eval.calib_images:,} training images; "
        f"stand-alone models report `{config.ground_truth}` ({len(splits.test):,} test images).",
        f"- {stats['architectures']} architectures, one per equal-width multiply-add stratum "
        f"(seed {config.arch_seed}), the same set for every sampler; "
        f"{stats['with_ground_truth']} of them have a finished stand-alone model.",
        f"- Stand-alone recipe: {train.epochs:g} epoch(s), batch {train.batch_size}, lr "
        f"{train.lr:g} (warm-up {train.warmup_steps} steps, cosine), label smoothing "
        f"{train.label_smoothing:g}, {config.seeds_per_arch} seed(s) per architecture.",
        f"- Supernet template: batch {config.supernet.batch_size}, lr {config.supernet.lr:g}, "
        f"gradients of a step's paths combined by `{config.supernet.grad_reduction}`, seed "
        f"{config.supernet.seed}.",
        "",
    ]


def render_report(study: RankStudy, stats: dict[str, Any]) -> str:
    samplers = study.config.samplers
    figures = stats.get("figures", {})
    lines = [
        "# Ranking study: does the supernet rank architectures like stand-alone training?",
        "",
        *_setup_lines(study, stats),
        "## Rank agreement with stand-alone training",
        "",
        *_results_section(stats, samplers),
        "The paper reports Kendall tau on about 13 ImageNet models: "
        + ", ".join(f"{SAMPLER_NAMES[s]} {t}" for s, t in PAPER_TAU.items())
        + ". With so few architectures the bootstrap intervals above show how far one such "
        "number can move.",
        "",
        "## Ground-truth noise",
        "",
        *_noise_section(stats),
        "## Equal budgets",
        "",
        *_budget_section(study, stats),
    ]
    if "scatter" in figures:
        lines += ["## Supernet against stand-alone accuracy", "",
                  f"![scatter]({figures['scatter']})", ""]
    if "histogram" in figures:
        lines += [f"## One-shot accuracies of {study.config.histogram_samples} stratified "
                  f"architectures", "", f"![histogram]({figures['histogram']})", ""]
    if "ledger" in figures:
        lines += ["## Ledger: optimizer updates per choice block", "",
                  f"![ledger]({figures['ledger']})", ""]
    lines += ["## Every architecture", "", *_table_section(stats, samplers)]
    seconds = stats["seconds"]
    lines += ["## Compute", "",
              "Supernet training (s): " + ", ".join(f"{s} {v:.0f}" for s, v in
                                                   seconds["supernets"].items())
              + ". Scoring (s): " + ", ".join(f"{s} {v:.0f}" for s, v in
                                               seconds["scores"].items())
              + f". Stand-alone training, all models: {seconds['standalone']:.0f} s. A resumed "
              f"piece counts only its last stretch.", ""]
    return "\n".join(lines)
