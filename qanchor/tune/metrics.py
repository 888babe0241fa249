"""Binary-classification metrics for scenario heads: AUC and KS, pure functions of arrays.

KS is the Kolmogorov-Smirnov statistic of the score distributions of the two classes, which equals
``max |TPR - FPR|`` over thresholds (what risk teams report next to AUC).

Example:
    >>> auc_ks([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    {'auc': 0.75, 'ks': 0.5}
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

__all__ = ["auc_ks"]


def auc_ks(labels, scores) -> dict[str, float]:
    """AUC and KS of ``scores`` (higher = positive) against 0/1 ``labels``; NaN when one class is absent."""
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    if np.unique(labels).size < 2:
        return {"auc": float("nan"), "ks": float("nan")}
    fpr, tpr, _ = roc_curve(labels, scores)
    return {"auc": float(roc_auc_score(labels, scores)), "ks": float(np.max(np.abs(tpr - fpr)))}
