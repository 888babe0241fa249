"""Load a validated dataset directory and stream per-user records in bounded memory.

Event exports are long and unsorted (one row per event, as SQL writes them). On first use the loader
range-partitions events by user id into ``<cache>/users-<fingerprint>/`` so that iterating users reads
one partition (a few thousand users) at a time: 100k users never sit in RAM together.

Example:
    >>> import qanchor
    >>> ds = qanchor.load_dataset("data/synth")  # doctest: +SKIP
    >>> user = next(ds.users())  # doctest: +SKIP
    >>> user.user_id, sorted(user.events)  # doctest: +SKIP
    ('u000000', ['app', 'bill', 'search'])
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from qanchor.data.io import (
    OutputKind,
    atomic_dir,
    claim_output_dir,
    file_sha256,
    local_path,
    output_kind,
    write_text,
)
from qanchor.data.manifest import MANIFEST_FILE, Manifest, TaskSpec
from qanchor.data.schema import (
    CACHE_DIR,
    EVENTS_DIR,
    TABULAR_FILE,
    TASKS_DIR,
    USERU_FILE,
    event_schema,
    tabular_feature_columns,
    utc_micros,
)
from qanchor.data.validate import ValidationReport, event_files, task_files, validate_dataset
from qanchor.errors import ConfigError, DataValidationError, OutputError
from qanchor.logs import warn

__all__ = ["EventSeq", "event_order", "in_event_order", "order_key", "isin_ids", "UserRecord", "RecordLayout", "Task", "Dataset", "load_dataset", "records_from_table", "default_cache_dir",
           "CACHE_DIR", "warn_tasks_without_data", "content_digests", "legacy_fingerprint"]

_PARTITION_USERS = 4096
_MAX_PARTITIONS = 512


@dataclass
class EventSeq:
    """One modality's events of one user, oldest first. Arrays share length ``n``."""

    ts: np.ndarray  # int64 [n], microseconds since the epoch, UTC
    text: list[str]  # [n]
    value: np.ndarray  # float32 [n], NaN where null
    extras: np.ndarray  # float32 [n, n_extra], the modality's numeric_columns in manifest order; NaN = null

    def __len__(self) -> int:
        return len(self.text)


