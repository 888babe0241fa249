"""Benchmark: AUC / KS of Q-Anchor embeddings and heads against peers, k-fold over users (DESIGN section 8).

Layer: the top library layer (imports data, model, infer and tune; only the CLI imports it).

Example:
    >>> from qanchor.bench import run_bench
    >>> from qanchor.config import load_config
    >>> result = run_bench(load_config("configs/bench/tiny-cj.yaml"))  # doctest: +SKIP
"""

from qanchor.bench.peers import MethodResult
from qanchor.bench.runner import BenchResult, TaskResult, run_bench

__all__ = ["run_bench", "BenchResult", "MethodResult", "TaskResult"]
