"""Arrow schemas of the dataset directory (DESIGN section 2) and a writer that keeps them.

Layout::

    <dataset>/manifest.yaml
    <dataset>/events/part-00000.parquet   user_id, modality, ts (UTC), text, value, <extra numeric columns>
    <dataset>/tabular.parquet             user_id + numeric feature columns          [optional]
    <dataset>/tasks/<task>.parquet        user_id, label:int8 (+ optional prob:float64, the true P(label=1))
    <dataset>/userU.parquet               user_id, cutoff, query, answer, source (future | uqa | forecast | signature)
                                          [built by `qanchor data userU`]
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Collection
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from qanchor.data.io import (
    MARKER_FILE,
    OutputKind,
    atomic_dir,
    check_replaceable,
    enclosing_output,
    file_sha256,
    is_temporary,
    mark_output,
    output_kind,
    output_record,
    refuse_working_directory,
    write_parquet,
)
from qanchor.data.manifest import MANIFEST_FILE, Manifest
from qanchor.errors import OutputError

__all__ = [
    "TS_TYPE",
    "EVENT_CORE_COLUMNS",
    "event_schema",
    "USERU_SCHEMA",
    "USERU_FILE",
    "TABULAR_FILE",
    "EVENTS_DIR",
    "USERU_SOURCES",
    "TASKS_DIR",
    "events_table",
    "utc_micros",
    "userU_metadata",
    "check_userU_target",
    "check_dataset_target",
    "write_dataset",
]

TS_TYPE = pa.timestamp("us", tz="UTC")
EVENTS_DIR, TASKS_DIR, TABULAR_FILE, USERU_FILE = "events", "tasks", "tabular.parquet", "userU.parquet"
CACHE_DIR = ".qanchor_cache"  # a dataset's own cache (user partitions, text vectors), unless data.cache_dir says elsewhere
USERU_OWNER_KEY, USERU_OWNER_VALUE = "qanchor", "userU pairs"  # Parquet schema metadata: written by `qanchor data userU`


def tabular_feature_columns(schema: pa.Schema) -> list[str]:
    """A tabular file's feature columns: every column but ``user_id`` and a pandas index (``to_parquet`` writes a
    DataFrame's index as ``__index_level_0__``, or under its name, beside the data; the row numbers of a sorted or
    filtered frame would otherwise become a feature, and can carry the very order a label was made from)."""
    meta = schema.pandas_metadata or {}
    index = {c for c in meta.get("index_columns", []) if isinstance(c, str)}  # a RangeIndex is stored as a dict, no column
    return [n for n in schema.names
            if n != "user_id" and n not in index and not re.fullmatch(r"__index_level_\d+__", n)]


def utc_micros(col: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """Timestamps as ``TS_TYPE`` (microseconds, UTC), the one type qanchor computes with. Naive timestamps are read as
    UTC. A finer unit (pandas writes nanoseconds) is floored to the microsecond: a cutoff is a whole microsecond and
    only events strictly before it count, so flooring never moves an event to the other side of one.

    Example:
        >>> utc_micros(pa.array([1_000_000_999], pa.timestamp("ns"))).cast(pa.int64()).to_pylist()
        [1000000]
    """
    if col.type.unit == "ns":
        if col.type.tz is not None:  # floored in UTC: in local time a daylight-saving fall-back hour is ambiguous
            col = col.cast(pa.timestamp("ns", "UTC"))  # the same instants (only the zone label changes)
        col = pc.floor_temporal(col, unit="microsecond")  # the remainder is 0 now, so the casts below are exact
    if col.type.tz is None:
        return col.cast(pa.timestamp("us")).cast(pa.int64()).cast(TS_TYPE)
    return col.cast(TS_TYPE)
EVENT_CORE_COLUMNS = ("user_id", "modality", "ts", "text", "value")
USERU_SOURCES = ("future", "uqa", "forecast", "signature")
USERU_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("cutoff", TS_TYPE),
        ("query", pa.string()),
        ("answer", pa.string()),
        ("source", pa.string()),
    ]
)


def event_schema(manifest: Manifest) -> pa.Schema:
    """The event-file schema for ``manifest``: core columns then every modality's extra columns."""
    fields = [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("modality", pa.string(), nullable=False),
        pa.field("ts", TS_TYPE, nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("value", pa.float32()),
    ]
    seen = set()
    for m in manifest.sequence_modalities:
        for col in m.numeric_columns:
            if col not in seen:
                seen.add(col)
                fields.append(pa.field(col, pa.float32()))
    return pa.schema(fields)


def events_table(manifest: Manifest, columns: dict[str, object]) -> pa.Table:
    """Build an event table in the manifest's schema from column arrays (missing extras become null).

    ``ts`` may be numpy datetime64 values or integer microseconds since the epoch (UTC).
    """
    schema = event_schema(manifest)
    n = len(columns["user_id"])
    arrays = []
    for f in schema:
        if f.name in columns:
            values = columns[f.name]
            if f.name == "ts":
                values = np.asarray(values)
                if np.issubdtype(values.dtype, np.datetime64):
                    values = values.astype("datetime64[us]").astype(np.int64)
                arrays.append(pa.array(values, type=pa.int64()).cast(TS_TYPE))
            else:
                arrays.append(pa.array(values, type=f.type, from_pandas=True))
        else:
            arrays.append(pa.nulls(n, type=f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def write_dataset(
    out_dir: str | Path,
    manifest: Manifest,
    event_parts: list[pa.Table],
    tabular: pa.Table | None = None,
    tasks: dict[str, pa.Table] | None = None,
) -> Path:
    """Write a whole dataset directory atomically (a crash leaves the previous directory intact).

    ``event_parts`` are tables from :func:`events_table`, one Parquet file each (sort each part by
    user then time for good compression). ``tasks`` maps task name -> table(user_id, label[, prob]).
    """
    out_dir = Path(out_dir)
    check_dataset_target(out_dir)
    with atomic_dir(out_dir, OutputKind.DATASET) as tmp:
        manifest.save(tmp)
        # a part without rows (all its users silent) is left out: the validator refuses an events file with no rows
        for i, part in enumerate(p for p in event_parts if p.num_rows):
            write_parquet(part, tmp / EVENTS_DIR / f"part-{i:05d}.parquet")
        if tabular is not None:
            write_parquet(tabular, tmp / TABULAR_FILE)
        for name, table in (tasks or {}).items():
            label = table.column("label").cast(pa.int8())
            table = table.set_column(table.schema.get_field_index("label"), "label", label)
            write_parquet(table, tmp / TASKS_DIR / f"{name}.parquet")
        # what the build wrote, by content: a rebuild replaces the directory whole, so a file a user adds or overwrites
        # later (an events part of their own named like ours, a task of their own declared in the manifest) must be
        # told from these, which names alone cannot do
        # (the manifest too: a task's question edited by hand is the user's work, which a rebuild would undo)
        built = [tmp / MANIFEST_FILE, tmp / TABULAR_FILE, *sorted((tmp / EVENTS_DIR).glob("*")),
                 *sorted((tmp / TASKS_DIR).glob("*"))]
        mark_output(tmp, OutputKind.DATASET, written={p.relative_to(tmp).as_posix(): file_sha256(p) for p in built if p.is_file()})
        # again, last: a file put into the old directory while this one was built (minutes, at scale) would go with it
        check_dataset_target(out_dir)
    return out_dir


def userU_metadata(target: Path) -> dict[bytes, bytes] | None:
    """The Parquet metadata of ``target`` if ``qanchor data userU`` wrote it; None if absent, not Parquet (certainly
    not ours) or someone's own pairs."""
    try:
        meta = pq.read_schema(target).metadata or {}
    except Exception:
        return None
    return meta if meta.get(USERU_OWNER_KEY.encode()) == USERU_OWNER_VALUE.encode() else None


def check_userU_target(target: Path) -> None:
    """Refuse to replace a ``userU.parquet`` that ``qanchor data userU`` did not write (someone's own pairs), or one
    that cannot be read to tell (a damaged copy)."""
    if not target.exists() or userU_metadata(target) is not None:
        return
    try:
        pq.read_schema(target)
    except Exception as exc:
        raise OutputError(f"{target} cannot be read as Parquet ({str(exc).splitlines()[0][:120]}), so qanchor cannot "
                          "tell whether `qanchor data userU` wrote it (a damaged or cut copy?) and does not replace it: "
                          "delete it if it was qanchor's, or move it away") from None
    raise OutputError(f"{target} was not written by `qanchor data userU` (pairs of your own?); qanchor does not "
                      "replace it: move it away first if it should be rebuilt")


def check_dataset_target(out_dir: str | Path) -> None:
    """Refuse (OutputError) an ``out_dir`` a dataset build may not replace: what :func:`check_replaceable` refuses,
    and a dataset of ours holding files of the user's own (a rebuild replaces the directory whole): pairs, a labels
    file, a task or events file the build did not write, notes."""
    check_replaceable(out_dir, OutputKind.DATASET)
    refuse_working_directory(out_dir)
    root = Path(out_dir).resolve()
    if (holder := enclosing_output(root)) is not None:  # rebuilding or removing that output would take this dataset with it, unasked
        raise OutputError(f"{root} lies inside {holder}, a qanchor output of its own; build the dataset beside it, "
                          "not in it")
    if not root.is_dir():
        return
    check_userU_target(root / USERU_FILE)
    if foreign := _not_built(root):
        shown = ", ".join(repr(name) for name in foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise OutputError(f"{root} holds files a dataset build does not write ({shown}); rebuilding replaces the "
                          "directory whole, so move them out of it first, or build into another directory")


def _not_built(root: Path) -> list[str]:
    """What in a dataset directory a build did not write: anything but the manifest, the events, tabular and task files
    its marker records (with the same content), UserU pairs ``qanchor data userU`` wrote, the cache and the output
    marker. A dataset built before the marker recorded its files: ``events/part-*.parquet``, the tabular file and the
    manifest's task files; one built before it recorded the manifest: its manifest, whatever it holds."""
    built = _built_as_recorded(root) or _built_by_name(root)
    # a dataset built before its marker recorded the manifest: its manifest is taken as the build's
    manifest_recorded = MANIFEST_FILE in (output_record(root).get("written") or {})
    out = []
    for path in sorted(root.iterdir()):
        if path.name == CACHE_DIR and path.is_dir():
            out += _foreign_in_cache(path)
            continue
        if path.name == USERU_FILE:  # pairs of the user's own (or unreadable): rebuilding or cleaning would lose them
            if userU_metadata(path) is None:
                out.append(path.name)
            continue
        if (path.name == MANIFEST_FILE and not manifest_recorded) or path.name == MARKER_FILE or is_temporary(path):
            continue
        files = sorted(path.iterdir()) if path.name in (EVENTS_DIR, TASKS_DIR) and path.is_dir() else [path]
        out += [name for file in files if not built(file, name := file.relative_to(root).as_posix())]
    return out


def _built_as_recorded(root: Path) -> Callable[[Path, str], bool] | None:
    """Whether a file (and its name under ``root``) is one the build wrote, by the SHA-256 its marker records: a file
    of the build's overwritten since is the user's now. None for a dataset whose marker records none."""
    written = output_record(root).get("written")
    if not isinstance(written, dict):
        return None
    return lambda file, name: written.get(name) is not None and file.is_file() and file_sha256(file) == written[name]


def _built_by_name(root: Path) -> Callable[[Path, str], bool]:
    """The same, by name, for a dataset built before the marker recorded its files."""
    try:
        tasks = {t.name for t in Manifest.load(root).tasks}
    except Exception:  # an unreadable manifest: no task file is known to be the build's
        tasks = set()

    def built(file: Path, name: str) -> bool:
        folder = name.split("/")[0] if "/" in name else None
        if folder == EVENTS_DIR:
            return file.name.startswith("part-") and file.suffix == ".parquet"
        if folder == TASKS_DIR:
            return file.suffix == ".parquet" and file.stem in tasks
        return name == TABULAR_FILE

    return built


def _foreign_in_cache(cache: Path) -> list[str]:
    """The outputs put inside a dataset's cache folder that are not qanchor's caches (the cache itself is ours)."""
    return [f"{CACHE_DIR}/{m.parent.relative_to(cache)}" for m in sorted(cache.rglob(MARKER_FILE))
            if output_kind(m.parent) not in (OutputKind.CACHE.value, OutputKind.MODEL_CACHE.value)]



def clean_outputs(candidates: list[str], root: str | Path = ".", parents: Collection[str] = ()) -> list[str]:
    """Remove each of ``candidates`` that is a qanchor output holding only what qanchor wrote (``make clean``); return
    a line per candidate kept and why. Kept: a link (its target may be anyone's), anything outside ``root``, and an
    output (or an output inside it) holding files of the user's own: a dataset's files its marker does not record, a
    checkpoint's, head's or state's beyond the names it was saved with, a pretraining run's or prompt-tune folder's
    beyond what those commands write. A bench or uqa results folder, whose files vary with its settings, is removed
    whole.

    ``parents``: folders the outputs were written into (``runs/demo``, ``runs``), removed too when this clean emptied
    them; one that held nothing of ours, or holds anything still (an empty folder of the user's own), stays."""
    base, kept, removed = Path(root).resolve(), [], []
    for name in candidates:
        path = Path(name)
        if not (path / MARKER_FILE).is_file():
            continue  # not an output of ours (or absent): nothing to do
        if any(p.is_symlink() for p in (path, *path.parents) if p != Path(".")) or base not in path.resolve().parents:
            kept.append(f"kept {path}: a link, or outside {base} (only the repository's own outputs are removed)")
            continue
        reason = _user_files_in(path)
        if reason:
            kept.append(f"kept {path}: {reason}")
            continue
        print(f"rm -rf {path}")
        shutil.rmtree(path)
        removed.append(Path(os.path.abspath(path)))
    for name in sorted(parents, key=lambda p: len(Path(p).parts), reverse=True):  # runs/demo before runs
        folder = Path(os.path.abspath(name))
        if (any(folder in path.parents for path in removed) and folder.is_dir() and not folder.is_symlink()
                and base in folder.resolve().parents and not any(folder.iterdir())):
            print(f"rmdir {name}")
            folder.rmdir()
            removed.append(folder)
    return kept


def _user_files_in(path: Path) -> str | None:
    """Why ``path`` (a marked output) may not be removed whole, or None: files of the user's own in it, or in an output
    it holds (a run's checkpoint)."""
    for marker in sorted(path.rglob(MARKER_FILE)):
        output, kind = marker.parent, output_kind(marker.parent)
        if kind == OutputKind.DATASET.value and (foreign := _not_built(output)):
            return f"{output} holds files a dataset build does not write ({', '.join(map(repr, foreign[:3]))})"
        if kind in (OutputKind.CHECKPOINT.value, OutputKind.HEAD.value, OutputKind.STATE.value):
            try:
                check_replaceable(output, OutputKind(kind))
            except OutputError as exc:
                return str(exc)
        own = _RUN_FILES if kind == OutputKind.RUN.value else _HEADS_FILES if kind == OutputKind.HEADS.value else None
        if own is not None:
            # a prompt-tune folder's heads are outputs of their own, checked above
            extra = sorted(p.name for p in output.iterdir() if p.name not in own and not is_temporary(p)
                           and not (kind == OutputKind.HEADS.value and (p / MARKER_FILE).is_file()))
            if extra:
                return f"{output} holds files its command does not write ({', '.join(map(repr, extra[:3]))})"
    return None


_RUN_FILES = frozenset({MARKER_FILE, "checkpoint", "ds_state", "metrics.jsonl"})  # what `qanchor pretrain` writes
_HEADS_FILES = frozenset({MARKER_FILE, "summary.json"})  # `qanchor prompt-tune`, beside its heads