@lru_cache(maxsize=1 << 16)
def _text_rank(text: str) -> int:
    """A fixed pseudo-random rank of a text (non-negative int64): the same in every process and on every machine."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big") >> 1


def event_order(ts: np.ndarray, text: Sequence[str], value: np.ndarray, extras: np.ndarray) -> np.ndarray:
    """The indices that put events oldest first, and events of one instant in an order of their content alone.

    Many events share a timestamp (a basket's lines: Complete Journey has up to 161 at one instant), and a modality's
    cap keeps its newest events, often cutting such a group. Left in the order their rows had, which ones the model
    read, and in what order, depended on how the export happened to list them: the same events in another row order
    gave other embeddings. Ties are ordered by a fixed hash of the text, then value and numeric columns (NaN last):
    which of a cut group survive is then arbitrary but fixed, and not biased to one end of the alphabet.

        >>> ts = np.array([5, 1, 5, 5]); vals = np.array([1.0, 2.0, 3.0, 1.0], np.float32)
        >>> a = event_order(ts, ["milk", "eggs", "bread", "milk"], vals, np.zeros((4, 0), np.float32))
        >>> b = event_order(ts[::-1], ["milk", "bread", "eggs", "milk"], vals[::-1], np.zeros((4, 0), np.float32))
        >>> [["milk", "eggs", "bread", "milk"][i] for i in a] == [["milk", "bread", "eggs", "milk"][i] for i in b]
        True
        >>> int(ts[a][0])
        1
    """
    n = len(ts)
    by_time = np.argsort(ts, kind="stable")
    ordered = ts[by_time]
    if not np.any(ordered[1:] == ordered[:-1]):  # no two events at one instant: time alone decides
        return by_time
    ranks = np.fromiter((_text_rank(t) for t in text), dtype=np.int64, count=n)
    extra = np.asarray(extras).reshape(n, -1)
    return np.lexsort([*(extra[:, j] for j in reversed(range(extra.shape[1]))), value, ranks, ts])


def order_key(seq: EventSeq, i: int) -> tuple:
    """Event ``i``'s place in :func:`event_order` as a tuple: of two events, the one with the smaller key comes first
    (a NaN value or column sorts after every number, as there)."""
    def number(x: float) -> tuple[int, float]:
        return (1, 0.0) if np.isnan(x) else (0, float(x))
    return (int(seq.ts[i]), _text_rank(seq.text[i]), number(seq.value[i]), *(number(x) for x in seq.extras[i]))


def in_event_order(seq: EventSeq) -> EventSeq:
    """``seq`` with its events in :func:`event_order` (itself, when they already are)."""
    order = event_order(seq.ts, seq.text, seq.value, seq.extras)
    if np.array_equal(order, np.arange(len(order))):
        return seq
    return EventSeq(seq.ts[order], [seq.text[i] for i in order], seq.value[order], seq.extras[order])


@dataclass(frozen=True)
class RecordLayout:
    """The column names a record's numbers are in: each modality's numeric columns (``EventSeq.extras``) and the
    tabular features (``UserRecord.tabular``). A dataset's records carry theirs, so that a model trained with another
    column order reads them by name, not by position."""

    numeric_columns: tuple[tuple[str, tuple[str, ...]], ...]  # (modality, its numeric columns), manifest order
    tabular_columns: tuple[str, ...]

    @classmethod
    def of(cls, manifest: Manifest, tabular_columns: Iterable[str]) -> RecordLayout:
        return cls(tuple((m.name, tuple(m.numeric_columns)) for m in manifest.sequence_modalities), tuple(tabular_columns))


@dataclass
class UserRecord:
    """Everything known about one user before the cutoff. Modalities without events are absent."""

    user_id: str
    events: dict[str, EventSeq]
    tabular: np.ndarray | None = None  # float32 [n_features], NaN where missing; None = no tabular row
    # The columns ``tabular`` and each modality's ``extras`` are in (a dataset's records say; None = the model's own)
    layout: RecordLayout | None = field(default=None, compare=False, repr=False)


@dataclass
class Task:
    spec: TaskSpec
    user_ids: np.ndarray  # object [n] of str
    labels: np.ndarray  # int8 [n]
    prob: np.ndarray | None = None  # float64 [n], the true P(label = 1) where the data is synthetic

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def query(self) -> str:
        return self.spec.query

    @property
    def positive_rate(self) -> float:
        return float(self.labels.mean()) if len(self.labels) else 0.0



def warn_tasks_without_data(ds: Dataset, names: Iterable[str]) -> None:
    """Say when most of a task's labelled users have no event and no tabular row before the cutoff (labels keyed by
    other ids than the events', a label file of the wrong period): every method scores those users alike, so the
    task's AUC says little, and only `qanchor data validate` had counted them (a task none of whose users has data is
    refused when the dataset is opened)."""
    for name in names:
        without = ds.report.task_users_without_data.get(name, 0)
        labelled = ds.report.task_counts.get(name, (0, 0))[0]
        if labelled and 2 * without > labelled:
            warn(f"task {name}: {without} of its {labelled} labelled users have no event and no tabular row before the "
                 f"cutoff, so every method scores them alike and its AUC says little about the others; check that "
                 f"{ds.root / TASKS_DIR / (name + '.parquet')} names users as the events do")


def isin_ids(values: Sequence, among: Sequence) -> np.ndarray:
    """``np.isin`` for user ids (bool, one per value): numpy compares object arrays pair by pair, which made reading
    given users of a dataset quadratic (36 s for 40,000 ids, every export shard and labels file paying it). Hashed
    here, and exact: numpy's fixed-width strings would drop trailing NUL characters ("u1\\x00" read as "u1"). Only
    strings match: an id of another type is in nothing.

        >>> isin_ids(np.array(["007", 7, "b", "b\\x00"], object), np.array(["7", "b"], object)).tolist()
        [False, False, True, False]
    """
    known = {x for x in np.asarray(among, dtype=object).tolist() if isinstance(x, str)}
    v = np.asarray(values, dtype=object)
    return np.fromiter((isinstance(x, str) and x in known for x in v.tolist()), bool, count=len(v))


class Dataset:
    """A dataset directory: manifest, tasks, tabular features and a per-user event stream."""

    def __init__(self, root: Path, manifest: Manifest, report: ValidationReport, cache_dir: Path):
        self.root, self.manifest, self.report, self.cache_dir = root, manifest, report, cache_dir
        self.tasks: dict[str, Task] = {t.name: _read_task(root, t) for t in manifest.tasks}
        self.tabular_columns: list[str] = []
        self._tabular: dict[str, np.ndarray] = {}
        if manifest.tabular is not None:
            self._read_tabular()
        self._partitions: _Partitions | None = None

    def __repr__(self) -> str:
        return f"Dataset({self.manifest.name!r}, users={self.num_users}, tasks={list(self.tasks)})"

    # ------------------------------------------------------------------------------------- users
    @property
    def fingerprint(self) -> str:
        """Changes whenever an event, tabular or task file is added or removed or its bytes change, or the manifest
        changes; not when the same bytes are written again (by content: :func:`content_digests`)."""
        return _fingerprint(self.root, event_files(self.root), self.cache_dir)

    @property
    def text_cache_dir(self) -> Path:
        """Where this dataset's event-text vectors are cached (``<cache_dir>/text``), the cache dir claimed."""
        claim_output_dir(self.cache_dir, OutputKind.CACHE, key="data.cache_dir")
        return self.cache_dir / "text"

    @property
    def partitions(self) -> _Partitions:
        if self._partitions is None:
            self._partitions = _Partitions.build(self)
        return self._partitions

    @property
    def user_ids(self) -> np.ndarray:
        """Every user (events, tabular rows or task labels), sorted."""
        return self.partitions.user_ids

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    def users(self, user_ids: Iterable[str] | None = None) -> Iterator[UserRecord]:
        """Yield user records in sorted id order, one partition in memory at a time.

        With ``user_ids``, yield only those (still in sorted order); unknown ids raise KeyError.
        """
        wanted = None
        if user_ids is not None:
            wanted = np.unique(np.asarray(list(user_ids), dtype=object))
            missing = wanted[~isin_ids(wanted, self.user_ids)]
            if missing.size:
                raise KeyError(f"user '{missing[0]}' is not in dataset {self.root} ({missing.size} unknown ids)")
        for part in range(self.partitions.count):
            ids = self.partitions.ids_of(part)
            if wanted is not None:
                ids = ids[isin_ids(ids, wanted)]
                if not ids.size:
                    continue
            yield from self.read_partition(part, ids)

    def user(self, user_id: str) -> UserRecord:
        return next(self.users([user_id]))

    @cached_property
    def layout(self) -> RecordLayout:
        """The column layout its records carry (:class:`RecordLayout`)."""
        return RecordLayout.of(self.manifest, self.tabular_columns)

    def userU(self) -> pa.Table:
        """The UserU pretraining pairs (built by ``qanchor data userU``)."""
        path = self.root / USERU_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path} not found; build it with `qanchor data userU {self.root}`")
        table = pq.read_table(path)
        # Pairs of the user's own may store their cutoffs in another unit or naive; readers take them as microseconds.
        at = table.schema.get_field_index("cutoff")
        return table if at < 0 else table.set_column(at, "cutoff", utc_micros(table.column(at)))

    # ---------------------------------------------------------------------------------- internals
    def _read_tabular(self) -> None:
        table = pq.read_table(self.root / TABULAR_FILE)
        self.tabular_columns = tabular_feature_columns(table.schema)  # not a pandas index written beside them
        matrix = np.stack(
            [table.column(c).to_numpy(zero_copy_only=False).astype(np.float32) for c in self.tabular_columns], axis=1
        )  # (n_users, n_features); nulls arrive as NaN
        self._tabular = dict(zip(table.column("user_id").to_pylist(), matrix))

    def read_partition(self, part: int, ids: np.ndarray) -> Iterator[UserRecord]:
        """Records of ``ids`` (sorted, all in range partition ``part``), in order; for callers that group
        users by partition themselves (pretraining pairs) rather than stream with :meth:`users`."""
        tabular, layout = self._tabular.get, self.layout
        for record in records_from_table(self.partitions.read(part), self.manifest, ids):
            record.tabular = tabular(record.user_id)
            record.layout = layout
            yield record


