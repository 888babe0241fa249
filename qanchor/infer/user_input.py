"""Users handed to the model in code: plain dicts -> validated :class:`UserRecord` in the model's layout.

A caller can build a user without a dataset directory::

    {"user_id": "u1",
     "events": {"bill": [{"ts": "2024-06-01T12:00:00+00:00", "text": "Coffee shop", "value": 4.5,
                          "discount": None}]},
     "tabular": {"age": 31.0, "income": None}}   # or None / absent: no tabular row

Event timestamps may be ``datetime`` (naive = UTC), ISO strings or ``numpy.datetime64``; any time is
accepted (ages are counted from the cutoff the caller embeds at). Events are sorted by time here.
Records from a dataset whose manifest lays columns out differently are remapped by
:func:`record_adapter`. Every problem raises :class:`ModelInputError` naming user, modality and event.

Example:
    >>> rec = to_record({"user_id": "u1", "events": {}}, manifest, [])  # doctest: +SKIP
    >>> rec.events  # doctest: +SKIP
    {}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from numbers import Real

import numpy as np

from qanchor.data.dataset import EventSeq, RecordLayout, UserRecord, event_order, in_event_order
from qanchor.data.manifest import Manifest, ModalitySpec
from qanchor.data.validate import EPOCH_YEAR_US, not_storable
from qanchor.errors import ModelInputError
from qanchor.logs import warn
from qanchor.model.layout import check_utf8

__all__ = ["to_record", "record_adapter", "to_microseconds"]

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_CORE_KEYS = {"ts", "text", "value"}


def to_microseconds(ts: object) -> int:
    """A timestamp (datetime, ISO string, numpy.datetime64) -> int microseconds since the epoch, UTC.

    Example:
        >>> to_microseconds("1970-01-01T00:00:01Z")
        1000000
    """
    if isinstance(ts, np.datetime64):
        if np.isnat(ts):  # as an integer NaT is the oldest moment there is, and its age overflows
            raise ValueError("the timestamp is missing (NaT); drop the event or give its time")
        return int(ts.astype("datetime64[us]").astype(np.int64))
    if isinstance(ts, datetime) and ts != ts:  # pandas' NaT is a datetime that equals nothing, itself included
        raise ValueError("the timestamp is missing (NaT); drop the event or give its time")
    if isinstance(ts, str):
        try:
            ts = datetime.fromisoformat(ts.strip().replace("Z", "+00:00"))  # py3.10 does not read "Z"
        except ValueError:
            raise ValueError(f"'{ts}' is not an ISO datetime such as 2024-06-01T12:00:00+00:00") from None
    if not isinstance(ts, datetime):
        raise ValueError(f"{type(ts).__name__} is not a timestamp; give a datetime or an ISO string")
    # naive times are UTC, as in the dataset format. The offset is taken off by hand: astimezone() overflows for a
    # time within a day of the calendar's ends (0001-01-01T00:00+01:00, an export's "unknown date")
    offset = ts.utcoffset() if ts.tzinfo is not None else None
    delta = (ts.replace(tzinfo=None) - _EPOCH.replace(tzinfo=None)) - (offset or timedelta(0))
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _number(x: object, where: str) -> float:
    if x is None:
        return float("nan")
    if isinstance(x, bool) or not isinstance(x, Real):
        raise ModelInputError(f"{where}: expected a number or None, got {x!r}")
    try:
        value = float(x)
    except OverflowError:  # a Python int beyond any float: as far out of float32's range as an infinity
        value = float("inf")
    # As a dataset's validation does: NaN means missing, an infinity is a broken value. Values are stored as float32,
    # so a finite number beyond its range would arrive as an infinity and poison every statistic of the user.
    if not_storable(value):
        raise ModelInputError(f"{where}: {x!r} is infinite or beyond float32 range; give None for a missing value")
    return value


def _events(uid: str, spec: ModalitySpec, raw: object) -> EventSeq:
    if not isinstance(raw, (list, tuple)):
        raise ModelInputError(f"user {uid!r}, modality {spec.name!r}: events must be a list of dicts, got {type(raw).__name__}")
    allowed = _CORE_KEYS | set(spec.numeric_columns)
    ts, text, value = np.zeros(len(raw), np.int64), [], np.zeros(len(raw), np.float32)
    extras = np.full((len(raw), len(spec.numeric_columns)), np.nan, np.float32)  # (n, n_extra)
    for i, event in enumerate(raw):
        where = f"user {uid!r}, modality {spec.name!r}, event {i}"
        if not isinstance(event, Mapping):
            raise ModelInputError(f"{where}: must be a dict with ts, text and optional value, got {type(event).__name__}")
        unknown = set(event) - allowed
        if unknown:
            raise ModelInputError(f"{where}: unknown field '{sorted(unknown)[0]}'; allowed: {', '.join(sorted(allowed))}")
        if "ts" not in event or not isinstance(event.get("text"), str):
            raise ModelInputError(f"{where}: every event needs 'ts' (datetime or ISO string) and 'text' (a string)")
        try:
            ts[i] = to_microseconds(event["ts"])
        except ValueError as exc:
            raise ModelInputError(f"{where}: {exc}") from None
        check_utf8(event["text"], f"{where}, field 'text'")
        text.append(event["text"])
        value[i] = _number(event.get("value"), f"{where}, field 'value'")
        for j, col in enumerate(spec.numeric_columns):
            extras[i, j] = _number(event.get(col), f"{where}, field {col!r}")
    order = event_order(ts, text, value, extras)  # oldest first (the packer keeps the tail); ties by content, not list place
    return EventSeq(ts[order], [text[i] for i in order], value[order], extras[order])


def _tabular(uid: str, raw: object, columns: list[str]) -> np.ndarray | None:
    if raw is None:
        return None
    if not columns:
        raise ModelInputError(f"user {uid!r}: this model has no tabular modality; drop the 'tabular' entry")
    if not isinstance(raw, Mapping):
        raise ModelInputError(f"user {uid!r}: 'tabular' must be a dict feature -> number (or None), got {type(raw).__name__}")
    unknown = set(raw) - set(columns)
    if unknown:
        raise ModelInputError(f"user {uid!r}: unknown tabular feature '{sorted(unknown)[0]}'; the model knows: "
                              f"{', '.join(columns[:8])}{' ...' if len(columns) > 8 else ''}")
    return np.array([_number(raw.get(c), f"user {uid!r}, tabular feature {c!r}") for c in columns], np.float32)


def _check_record(rec: UserRecord, manifest: Manifest, columns: list[str], ordered: bool = False) -> UserRecord:
    """``rec`` checked; its events of one instant put in the order of their content unless ``ordered`` (a dataset's
    record, read in that order and re-ordered by the layout adapter where it remaps columns)."""
    specs = {m.name: m for m in manifest.sequence_modalities}
    if not isinstance(rec.events, Mapping):
        raise ModelInputError(f"user {rec.user_id!r}: events must be a dict modality -> EventSeq (an empty dict for a "
                              f"user without events), got {type(rec.events).__name__}")
    if rec.tabular is not None and (not isinstance(rec.tabular, np.ndarray) or rec.tabular.dtype.kind not in "fiu"):
        what = f"a {rec.tabular.dtype} array" if isinstance(rec.tabular, np.ndarray) else type(rec.tabular).__name__
        raise ModelInputError(f"user {rec.user_id!r}: tabular must be a numpy array of numbers (NaN where missing), got "
                              f"{what}")
    for name, seq in rec.events.items():
        if name not in specs:
            raise ModelInputError(f"user {rec.user_id!r}: unknown modality {name!r}; the model knows: {', '.join(specs)}")
        where = f"user {rec.user_id!r}, modality {name!r}"
        if not isinstance(seq, EventSeq):
            raise ModelInputError(f"{where}: events must be an EventSeq, got {type(seq).__name__}")
        if isinstance(seq.ts, np.ndarray) and seq.ts.dtype.kind in "iu" and seq.ts.dtype != np.int64:
            # a narrower integer holds +-35 minutes around 1970 in microseconds: the numbers were another unit
            raise ModelInputError(f"{where}: ts must be int64 microseconds since 1970 (UTC), got {seq.ts.dtype}; in seconds "
                                  "or milliseconds, multiply by 10**6 or 10**3 and cast to int64 (or pass a dict user, "
                                  "which takes datetimes)")
        for field_name, array, kinds, ndim in (("ts", seq.ts, "i", 1), ("value", seq.value, "fiu", 1),
                                               ("extras", seq.extras, "fiu", 2)):
            if not isinstance(array, np.ndarray) or array.dtype.kind not in kinds or array.ndim != ndim:
                what = f"a {array.ndim}-d {array.dtype} array" if isinstance(array, np.ndarray) else type(array).__name__
                raise ModelInputError(f"{where}: {field_name} must be a {ndim}-d numpy array of "
                                      f"{'integer microseconds' if field_name == 'ts' else 'numbers'}, got {what} (a dict "
                                      "user takes lists and datetimes)")
        for i, t in enumerate(seq.text):
            if not isinstance(t, str):
                raise ModelInputError(f"{where}, event {i}: text must be a string, got {type(t).__name__}")
            check_utf8(t, f"{where}, event {i}, field 'text'")
        lengths = {"ts": len(seq.ts), "text": len(seq.text), "value": len(seq.value), "extras": len(seq.extras)}
        if len(set(lengths.values())) > 1:
            raise ModelInputError(f"user {rec.user_id!r}, modality {name!r}: its arrays differ in length ({lengths}); "
                                  "give one ts, text, value and extras row per event")
        late = np.flatnonzero(np.diff(np.asarray(seq.ts, dtype=np.int64)) < 0)
        if late.size:  # packing keeps the newest max_events from the end: an unsorted sequence keeps the wrong ones
            raise ModelInputError(f"user {rec.user_id!r}, modality {name!r}: event {int(late[0]) + 1} is older than the one "
                                  "before it; a UserRecord's events are oldest first (sort them by ts, or pass a dict user, "
                                  "which qanchor sorts)")
        if seq.extras.shape[1] != len(specs[name].numeric_columns):
            raise ModelInputError(f"user {rec.user_id!r}, modality {name!r}: {seq.extras.shape[1]} extra columns, the model "
                                  f"expects {len(specs[name].numeric_columns)} ({', '.join(specs[name].numeric_columns)})")
    times = [seq.ts for seq in rec.events.values() if len(seq.ts)]
    if not ordered and times and manifest.cutoff_us > 20 * EPOCH_YEAR_US:
        earliest, latest = min(int(t.min()) for t in times), max(int(t.max()) for t in times)
        if 0 <= earliest and latest < EPOCH_YEAR_US:  # as a dataset's validation refuses it: read as microseconds,
            # seconds land every event in January 1970, and the user embeds as one idle for decades, without a word
            raise ModelInputError(f"user {rec.user_id!r}: every event lies in 1970 (the latest ts is {latest}), decades "
                                  f"before the model's cutoff {manifest.cutoff.isoformat()}: a UserRecord's ts are int64 "
                                  "microseconds since 1970 (UTC); in seconds or milliseconds, multiply them by 10**6 or "
                                  "10**3 (or pass a dict user, which takes datetimes)")
    if rec.tabular is not None and len(rec.tabular) != len(columns):
        raise ModelInputError(f"user {rec.user_id!r}: {len(rec.tabular)} tabular values, the model expects {len(columns)}")
    for name, seq in rec.events.items():
        for field, values in (("value", seq.value), *((c, seq.extras[:, j]) for j, c in enumerate(specs[name].numeric_columns))):
            bad = np.flatnonzero(not_storable(values))
            if bad.size:
                raise ModelInputError(f"user {rec.user_id!r}, modality {name!r}, event {int(bad[0])}, field {field!r}: infinite "
                                      "(or beyond float32 range); use NaN for a missing value")
    if rec.tabular is not None:
        bad = np.flatnonzero(not_storable(rec.tabular))
        if bad.size:
            raise ModelInputError(f"user {rec.user_id!r}, tabular feature {columns[int(bad[0])]!r}: infinite (or beyond "
                                  "float32 range); use NaN for a missing value")
    if ordered:
        return rec
    # events of one instant in the order of their content, as a dataset's records have them: the same user built by
    # hand with a basket's lines listed another way is the same input
    events = {name: in_event_order(seq) for name, seq in rec.events.items()}
    if any(events[name] is not seq for name, seq in rec.events.items()):
        return UserRecord(rec.user_id, events, rec.tabular, rec.layout)
    return rec



def to_record(user: UserRecord | Mapping, manifest: Manifest, tabular_columns: list[str]) -> UserRecord:
    """Validate ``user`` (a :class:`UserRecord` or a dict as in the module docstring) for a model.

    Example:
        >>> to_record({"user_id": "u1", "events": {"sms": []}}, manifest, [])  # doctest: +SKIP
        ModelInputError: user 'u1': unknown modality 'sms'; the model knows: bill, app, search
    """
    if isinstance(user, UserRecord):
        from_dataset = user.layout is not None  # read in event order; the adapter re-orders where it remaps columns
        if from_dataset:  # a dataset's record: its columns by name, whatever order the model has them in
            user = _layout_adapter(user.layout, RecordLayout.of(manifest, tabular_columns))(user)
        return _check_record(user, manifest, tabular_columns, ordered=from_dataset)
    if not isinstance(user, Mapping):
        raise ModelInputError(f"a user must be a UserRecord or a dict with user_id and events, got {type(user).__name__}"
                              + (" (iterating a DataFrame gives its column names: pass one dict per user, or the Dataset)"
                                 if isinstance(user, str) else ""))
    unknown = set(user) - {"user_id", "events", "tabular"}
    if unknown:
        raise ModelInputError(f"unknown user field '{sorted(unknown)[0]}'; allowed: user_id, events, tabular")
    uid = user.get("user_id")
    if not isinstance(uid, str) or not uid:
        raise ModelInputError(f"'user_id' must be a non-empty string, got {uid!r}")
    raw_events = user.get("events")
    raw_events = {} if raw_events is None else raw_events  # not `or {}`: a DataFrame has no truth value
    if not isinstance(raw_events, Mapping):
        hint = (": from a DataFrame of events with a modality column, {m: g.drop(columns='modality').to_dict('records') "
                "for m, g in df.groupby('modality')}" if hasattr(raw_events, "to_dict") else "")
        raise ModelInputError(f"user {uid!r}: 'events' must be a dict modality -> list of events, got "
                              f"{type(raw_events).__name__}{hint}")
    specs = {m.name: m for m in manifest.sequence_modalities}
    events = {}
    for name, raw in raw_events.items():
        if name not in specs:
            raise ModelInputError(f"user {uid!r}: unknown modality {name!r}; the model knows: {', '.join(specs)}")
        seq = _events(uid, specs[name], raw)
        if len(seq):
            events[name] = seq  # as in datasets: a modality without events is absent
    return UserRecord(uid, events, _tabular(uid, user.get("tabular"), tabular_columns))


def record_adapter(data_manifest: Manifest, data_columns: list[str], model_manifest: Manifest,
                   model_columns: list[str]) -> Callable[[UserRecord], UserRecord]:
    """A function remapping a dataset's records into the model's layout (identity when they agree).

    Extra numeric columns and tabular features are matched by name; ones the model has but the dataset
    lacks become missing values. A modality or feature the model does not know raises ModelInputError.
    """
    return _layout_adapter(RecordLayout.of(data_manifest, data_columns), RecordLayout.of(model_manifest, model_columns))


def _warn_missing_inputs(data: RecordLayout, model: RecordLayout) -> None:
    """Say which of the model's inputs the data lack (read as missing for every user, so every embedding and head score
    moves): a monthly re-export that dropped a log source or renamed a column is otherwise scored without a word."""
    numeric = dict(data.numeric_columns)
    missing = [f"modality {name!r}" for name, _ in model.numeric_columns if name not in numeric]
    missing += [f"{name} column {c!r}" for name, columns in model.numeric_columns if name in numeric
                for c in columns if c not in numeric[name]]
    missing += [f"tabular feature {c!r}" for c in model.tabular_columns if c not in data.tabular_columns]
    if missing:
        warn(f"the data lack {len(missing)} of the model's inputs ({', '.join(missing[:8])}"
             f"{', ...' if len(missing) > 8 else ''}): they are read as missing for every user, so embeddings and head "
             "scores differ from ones on complete data. If a column was renamed or a log source dropped, restore it")


@lru_cache(maxsize=16)  # one per (dataset, model) pair in use: to_record asks for it once per record
def _layout_adapter(data: RecordLayout, model: RecordLayout) -> Callable[[UserRecord], UserRecord]:
    model_numeric = dict(model.numeric_columns)
    extra_index = {}
    for name, columns in data.numeric_columns:
        if name not in model_numeric:
            raise ModelInputError(f"dataset modality {name!r} is unknown to the model, which knows: {', '.join(model_numeric)}")
        extra_index[name] = [columns.index(c) if c in columns else -1 for c in model_numeric[name]]
    data_columns = list(data.tabular_columns)
    unknown = set(data_columns) - set(model.tabular_columns)
    if unknown:
        raise ModelInputError(f"dataset tabular feature {sorted(unknown)[0]!r} is unknown to the model; "
                              "drop it from tabular.parquet or use a model trained with it")
    tab_index = [data_columns.index(c) if c in data_columns else -1 for c in model.tabular_columns]
    _warn_missing_inputs(data, model)
    numeric = dict(data.numeric_columns)
    same_extras = all(idx == list(range(len(idx))) and len(idx) == len(numeric[n]) for n, idx in extra_index.items())
    if same_extras and tab_index == list(range(len(data_columns))):
        return lambda rec: rec

    def take(matrix: np.ndarray, index: list[int]) -> np.ndarray:
        padded = np.concatenate([matrix, np.full((*matrix.shape[:-1], 1), np.nan, np.float32)], axis=-1)
        return padded[..., index]  # index -1 picks the NaN column: a feature the dataset lacks

    def adapt(rec: UserRecord) -> UserRecord:
        # ties re-ordered by the model's columns: the order of content a record built in the model's layout has
        events = {n: in_event_order(EventSeq(s.ts, s.text, s.value, take(s.extras, extra_index[n])))
                  for n, s in rec.events.items()}
        tab = take(rec.tabular, tab_index) if rec.tabular is not None else None
        return UserRecord(rec.user_id, events, tab)  # now in the model's layout

    return adapt
