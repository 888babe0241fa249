"""The shared LR probe every LR row uses (ours and the peers'): quiet under the installed scikit-learn, and the
L2 model it always was."""

import warnings

import numpy as np
import pytest
from scipy.stats import spearmanr
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from qanchor.probe import FALLBACK_C, LR_CS, chosen_c, logistic_probe


def _data(n=300, d=6, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = (x[:, 0] - 0.5 * x[:, 1] + rng.normal(size=n) > 0.8).astype(int)
    return x, y


def test_probe_fits_without_third_party_warnings():
    x, y = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any FutureWarning / ConvergenceWarning fails the test
        logistic_probe(y, seed=0).fit(x, y)


def test_probe_is_the_plain_l2_cv_regression():
    # The settled defaults must not change the model: same C choice and coefficients as sklearn's plain L2 CV.
    x, y = _data(seed=1)
    ours = logistic_probe(y, seed=0).fit(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=list(LR_CS), cv=3, scoring="roc_auc",
                                                                     max_iter=2000, random_state=0)).fit(x, y)
    np.testing.assert_allclose(ours[-1].coef_, plain[-1].coef_, atol=1e-8)
    np.testing.assert_allclose(ours.predict_proba(x), plain.predict_proba(x), atol=1e-8)


def test_the_grid_reaches_the_regularisation_wide_weak_problems_need():
    # A bench-like problem: a rare class (5%), one weak signal column among 120 noise columns, ~1,600 labelled users.
    # The old grid's floor (C = 0.01) was the pick in 97 of 100 fits on the synthetic world; its inner CV must now be
    # able to go below it.
    rng = np.random.default_rng(0)
    n, d = 1600, 120
    x = rng.normal(size=(n, d))
    y = (0.6 * x[:, 0] + rng.normal(size=n) > 2.1).astype(int)
    assert 40 < y.sum() < 120
    assert chosen_c(logistic_probe(y, seed=0).fit(x, y)) < 0.01
    assert chosen_c(logistic_probe(y, seed=0, cs=(0.01, 0.1, 1.0)).fit(x, y)) == 0.01  # the old grid's floor


@pytest.mark.parametrize("n", [500, 20_000])
def test_the_grid_floor_is_the_mean_difference_limit(n):
    # Below the grid's smallest C nothing changes: the regression ranks users as the classes' mean difference in
    # standardised units does (its C -> 0 limit), for a few hundred users and for twenty thousand.
    rng = np.random.default_rng(1)
    x = rng.normal(size=(n, 40)) @ rng.normal(size=(40, 40))  # correlated columns: the limit is not the optimum
    y = (x[:, :3].sum(1) + 2 * rng.normal(size=n) > 2).astype(int)
    z = StandardScaler().fit_transform(x)
    mean_difference = z @ (z[y == 1].mean(0) - z[y == 0].mean(0))
    floor = make_pipeline(StandardScaler(), LogisticRegression(C=LR_CS[0], max_iter=2000)).fit(x, y).decision_function(x)
    assert spearmanr(floor, mean_difference)[0] > 0.9999
    top = make_pipeline(StandardScaler(), LogisticRegression(C=LR_CS[-1], max_iter=2000)).fit(x, y).decision_function(x)
    assert spearmanr(top, mean_difference)[0] < 0.99  # and the grid spans rankings that differ


def test_chosen_c_of_the_fallback():
    y = np.array([1] + [0] * 20)  # one positive: no inner split, the fallback C
    assert chosen_c(logistic_probe(y, seed=0).fit(np.arange(21.0)[:, None], y)) == FALLBACK_C