def records_from_table(table: pa.Table, manifest: Manifest, user_ids: np.ndarray | None = None) -> Iterator[UserRecord]:
    """A long event table (dataset event format) -> one :class:`UserRecord` per user, events in :func:`event_order`.

    With ``user_ids`` (sorted), one record per id in that order, with no events for ids absent from the
    table; without, one per user in the table. The one place event rows become records (the dataset
    stream, daily-update buffers and new events all go through it). Tabular values are the caller's.
    """
    if table.num_rows and not _sorted_by_user_time(table):
        table = table.sort_by([("user_id", "ascending"), ("ts", "ascending")])
    uid = table.column("user_id").to_numpy(zero_copy_only=False) if table.num_rows else np.zeros(0, object)
    if user_ids is None:
        user_ids = uid[np.flatnonzero(np.r_[True, uid[1:] != uid[:-1]])] if len(uid) else np.zeros(0, object)
    starts = np.searchsorted(uid, user_ids, side="left")
    ends = np.searchsorted(uid, user_ids, side="right")
    mods = table.column("modality").to_numpy(zero_copy_only=False) if table.num_rows else uid
    ts = table.column("ts").cast(pa.timestamp("us", tz="UTC")).cast(pa.int64()).to_numpy() if table.num_rows else uid
    text = table.column("text").to_numpy(zero_copy_only=False) if table.num_rows else uid
    value = _floats(table, "value")
    extras = {m.name: _float_matrix(table, m.numeric_columns) for m in manifest.sequence_modalities}
    for user_id, lo, hi in zip(user_ids, starts, ends):
        events = {}
        if hi > lo:
            for m in manifest.sequence_modalities:
                sel = lo + np.flatnonzero(mods[lo:hi] == m.name)
                if sel.size:
                    events[m.name] = in_event_order(EventSeq(ts[sel], text[sel].tolist(), value[sel], extras[m.name][sel]))
        yield UserRecord(str(user_id), events, None)


