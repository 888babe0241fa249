"""Daily incremental update: yesterday's state + a day of events -> today's state.

Only users with new events are touched, and for them only the modalities that received events are
re-encoded (rolling buffer of the most recent ``max_events``; every event for a model whose modality tokens read
whole-history statistics); the other modality encodings come from the state. The user token is recomputed, and the LLM prefix and every query suffix re-run for each
touched user: the prefix reads every modality's tokens, so it cannot be reused once any changed.
Users without new events keep yesterday's embeddings (their state files are hard-linked).

Honest caveat: event ages are a model input. A skipped encoding keeps the ages of the day it was
computed (``encoded_at``), and an untouched user keeps yesterday's embedding, so as days pass they
drift from a full recompute; ``full=True`` (``full=true`` on the command line) re-encodes every modality at the new as_of.
With as_of unchanged (late events for the same day) the update equals a full recompute.

Example:
    >>> init_state(qa, load_dataset("data/synth"), read_queries("q.yaml"), "state/d0")  # doctest: +SKIP
    >>> update_state(qa, "state/d0", ["day1.parquet"], "state/d1").modality_encodings_skipped  # doctest: +SKIP
    11412
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from qanchor.data.dataset import Dataset, EventSeq, UserRecord, event_order, order_key
from qanchor.data.io import OutputKind, atomic_dir
from qanchor.data.pipeline import batched
from qanchor.data.schema import TS_TYPE, utc_micros
from qanchor.data.validate import check_event_file, check_tabular_file
from qanchor.errors import CheckpointError, ConfigError, DataValidationError, ModelInputError
from qanchor.infer.api import QAnchor, events_before
from qanchor.infer.export import embeddings_table
from qanchor.infer.modality_cache import Encoding, embed_from_encodings, encode_modalities
from qanchor.infer.state import (
    LAYOUT,
    StateMeta,
    decode_encodings,
    encodings_table,
    events_from_records,
    link_shard,
    read_table,
    records_from_events,
    shard_path,
    write_tables,
)
from qanchor.infer.user_input import record_adapter, to_microseconds
from qanchor.logs import Progress, log, warn
from qanchor.model.factory import same_model

__all__ = ["UpdateReport", "init_state", "update_state", "read_events", "read_tabular"]

_DAY_US = 86_400 * 1_000_000


@dataclass
class UpdateReport:
    as_of: str
    age_shift_days: float  # as_of minus the previous state's: how stale skipped encodings' ages are
    users_total: int
    users_changed: int  # users with new events or given tabular values
    users_new: int
    events_received: int
    modality_encodings_run: int
    modality_encodings_skipped: int  # (user, modality) encodings reused from the state
    llm_prefixes_run: int  # users whose prefix + suffixes ran (changed users; everyone on --full or new queries)
    shards_rewritten: int
    shards_linked: int
    seconds: float
    # received events the state already held (a day applied twice, a retried job): skipped, so a replay changes nothing
    events_already_in_state: int = 0
    # received events older than a full capped buffer's oldest kept event: the state could never keep them, skipped
    events_before_kept_window: int = 0
    # users first seen in this update without a row in tabular=, of a model with tabular features: their tabular
    # values are missing (a full recompute from a dataset holding their row would differ)
    users_new_without_tabular: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def _iso(us: int) -> str:
    return (datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(microseconds=int(us))).isoformat()


def _buffer(q: QAnchor, record: UserRecord) -> dict[str, EventSeq]:
    """What the state keeps of a user's events: each modality's most recent ``max_events``, or every event when the
    model's modality tokens read whole-history statistics (``model.user_encoder.summary_stats: history``) or the
    whole history's mean text vector (``summary_text: history``): counts, tenure, active days and what the older
    events were about cannot be recomputed from the last ``max_events`` events."""
    return dict(record.events) if _keeps_every_event(q) else q.pipeline.packer.recent(record)


def _keeps_every_event(q: QAnchor) -> bool:
    enc = q.model.user_encoder
    return bool(enc.history_width or enc.summary_text == "history")


def _event_key(seq: EventSeq, i: int) -> tuple:
    def number(x: float) -> float | None:
        return None if np.isnan(x) else float(x)
    return int(seq.ts[i]), seq.text[i], number(seq.value[i]), tuple(number(x) for x in seq.extras[i])


def _without_replayed(old: UserRecord | None, new: UserRecord,
                      caps: dict[str, int] | None) -> tuple[UserRecord | None, int, int]:
    """``new`` less the events the state already holds, and less those it could never keep -> (what is left, or None;
    how many were already held; how many were older than a full buffer's oldest kept event).

    A daily job retried, or a day's file given again, must not count its events twice. Identical events count as a
    multiset: a day's two identical purchases are both kept the first time and both dropped on a replay. With capped
    buffers (``caps``; None when the state keeps every event) an event before a full buffer's oldest in event order is
    not found there, as an old day replayed after the cap pushed it out, one that arrives that late, or a line of a
    basket the cap cut (same time, earlier in the order of content): merging would cut it again, so it is dropped here
    rather than marking its user as changed (which re-encodes the user at a later as_of). So a replay changes nothing
    either way."""
    if old is None:
        return new, 0, 0
    events, dropped, too_old = {}, 0, 0
    for name, seq in new.events.items():
        held = old.events.get(name)
        if held is None:
            events[name] = seq
            continue
        counts = Counter(_event_key(held, i) for i in range(len(held)))
        full = caps is not None and len(held) >= caps.get(name, len(held) + 1)
        edge = order_key(held, 0) if full else None
        keep = []
        for i in range(len(seq)):
            key = _event_key(seq, i)
            if counts[key]:
                counts[key] -= 1
                dropped += 1
            # before the buffer's oldest in event order, or another copy of it (the merge puts the held one first and
            # keeps one of the two): a merge cuts it
            elif full and order_key(seq, i) <= edge:
                too_old += 1
            else:
                keep.append(i)
        if keep:
            events[name] = EventSeq(seq.ts[keep], [seq.text[i] for i in keep], seq.value[keep], seq.extras[keep])
    return (UserRecord(new.user_id, events, new.tabular) if events else None), dropped, too_old


def _merge(old: UserRecord | None, new: UserRecord, q: QAnchor) -> UserRecord:
    """Old buffer + new events, cut as :func:`_buffer` keeps them (oldest first)."""
    events = dict(old.events) if old is not None else {}
    for name, seq in new.events.items():
        if name in events:
            a = events[name]
            ts = np.concatenate([a.ts, seq.ts])
            texts = a.text + seq.text  # once: joined per index, a heavy user's whole-history buffer cost O(n^2)
            value, extras = np.concatenate([a.value, seq.value]), np.concatenate([a.extras, seq.extras])
            # ties by content, as a full read of the same events orders them: an update equals a recompute
            order = event_order(ts, texts, value, extras)
            seq = EventSeq(ts[order], [texts[i] for i in order], value[order], extras[order])
        events[name] = seq
    return UserRecord(new.user_id, _buffer(q, UserRecord(new.user_id, events, None)), None)


def _before(records: Iterable[UserRecord], as_of_us: int) -> tuple[list[UserRecord], int]:
    """Each user's events before ``as_of_us`` (a user keeps its place, with no events if none is left) -> (users,
    how many events were left out)."""
    out, left_out = [], 0
    for r in records:
        events = events_before(r.events, as_of_us)
        left_out += sum(map(len, r.events.values())) - sum(map(len, events.values()))
        out.append(UserRecord(r.user_id, events, r.tabular))
    return out, left_out


def _encode_users(q: QAnchor, records: list[UserRecord], touched: list[set[str]], as_of_us: int,
                  cached: dict[str, dict[str, Encoding]]) -> tuple[dict[str, dict[str, Encoding]], int]:
    """Re-encode ``touched[i]`` of ``records[i]``, take the rest from ``cached`` -> (encodings, how many ran)."""
    packed = q.pack(records, as_of_us)
    out = {r.user_id: dict(cached.get(r.user_id, {})) for r in records}
    ran = 0
    for name in q.model.user_encoder.names:
        idx = [i for i, t in enumerate(touched) if name in t]
        if idx:
            for i, e in zip(idx, encode_modalities(q, [packed[i] for i in idx], [name], as_of_us)[name]):
                out[records[i].user_id][name] = e
            ran += len(idx)
    return out, ran


def _asked(q: QAnchor, queries: list[tuple[str, str]]) -> tuple[list, torch.Tensor | None]:
    """The queries' suffixes and (for a model with query evidence) their sentence vectors."""
    texts = [t for _, t in queries]
    return q.suffixes([(t, None) for t in texts]), q.query_vectors(texts)


