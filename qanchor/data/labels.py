"""A task from the user's own labels: a ``user_id,label`` Parquet, CSV or TSV and the question that anchors it.

Both ``qanchor bench`` (judge a checkpoint on your scenario) and ``qanchor prompt-tune`` (tune a head for it) read
it. The file is checked at the door, with errors that name the file, the column, the first bad row and what to do:
missing columns, labels other than 0/1, duplicate or unknown users, one class only.

Example:
    >>> task = custom_task(ds, "my_labels.csv", "Will this user buy a bike next month?")  # doctest: +SKIP
    >>> task.name, int(task.labels.sum())  # doctest: +SKIP
    ('my_labels', 118)
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import csv as pacsv

from qanchor.data.dataset import Dataset, Task, isin_ids
from qanchor.data.manifest import TaskDomain, TaskSpec
from qanchor.errors import ConfigError, DataValidationError

__all__ = ["custom_task", "task_digest"]


def task_digest(task: Task) -> str:
    """A hash of what a task is: its question, users and labels (a path names a file, not what it held)."""
    h = hashlib.sha256(json.dumps([task.name, task.query]).encode())
    h.update("\0".join(map(str, task.user_ids)).encode())
    h.update(np.ascontiguousarray(task.labels, dtype=np.int64).tobytes())
    return h.hexdigest()


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
        if table.column_names.count(col) > 1:
            raise DataValidationError(str(path), f"column {col!r} appears {table.column_names.count(col)} times; keep one",
                                      column=col)
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
    suffix = path.suffix.lower()  # "Labels.CSV" is a CSV too
    if suffix in (".csv", ".tsv"):
        try:  # ids stay text ("0042" is not 42), as in the dataset
            return pacsv.read_csv(path, parse_options=pacsv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ","),
                                  convert_options=pacsv.ConvertOptions(column_types={"user_id": pa.string()}))
        except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
            raise DataValidationError(str(path), f"not a readable {suffix[1:].upper()} ({str(exc).splitlines()[0]}); "
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
    first: dict[str, int] = {}  # exact: numpy's fixed-width strings would make "u1\x00" a repeat of "u1"
    repeated = [first[u] for row, u in enumerate(user_ids.tolist()) if first.setdefault(u, row) != row]
    if repeated:
        row = min(repeated)
        raise DataValidationError(str(path), f"user '{user_ids[row]}' appears more than once; give one label per user",
                                  column="user_id", row=row)
    known = isin_ids(user_ids, ds.user_ids)
    if not known.all():
        row = int(np.argmin(known))
        raise DataValidationError(
            str(path), f"user '{user_ids[row]}' is not in dataset {ds.root} ({int((~known).sum())} of {len(user_ids)} "
            "users unknown); labels must be for users of the dataset given as data.path=", column="user_id", row=row)
