"""Benchmark: AUC / KS of Q-Anchor embeddings and heads against peers, k-fold over users (DESIGN section 8).

Example:
    >>> from qanchor.bench import run_bench
    >>> from qanchor.config import load_config
    >>> result = run_bench(load_config("configs/bench/tiny-cj.yaml"))  # doctest: +SKIP
"""

from qanchor.bench.metrics import auc_score, ks_score, mean_std
from qanchor.bench.runner import BenchResult, MethodResult, TaskResult, run_bench

__all__ = ["auc_score", "ks_score", "mean_std", "run_bench", "BenchResult", "MethodResult", "TaskResult"]