def _embed(q: QAnchor, encodings: dict[str, dict[str, Encoding]], users: list[str], asked) -> np.ndarray:
    suffixes, vectors = asked
    chunks = [embed_from_encodings(q, [encodings[u] for u in part], suffixes, vectors) for part in batched(users, q.batch_size)]
    return np.concatenate(chunks) if chunks else np.zeros((0, len(suffixes), q.embedding_dim), np.float32)  # (U, Q, D)


def _write_shard(q: QAnchor, out: Path, shard: int, records: list[UserRecord], encodings: dict[str, dict[str, Encoding]],
                 emb: np.ndarray, query_ids: list[str], old: dict[str, pa.Table | None]) -> None:
    """Replace the rows of ``records``' users in the old shard tables (if any) and write the shard."""
    users = pa.array(sorted(r.user_id for r in records), pa.string())
    new = {"buffer": events_from_records(records, q.manifest),
           "encodings": encodings_table({u: encodings[u] for u in users.to_pylist()}, q.model.hidden_size),
           "embeddings": embeddings_table([r.user_id for r in records], query_ids, emb)}
    tables = {}
    for kind, table in new.items():
        if old.get(kind) is not None:
            kept = old[kind].filter(pc.invert(pc.is_in(old[kind].column("user_id"), users)))
            if kind == "encodings":  # a state written with 32-bit list offsets takes the new 64-bit ones
                kept = kept.cast(table.schema)
            table = pa.concat_tables([kept, table.cast(kept.schema)])
        keys = [("user_id", "ascending")] + ([("ts", "ascending")] if kind == "buffer" else [])
        tables[kind] = table.sort_by(keys)  # a stable sort: queries and modalities keep their order per user
    write_tables(out, shard, tables)