def _sorted_by_user_time(table: pa.Table) -> bool:
    uid = table.column("user_id").to_numpy(zero_copy_only=False)
    ts = table.column("ts").cast(pa.int64()).to_numpy()
    same = uid[1:] == uid[:-1]
    return bool(np.all(uid[1:] >= uid[:-1]) and np.all(ts[1:][same] >= ts[:-1][same]))


def _floats(table: pa.Table, name: str) -> np.ndarray:
    if name not in table.column_names:
        return np.full(table.num_rows, np.nan, dtype=np.float32)
    # safe=False: Arrow's checked cast refuses integers beyond 2**24 (amounts in cents), which float32 holds to its
    # precision; the validator has already refused values beyond float32's range
    return table.column(name).cast(pa.float32(), safe=False).to_numpy(zero_copy_only=False).astype(np.float32)


def _float_matrix(table: pa.Table, names: tuple[str, ...]) -> np.ndarray:
    if not names:
        return np.zeros((table.num_rows, 0), dtype=np.float32)
    return np.stack([_floats(table, n) for n in names], axis=1)  # (rows, n_extra)


def _read_task(root: Path, spec: TaskSpec) -> Task:
    table = pq.read_table(root / TASKS_DIR / f"{spec.name}.parquet").sort_by("user_id")
    prob = table.column("prob").to_numpy(zero_copy_only=False).astype(np.float64) if "prob" in table.column_names else None
    return Task(
        spec,
        table.column("user_id").to_numpy(zero_copy_only=False).astype(object),
        table.column("label").to_numpy(zero_copy_only=False).astype(np.int8),
        prob,
    )


