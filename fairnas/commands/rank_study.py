"""``fairnas rank-study``: how well each sampler's supernet ranks architectures."""

from __future__ import annotations

import argparse
import logging

from fairnas.cli import add_config_arguments, config_overrides, emit
from fairnas.rankstudy import resolve_rank_study_config, run_rank_study

logger = logging.getLogger(__name__)


def _summary_lines(stats: dict) -> list[str]:
    lines = []
    for sampler, agreement in stats["agreement"].items():
        tau = agreement["kendall_tau"]
        if tau["value"] is None:
            lines.append(f"{sampler:>12}: Kendall tau undefined (a score is constant)")
            continue
        ci = tau["ci"]
        interval = (f" [{ci['low']:+.2f}, {ci['high']:+.2f}]"
                    if ci is not None and ci["low"] is not None else "")
        lines.append(f"{sampler:>12}: Kendall tau {tau['value']:+.3f}{interval} "
                     f"(n={agreement['n']}, p={tau['p_value']:.2g})")
    if not lines:
        lines.append("no statistics yet (fewer than 3 architectures with ground truth)")
    return lines


def cmd_rank_study(args: argparse.Namespace) -> int:
    config = resolve_rank_study_config(args.config, config_overrides(args))
    stats = run_rank_study(config, report_only=args.report_only)
    result = {"out_dir": config.out_dir, "agreement": stats["agreement"],
              "with_ground_truth": stats["with_ground_truth"],
              "equal_passes": stats["budgets"]["equal_passes"]}
    emit(result, args.json, "\n".join(_summary_lines(stats))
         + f"\nreport: {config.out_dir}/report.md (stats.json and figures beside it)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "rank-study",
        help="compare samplers by how well their supernets rank architectures (resumable)",
        description="Train one supernet per sampler under equal budgets of single-path passes, "
                    "train the same stratified architectures stand-alone, and report Kendall "
                    "tau, Spearman rho and Pearson r with bootstrap intervals. Re-running the "
                    "same command resumes; nothing finished is trained again.",
    )
    add_config_arguments(parser)
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing; rebuild stats and report from what is finished")
    parser.set_defaults(func=cmd_rank_study)