def _check_token_model(q: QAnchor) -> None:
    """A state keeps each modality's encoding, the user tokens; a model that reads its users as lines of event text
    has none, and prefixes built from its untrained user encoder would be wrong embeddings."""
    if q.run_cfg.model.user_input != "tokens":
        raise CheckpointError(f"{q.checkpoint_dir or 'this model'} reads users as event text (model.user_input="
                              f"{q.run_cfg.model.user_input}), so a daily-update state, which keeps user-token "
                              "encodings, cannot serve it; embed its users with `qanchor embed` instead")


def init_state(q: QAnchor, ds: Dataset, queries: list[tuple[str, str]], out_dir: str | Path,
               as_of: str | None = None, progress: bool = True) -> UpdateReport:
    """Build the first state from a dataset: buffers, every modality encoding, embeddings."""
    _check_token_model(q)
    start = time.perf_counter()
    as_of_us = q.cutoff_us(as_of or ds.manifest.cutoff.isoformat(), "as_of")
    adapt = record_adapter(ds.manifest, ds.tabular_columns, q.manifest, q.tabular_columns)
    asked, query_ids = _asked(q, queries), [i for i, _ in queries]
    parts = ds.partitions
    shards = [p for p in range(parts.count) if len(parts.ids_of(p))]
    names = set(q.model.user_encoder.names)
    n_users = ran = 0
    # counted in users, per batch: a shard is a whole partition (up to 4,096 users), minutes at the paper's width
    bar = Progress(sum(len(parts.ids_of(p)) for p in shards), "init state", "user", enabled=progress)
    left_out = 0
    with atomic_dir(out_dir, OutputKind.STATE, LAYOUT, record_layout=True) as tmp:
        for s, p in enumerate(shards):
            # a state as of T holds what happened before T: later events are for `qanchor update` to apply (a state
            # that kept them would skip those days as "already in the state", and describe its users as of later)
            records, n_late = _before(map(adapt, ds.users(parts.ids_of(p))), as_of_us)
            left_out += n_late
            encodings, n = {}, 0
            for chunk in batched(records, q.batch_size):
                enc, n_run = _encode_users(q, chunk, [names] * len(chunk), as_of_us, {})
                encodings.update(enc)
                n += n_run
                bar.update(len(chunk))
            emb = _embed(q, encodings, [r.user_id for r in records], asked)
            buffers = [UserRecord(r.user_id, _buffer(q, r), None) for r in records]
            _write_shard(q, tmp, s, buffers, encodings, emb, query_ids, {})
            n_users, ran = n_users + len(records), ran + n
        bar.close()
        if left_out and progress:
            log(f"{left_out} events of {ds.root} at or after as_of={_iso(as_of_us)} were left out of the state; apply "
                "them with `qanchor update` (events=...) to bring it forward")
        report = UpdateReport(_iso(as_of_us), 0.0, n_users, n_users, n_users, 0, ran, 0, n_users, len(shards), 0,
                              time.perf_counter() - start)
        bounds = [str(parts.ids_of(p)[0]) for p in shards[1:]]
        caps = q.event_caps
        StateMeta(q.weights_id(), _iso(as_of_us), [list(x) for x in queries], bounds, caps, n_users,
                  [asdict(report)]).save(tmp)
    return report


