"""Validation at the door: every rule of the dataset format, checked once, with errors that say where.

``validate_dataset(dir)`` raises :class:`~qanchor.errors.DataValidationError` naming the file, the
column, the first bad row (0-based, counted within that file) and the rule broken. Row-level checks
stream record batches, so a large export is checked in bounded memory. Nothing downstream re-checks.

Example:
    >>> from qanchor.data.validate import validate_dataset
    >>> report = validate_dataset("data/synth")  # doctest: +SKIP
    >>> report.n_events, report.n_users  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from qanchor.data.manifest import Manifest
from qanchor.data.schema import (
    EVENTS_DIR,
    TABULAR_FILE,
    TASKS_DIR,
    USERU_FILE,
    USERU_SOURCES,
    tabular_feature_columns,
    userU_metadata,
    utc_micros,
)
from qanchor.errors import DataValidationError

__all__ = ["ValidationReport", "validate_dataset", "event_files", "task_files", "check_event_file", "check_tabular_file", "not_storable", "EPOCH_YEAR_US"]

_BATCH_ROWS = 262_144
_FLOAT32_MAX = float(np.finfo(np.float32).max)  # events and tabular values are stored as float32


@dataclass
class ValidationReport:
    """What a valid dataset holds: counts per modality and task, for the CLI to print."""

    manifest: Manifest
    n_event_files: int = 0
    n_events: int = 0
    events_per_modality: dict[str, int] = field(default_factory=dict)
    n_users: int = 0
    n_tabular_users: int = 0
    tabular_columns: list[str] = field(default_factory=list)  # the features read (a pandas index left out)
    task_counts: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (users, positives)
    task_users_without_data: dict[str, int] = field(default_factory=dict)  # name -> labelled users with no event or row
    n_userU_pairs: int = 0


def event_files(dataset_dir: str | Path) -> list[Path]:
    """The event Parquet files of a dataset, in name order (the order users and rows are read in).

    Every other entry of ``events/`` is refused rather than skipped, so that no event is silently lost: a
    partitioned folder (``events/day=2024-01-01/part-0.parquet``) or a file named ``part-1.PARQUET`` holds events
    too. Hidden and underscore names (``.DS_Store``, ``_SUCCESS``, writers' temporaries) and ``*.crc`` checksums
    are not data and are passed over.
    """
    folder = Path(dataset_dir) / EVENTS_DIR
    if not folder.is_dir():
        return []
    files = []
    for path in sorted(folder.iterdir()):
        if _not_data(path):
            continue
        if path.suffix != ".parquet" or not path.is_file():
            what = ("a folder" if path.is_dir() else "a link to nothing" if path.is_symlink() and not path.exists()
                    else "not named *.parquet")
            raise DataValidationError(str(path), f"{what}: qanchor reads only the Parquet files directly in {EVENTS_DIR}/ "
                                      f"(*.parquet); move its events into {EVENTS_DIR}/ as flat *.parquet files "
                                      "(e.g. pyarrow.parquet.write_table(table, 'events/part-00001.parquet')) or "
                                      "remove it from the dataset")
        files.append(path)
    return files


def task_files(dataset_dir: str | Path) -> list[Path]:
    """The task files of a dataset (``tasks/*.parquet``), in name order; hidden and underscore names are passed over
    as in ``events/`` (``._churn.parquet``, the AppleDouble file a copy from a Mac leaves, was refused as a task the
    manifest does not declare)."""
    return [p for p in sorted((Path(dataset_dir) / TASKS_DIR).glob("*.parquet")) if not _not_data(p)]


def _not_data(path: Path) -> bool:
    """Hidden and underscore names (``.DS_Store``, ``_SUCCESS``, writers' temporaries) and ``*.crc`` checksums."""
    return path.name.startswith((".", "_")) or path.name.endswith(".crc")


def validate_dataset(dataset_dir: str | Path, pairs: bool = True) -> ValidationReport:
    """Check a dataset directory against the format; return counts, or raise DataValidationError.

    ``pairs=False`` leaves ``userU.parquet`` unread: ``qanchor data userU`` replaces its own pairs, which may no
    longer fit a dataset whose cutoff or users changed since they were built."""
    root = Path(dataset_dir)
    if not root.is_dir():
        raise DataValidationError(str(root), "dataset directory not found")
    manifest = Manifest.load(root)
    report = ValidationReport(manifest, events_per_modality={m.name: 0 for m in manifest.sequence_modalities})
    users: set[str] = set()
    files = event_files(root)
    if manifest.sequence_modalities and not files:
        raise DataValidationError(str(root / EVENTS_DIR), "no *.parquet event files, but the manifest declares sequence modalities")
    for path in files:
        _check_event_file(path, manifest, report, users)
    report.n_event_files = len(files)
    _check_tabular(root, manifest, report, users)
    _check_tasks(root, manifest, report, users)
    if pairs:
        _check_userU(root, manifest, report, users)
    report.n_users = len(users)
    return report


# ------------------------------------------------------------------------------------------ helpers
def _open(path: Path) -> pq.ParquetFile:
    try:
        # page checksums verified where the file has them (qanchor writes them): a byte flipped on disk in a dataset's
        # file is refused as unreadable, not read as another value
        pf = pq.ParquetFile(path, page_checksum_verification=True)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataValidationError(str(path), f"not a readable Parquet file ({exc})") from None
    except UnicodeDecodeError:  # Arrow decodes the column names as it opens the file
        raise DataValidationError(str(path), "a column name is not valid UTF-8 text; rename the columns (as UTF-8) "
                                  "and write the file again") from None
    if pf.metadata.num_rows == 0:
        raise DataValidationError(str(path), "file has no rows; remove it or export the data again")
    return pf


def _require(path: Path, schema: pa.Schema, column: str, kind: str) -> None:
    if column not in schema.names:
        raise DataValidationError(str(path), f"required column is missing (expected {kind})", column=column)
    if (copies := len(schema.get_all_field_indices(column))) > 1:
        raise DataValidationError(str(path), f"{copies} columns have this name; keep one", column=column)
    typ = schema.field(column).type
    ok = {
        "string": pa.types.is_string(typ) or pa.types.is_large_string(typ),
        "timestamp": pa.types.is_timestamp(typ),
        "number": pa.types.is_integer(typ) or pa.types.is_floating(typ),
        # whole-number floats pass here (pandas writes an int column that held a NaN as float64), as in a labels= file;
        # their values are checked as 0 / 1, and the dataset reads them as int8
        "0/1 label": pa.types.is_integer(typ) or pa.types.is_floating(typ),
    }[kind]
    if not ok:
        if pa.types.is_dictionary(typ):  # pandas writes its 'category' dtype so
            hint = f" (a pandas 'category' column: write it with df['{column}'].astype(str))"
        elif pa.types.is_null(typ) and kind == "number":  # pandas writes an object column holding only None so
            hint = (" (a column with no value at all, as pandas writes one that holds only None: write it with "
                    f"df['{column}'].astype('float64'), null where unknown)")
        elif kind == "string" and pa.types.is_string_view(typ):  # Polars 1.38 writes its strings so
            hint = (" (text stored as string_view, as newer Polars writes it: cast the column to a plain string, e.g. "
                    f"pl.col('{column}').cast(pl.String) written with use_pyarrow=True, or table.cast(...) to pa.string())")
        elif kind == "string" and pa.types.is_integer(typ):
            hint = f" (ids that are numbers: write them as text, df['{column}'].astype(str), the same way in every file)"
        else:
            hint = {"timestamp": " (parse the timestamps before writing, as UTC)",
                    "number": " (write a yes/no column as 0/1, a category as one 0/1 column per value or a code)"
                    if pa.types.is_boolean(typ) or pa.types.is_string(typ) or pa.types.is_large_string(typ) else
                    " (cast decimal amounts to float64 before writing)" if pa.types.is_decimal(typ) else "",
                    "0/1 label": " (write labels as 0/1 integers)"}.get(kind, "")
        raise DataValidationError(str(path), f"has type {typ}, expected {kind}{hint}", column=column)


_NOT_STORABLE = "infinite value, or beyond float32 range (about 3.4e38); use null for missing"


def not_storable(values: np.ndarray) -> np.ndarray:
    """Infinities, and finite values that float32 would turn into infinities (NaN = missing, allowed); a mask of
    ``values`` read as float64, so a too-large value is found without an overflow warning."""
    values = np.asarray(values, np.float64)
    with np.errstate(invalid="ignore"):
        return np.isinf(values) | (np.abs(values) > _FLOAT32_MAX)


def _first(mask: pa.Array | np.ndarray) -> int | None:
    arr = mask.to_numpy(zero_copy_only=False) if isinstance(mask, (pa.Array, pa.ChunkedArray)) else mask
    idx = np.flatnonzero(arr)
    return int(idx[0]) if idx.size else None


def _no_nulls(path: Path, batch: pa.RecordBatch, column: str, offset: int) -> None:
    col = batch.column(column)
    if col.null_count:
        row = _first(col.is_null())
        raise DataValidationError(str(path), "null value; every row needs one", column=column, row=offset + row)


EPOCH_YEAR_US = 365 * 86_400 * 1_000_000


def _micros_text(us: int) -> str:
    """A timestamp (microseconds since 1970, UTC) as ISO text; one beyond Python's dates (a wrong unit) as the number."""
    try:
        return (datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(microseconds=us)).isoformat()
    except OverflowError:
        return f"{us} microseconds since 1970 (beyond the year 9999: check the unit the timestamps were written in)"


def _utc_micros(col: pa.Array) -> np.ndarray:
    """Timestamps as int64 microseconds since the epoch (UTC); naive timestamps are read as UTC (:func:`utc_micros`)."""
    return utc_micros(col).cast(pa.int64()).to_numpy(zero_copy_only=False)


def check_event_file(path: str | Path, manifest: Manifest, cutoff_name: str = "the dataset cutoff") -> None:
    """Check one events Parquet file against ``manifest`` alone (columns, types, modalities, timestamps before
    the manifest's cutoff, which errors call ``cutoff_name``, ...); raise DataValidationError naming the file, column
    and first bad row."""
    report = ValidationReport(manifest, events_per_modality={m.name: 0 for m in manifest.sequence_modalities})
    _check_event_file(Path(path), manifest, report, set(), cutoff_name)


def _check_event_file(path: Path, manifest: Manifest, report: ValidationReport, users: set[str],
                      cutoff_name: str = "the dataset cutoff") -> None:
    pf = _open(path)
    schema = pf.schema_arrow
    for col, kind in (("user_id", "string"), ("modality", "string"), ("ts", "timestamp"), ("text", "string")):
        _require(path, schema, col, kind)
    if "value" in schema.names:
        _require(path, schema, "value", "number")
    held = None  # the modalities this file holds, read only if a declared column is absent
    for m in manifest.sequence_modalities:
        for col in m.numeric_columns:
            if col not in schema.names:  # fine in a file without that modality's events (one file per modality)
                if held is None:
                    held = set(pc.unique(_read(path, pf, ["modality"]).column(0)).to_pylist())
                if m.name not in held:
                    continue
                raise DataValidationError(str(path), f"required column is missing (expected number): the manifest "
                                          f"declares it for modality '{m.name}', whose events this file holds; add it "
                                          "(null where unknown)", column=col)
            _require(path, schema, col, "number")
    known = {m.name for m in manifest.sequence_modalities}
    cutoff_us = manifest.cutoff_us
    numeric = [c for c in dict.fromkeys(["value", *(c for m in manifest.sequence_modalities for c in m.numeric_columns)])
               if c in schema.names]
    offset, span = 0, None  # span: the earliest and latest event, microseconds
    for batch in _batches(path, pf, ["user_id", "modality", "ts", "text", *numeric]):
        for col in ("user_id", "modality", "text"):
            _valid_text(path, batch.column(col), col, offset)
        for col in numeric:  # NaN / null mean "missing"; an infinity is a broken export
            values = batch.column(col).to_numpy(zero_copy_only=False).astype(np.float64)
            bad = _first(not_storable(values))
            if bad is not None:
                raise DataValidationError(str(path), _NOT_STORABLE, column=col, row=offset + bad)
        for col in ("user_id", "modality", "ts", "text"):
            _no_nulls(path, batch, col, offset)
        empty = _first(pc.equal(pc.utf8_length(batch.column("user_id")), 0))
        if empty is not None:
            raise DataValidationError(str(path), "empty user_id", column="user_id", row=offset + empty)
        mods = batch.column("modality")
        bad = _first(pc.invert(pc.is_in(mods, value_set=pa.array(sorted(known), type=mods.type))))
        if bad is not None:
            raise DataValidationError(
                str(path),
                f"unknown modality '{mods[bad].as_py()}'; the manifest's sequence modalities are: {', '.join(sorted(known))}",
                column="modality",
                row=offset + bad,
            )
        try:
            ts = _utc_micros(batch.column("ts"))
        except pa.ArrowInvalid as exc:  # seconds or milliseconds beyond what microseconds can hold
            raise DataValidationError(str(path), f"a timestamp out of range ({str(exc).splitlines()[0][:120]}); check "
                                      "the unit the timestamps were written in", column="ts") from None
        late = _first(ts >= cutoff_us)
        if late is not None:
            raise DataValidationError(
                str(path),
                f"event at {_micros_text(int(ts[late]))} is not before {cutoff_name} "
                f"{manifest.cutoff.isoformat()}; inputs must come from before it",
                column="ts",
                row=offset + late,
            )
        if len(ts):
            span = (min(span[0], int(ts.min())), max(span[1], int(ts.max()))) if span else (int(ts.min()), int(ts.max()))
        counts = pc.value_counts(mods)
        for item in counts.to_pylist():
            report.events_per_modality[item["values"]] += item["counts"]
        users.update(pc.unique(batch.column("user_id")).to_pylist())
        offset += batch.num_rows
    if span is not None and 0 <= span[0] and span[1] < EPOCH_YEAR_US and cutoff_us > 20 * EPOCH_YEAR_US:
        # seconds or milliseconds written into a microsecond or nanosecond column: every event lands in January 1970,
        # the dataset validates, and every window before the cutoff is empty (no future pairs, no labels' history)
        raise DataValidationError(str(path), f"every event lies in 1970 (the latest at {_micros_text(span[1])}), decades "
                                  f"before {cutoff_name} {manifest.cutoff.isoformat()}: the timestamps were most likely "
                                  "written in another unit than their column's (seconds or milliseconds since 1970 "
                                  "stored as microseconds or nanoseconds); convert them with the right unit and write "
                                  "the file again", column="ts")
    report.n_events += offset


def _batches(path: Path, pf: pq.ParquetFile, columns: list[str]):
    """``pf``'s record batches of ``columns``; a file that breaks while being read is a DataValidationError."""
    reader = pf.iter_batches(batch_size=_BATCH_ROWS, columns=columns)
    while True:
        try:
            batch = next(reader)
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as exc:
            raise DataValidationError(str(path), f"unreadable ({str(exc).splitlines()[0][:160]}); export the file "
                                      "again") from None
        yield batch


def _read(path: Path, pf: pq.ParquetFile, columns: list[str] | None = None) -> pa.Table:
    try:
        return pf.read(columns=columns)
    except (pa.ArrowException, OSError) as exc:
        raise DataValidationError(str(path), f"unreadable ({str(exc).splitlines()[0][:160]}); export the file "
                                  "again") from None


def _valid_text(path: Path, col: pa.Array | pa.ChunkedArray, name: str, offset: int = 0) -> None:
    """Strings must be UTF-8 (Arrow stores whatever bytes a writer gave it, and fails later, deep inside)."""
    start = 0
    for chunk in col.chunks if isinstance(col, pa.ChunkedArray) else [col]:
        try:
            chunk.validate(full=True)
        except pa.ArrowInvalid:
            raw = chunk.view(pa.large_binary() if pa.types.is_large_string(chunk.type) else pa.binary()).to_pylist()
            bad = next((i for i, b in enumerate(raw) if b is not None and not _decodes(b)), 0)
            raise DataValidationError(str(path), "text that is not valid UTF-8; write the column as UTF-8 text",
                                      column=name, row=offset + start + bad) from None
        start += len(chunk)


def _decodes(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _check_unique_users(path: Path, col: pa.ChunkedArray) -> None:
    _valid_text(path, col, "user_id")
    if col.null_count:
        raise DataValidationError(str(path), "null user_id", column="user_id", row=_first(col.is_null()))
    empty = _first(pc.equal(pc.utf8_length(col), 0))
    if empty is not None:  # the events' rule: an empty id is no user
        raise DataValidationError(str(path), "empty user_id", column="user_id", row=empty)
    values = col.to_numpy(zero_copy_only=False)
    _, first_idx, counts = np.unique(values, return_index=True, return_counts=True)
    if (counts > 1).any():
        dup_pos = np.sort(first_idx[counts > 1])[0]
        dup_rows = np.flatnonzero(values == values[dup_pos])
        raise DataValidationError(
            str(path), f"user '{values[dup_pos]}' appears more than once; keep one row per user",
            column="user_id", row=int(dup_rows[1]),
        )


def _check_tabular(root: Path, manifest: Manifest, report: ValidationReport, users: set[str]) -> None:
    path = root / TABULAR_FILE
    if manifest.tabular is None:
        if path.exists():
            raise DataValidationError(str(path), "tabular.parquet exists but the manifest declares no tabular modality")
        return
    if not path.exists():
        raise DataValidationError(str(path), "file not found, but the manifest declares a tabular modality")
    table = check_tabular_file(path)
    report.n_tabular_users, report.tabular_columns = table.num_rows, table.column_names[1:]
    users.update(table.column("user_id").to_pylist())


def check_tabular_file(path: Path) -> pa.Table:
    """Read a tabular file (``user_id`` + numeric feature columns, one row per user) after checking it, as a dataset's
    ``tabular.parquet`` is checked (DataValidationError naming the column and row); a pandas index written beside the
    features is left out (:func:`~qanchor.data.schema.tabular_feature_columns`)."""
    pf = _open(path)
    _require(path, pf.schema_arrow, "user_id", "string")
    features = tabular_feature_columns(pf.schema_arrow)
    if not features:
        raise DataValidationError(str(path), "no feature columns besides user_id")
    for name in features:
        _require(path, pf.schema_arrow, name, "number")
    table = _read(path, pf, ["user_id", *features])
    _check_unique_users(path, table.column("user_id"))
    for name in features:
        values = table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
        bad = _first(not_storable(values))
        if bad is not None:
            raise DataValidationError(str(path), _NOT_STORABLE, column=name, row=bad)
    return table


_WRITE_LABELS = "write labels as 0/1 integers (drop or fill missing labels first)"


def _check_tasks(root: Path, manifest: Manifest, report: ValidationReport, users: set[str]) -> None:
    declared = {t.name for t in manifest.tasks}
    with_data = set(users)  # the users with events or a tabular row (labelled ones join below)
    for path in task_files(root):
        if path.stem not in declared:
            raise DataValidationError(str(path), f"task file for '{path.stem}', which the manifest does not declare; add it to manifest.yaml tasks or remove the file")
    for task in manifest.tasks:
        path = root / TASKS_DIR / f"{task.name}.parquet"
        if not path.exists():
            raise DataValidationError(str(path), f"file not found for task '{task.name}' declared in the manifest")
        pf = _open(path)
        _require(path, pf.schema_arrow, "user_id", "string")
        _require(path, pf.schema_arrow, "label", "0/1 label")
        table = _read(path, pf)
        _check_unique_users(path, table.column("user_id"))
        label = table.column("label")
        if label.null_count:
            raise DataValidationError(str(path), f"null label; {_WRITE_LABELS}", column="label", row=_first(label.is_null()))
        values = label.to_numpy(zero_copy_only=False)
        bad = _first((values != 0) & (values != 1))  # NaN included: a float column's missing label
        if bad is not None:
            what = "missing label (NaN)" if np.isnan(values[bad]) else f"label {values[bad]} is not 0 or 1"
            raise DataValidationError(str(path), f"{what}; {_WRITE_LABELS}", column="label", row=bad)
        if "prob" in table.column_names:
            _require(path, pf.schema_arrow, "prob", "number")
            prob = table.column("prob").to_numpy(zero_copy_only=False).astype(np.float64)
            bad = _first(~((prob >= 0) & (prob <= 1)))
            if bad is not None:
                raise DataValidationError(str(path), "prob must lie in [0, 1]", column="prob", row=bad)
        report.task_counts[task.name] = (table.num_rows, int(values.sum()))
        ids = table.column("user_id").to_pylist()
        without = sum(u not in with_data for u in ids)
        if with_data and without == len(ids):  # every method would score these users alike: AUC 0.5, no warning
            raise DataValidationError(str(path), f"none of its {len(ids)} users has an event or a tabular row (task user "
                                      f"{ids[0]!r}; the events name users such as {min(with_data)!r}): write its "
                                      "user ids as the events do (an id read as a number, '1001.0' for '1001'?)",
                                      column="user_id")
        report.task_users_without_data[task.name] = without
        users.update(ids)  # a labelled user with no events is still a user


def _check_userU(root: Path, manifest: Manifest, report: ValidationReport, users: set[str]) -> None:
    path = root / USERU_FILE
    if not path.exists():
        return
    pf = _open(path)
    for col, kind in (("user_id", "string"), ("cutoff", "timestamp"), ("query", "string"), ("answer", "string"), ("source", "string")):
        _require(path, pf.schema_arrow, col, kind)
    table = _read(path, pf)
    for col in ("user_id", "query", "answer", "source"):  # a user's own pairs file: checked as every text is
        _valid_text(path, table.column(col), col)
    for col in ("user_id", "cutoff", "query", "answer", "source"):
        _no_nulls(path, table.combine_chunks().to_batches()[0], col, 0)
    for col in ("query", "answer"):
        empty = _first(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(table.column(col))), 0))
        if empty is not None:
            raise DataValidationError(str(path), "empty text", column=col, row=empty)
    bad = _first(pc.invert(pc.is_in(table.column("source"), value_set=pa.array(USERU_SOURCES))))
    if bad is not None:
        raise DataValidationError(str(path), f"source must be one of {', '.join(USERU_SOURCES)}", column="source", row=bad)
    # qanchor's own pairs were built for this dataset as it was then: say how to rebuild them
    rebuild = (f"; these pairs were built by `qanchor data userU` before the dataset changed: rebuild them with "
               f"`qanchor data userU {root}`" if userU_metadata(path) is not None else "")
    try:
        pair_cutoffs = _utc_micros(table.column("cutoff").combine_chunks())
    except pa.ArrowInvalid as exc:  # seconds or milliseconds beyond what microseconds can hold
        raise DataValidationError(str(path), f"a cutoff out of range ({str(exc).splitlines()[0][:120]}); check the "
                                  "unit the cutoffs were written in", column="cutoff") from None
    late = _first(pair_cutoffs > manifest.cutoff_us)
    if late is not None:
        raise DataValidationError(str(path), "pair cutoff lies after the dataset cutoff (it would look into the label "
                                  f"window){rebuild}", column="cutoff", row=late)
    stranger = _first(pc.invert(pc.is_in(table.column("user_id"), value_set=pa.array(sorted(users), pa.string()))))
    if stranger is not None:
        raise DataValidationError(str(path), f"user '{table.column('user_id')[stranger].as_py()}' is not a user of this "
                                  f"dataset (no events, tabular row or label){rebuild}", column="user_id", row=stranger)
    report.n_userU_pairs = table.num_rows
