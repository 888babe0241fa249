"""The linear probe every logistic-regression reader in qanchor shares: standardise, then L2 logistic regression
whose strength is picked by inner cross-validated AUC on the training users.

Used by the benchmark's LR rows (ours and the peers') and by the scenario head's logistic prototypes, so both
read an embedding the same way. Example:
    >>> import numpy as np
    >>> x = np.array([[0.0], [1.0], [0.1], [0.9]] * 3); y = np.array([0, 1, 0, 1] * 3)
    >>> bool(logistic_probe(y, seed=0).fit(x, y).decision_function([[1.0]])[0] > 0)
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["LR_CS", "FALLBACK_C", "logistic_probe", "chosen_c"]

# The grid of inverse regularisation strengths (on standardised features), from the regression's most regularised
# form to nearly none. It was (0.01, 0.1, 1) until 2026-12-06, and the inner CV then picked its smallest value in 97 of
# 100 fits on the synthetic world, for the embedding and the peers alike: the best C lay below the grid. It now reaches
# down to where the ranking stops changing: as C -> 0 the regression's direction becomes the classes' mean
# difference (in standardised units), and at 1e-6 its scores rank users as that direction does (tested) for the data
# sizes here, so a smaller C would only tie. `qanchor bench` keeps each fold's pick (`probe_c` in results.json).
# docs/quality.md, "The probe's grid was too narrow".
LR_CS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0)
FALLBACK_C = 0.1  # with fewer than 2 users in the minority class there is no inner split to choose by


def logistic_probe(y_train: np.ndarray, seed: int, cs: Sequence[float] = LR_CS):
    """An unfitted ``StandardScaler -> LogisticRegression(CV)`` pipeline for labels ``y_train``.

    C is chosen from ``cs`` by inner CV (up to 3 folds, scored by AUC); with fewer than 2 users in the
    minority class there is no inner split and C falls back to 0.1.
    """
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = np.asarray(y_train)
    inner = min(3, int(min(y.sum(), len(y) - y.sum())))
    if inner < 2:
        return make_pipeline(StandardScaler(), LogisticRegression(C=FALLBACK_C, max_iter=2000))
    return make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=list(cs), cv=inner, scoring="roc_auc", max_iter=2000,
                                                                random_state=seed, **_settled_cv_defaults()))


def _settled_cv_defaults() -> dict:
    """scikit-learn >= 1.9 warns on every fit that two LogisticRegressionCV defaults will change; pass the new values
    (the same L2 model: ``l1_ratios=(0.0,)``; only the layout of the CV bookkeeping attributes, which nothing here
    reads, differs). Older versions lack ``use_legacy_attributes`` and would warn about ``l1_ratios`` instead."""
    from sklearn.linear_model import LogisticRegressionCV

    if "use_legacy_attributes" not in LogisticRegressionCV().get_params():
        return {}
    return {"l1_ratios": (0.0,), "use_legacy_attributes": False}


def chosen_c(fitted) -> float:
    """The C a fitted :func:`logistic_probe` uses (picked by its inner CV, or the fallback)."""
    last = fitted[-1]
    return float(np.ravel(last.C_)[0]) if hasattr(last, "C_") else float(last.C)
