"""AUC and KS of binary scores: pure functions of numpy arrays, tested against scikit-learn and scipy.

The one definition of the two metrics for prompt tuning, the benchmark and every diagnostic. KS is the
Kolmogorov-Smirnov statistic of the two classes' score distributions, which equals ``max |TPR - FPR|``
over thresholds (what risk teams report next to AUC). Both are rank statistics, so any monotone transform of the scores leaves them unchanged; ties are
handled exactly (average ranks for AUC, thresholds only between distinct scores for KS).

Example:
    >>> import numpy as np
    >>> y = np.array([0, 0, 1, 1]); s = np.array([0.1, 0.4, 0.35, 0.8])
    >>> round(auc_score(y, s), 4), round(ks_score(y, s), 4)
    (0.75, 0.5)
"""

from __future__ import annotations

import numpy as np

__all__ = ["auc_score", "ks_score", "auc_ks", "mean_std", "check_binary"]


def check_binary(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate and return ``(labels as bool, scores as float64)``; both classes must be present.

    Example:
        >>> check_binary(np.array([0, 1]), np.array([0.2, 0.1]))[0].tolist()
        [False, True]
    """
    y = np.asarray(labels).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.shape[0]} vs {s.shape[0]}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite (no NaN or inf)")
    y = y.astype(bool)
    if y.all() or not y.any():
        raise ValueError("AUC and KS need both classes among the labels")
    return y, s


def _average_ranks(s: np.ndarray) -> np.ndarray:
    """1-based ranks of ``s``; tied values share the mean of the ranks they span."""
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)  # rank of the last member of each distinct value
    return (ends - (counts - 1) / 2.0)[inverse]


def auc_score(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve: P(score of a random positive > a random negative), ties count half.

    Example:
        >>> auc_score(np.array([0, 1, 0, 1]), np.array([0.1, 0.9, 0.5, 0.5]))
        0.875
    """
    y, s = check_binary(labels, scores)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    rank_sum = _average_ranks(s)[y].sum()  # Mann-Whitney U of the positives, plus n_pos (n_pos + 1) / 2
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def ks_score(labels: np.ndarray, scores: np.ndarray) -> float:
    """Kolmogorov-Smirnov statistic: max over thresholds of |TPR - FPR|.

    Equals ``scipy.stats.ks_2samp(scores[labels == 1], scores[labels == 0]).statistic``: the gap
    between the two classes' empirical CDFs is the gap between their true and false positive rates.

    Example:
        >>> ks_score(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.3, 0.4]))
        1.0
    """
    y, s = check_binary(labels, scores)
    values, inverse = np.unique(s, return_inverse=True)
    pos = np.bincount(inverse, weights=y, minlength=len(values))  # positives at each distinct score
    neg = np.bincount(inverse, weights=~y, minlength=len(values))
    cdf_pos = np.cumsum(pos) / pos.sum()  # share of positives scoring <= each distinct value
    cdf_neg = np.cumsum(neg) / neg.sum()
    return float(np.max(np.abs(cdf_pos - cdf_neg)))


def mean_std(values: list[float] | np.ndarray) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value) of per-fold metrics.

    Example:
        >>> [round(x, 4) for x in mean_std([0.7, 0.8])]
        [0.75, 0.0707]
    """
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    std = float(v.std(ddof=1)) if v.size > 1 else 0.0
    return float(v.mean()), std


def auc_ks(labels, scores) -> dict[str, float]:
    """AUC and KS of ``scores`` (higher = positive) against 0/1 ``labels``; NaN when one class is absent.

    Example:
        >>> auc_ks([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
        {'auc': 0.75, 'ks': 0.5}
    """
    labels = np.asarray(labels)
    if np.unique(labels).size < 2:  # a tiny validation split may hold one class: no number, not an error
        return {"auc": float("nan"), "ks": float("nan")}
    return {"auc": float(auc_score(labels, scores)), "ks": float(ks_score(labels, scores))}
