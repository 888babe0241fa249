"""Which users and labels the benchmark judges: the dataset's tasks, or a custom ``user_id,label`` file
(:func:`qanchor.data.labels.custom_task`, shared with ``qanchor prompt-tune``).

Example:
    >>> views = dataset_tasks(ds, ["churn"], max_users=None, seed=0)  # doctest: +SKIP
    >>> view = custom_task(ds, "my_labels.parquet", "Will this user buy a bike?")  # doctest: +SKIP
"""

from __future__ import annotations

import numpy as np

from qanchor.data.dataset import Dataset, Task, isin_ids
from qanchor.data.labels import custom_task
from qanchor.errors import ConfigError

__all__ = ["dataset_tasks", "custom_task", "subsample", "fold_count"]


def dataset_tasks(ds: Dataset, names: list[str], max_users: int | None, seed: int) -> list[Task]:
    """The dataset's tasks named in ``names`` (all when empty), optionally on a random user subsample."""
    unknown = [n for n in names if n not in ds.tasks]
    if unknown:
        raise ConfigError(f"tasks: unknown task(s) {unknown}; dataset {ds.root} has {sorted(ds.tasks)}")
    views = [t for name, t in ds.tasks.items() if not names or name in names]
    if not views:
        raise ConfigError(f"dataset {ds.root} declares no tasks; pass labels=<user_id,label Parquet> and query=<text>")
    return subsample(views, max_users, seed)


def subsample(views: list[Task], max_users: int | None, seed: int) -> list[Task]:
    """Keep one random set of at most ``max_users`` users (shared by every task, so methods still align)."""
    # sorted as Python strings: numpy's fixed-width ones drop trailing NULs, and "u1\x00" would become "u1"
    everyone = np.array(sorted({u for v in views for u in v.user_ids.tolist()}), dtype=object)
    if max_users is None or len(everyone) <= max_users:
        return views
    keep = np.random.default_rng(seed).choice(everyone, size=max_users, replace=False)
    out = []
    for v in views:
        sel = isin_ids(v.user_ids, keep)
        out.append(Task(v.spec, v.user_ids[sel], v.labels[sel], None if v.prob is None else v.prob[sel]))
    return out


def fold_count(labels: np.ndarray, folds: int) -> int:
    """Folds actually used: stratification needs at least one user of each class per fold.

    Example:
        >>> fold_count(np.array([1, 1, 1, 0, 0, 0, 0, 0, 0, 0]), 5)
        3
    """
    minority = int(min(labels.sum(), len(labels) - labels.sum()))
    return max(min(folds, minority), 0)
