"""The classifiers that turn a method's per-user features into scores, and k-fold evaluation.

Every method is reduced to either a feature matrix plus a classifier (logistic regression or LightGBM,
fitted on each fold's training users) or fixed scores (a prompt-tuned head scores users by itself).
:func:`evaluate_folds` runs either over the same folds and returns AUC and KS per fold.

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0); y = rng.integers(0, 2, 200); X = y[:, None] + rng.normal(size=(200, 3))
    >>> folds = stratified_folds(y, 5, seed=0)
    >>> res = evaluate_folds(MethodInput(features=X, classifier=Classifier.LR), y, folds, seed=0)
    >>> len(res.auc), res.auc[0] > 0.7
    (5, True)
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from enum import Enum

import numpy as np
from threadpoolctl import threadpool_limits

from qanchor.metrics import auc_score, ks_score, mean_std
from qanchor.probe import chosen_c, logistic_probe

__all__ = ["Skip", "Classifier", "MethodInput", "MethodResult", "stratified_folds", "fit_predict", "fit_scores", "LGBM_SETTINGS",
           "lgbm_model", "chosen_setting",
           "evaluate_folds", "lgbm_params"]


class Skip(Exception):
    """A method does not apply to a task (or cannot run here); the message says why."""


class Classifier(str, Enum):
    LR = "lr"  # standardise + L2 logistic regression (lbfgs, C by inner CV): the usual linear probe
    LGBM = "lgbm"  # gradient-boosted trees: the usual strong model on handcrafted tabular features


@dataclass
class MethodInput:
    """What one method offers for one task, rows aligned with the task's users.

    Exactly one of ``features`` (with ``classifier``) or ``scores`` is set. ``eval_mask`` limits which
    users this method may be scored on (a head is only honest on users it never trained on).
    """

    features: np.ndarray | None = None  # float32 [n, F]
    classifier: Classifier | None = None
    scores: np.ndarray | None = None  # float64 [n], higher = positive
    eval_mask: np.ndarray | None = None  # bool [n]
    note: str = ""
    # With ``scores`` from a method that fits the LR probe per fold itself (``qanchor_head_lr``): the C each fold's
    # inner CV chose, in fold order, so results.json records it as it does for ``features`` methods.
    probe_c: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if (self.features is None) == (self.scores is None):
            raise ValueError("give exactly one of features (with a classifier) or scores")
        if self.features is not None and self.classifier is None:
            raise ValueError("features need a classifier")


@dataclass
class MethodResult:
    """Per-fold AUC / KS of one method on one task (and how many test users each fold scored), or why not."""

    auc: list[float] = field(default_factory=list)
    ks: list[float] = field(default_factory=list)
    n_test: list[int] = field(default_factory=list)
    skipped_folds: int = 0  # folds whose scored users held one class only
    note: str = ""
    skipped: str | None = None  # why the method did not run on this task
    seconds: float = 0.0
    probe_c: list[float] = field(default_factory=list)  # the LR probe's C per fold (its inner CV's pick); LR only
    tree_setting: list[int] = field(default_factory=list)  # LightGBM's pick per fold (index in LGBM_SETTINGS)

    @property
    def ok(self) -> bool:
        return self.skipped is None and len(self.auc) > 0

    @property
    def auc_mean_std(self) -> tuple[float, float]:
        return mean_std(self.auc)

    @property
    def ks_mean_std(self) -> tuple[float, float]:
        return mean_std(self.ks)

    def to_dict(self) -> dict:
        (am, asd), (km, ksd) = self.auc_mean_std, self.ks_mean_std
        return {**asdict(self), "auc_mean": am, "auc_std": asd, "ks_mean": km, "ks_std": ksd}


def stratified_folds(labels: np.ndarray, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified, shuffled ``k``-fold split of ``range(len(labels))`` -> [(train_idx, test_idx)].

    Example:
        >>> [len(te) for _, te in stratified_folds(np.array([0, 1] * 10), 5, seed=0)]
        [4, 4, 4, 4, 4]
    """
    from sklearn.model_selection import StratifiedKFold

    skf = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return [(tr, te) for tr, te in skf.split(np.zeros(len(labels)), labels)]


# The LightGBM peers' capacities, from additive stumps to the loosest; each fold picks one on its training users (AUC
# on a held-out third of them), as the LR probe picks its C. A single fixed setting (the last) left the trees
# under-regularised for a few thousand labelled users: picked per fold among 4, 7 and 15 leaves by a 3-fold inner CV,
# the smallest won 62 of 70 fits on Complete Journey (as the probe's C grid once stopped at its floor), so the grid
# reaches down to stumps. One held-out third rather than 3 folds: the bench must stay within minutes on 2 cores
# (3 folds cost 4.3 times the fixed setting's time, one third 1.8 times).
LGBM_SETTINGS: tuple[dict, ...] = (
    dict(num_leaves=2, min_child_samples=50, n_estimators=300, learning_rate=0.03),
    dict(num_leaves=4, min_child_samples=50, n_estimators=300, learning_rate=0.02),
    dict(num_leaves=15, min_child_samples=10, n_estimators=150, learning_rate=0.05),
)