class _Partitions:
    """Events range-partitioned by user id, each partition sorted by (user_id, ts)."""

    def __init__(self, directory: Path, user_ids: np.ndarray, bounds: np.ndarray, written: set[int] | None = None):
        # written: the partitions that hold events (None: an index from before qanchor listed them)
        self.directory, self.user_ids, self.bounds, self.written = directory, user_ids, bounds, written
        _in_use(self, directory)

    @property
    def count(self) -> int:
        return len(self.bounds) - 1

    def ids_of(self, part: int) -> np.ndarray:
        return self.user_ids[self.bounds[part] : self.bounds[part + 1]]

    def read(self, part: int) -> pa.Table:
        path = self.directory / f"part-{part:05d}.parquet"
        if not path.exists() and self.written is not None and part in self.written:
            # not "users without events": the dataset was rebuilt (its cache goes with it) or the cache was cleared
            # while this command read it, and its users would silently have no events
            raise DataValidationError(str(path), "this partition of the dataset's events is gone since the command "
                                      "opened the dataset (was the dataset rebuilt, or its cache removed, meanwhile?); "
                                      "run the command again")
        if not path.exists():  # a partition whose users have no events
            return pa.table({"user_id": pa.array([], pa.string()), "modality": pa.array([], pa.string()),
                             "ts": pa.array([], pa.timestamp("us", tz="UTC")), "text": pa.array([], pa.string())})
        try:  # verified (written with page checksums): a byte flipped on disk is refused, not read as another event
            return pq.read_table(path, page_checksum_verification=True)
        except (OSError, pa.ArrowException) as exc:  # damaged inside, past the footer build() checks
            raise DataValidationError(str(path), f"this partition of the dataset's events cache cannot be read "
                                      f"({str(exc).splitlines()[0][:120]}); it is a cache qanchor rebuilds from the "
                                      f"dataset: delete {self.directory} and run the command again") from None

    @classmethod
    def build(cls, ds: Dataset) -> _Partitions:
        files = event_files(ds.root)
        directory = ds.cache_dir / f"users-{_fingerprint(ds.root, files, ds.cache_dir)}"
        index_path = directory / "index.json"
        if index_path.exists():
            if (found := cls._open(directory)) is not None:
                return found
            # damaged (a copy or sync cut short keeps the files' times, so the fingerprint still matches; a cleaner
            # took some files): it is only a cache, ours, and the atomic write below replaces it whole
            warn(f"{directory}: the dataset's events cache is damaged or incomplete; rebuilding it")
        user_ids = _all_user_ids(ds, files)
        per_part = max(_PARTITION_USERS, -(-len(user_ids) // _MAX_PARTITIONS))
        bounds = np.append(np.arange(0, len(user_ids), per_part), len(user_ids)).astype(np.int64)
        claim_output_dir(ds.cache_dir, OutputKind.CACHE, key="data.cache_dir")
        with atomic_dir(directory, OutputKind.CACHE) as tmp:
            written = _write_partitions(tmp, files, user_ids, per_part, event_schema(ds.manifest))
            pq.write_table(pa.table({"user_id": pa.array(user_ids.tolist(), pa.string())}), tmp / "user_ids.parquet",
                           write_page_checksum=True)
            write_text(json.dumps({"bounds": bounds.tolist(), "written": sorted(written),
                                   "dataset": str(ds.root.resolve())}), tmp / "index.json")
        _remove_superseded(ds.cache_dir, directory, ds.root)
        return cls(directory, user_ids, bounds, written)

    @classmethod
    def _open(cls, directory: Path) -> _Partitions | None:
        """The partitions a finished build left in ``directory``, or None where its index, user list or a listed
        partition is unreadable or gone (each partition's footer is read: a cut file fails there)."""
        try:
            index = json.loads((directory / "index.json").read_text())
            user_ids = pq.read_table(directory / "user_ids.parquet", page_checksum_verification=True).column(
                "user_id").to_numpy(zero_copy_only=False)
            bounds = np.asarray(index["bounds"], dtype=np.int64)
            written = set(index["written"]) if "written" in index else None
            if bounds.ndim != 1 or len(bounds) < 1 or bounds[-1] != len(user_ids):
                return None
            for part in sorted(written) if written is not None else ():
                pq.read_metadata(directory / f"part-{part:05d}.parquet")
        except (OSError, ValueError, TypeError, KeyError, pa.ArrowException):
            return None
        return cls(directory, user_ids.astype(object), bounds, written)


# A partition cache of an earlier version of a dataset is removed only when no process holds it (each reader holds a
# shared lock on its index.json while its Dataset lives) and none has opened it for this long: a reader on another
# machine of a shared file system, whose lock this one may not see, has long been done with it
_UNUSED_FOR_SECONDS = 24 * 3600


def _in_use(partitions: _Partitions, directory: Path) -> None:
    """Hold ``directory``'s cache for as long as ``partitions`` lives (a shared lock on its index, released when the
    object goes), and mark it opened now (its index's time). Neither is possible on a read-only cache, which no one
    removes either."""
    index = directory / "index.json"
    try:
        fd = os.open(index, os.O_RDONLY)
    except OSError:
        return
    weakref.finalize(partitions, os.close, fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # not waiting: a remover holding it is about to take it away
        os.utime(index)
    except OSError:
        pass


def _remove_superseded(cache_dir: Path, kept: Path, root: Path) -> None:
    """Remove the partition caches an earlier version of this dataset left in ``cache_dir`` (each change to its event
    files or manifest wrote a whole new copy of the events beside the old ones, which no one read again): only caches
    that record this dataset as theirs (a ``data.cache_dir`` shared by several datasets keeps the others', and one
    written before caches recorded their dataset is left as it is), that no process holds, and that none has opened
    for :data:`_UNUSED_FOR_SECONDS` (a long pretraining run reads its copy to the end, whatever the dataset became)."""
    mine = str(root.resolve())
    for other in cache_dir.glob("users-*"):
        if other == kept or output_kind(other) != OutputKind.CACHE.value:
            continue
        index = other / "index.json"
        try:
            recorded = json.loads(index.read_text())
            if not (isinstance(recorded, dict) and recorded.get("dataset") == mine):
                continue
            if time.time() - index.stat().st_mtime < _UNUSED_FOR_SECONDS:
                continue
            fd = os.open(index, os.O_RDONLY)
        except (OSError, ValueError):
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held by a reader: kept
            shutil.rmtree(other, ignore_errors=True)
        except OSError:
            pass
        finally:
            os.close(fd)


_DIGESTS_FILE = "file-digests.json"  # in data.cache_dir: each dataset file's SHA-256 by its path and stat
_known_digests: dict[tuple, str] = {}  # (path, stat key) -> SHA-256: a process reads each file's bytes once


def _stat_key(st: os.stat_result) -> list[int]:
    # ctime too: a write moves it and no tool can set it back, so bytes rewritten with their size and mtime kept
    # (a copy with times kept, an editor that restores them) are read again instead of passing as unchanged
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def content_digests(paths: Sequence[Path], cache_dir: Path) -> list[str]:
    """SHA-256 of each file's bytes, in ``paths``' order. What identifies a dataset's contents (:func:`_fingerprint`,
    the pairs a run trains on): by the bytes, so a dataset rebuilt byte for byte or copied without its file times is
    the same data, not another. Hashing a paper-scale dataset takes seconds per gigabyte, so each digest is remembered
    with its file's stat, in this process and in ``cache_dir`` once that is a qanchor cache; a file whose stat moved
    is read again."""
    memo_path = cache_dir / _DIGESTS_FILE
    try:
        saved = json.loads(memo_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # none yet, or damaged: it is only a memo, rebuilt below
        saved = {}
    if not isinstance(saved, dict):
        saved = {}
    digests, updated = [], dict(saved)
    for path in paths:
        name = str(Path(path).resolve())
        key = _stat_key(path.stat())
        digest = _known_digests.get((name, *key))
        if digest is None:
            entry = saved.get(name)
            if isinstance(entry, list) and len(entry) == len(key) + 1 and entry[:-1] == key and isinstance(entry[-1], str):
                digest = entry[-1]
            else:
                digest = file_sha256(path)
            _known_digests[(name, *key)] = digest
        digests.append(digest)
        updated[name] = [*key, digest]
    if updated != saved and output_kind(cache_dir) == OutputKind.CACHE.value:  # never creates or claims a folder
        try:
            write_text(json.dumps(updated, indent=0) + "\n", memo_path)
        except (OSError, OutputError):  # another user's cache, a full disk, a folder by that name: the digests stand,
            pass  # only the memo is not kept
    return digests


def _fingerprint(root: Path, files: list[Path], cache_dir: Path) -> str:
    """Changes whenever the bytes of an event, tabular or task file change, a file is added or removed, or the
    manifest's text changes (it says what the files mean: a newly declared numeric column is read into the user
    partitions, a new cutoff changes every window). By content (:func:`content_digests`): rewriting the same bytes,
    or copying the dataset without its file times, keeps it."""
    h = hashlib.sha256()
    manifest = root / MANIFEST_FILE
    if manifest.is_file():
        h.update(hashlib.sha256(manifest.read_bytes()).digest())
    present = [path for path in [*files, root / TABULAR_FILE, *task_files(root)] if path.exists()]
    for path, digest in zip(present, content_digests(present, cache_dir)):
        h.update(f"{path.relative_to(root).as_posix()}:{digest};".encode())
    return h.hexdigest()[:16]


def legacy_fingerprint(root: Path) -> str:
    """:attr:`Dataset.fingerprint` as qanchor computed it before it went by content (2026-12-07): the manifest's text
    and each file's name, size and modification time. Only to recognise what runs made then recorded."""
    h = hashlib.sha256()
    manifest = root / MANIFEST_FILE
    if manifest.is_file():
        h.update(hashlib.sha256(manifest.read_bytes()).digest())
    for path in [*event_files(root), root / TABULAR_FILE, *task_files(root)]:
        if path.exists():
            st = path.stat()
            h.update(f"{path.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def _all_user_ids(ds: Dataset, files: list[Path]) -> np.ndarray:
    ids: set[str] = set(ds._tabular)
    for task in ds.tasks.values():
        ids.update(task.user_ids.tolist())
    for path in files:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1 << 20, columns=["user_id"]):
            ids.update(pc.unique(batch.column("user_id")).to_pylist())
    return np.array(sorted(ids), dtype=object)


def _canonical(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Same columns and types for every file: timestamps microseconds in UTC, absent optional columns null."""
    columns = []
    for f in schema:
        if f.name not in table.column_names:
            columns.append(pa.nulls(table.num_rows, f.type))
            continue
        col = table.column(f.name)
        if f.name == "ts":
            columns.append(utc_micros(col))
        else:  # numbers as in _floats: an integer amount beyond 2**24 is a float32 to its precision, not an error
            columns.append(col.cast(f.type, safe=not pa.types.is_floating(f.type)))
    return pa.Table.from_arrays(columns, schema=schema)


def _write_partitions(out: Path, files: list[Path], user_ids: np.ndarray, per_part: int, schema: pa.Schema) -> set[int]:
    """Write each partition's events, sorted by (user_id, ts); return the partitions written (those with events)."""
    writers: dict[int, pq.ParquetWriter] = {}
    try:
        for path in files:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=1 << 18):
                table = _canonical(pa.Table.from_batches([batch]), schema)
                part_of = np.searchsorted(user_ids, table.column("user_id").to_numpy(zero_copy_only=False)) // per_part
                for part in np.unique(part_of):
                    rows = table.filter(pa.array(part_of == part))
                    if part not in writers:
                        writers[part] = pq.ParquetWriter(out / f"unsorted-{part:05d}.parquet", schema)
                    writers[part].write_table(rows)
    finally:
        for w in writers.values():
            w.close()
    for part in sorted(writers):
        src = out / f"unsorted-{part:05d}.parquet"
        table = pq.read_table(src).sort_by([("user_id", "ascending"), ("ts", "ascending")])
        pq.write_table(table, out / f"part-{part:05d}.parquet", write_page_checksum=True)  # for read() to verify
        src.unlink()
    return {int(part) for part in writers}


def load_dataset(path: str | Path, cache_dir: str | Path | None = None, pairs: bool = True) -> Dataset:
    """Validate and open a dataset directory. Raises DataValidationError on a broken dataset. ``pairs=False``: leave
    ``userU.parquet`` unchecked (``qanchor data userU``, about to replace it).

    Example:
        >>> ds = load_dataset("data/completejourney")  # doctest: +SKIP
        >>> ds.tasks["churn"].positive_rate  # doctest: +SKIP
    """
    root = local_path(path)
    report = validate_dataset(root, pairs)
    if cache_dir and str(local_path(cache_dir)).startswith("~"):  # an unknown user's home: never a folder named "~"
        raise ConfigError(f"data.cache_dir={cache_dir}: no such user's home directory; give a path")
    if cache_dir:
        inside = local_path(cache_dir).resolve()
        for folder in (root.resolve() / EVENTS_DIR, root.resolve() / TASKS_DIR):
            if inside == folder or folder in inside.parents:  # the dataset would read the cache as its own files
                raise ConfigError(f"data.cache_dir={cache_dir} lies in {folder}, which holds only the dataset's own "
                                  f"files; give a folder outside them (the default is {root / CACHE_DIR})")
    return Dataset(root, report.manifest, report, local_path(cache_dir) if cache_dir else default_cache_dir(root))


def default_cache_dir(root: Path) -> Path:
    """``<dataset>/.qanchor_cache``, or, for a dataset directory this user cannot write (a read-only mount,
    someone else's export), ``~/.cache/qanchor/datasets/<hash of its path>``: an input is never written."""
    local = root / CACHE_DIR
    if os.access(local, os.W_OK) if local.is_dir() else os.access(root, os.W_OK):
        return local  # a cache shipped with a dataset on a read-only mount is not written into either
    key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    return Path(os.environ.get("QANCHOR_CACHE", Path.home() / ".cache" / "qanchor")) / "datasets" / key
