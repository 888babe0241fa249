"""Custom labels files are checked at the door; the dataset's tasks are selected and subsampled."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qanchor.bench.tasks import custom_task, dataset_tasks, fold_count
from qanchor.data.dataset import load_dataset
from qanchor.errors import ConfigError, DataValidationError


@pytest.fixture(scope="module")
def ds(tiny_dataset):
    return load_dataset(tiny_dataset)


def _write(tmp_path, name="labels.parquet", **cols) -> str:
    path = tmp_path / name
    pq.write_table(pa.table(cols), path)
    return str(path)


def test_custom_task_sorted_and_named(ds, tmp_path):
    path = _write(tmp_path, "My Labels.parquet", user_id=["u005", "u001", "u003", "u002"], label=[1, 0, 1, 0])
    task = custom_task(ds, path, "  Will this user buy a bike?  ")
    assert task.name == "my_labels" and task.query == "Will this user buy a bike?"
    assert task.user_ids.tolist() == ["u001", "u002", "u003", "u005"] and task.labels.tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize("cols,match", [
    ({"user_id": ["u001", "u002"], "target": [0, 1]}, r"column 'label'.*required column missing"),
    ({"uid": ["u001", "u002"], "label": [0, 1]}, r"column 'user_id'"),
    ({"user_id": ["u001", "nobody", "u003"], "label": [0, 1, 1]}, r"row 1: user 'nobody' is not in dataset .*1 of 3"),
    ({"user_id": ["u001", "u002", "u003"], "label": [1, 1, 1]}, r"every label is 1: AUC and KS need both classes"),
    ({"user_id": ["u001", "u002"], "label": [0, 2]}, r"column 'label', row 1: label must be 0 or 1, got 2"),
    ({"user_id": ["u001", "u002", "u001"], "label": [0, 1, 1]}, r"row 0: user 'u001' appears more than once"),
])
def test_custom_task_errors_name_file_column_row(ds, tmp_path, cols, match):
    path = _write(tmp_path, **cols)
    with pytest.raises(DataValidationError, match=match) as err:
        custom_task(ds, path, "q?")
    assert str(path) in str(err.value)


def test_missing_or_unreadable_file_and_empty_query(ds, tmp_path):
    with pytest.raises(DataValidationError, match="not found"):
        custom_task(ds, tmp_path / "none.parquet", "q?")
    bad = tmp_path / "bad.parquet"
    bad.write_text("user_id,label\nu001,1\n")
    with pytest.raises(DataValidationError, match="not a readable Parquet.*or a .csv with a header row"):
        custom_task(ds, bad, "q?")
    with pytest.raises(ConfigError, match="query is empty"):
        custom_task(ds, _write(tmp_path, user_id=["u001", "u002"], label=[0, 1]), " ")


def test_custom_labels_from_a_csv_keep_their_ids_as_text(ds, tmp_path, tiny_dataset):
    from qanchor.data.dataset import load_dataset as load

    parquet = custom_task(ds, _write(tmp_path, user_id=["u005", "u001", "u003"], label=[1, 0, 1]), "q?")
    (tmp_path / "labels.csv").write_text("user_id,label\nu005,1\nu001,0\nu003,1\n")
    from_csv = custom_task(ds, tmp_path / "labels.csv", "q?")
    assert from_csv.user_ids.tolist() == parquet.user_ids.tolist() and from_csv.labels.tolist() == parquet.labels.tolist()
    (tmp_path / "labels.tsv").write_text("label\tuser_id\n1\tu005\n0\tu001\n")
    assert custom_task(ds, tmp_path / "labels.tsv", "q?").user_ids.tolist() == ["u001", "u005"]
    (tmp_path / "Labels.CSV").write_text("user_id,label\nu005,1\nu001,0\nu003,1\n")  # the suffix in capitals: a CSV too
    assert custom_task(ds, tmp_path / "Labels.CSV", "q?").labels.tolist() == parquet.labels.tolist()
    (tmp_path / "ragged.csv").write_text("user_id,label\nu001,1,extra\n")
    with pytest.raises(DataValidationError, match=r"ragged\.csv.*not a readable CSV.*header row user_id,label"):
        custom_task(ds, tmp_path / "ragged.csv", "q?")
    # numeric-looking ids are text: '007' must not be read as 7 and miss the user
    numeric = tmp_path / "numeric.csv"
    numeric.write_text("user_id,label\nu001,0\n007,1\n")
    with pytest.raises(DataValidationError, match=r"user '007' is not in dataset"):
        custom_task(load(tiny_dataset), numeric, "q?")


def test_dataset_tasks_select_and_subsample(ds):
    assert [t.name for t in dataset_tasks(ds, [], None, 0)] == ["churn", "coupon"]
    with pytest.raises(ConfigError, match="unknown task"):
        dataset_tasks(ds, ["nope"], None, 0)
    small = dataset_tasks(ds, [], 20, seed=0)
    users = set(np.concatenate([t.user_ids for t in small]))
    assert len(users) == 20 and all(set(t.user_ids) <= users for t in small)  # one shared subsample
    assert small[1].prob is not None and len(small[1].prob) == len(small[1].labels)


def test_fold_count():
    assert fold_count(np.array([1, 0, 0, 0]), 5) == 1
    assert fold_count(np.array([1] * 10 + [0] * 10), 5) == 5
