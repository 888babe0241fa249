"""AUC and KS are checked against scikit-learn and scipy, ties and edge cases included."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import ks_2samp
from sklearn.metrics import roc_auc_score, roc_curve

from qanchor.metrics import auc_score, ks_score, mean_std


def _cases():
    rng = np.random.default_rng(0)
    for n, ties in [(50, False), (200, True), (1000, True), (7, False)]:
        y = rng.integers(0, 2, n)
        y[:2] = [0, 1]  # both classes, always
        s = rng.normal(size=n) + 0.8 * y
        if ties:
            s = np.round(s, 1)  # many exact ties, as with tree-model or count scores
        yield y, s


@pytest.mark.parametrize("y,s", list(_cases()))
def test_auc_matches_sklearn(y, s):
    assert auc_score(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


@pytest.mark.parametrize("y,s", list(_cases()))
def test_ks_matches_scipy_and_roc_curve(y, s):
    ks = ks_score(y, s)
    assert ks == pytest.approx(ks_2samp(s[y == 1], s[y == 0]).statistic, abs=1e-12)
    fpr, tpr, _ = roc_curve(y, s)
    assert ks == pytest.approx(np.max(np.abs(tpr - fpr)), abs=1e-12)


def test_rank_invariance_and_reversal():
    y = np.array([0, 0, 1, 1, 0, 1])
    s = np.array([0.1, 0.3, 0.35, 0.8, 0.5, 0.2])
    assert auc_score(y, np.exp(3 * s)) == pytest.approx(auc_score(y, s))
    assert auc_score(y, -s) == pytest.approx(1 - auc_score(y, s))
    assert ks_score(y, -s) == pytest.approx(ks_score(y, s))  # KS is two-sided


def test_perfect_constant_and_bool_labels():
    y = np.array([False, False, True, True])
    assert auc_score(y, [0.1, 0.2, 0.8, 0.9]) == 1.0 and ks_score(y, [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert auc_score(y, [0.5] * 4) == 0.5 and ks_score(y, [0.5] * 4) == 0.0


@pytest.mark.parametrize("y,s,match", [
    ([1, 1, 1], [0.1, 0.2, 0.3], "both classes"),
    ([0, 1], [0.1, float("nan")], "finite"),
    ([0, 1, 1], [0.1, 0.2], "length"),
    ([0, 2], [0.1, 0.2], "0 or 1"),
])
def test_bad_inputs(y, s, match):
    with pytest.raises(ValueError, match=match):
        auc_score(np.array(y), np.array(s))
    with pytest.raises(ValueError, match=match):
        ks_score(np.array(y), np.array(s))


def test_mean_std():
    m, s = mean_std([0.6, 0.7, 0.8])
    assert m == pytest.approx(0.7) and s == pytest.approx(np.std([0.6, 0.7, 0.8], ddof=1))
    assert mean_std([0.9]) == (0.9, 0.0)
    assert all(np.isnan(mean_std([])))
