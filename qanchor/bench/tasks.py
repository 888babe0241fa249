"""Which users and labels the benchmark judges: the dataset's tasks, or a custom ``user_id,label`` file.

A custom labels file is checked at the door, with errors that name the file, the column, the first bad
row and what to do: missing columns, labels other than 0/1, duplicate or unknown users, one class only.

Example:
    >>> views = dataset_tasks(ds, ["churn"], max_users=None, seed=0)  # doctest: +SKIP
    >>> view = custom_task(ds, "my_labels.parquet", "Will this user buy a bike?")  # doctest: +SKIP
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import csv as pacsv

from qanchor.data.dataset import Dataset, Task
from qanchor.data.manifest import TaskDomain, TaskSpec
from qanchor.errors import ConfigError, DataValidationError

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
    everyone = np.unique(np.concatenate([v.user_ids for v in views]).astype(str)).astype(object)
    if max_users is None or len(everyone) <= max_users:
        return views
    keep = np.random.default_rng(seed).choice(everyone, size=max_users, replace=False)
    out = []
    for v in views:
        sel = np.isin(v.user_ids, keep)
        out.append(Task(v.spec, v.user_ids[sel], v.labels[sel], None if v.prob is None else v.prob[sel]))
    return out


def _task_name(path: Path) -> str:
    name = re.sub(r"[^a-z0-9_]+", "_", path.stem.lower()).strip("_")
    return name or "custom"


def custom_task(ds: Dataset, labels_path: str | Path, query: str) -> Task:
    """A task from any ``user_id,label`` Parquet, or CSV / TSV with that header; raises DataValidationError naming
    what is wrong."""
    path = Path(labels_path)
    if not path.is_file():
        raise DataValidationError(str(path), "labels file not found; give a Parquet (or a CSV with a header row) with "
                                  "columns user_id, label")
    if not query or not query.strip():
        raise ConfigError("query is empty; a custom task needs the question that anchors it, e.g. "
                          "query='Will this user buy a bike next month?'")
    table = _read_labels_table(path)
    for col in ("user_id", "label"):
        if col not in table.column_names:
            raise DataValidationError(str(path), f"required column missing (found {table.column_names}); "
                                      "the file needs user_id (string) and label (0/1)", column=col)
    user_ids = np.asarray(table.column("user_id").to_pylist(), dtype=object)
    labels = _check_labels(path, table.column("label").to_pylist())
    _check_users(path, user_ids, ds)
    order = np.argsort(user_ids.astype(str), kind="stable")
    spec = TaskSpec(_task_name(path), TaskDomain.PROFILE, query.strip(), 0, description=f"custom labels from {path}")
    return Task(spec, user_ids[order], labels[order])


def _read_labels_table(path: Path) -> pa.Table:
    if path.suffix in (".csv", ".tsv"):
        try:  # ids stay text ("0042" is not 42), as in the dataset
            return pacsv.read_csv(path, parse_options=pacsv.ParseOptions(delimiter="\t" if path.suffix == ".tsv" else ","),
                                  convert_options=pacsv.ConvertOptions(column_types={"user_id": pa.string()}))
        except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
            raise DataValidationError(str(path), f"not a readable {path.suffix[1:].upper()} ({str(exc).splitlines()[0]}); "
                                      "give a header row user_id,label and one user per row") from None
    try:
        return pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a non-Parquet file
        raise DataValidationError(str(path), f"not a readable Parquet file ({str(exc).splitlines()[0]}); give a Parquet, "
                                  "or a .csv with a header row user_id,label") from None


def _check_labels(path: Path, raw: list) -> np.ndarray:
    for row, v in enumerate(raw):
        if v is None or v not in (0, 1):  # bools and 0.0 / 1.0 pass; '1', 2 or 0.5 do not
            raise DataValidationError(str(path), f"label must be 0 or 1, got {v!r}", column="label", row=row)
    labels = np.asarray(raw, dtype=np.int8)
    if labels.size == 0:
        raise DataValidationError(str(path), "the labels file has no rows")
    if labels.min() == labels.max():
        raise DataValidationError(str(path), f"every label is {int(labels[0])}: AUC and KS need both classes "
                                  "(at least 2 users of each)", column="label")
    return labels


def _check_users(path: Path, user_ids: np.ndarray, ds: Dataset) -> None:
    for row, u in enumerate(user_ids):
        if u is None or not isinstance(u, str):
            raise DataValidationError(str(path), f"user_id must be a non-null string, got {u!r}", column="user_id", row=row)
    _, first, counts = np.unique(user_ids.astype(str), return_index=True, return_counts=True)
    if (counts > 1).any():
        row = int(first[np.argmax(counts > 1)])
        raise DataValidationError(str(path), f"user '{user_ids[row]}' appears more than once; give one label per user",
                                  column="user_id", row=row)
    known = np.isin(user_ids, ds.user_ids)
    if not known.all():
        row = int(np.argmin(known))
        raise DataValidationError(
            str(path), f"user '{user_ids[row]}' is not in dataset {ds.root} ({int((~known).sum())} of {len(user_ids)} "
            "users unknown); labels must be for users of --data", column="user_id", row=row)


def fold_count(labels: np.ndarray, folds: int) -> int:
    """Folds actually used: stratification needs at least one user of each class per fold.

    Example:
        >>> fold_count(np.array([1, 1, 1, 0, 0, 0, 0, 0, 0, 0]), 5)
        3
    """
    minority = int(min(labels.sum(), len(labels) - labels.sum()))
    return max(min(folds, minority), 0)