def read_events(files: Sequence[str | Path], q: QAnchor, as_of_us: int | None) -> pa.Table:
    """Read and validate a day of events (the dataset event format); events must precede ``as_of``."""
    limit = datetime(9999, 1, 1, tzinfo=timezone.utc) if as_of_us is None else datetime.fromisoformat(_iso(as_of_us))
    manifest = dataclasses.replace(q.manifest, cutoff=limit)  # the validator's "before the cutoff" rule = before as_of
    tables, seen = [], set()
    for path in map(Path, files):
        if path.is_dir():
            raise ModelInputError(f"events file {path} is a folder; give its Parquet files (events=[{path}/part-0.parquet,"
                                  " ...]), each once")
        if not path.is_file():
            raise ModelInputError(f"events file {path} not found")
        if path.resolve() in seen:
            raise ModelInputError(f"events file {path} is given twice: its events would count twice; give each file once")
        seen.add(path.resolve())
        if _rows_in(path) == 0:  # a quiet day: no events, nothing to check or apply
            continue
        check_event_file(path, manifest, cutoff_name="as_of")
        table = pq.read_table(path)
        ts = table.schema.get_field_index("ts")
        tables.append(table.set_column(ts, "ts", utc_micros(table.column(ts))))  # naive = UTC
    return pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({"ts": pa.array([], TS_TYPE)})


def read_tabular(path: str | Path, q: QAnchor) -> dict[str, np.ndarray]:
    """A tabular file (the dataset's ``tabular.parquet`` format: ``user_id`` + the model's tabular columns, matched by
    name) -> each user's values in the model's column order (NaN where missing)."""
    path = Path(path)
    if not q.tabular_columns:
        raise ModelInputError(f"tabular={path}: this model reads no tabular features; leave tabular= out")
    if not path.is_file():
        raise ModelInputError(f"tabular file {path} not found")
    if _rows_in(path) == 0:  # a day without new or changed rows
        return {}
    table = check_tabular_file(path)
    given = [c for c in table.column_names if c != "user_id"]
    missing, unknown = [c for c in q.tabular_columns if c not in given], [c for c in given if c not in q.tabular_columns]
    if missing or unknown:
        raise DataValidationError(str(path), f"its columns must be the model's tabular columns {q.tabular_columns}"
                                  + (f"; missing {missing}" if missing else "") + (f"; not the model's {unknown}" if unknown else ""))
    values = np.stack([table.column(c).to_numpy(zero_copy_only=False).astype(np.float32) for c in q.tabular_columns], 1)
    return dict(zip(table.column("user_id").to_pylist(), values))


def _rows_in(path: Path) -> int | None:
    """How many rows a Parquet file holds (None: not readable as Parquet, which the validator then says)."""
    try:
        return pq.ParquetFile(path).metadata.num_rows
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError):  # a column name not UTF-8: the validator says
        return None


