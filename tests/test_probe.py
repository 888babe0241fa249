"""The shared LR probe every LR row uses (ours and the peers'): quiet under the installed scikit-learn, and the
L2 model it always was."""

import warnings

import numpy as np
from sklearn.linear_model import LogisticRegressionCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from qanchor.probe import LR_CS, logistic_probe


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
