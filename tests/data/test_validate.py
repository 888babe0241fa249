"""Every corruption a user can make fails at the door: exit code 2, one line naming file and rule."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from qanchor.cli import main


def _events(ds: Path) -> Path:
    return sorted((ds / "events").glob("*.parquet"))[0]


def _rewrite(path: Path, fn) -> None:
    pq.write_table(fn(pq.read_table(path)), path)


def _set_col(table: pa.Table, name: str, values) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, values)


def _edit_manifest(ds: Path, fn) -> None:
    raw = yaml.safe_load((ds / "manifest.yaml").read_text())
    fn(raw)
    (ds / "manifest.yaml").write_text(yaml.safe_dump(raw))


def _latin1_column_name(ds: Path) -> None:
    """A column named in cp1252 bytes, as an old writer names it (Arrow cannot write one: patch the file's bytes)."""
    path = ds / "tabular.parquet"
    table = pq.read_table(path)
    pq.write_table(table.rename_columns([*table.column_names[:-1], "QQQQQ"]), path, store_schema=False)
    path.write_bytes(path.read_bytes().replace(b"QQQQQ", b"\xe2ge\xa0Q"))


CORRUPTIONS = {
    "missing column": (lambda ds: _rewrite(_events(ds), lambda t: t.drop_columns(["text"])), ["part-00000.parquet", "'text'", "missing"]),
    "mistyped timestamp": (lambda ds: _rewrite(_events(ds), lambda t: _set_col(t, "ts", t.column("ts").cast(pa.string()))), ["'ts'", "expected timestamp"]),
    "unknown modality": (lambda ds: _rewrite(_events(ds), lambda t: _set_col(t, "modality", pa.array(["tiktok"] + t.column("modality").to_pylist()[1:]))), ["unknown modality 'tiktok'", "row 0"]),
    "null timestamp": (lambda ds: _rewrite(_events(ds), lambda t: _set_col(t, "ts", pa.array([None] + t.column("ts").to_pylist()[1:], t.schema.field("ts").type))), ["'ts'", "row 0", "null"]),
    "event after cutoff": (lambda ds: _rewrite(_events(ds), lambda t: _set_col(t, "ts", pa.array(t.column("ts").to_pylist()[:3] + [t.column("ts")[0].as_py().replace(year=2025)] + t.column("ts").to_pylist()[4:], t.schema.field("ts").type))), ["row 3", "not before the dataset cutoff"]),
    "label not 0/1": (lambda ds: _rewrite(ds / "tasks/churn.parquet", lambda t: _set_col(t, "label", pa.array([0, 1, 2] + t.column("label").to_pylist()[3:], pa.int8()))), ["churn.parquet", "'label'", "row 2", "not 0 or 1"]),
    "task file missing": (lambda ds: (ds / "tasks/coupon.parquet").unlink(), ["coupon.parquet", "file not found"]),
    "empty events file": (lambda ds: _rewrite(_events(ds), lambda t: t.slice(0, 0)), ["part-00000.parquet", "no rows"]),
    "duplicate tabular user": (lambda ds: _rewrite(ds / "tabular.parquet", lambda t: pa.concat_tables([t, t.slice(4, 1)])), ["tabular.parquet", "'user_id'", "appears more than once"]),
    "unknown manifest key": (lambda ds: _edit_manifest(ds, lambda m: m.update(cutof="2024-01-01")), ["manifest.yaml", "'cutof'", "unknown key"]),
    "bad modality kind": (lambda ds: _edit_manifest(ds, lambda m: m["modalities"][0].update(kind="stream")), ["modalities[0].kind", "'stream'"]),
    "unparseable cutoff": (lambda ds: _edit_manifest(ds, lambda m: m.update(cutoff="last tuesday")), ["'cutoff'", "ISO datetime"]),
    "tabular declared but absent": (lambda ds: (ds / "tabular.parquet").unlink(), ["tabular.parquet", "file not found"]),
    "undeclared task file": (lambda ds: shutil.copy(ds / "tasks/churn.parquet", ds / "tasks/extra.parquet"), ["extra.parquet", "does not declare"]),
    "null user id": (lambda ds: _rewrite(_events(ds), lambda t: _set_col(t, "user_id", pa.array([None] + t.column("user_id").to_pylist()[1:], pa.string()))), ["'user_id'", "row 0"]),
    "not parquet": (lambda ds: _events(ds).write_bytes(b"user_id,modality\nu1,bill\n"), ["part-00000.parquet", "not a readable Parquet"]),
    "infinite tabular value": (lambda ds: _rewrite(ds / "tabular.parquet", lambda t: _set_col(t, "income", pa.array([float("inf")] + t.column("income").to_pylist()[1:]))), ["'income'", "row 0", "infinite"]),
    "missing extra column": (lambda ds: _rewrite(_events(ds), lambda t: t.drop_columns(["discount"])), ["'discount'", "missing"]),
    "yes/no tabular column": (lambda ds: _rewrite(ds / "tabular.parquet", lambda t: t.append_column("vip", pa.array([True, False] * (t.num_rows // 2) + [True] * (t.num_rows % 2)))), ["'vip'", "has type bool, expected number", "as 0/1"]),
    "text tabular column": (lambda ds: _rewrite(ds / "tabular.parquet", lambda t: t.append_column("city", pa.array(["Paris"] * t.num_rows))), ["'city'", "expected number", "one 0/1 column per value"]),
    "partitioned events folder": (lambda ds: (ds / "events/day=2024-01-01").mkdir() or shutil.move(_events(ds), ds / "events/day=2024-01-01/part-0.parquet"), ["day=2024-01-01", "a folder", "flat *.parquet"]),
    "events file not named .parquet": (lambda ds: shutil.move(_events(ds), ds / "events/part-9.PARQUET"), ["part-9.PARQUET", "not named *.parquet"]),
    "empty tabular user id": (lambda ds: _rewrite(ds / "tabular.parquet", lambda t: _set_col(t, "user_id", pa.array([""] + t.column("user_id").to_pylist()[1:]))), ["tabular.parquet", "'user_id'", "row 0", "empty user_id"]),
    "text prob column": (lambda ds: _rewrite(ds / "tasks/churn.parquet", lambda t: t.append_column("prob", pa.array(["0.5"] * t.num_rows))), ["churn.parquet", "'prob'", "expected number"]),
    "duplicate column": (lambda ds: _rewrite(_events(ds), lambda t: pa.Table.from_arrays([*t.columns, t.column("text")], names=[*t.column_names, "text"])), ["'text'", "2 columns have this name"]),
    "timestamps in seconds out of range": (lambda ds: _rewrite(_events(ds), lambda t: _set_col(t, "ts", pa.array([10**15] * t.num_rows, pa.timestamp("s")))), ["'ts'", "out of range", "unit"]),
    "text not UTF-8": (lambda ds: _rewrite(_events(ds), lambda t: _set_col(t, "text", pa.array([b"ok", b"\xff\xfe bad"] + [b"x"] * (t.num_rows - 2), pa.binary()).view(pa.string()))), ["'text'", "row 1", "not valid UTF-8"]),
    "decimal amounts": (lambda ds: _rewrite(_events(ds), lambda t: _set_col(t, "value", pa.array([None] * t.num_rows, pa.decimal128(10, 2)))), ["'value'", "decimal128", "float64"]),
    "task ids written otherwise": (lambda ds: _rewrite(ds / "tasks/churn.parquet", lambda t: _set_col(t, "user_id", pa.array([u + ".0" for u in t.column("user_id").to_pylist()]))), ["churn.parquet", "'user_id'", "none of its 40 users has an event or a tabular row", "'u000.0'"]),
    "category modality": (lambda ds: _rewrite(_events(ds), lambda t: _set_col(t, "modality", t.column("modality").dictionary_encode())), ["'modality'", "dictionary<values=string", "'category' column", "astype(str)"]),
    "all-null value column": (lambda ds: _rewrite(_events(ds), lambda t: _set_col(t, "value", pa.nulls(t.num_rows))), ["'value'", "has type null", "astype('float64')"]),
    "integer user ids": (lambda ds: _rewrite(ds / "tabular.parquet", lambda t: _set_col(t, "user_id", pa.array(range(t.num_rows)))), ["tabular.parquet", "'user_id'", "has type int64", "write them as text"]),
    "yes/no labels": (lambda ds: _rewrite(ds / "tasks/churn.parquet", lambda t: _set_col(t, "label", pa.array([v == 1 for v in t.column("label").to_pylist()]))), ["churn.parquet", "'label'", "has type bool", "0/1 integers"]),
    # nanoseconds since 1970 written into a microsecond column: years beyond 9999 (a traceback formatting the late event)
    "timestamps in ns as us": (lambda ds: _rewrite(_events(ds), lambda t: _set_col(t, "ts", pa.compute.multiply(t.column("ts").cast(pa.int64()), 1000).cast(pa.timestamp("us", "UTC")))), ["'ts'", "beyond the year 9999", "check the unit", "row 0"]),
    # milliseconds since 1970 written into a microsecond column: every event in January 1970, validated, no history
    "timestamps in ms as us": (lambda ds: _rewrite(_events(ds), lambda t: _set_col(t, "ts", pa.compute.divide(t.column("ts").cast(pa.int64()), 1000).cast(pa.timestamp("us", "UTC")))), ["'ts'", "every event lies in 1970", "another unit"]),
    "late event in an unknown time zone": (lambda ds: _rewrite(_events(ds), lambda t: _set_col(t, "ts", pa.array(t.column("ts").cast(pa.int64()).to_pylist()[:2] + [4_000_000_000_000_000] + t.column("ts").cast(pa.int64()).to_pylist()[3:], pa.int64()).cast(pa.timestamp("us", "Mars/Olympus")))), ["'ts'", "row 2", "not before the dataset cutoff", "2096-"]),
    "column name not UTF-8": (_latin1_column_name, ["tabular.parquet", "column name is not valid UTF-8"]),
    "string_view ids": (lambda ds: _rewrite(ds / "tabular.parquet", lambda t: _set_col(t, "user_id", t.column("user_id").cast(pa.string_view()))), ["'user_id'", "string_view", "pa.string()"]),
    "manifest key given twice": (lambda ds: (ds / "manifest.yaml").write_text((ds / "manifest.yaml").read_text() + "cutoff: '2030-01-01T00:00:00+00:00'\n"), ["manifest.yaml", "'cutoff' is given twice", "keep one"]),
    # pandas writes an int column that held a NaN as float64: it was refused by its type alone ("has type double"), no row
    "NaN label": (lambda ds: _rewrite(ds / "tasks/churn.parquet", lambda t: _set_col(t, "label", pa.array(t.column("label").to_pylist()[:3] + [float("nan")] + t.column("label").to_pylist()[4:], pa.float64()))), ["churn.parquet", "'label'", "row 3", "missing label (NaN)", "drop or fill missing labels first"]),
    "half label": (lambda ds: _rewrite(ds / "tasks/churn.parquet", lambda t: _set_col(t, "label", pa.array(t.column("label").to_pylist()[:2] + [0.5] + t.column("label").to_pylist()[3:], pa.float64()))), ["churn.parquet", "'label'", "row 2", "label 0.5 is not 0 or 1", "0/1 integers"]),
    "label window true": (lambda ds: _edit_manifest(ds, lambda m: m["tasks"][0].update(label_window_days=True)), ["label_window_days", "whole number"]),
    "cutoff beyond year 9999 in UTC": (lambda ds: _edit_manifest(ds, lambda m: m.update(cutoff="9999-12-31T23:00:00-05:00")), ["'cutoff'", "beyond the year 9999"]),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corruption_fails_with_clear_message(name, tiny_dataset, tmp_path, capsys):
    ds = tmp_path / "ds"
    shutil.copytree(tiny_dataset, ds, ignore=shutil.ignore_patterns(".qanchor_cache"))
    corrupt, expected = CORRUPTIONS[name]
    before = {p: p.read_bytes() for p in ds.rglob("*") if p.is_file()}
    corrupt(ds)
    after = {p: p.read_bytes() for p in ds.rglob("*") if p.is_file()}
    code = main(["data", "validate", str(ds)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    for fragment in expected:
        assert fragment in err, f"{fragment!r} not in {err!r}"
    # validation reads only: the (corrupted) files are exactly as the user left them
    assert after == {p: p.read_bytes() for p in ds.rglob("*") if p.is_file()}
    made = {ds / "tasks/extra.parquet", ds / "events/day=2024-01-01/part-0.parquet", ds / "events/part-9.PARQUET"}
    assert before.keys() >= after.keys() - made


def test_valid_dataset_passes_and_counts(tiny_dataset, capsys):
    assert main(["data", "validate", str(tiny_dataset)]) == 0
    out = capsys.readouterr().out
    assert "users: 40" in out and "events: 469" in out
    assert "task churn" in out and "25.0% positive" in out


def test_a_pandas_index_is_no_feature_and_labelled_users_without_data_are_counted(tiny_dataset, tmp_path, capsys):
    """to_parquet writes a sorted or filtered frame's row numbers as __index_level_0__ (or a named index): they were
    read as a tabular feature (and can carry the order a label was made from). Labelled users with neither an event
    nor a tabular row are counted beside their task."""
    import pandas as pd

    from qanchor.data.dataset import load_dataset

    ds = tmp_path / "ds"
    shutil.copytree(tiny_dataset, ds, ignore=shutil.ignore_patterns(".qanchor_cache"))
    frame = pq.read_table(ds / "tabular.parquet").to_pandas().sort_values("income")
    frame.to_parquet(ds / "tabular.parquet")  # the index of a sorted frame is kept
    assert "__index_level_0__" in pq.read_schema(ds / "tabular.parquet").names
    assert load_dataset(ds).tabular_columns == ["age", "income"]
    frame.set_index(pd.Index([i * i for i in range(len(frame))], name="row")).to_parquet(ds / "tabular.parquet")  # a named index
    assert "row" in pq.read_schema(ds / "tabular.parquet").names
    churn = pq.read_table(ds / "tasks/churn.parquet")
    pq.write_table(pa.concat_tables([churn, pa.table({"user_id": ["ghost"], "label": pa.array([1], pa.int8())})]),
                   ds / "tasks/churn.parquet")
    assert main(["data", "validate", str(ds)]) == 0
    out = capsys.readouterr().out
    assert "tabular features: age, income\n" in out and "(1 without an event or a tabular row)" in out
    assert load_dataset(ds).tabular_columns == ["age", "income"]


def test_task_labels_written_as_floats_are_read_as_the_same_labels(tiny_dataset, tmp_path):
    """A task file whose labels pandas wrote as float64 0.0 / 1.0 was refused ("has type double, expected integer"),
    while the same file given as labels= was read."""
    from qanchor.data.dataset import load_dataset

    ds = tmp_path / "ds"
    shutil.copytree(tiny_dataset, ds, ignore=shutil.ignore_patterns(".qanchor_cache"))
    expected = load_dataset(tiny_dataset).tasks["churn"].labels
    _rewrite(ds / "tasks/churn.parquet", lambda t: _set_col(t, "label", t.column("label").cast(pa.float64())))
    labels = load_dataset(ds).tasks["churn"].labels
    assert labels.dtype == np.int8 and np.array_equal(labels, expected) and 0 < labels.sum() < len(labels)


def test_hidden_files_in_tasks_are_passed_over_as_in_events(tiny_dataset, tmp_path, capsys):
    """A copy from a Mac leaves ``tasks/._churn.parquet`` (an AppleDouble file, no Parquet): it was refused as a task
    the manifest does not declare, while ``events/`` passes hidden and underscore names over."""
    from qanchor.data.dataset import load_dataset

    ds = tmp_path / "ds"
    shutil.copytree(tiny_dataset, ds, ignore=shutil.ignore_patterns(".qanchor_cache"))
    list(load_dataset(ds).users())
    cache = sorted(p.name for p in (ds / ".qanchor_cache").glob("users-*"))
    (ds / "tasks/._churn.parquet").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
    (ds / "tasks/_SUCCESS.parquet").write_bytes(b"")
    assert main(["data", "validate", str(ds)]) == 0
    assert "task churn" in capsys.readouterr().out
    loaded = load_dataset(ds)
    assert sorted(loaded.tasks) == sorted(load_dataset(tiny_dataset).tasks)
    list(loaded.users())
    assert sorted(p.name for p in (ds / ".qanchor_cache").glob("users-*")) == cache  # no new events cache for them


def test_console_script_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "qanchor.cli", "data", "validate", str(tmp_path / "nope")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {tmp_path / 'nope'}: dataset directory not found"


def _shift_to_cutoff(ds: Path, cutoff: str, last_offset_us: int) -> None:
    """Move the dataset to ``cutoff``: every event keeps its distance to the cutoff (in whole microseconds), and the
    latest event lands ``last_offset_us`` before it (0: exactly at the cutoff)."""
    from datetime import datetime, timedelta, timezone

    def exact_us(value) -> int:
        dt = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
        return (dt.replace(tzinfo=dt.tzinfo or timezone.utc) - datetime(1970, 1, 1, tzinfo=timezone.utc)) // timedelta(microseconds=1)

    new = exact_us(cutoff)
    shift = new - exact_us(yaml.safe_load((ds / "manifest.yaml").read_text())["cutoff"])
    files = sorted((ds / "events").glob("*.parquet"))
    latest = max(max(pq.read_table(f).column("ts").cast(pa.int64()).to_pylist()) for f in files)

    def move(t: pa.Table) -> pa.Table:
        ts = [new - last_offset_us if v == latest else v + shift for v in t.column("ts").cast(pa.int64()).to_pylist()]
        return _set_col(t, "ts", pa.array(ts, pa.int64()).cast(t.schema.field("ts").type))

    for f in files:
        _rewrite(f, move)
    _edit_manifest(ds, lambda m: m.update(cutoff=cutoff))


# Cutoffs whose float timestamp() * 1e6 is 1 us off the exact count (found by search): a float conversion let an
# event at the 1952 cutoff through and refused one 1 us before the 2005 cutoff.
FRACTIONAL_CUTOFFS = ["1952-05-06T03:55:03.784368+00:00", "2005-04-19T15:17:04.547000+00:00"]


@pytest.mark.parametrize("cutoff", FRACTIONAL_CUTOFFS)
def test_cutoff_is_exact_to_the_microsecond(cutoff, tiny_dataset, tmp_path, capsys):
    from datetime import datetime, timedelta, timezone

    from qanchor.data.dataset import load_dataset

    exact = (datetime.fromisoformat(cutoff) - datetime(1970, 1, 1, tzinfo=timezone.utc)) // timedelta(microseconds=1)
    assert int(datetime.fromisoformat(cutoff).timestamp() * 1_000_000) != exact  # the case the float got wrong
    just_before, at = tmp_path / "before", tmp_path / "at"
    for ds, offset in ((just_before, 1), (at, 0)):
        shutil.copytree(tiny_dataset, ds, ignore=shutil.ignore_patterns(".qanchor_cache"))
        _shift_to_cutoff(ds, cutoff, offset)
    assert load_dataset(just_before).manifest.cutoff_us == exact
    assert main(["data", "validate", str(just_before)]) == 0, capsys.readouterr().err
    latest = max(int(s.ts.max()) for r in load_dataset(just_before).users() for s in r.events.values() if len(s.ts))
    assert latest == exact - 1  # the event 1 us before the cutoff is kept
    capsys.readouterr()
    assert main(["data", "validate", str(at)]) == 2
    assert "not before the dataset cutoff" in capsys.readouterr().err


def test_writer_markers_beside_event_files_are_passed_over(tiny_dataset, tmp_path, capsys):
    """Spark / Hadoop leave _SUCCESS and .crc files, macOS .DS_Store: none is data, and none stops a dataset."""
    ds = tmp_path / "ds"
    shutil.copytree(tiny_dataset, ds, ignore=shutil.ignore_patterns(".qanchor_cache"))
    for name in ("_SUCCESS", ".DS_Store", ".part-00000.parquet.crc", "part-00000.parquet.crc"):
        (ds / "events" / name).write_bytes(b"")
    assert main(["data", "validate", str(ds)]) == 0
    assert "events: 469" in capsys.readouterr().out


def test_one_file_per_modality_needs_only_its_own_columns(tiny_dataset, tmp_path, capsys):
    """A file of `app` events need not carry `discount`, which the manifest declares for `bill` only (the loader fills
    absent columns with nulls); a file that holds bill events still must."""
    import pyarrow.compute as pc

    from qanchor.data.dataset import load_dataset

    ds = tmp_path / "ds"
    shutil.copytree(tiny_dataset, ds, ignore=shutil.ignore_patterns(".qanchor_cache"))
    files = sorted((ds / "events").glob("*.parquet"))
    table = pa.concat_tables([pq.read_table(f) for f in files])
    for f in files:
        f.unlink()
    for k, modality in enumerate(sorted(set(table.column("modality").to_pylist()))):
        part = table.filter(pc.equal(table.column("modality"), modality))
        pq.write_table(part if modality == "bill" else part.drop_columns(["discount"]), ds / "events" / f"part-{k}.parquet")
    assert main(["data", "validate", str(ds)]) == 0, capsys.readouterr().err
    assert "events: 469" in capsys.readouterr().out
    record = next(r for r in load_dataset(ds).users() if "app" in r.events)
    assert np.isnan(record.events["app"].extras).all()


def test_userU_cutoffs_beyond_microseconds_are_named(tiny_dataset, tmp_path, capsys):
    """Pair cutoffs in a unit whose values microseconds cannot hold: the cast had no guard (ArrowInvalid traceback)."""
    ds = tmp_path / "ds"
    shutil.copytree(tiny_dataset, ds, ignore=shutil.ignore_patterns(".qanchor_cache"))
    user = pq.read_table(ds / "tabular.parquet").column("user_id")[0].as_py()
    pq.write_table(pa.table({"user_id": [user], "cutoff": pa.array([2**62], pa.int64()).cast(pa.timestamp("ms")),
                             "query": ["Is this user active?"], "answer": ["Yes"], "source": ["uqa"]}), ds / "userU.parquet")
    assert main(["data", "validate", str(ds)]) == 2
    err = capsys.readouterr().err
    assert "userU.parquet" in err and "'cutoff'" in err and "check the unit" in err and "Traceback" not in err
