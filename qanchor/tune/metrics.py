"""AUC and KS of a head's scores as one dict, on the benchmark's own metric functions.

KS is the Kolmogorov-Smirnov statistic of the score distributions of the two classes, which equals
``max |TPR - FPR|`` over thresholds (what risk teams report next to AUC). Prompt tuning and ``qanchor
bench`` must agree on what AUC and KS mean, so both use :mod:`qanchor.bench.metrics`.

Example:
    >>> auc_ks([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    {'auc': 0.75, 'ks': 0.5}
"""

from __future__ import annotations

import numpy as np

from qanchor.bench.metrics import auc_score, ks_score

__all__ = ["auc_ks"]


def auc_ks(labels, scores) -> dict[str, float]:
    """AUC and KS of ``scores`` (higher = positive) against 0/1 ``labels``; NaN when one class is absent."""
    labels = np.asarray(labels)
    if np.unique(labels).size < 2:  # a tiny validation split may hold one class: no number, not an error
        return {"auc": float("nan"), "ks": float("nan")}
    return {"auc": float(auc_score(labels, scores)), "ks": float(ks_score(labels, scores))}