def lgbm_params(seed: int, n_jobs: int) -> dict:
    """The LightGBM peers' settings (``rfm_lgbm``, ``union_lgbm``) beside their capacity (:data:`LGBM_SETTINGS`, picked
    per fold; these hold the last).

    Row and column subsampling and an L2 penalty: a few thousand users, and the whole bench must run in minutes on 2
    cores. Left to itself,
    LightGBM picks col-wise or row-wise histograms by timing both on the first fit, so a busy machine could pick the
    other one and print other numbers for the same seed (two `make demo-ratings` runs on the same data, one beside a
    test run, printed `union_lgbm` 0.8685 and 0.8682); ``force_col_wise`` + ``deterministic`` fix the choice and the
    summation order.

        >>> p = lgbm_params(0, 2); p["deterministic"], p["force_col_wise"], p["n_jobs"]
        (True, True, 2)
    """
    return dict(**LGBM_SETTINGS[-1], subsample=0.8, subsample_freq=1, colsample_bytree=0.8, reg_lambda=1.0, random_state=seed, n_jobs=n_jobs,
                deterministic=True, force_col_wise=True, verbose=-1)


def fit_predict(classifier: Classifier, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                seed: int, n_jobs: int = 1) -> np.ndarray:
    """Fit ``classifier`` on the training rows and return P(positive) for the test rows.

    Example:
        >>> x = np.array([[0.0], [1.0], [0.1], [0.9]]); y = np.array([0, 1, 0, 1])
        >>> bool(fit_predict(Classifier.LR, x, y, np.array([[1.0]]), seed=0)[0] > 0.5)
        True
    """
    return fit_scores(classifier, x_train, y_train, x_test, seed, n_jobs)[0]


def lgbm_model(y_train: np.ndarray, seed: int, n_jobs: int):
    """An unfitted LightGBM that picks its capacity among :data:`LGBM_SETTINGS` by AUC on a stratified third of
    ``y_train``'s users, fitted on the rest, then refits on them all; with fewer than 3 users in the minority class
    there is no such split and the last setting is used."""
    from lightgbm import LGBMClassifier
    from sklearn.model_selection import GridSearchCV, StratifiedShuffleSplit

    y = np.asarray(y_train)
    if min(y.sum(), len(y) - y.sum()) < 3:
        return LGBMClassifier(**lgbm_params(seed, n_jobs))
    grid = [{key: [value] for key, value in setting.items()} for setting in LGBM_SETTINGS]
    return GridSearchCV(LGBMClassifier(**lgbm_params(seed, n_jobs)), grid, scoring="roc_auc", refit=True,
                        cv=StratifiedShuffleSplit(n_splits=1, test_size=1 / 3, random_state=seed))


def chosen_setting(fitted) -> int:
    """The index in :data:`LGBM_SETTINGS` a fitted :func:`lgbm_model` uses."""
    if not hasattr(fitted, "best_params_"):
        return len(LGBM_SETTINGS) - 1
    return next(i for i, s in enumerate(LGBM_SETTINGS) if all(fitted.best_params_[k] == v for k, v in s.items()))


def fit_scores(classifier: Classifier, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
               seed: int, n_jobs: int = 1) -> tuple[np.ndarray, float | int]:
    """:func:`fit_predict`'s scores and the inner CV's pick: the LR probe's C, or LightGBM's setting index."""
    if classifier is Classifier.LR:
        model = logistic_probe(y_train, seed)  # every LR method is tuned alike, ours and the peers'
        x_train, x_test = np.nan_to_num(x_train), np.nan_to_num(x_test)  # LR has no notion of missing
    else:
        model = lgbm_model(y_train, seed, n_jobs)  # and the trees pick their capacity as the probe picks its C
    # One BLAS thread: these problems are small, and on a busy 2-core machine BLAS threads spin against
    # LightGBM's and each other (measured 10x slower fits under load).
    with warnings.catch_warnings(), threadpool_limits(1, user_api="blas"):
        warnings.simplefilter("ignore")  # lbfgs convergence / feature-name chatter would drown the progress bar
        model.fit(x_train, y_train)
        scores = model.predict_proba(x_test)[:, 1]
    return scores, (chosen_c(model) if classifier is Classifier.LR else chosen_setting(model))


def evaluate_folds(method: MethodInput, labels: np.ndarray, folds: list[tuple[np.ndarray, np.ndarray]],
                   seed: int, n_jobs: int = 1) -> MethodResult:
    """AUC and KS of ``method`` on each fold's test users (restricted to ``eval_mask`` if set)."""
    out = MethodResult(note=method.note, probe_c=list(method.probe_c) if method.scores is not None else [])
    for train, test in folds:
        if method.scores is not None:
            scores = method.scores[test]
        else:
            scores, pick = fit_scores(method.classifier, method.features[train], labels[train], method.features[test],
                                      seed, n_jobs)
            (out.probe_c if method.classifier is Classifier.LR else out.tree_setting).append(pick)
        keep = method.eval_mask[test] if method.eval_mask is not None else np.ones(len(test), bool)
        y, s = labels[test][keep], scores[keep]
        if y.size == 0 or y.min() == y.max():
            out.skipped_folds += 1
            continue
        out.auc.append(auc_score(y, s))
        out.ks.append(ks_score(y, s))
        out.n_test.append(int(y.size))
    if out.skipped_folds:
        out.note = (out.note + "; " if out.note else "") + f"{out.skipped_folds} fold(s) had one class among scored users"
    if not out.auc:
        out.skipped = "no fold had both classes among the users it may be scored on"
    return out