def _default_as_of(meta: StateMeta, table: pa.Table) -> int:
    """The state's as_of, moved to the midnight (UTC) after the newest new event if that is later."""
    prev = to_microseconds(meta.as_of)
    if not table.num_rows:
        return prev
    newest = int(pc.max(table.column("ts").cast(pa.int64())).as_py())
    return max(prev, (newest // _DAY_US + 1) * _DAY_US)


def update_state(q: QAnchor, state_dir: str | Path, event_files: Sequence[str | Path], out_dir: str | Path,
                 queries: list[tuple[str, str]] | None = None, as_of: str | None = None, full: bool = False,
                 tabular: str | Path | None = None, progress: bool = True) -> UpdateReport:
    """Apply a day of events to the state in ``state_dir``, writing today's state to ``out_dir``.

    ``tabular``: a file of tabular rows (:func:`read_tabular`) for users first seen today, whose values no event file
    carries, or for users whose values changed; their tabular encoding is recomputed."""
    start = time.perf_counter()
    state_dir, out_dir = Path(state_dir), Path(out_dir)
    if state_dir.resolve() == out_dir.resolve():
        raise ConfigError("out must differ from state: yesterday's state stays intact until today's is complete")
    _check_token_model(q)
    meta = StateMeta.load(state_dir)
    model_id = q.weights_id()
    if not same_model(meta.checkpoint, model_id, f"the state {state_dir}"):
        # a state carried on by another model would mix two models' encodings, and then pass as the first one's; a
        # model built in code is known by its weights' digest
        def named(made_by: str | None) -> str:
            if made_by is None or made_by.startswith("in-code:"):
                return "a model built in code" + (f" (weights {made_by[8:20]})" if made_by else "")
            return f"checkpoint {made_by[:12]}"
        raise CheckpointError(f"{state_dir} was built with {named(meta.checkpoint)}, not this one ({named(model_id)}); "
                              "rebuild the state with this model, or update it with the model that built it (load a "
                              "checkpoint with QAnchor.from_pretrained)")
    if q.event_caps != meta.caps:  # the buffer holds each modality's most recent caps[m] events
        raise ConfigError(f"{state_dir} was built packing {meta.caps} most recent events per modality, and this model "
                          f"packs {q.event_caps}; update it with the state's caps (data.max_events={meta.caps}) or "
                          "build a new state")
    meta.check_files(state_dir, len(q.model.user_encoder.names))
    as_of_us = q.cutoff_us(as_of, "as_of") if as_of else None
    table = read_events(event_files, q, as_of_us)
    as_of_us = as_of_us or _default_as_of(meta, table)
    if as_of_us < to_microseconds(meta.as_of):
        raise ModelInputError(f"as_of {_iso(as_of_us)} is before the state's {meta.as_of}")
    queries = queries or [tuple(x) for x in meta.queries]
    requery = [list(x) for x in queries] != meta.queries
    new = records_from_events(table, q.manifest)
    rows = read_tabular(tabular, q) if tabular is not None else {}
    seen = sorted(set(new) | set(rows))
    shard_of = dict(zip(seen, meta.shard_of(np.array(seen, dtype=object)))) if seen else {}
    asked, query_ids = _asked(q, queries), [i for i, _ in queries]
    totals = dict(users=0, changed=0, new=0, ran=0, prefixes=0, rewritten=0, linked=0, replayed=0, too_old=0,
                  untabled=0)
    with atomic_dir(out_dir, OutputKind.STATE, LAYOUT, record_layout=True) as tmp:
        # counted in users re-encoded, per batch: a state of one partition is one shard, which ran silent for minutes
        with Progress(None, "update state", "user", enabled=progress) as bar:
            for s in range(meta.shards):
                mine = {u: r for u, r in new.items() if shard_of[u] == s}
                values = {u: v for u, v in rows.items() if shard_of[u] == s}
                _update_shard(q, state_dir, tmp, s, mine, values, as_of_us, asked, query_ids, requery or full, full,
                              totals, bar)
                bar.set_postfix(f"{s + 1}/{meta.shards} shards")
        m = len(q.model.user_encoder.names)
        report = UpdateReport(_iso(as_of_us), (as_of_us - to_microseconds(meta.as_of)) / _DAY_US, totals["users"],
                              totals["changed"], totals["new"], table.num_rows, totals["ran"],
                              totals["users"] * m - totals["ran"], totals["prefixes"], totals["rewritten"],
                              totals["linked"], time.perf_counter() - start, totals["replayed"], totals["too_old"],
                              totals["untabled"] if q.tabular_columns else 0)
        if report.events_already_in_state and progress:
            warn(f"{report.events_already_in_state} of the {report.events_received} events received were already "
                 f"in {state_dir} (a day applied twice, or a retried job?) and were skipped")
        if report.users_new_without_tabular and progress:
            warn(f"{report.users_new_without_tabular} users first seen in this update have no tabular values "
                 "(no row in tabular=), so their embeddings read those features as missing; give their rows with "
                 "tabular=FILE (user_id + the model's tabular columns)")
        if report.events_before_kept_window and progress:
            log(f"{report.events_before_kept_window} of the {report.events_received} events received were older than "
                f"every event their user's buffer keeps (the most recent {meta.caps} per modality) and were skipped")
        # the model as the state recorded it (accepted above): a state begun before model ids covered the config keeps
        # its weights-only record, and its warning, until it is rebuilt, as it carries that state's embeddings on
        StateMeta(meta.checkpoint, report.as_of, [list(x) for x in queries], meta.bounds, meta.caps,
                  totals["users"], [*meta.history, asdict(report)]).save(tmp)
    return report


def _update_shard(q: QAnchor, src: Path, dst: Path, shard: int, new: dict[str, UserRecord],
                  tabular: dict[str, np.ndarray], as_of_us: int, asked, query_ids: list[str], reembed_all: bool,
                  full: bool, totals: dict, bar: Progress | None = None) -> None:
    path = shard_path(src, "encodings", shard)
    n_old = pq.ParquetFile(path).metadata.num_rows // len(q.model.user_encoder.names)

    def carry_over() -> None:  # the shard unchanged: yesterday's files, hard-linked
        link_shard(src, dst, shard)
        totals.update(users=totals["users"] + n_old, linked=totals["linked"] + 1)

    if not new and not tabular and not reembed_all:
        return carry_over()
    old = {k: read_table(src, k, shard) for k in ("buffer", "encodings", "embeddings")}
    buffers = records_from_events(old["buffer"], q.manifest)
    fresh = {}
    caps = None if _keeps_every_event(q) else q.event_caps
    for uid, rec in new.items():
        left, dropped, too_old = _without_replayed(buffers.get(uid), rec, caps)
        totals["replayed"] += dropped
        totals["too_old"] += too_old
        if left is not None:
            fresh[uid] = left
    new = fresh
    if not new and not tabular and not reembed_all:  # every event was already in the state
        return carry_over()
    known = set(pc.unique(old["encodings"].column("user_id")).to_pylist())
    names = set(q.model.user_encoder.names)
    sequence = {m.name for m in q.manifest.sequence_modalities}  # tabular values are not kept: never re-encoded
    records, touched = {}, {}
    for uid, rec in new.items():
        records[uid] = _merge(buffers.get(uid), rec, q)
        # a new user: every modality (the empty ones too); --full: every sequence modality, at the new as_of
        touched[uid] = names if uid not in known else sequence if full else set(rec.events)
    table_name = q.manifest.tabular.name if q.manifest.tabular is not None else None
    for uid, values in tabular.items():  # given values (a new user's, or changed ones): the tabular encoding re-runs
        if uid not in records:
            records[uid] = UserRecord(uid, buffers[uid].events if uid in buffers else {}, None)
            touched[uid] = names if uid not in known else sequence if full else set()
        records[uid].tabular = values
        touched[uid] = touched[uid] | {table_name}
    changed = set(new) | set(tabular)
    targets = sorted(known | changed) if reembed_all else sorted(changed)
    for uid in targets:
        if uid not in records:
            records[uid] = UserRecord(uid, buffers.get(uid, UserRecord(uid, {})).events, None)
            touched[uid] = sequence if full else set()
    cached = decode_encodings(old["encodings"], set(targets))
    recs = [records[u] for u in targets]
    encodings, ran = {}, 0
    for chunk in batched(recs, q.batch_size):
        enc, n = _encode_users(q, chunk, [touched[r.user_id] for r in chunk], as_of_us, cached)
        encodings.update(enc)
        ran += n
        if bar is not None:
            bar.update(len(chunk))
    emb = _embed(q, encodings, targets, asked)
    _write_shard(q, dst, shard, recs, encodings, emb, query_ids, old)
    totals.update(users=totals["users"] + len(known | changed), changed=totals["changed"] + len(changed),
                  new=totals["new"] + len(changed - known), untabled=totals["untabled"] + len(changed - known - set(tabular)),
                  ran=totals["ran"] + ran,
                  prefixes=totals["prefixes"] + len(targets), rewritten=totals["rewritten"] + 1)
