"""Ranking study: does a supernet rank architectures the way stand-alone training does?

FairNAS's central claim (paper, Fig. 1) is that strict fairness makes the supernet's ranking
agree with stand-alone training far better than uniform sampling or expectation fairness. This
package measures that on a user's own space and data: supernets trained per sampler under equal
budgets of single-path passes, architectures stratified over multiply-adds, stand-alone ground
truth (optionally over several seeds), rank statistics with bootstrap intervals, and a report.
"""

from fairnas.rankstudy.config import RankStudyConfig, resolve_rank_study_config
from fairnas.rankstudy.study import RankStudy, run_rank_study

__all__ = ["RankStudy", "RankStudyConfig", "resolve_rank_study_config", "run_rank_study"]
