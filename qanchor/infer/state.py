"""The daily-update state directory: what yesterday left for today.

Layout (users split into shards by contiguous id ranges; ``bounds`` in state.json)::

    state.json                   checkpoint hash, as_of, queries, shard bounds, caps, update history
    buffer/part-00000.parquet    rolling buffer: each user's most recent max_events per modality (every event
                                 when the model reads whole-history statistics), in the dataset's long event
                                 format (user_id, modality, ts, text, value, extras)
    encodings/part-00000.parquet one row per (user, modality): n, event_tokens (n*H floats),
                                 modality_token (H floats), encoded_at (when its ages were computed),
                                 statistics (the modality's block of the statistics path's input;
                                 empty without model.statistics_path), text_vectors (the kept events'
                                 text vectors, n*T floats; empty without model.query_evidence)
    embeddings/part-00000.parquet user_id, query_id, embedding: the same format as `qanchor embed`

Files are only ever replaced whole (atomic writes), so an untouched shard is hard-linked, not copied.
Size: the encodings hold sum_m (max_events_m + 1) * H floats per user (about 40 kB for the tiny preset).

Example:
    >>> meta = StateMeta.load("state/2024-07-01")  # doctest: +SKIP
    >>> meta.shard_of(np.array(["u000042"]))  # doctest: +SKIP
    array([0])
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from qanchor.data.dataset import UserRecord, records_from_table
from qanchor.data.io import read_json_object, write_parquet, write_text
from qanchor.data.manifest import Manifest
from qanchor.data.schema import TS_TYPE, events_table
from qanchor.errors import ModelInputError
from qanchor.infer.modality_cache import Encoding

__all__ = ["STATE_FORMAT", "StateMeta", "records_from_events", "events_from_records", "encodings_table",
           "decode_encodings", "shard_path", "link_shard"]

# 2: events at one instant are kept in the order of their content (a buffer of format 1 kept the file's row order,
# so updating it no longer equals a recompute)
STATE_FORMAT = 2
KINDS = ("buffer", "encodings", "embeddings")
STATE_FILE = "state.json"
LAYOUT = (*KINDS, STATE_FILE)  # all a state holds (beside the output marker): anything else in it is the user's


@dataclass
class StateMeta:
    checkpoint: str | None
    as_of: str  # ISO datetime: ages in the encodings count from here (or from each row's encoded_at)
    queries: list[list[str]]  # [query_id, query]
    bounds: list[str]  # shard i holds user ids in [bounds[i-1], bounds[i]); len = shards - 1
    caps: dict[str, int]  # max_events per sequence modality
    n_users: int = 0
    history: list[dict] = field(default_factory=list)
    format: int = STATE_FORMAT

    @property
    def shards(self) -> int:
        return len(self.bounds) + 1

    def shard_of(self, user_ids: np.ndarray) -> np.ndarray:
        """Shard index of each user id (new ids fall into the shard whose range holds them)."""
        return np.searchsorted(np.asarray(self.bounds, dtype=object), np.asarray(user_ids, dtype=object), side="right")

    def save(self, directory: Path) -> None:
        write_text(json.dumps(asdict(self), indent=2), directory / STATE_FILE)

    @classmethod
    def load(cls, directory: str | Path) -> StateMeta:
        path = Path(directory) / STATE_FILE
        if not path.exists():
            raise ModelInputError(f"{directory} is not an update state (state.json missing); build one with "
                                  "`qanchor update checkpoint=CKPT data.path=DATASET queries=FILE out=DIR`")
        raw = read_json_object(path, ModelInputError, "the state is damaged (rebuild it with `qanchor update`)")
        if raw.get("format") != STATE_FORMAT:
            raise ModelInputError(f"{path}: state format {raw.get('format')}, this qanchor reads {STATE_FORMAT}; rebuild it")
        try:
            return cls(**raw)
        except TypeError as exc:  # keys missing or unknown
            raise ModelInputError(f"{path}: not a state description ({exc}); rebuild it") from None

    def check_files(self, directory: str | Path, encodings_per_user: int) -> None:
        """Refuse (ModelInputError naming the file) a state whose shard files are missing, unreadable, or hold other
        row counts than state.json and each other say: an update read a missing file as an empty shard and carried
        on without its users' buffers, encodings and embeddings, and a truncated one ended in a pyarrow traceback.
        Reads only the files' footers. ``encodings_per_user``: the model's modality encodings (one row each)."""
        directory = Path(directory)
        users = 0
        for shard in range(self.shards):
            paths = {kind: shard_path(directory, kind, shard) for kind in KINDS}
            rows = {kind: _rows_of(path, directory) for kind, path in paths.items()}
            n, left = divmod(rows["encodings"], encodings_per_user)
            if left or rows["embeddings"] != n * len(self.queries):
                raise ModelInputError(_damaged(directory, f"{paths['encodings']} holds {rows['encodings']} rows and "
                                               f"{paths['embeddings']} {rows['embeddings']}, which are not "
                                               f"{encodings_per_user} encodings and {len(self.queries)} embeddings "
                                               "(its queries) for each of its users"))
            users += n
        if users != self.n_users:
            raise ModelInputError(_damaged(directory, f"its encodings hold {users} users, and its {STATE_FILE} says "
                                           f"{self.n_users}"))


def _damaged(directory: Path, what: str) -> str:
    return (f"the state {directory} is damaged: {what}; rebuild it with `qanchor update checkpoint=CKPT "
            "data.path=DATASET queries=FILE out=DIR` (and apply the days since)")


def _rows_of(path: Path, directory: Path) -> int:
    """A shard file's row count, from its footer; a missing or unreadable one is a damaged state."""
    if not path.is_file():
        raise ModelInputError(_damaged(directory, f"{path} is missing"))
    try:
        return pq.read_metadata(path).num_rows
    except (pa.ArrowInvalid, OSError) as exc:  # truncated, or not Parquet
        raise ModelInputError(_damaged(directory, f"{path} is not a readable Parquet file "
                                       f"({str(exc).splitlines()[0][:100]})")) from None


def shard_path(directory: Path, kind: str, shard: int) -> Path:
    return directory / kind / f"part-{shard:05d}.parquet"


def link_shard(src: Path, dst: Path, shard: int) -> None:
    """Carry an untouched shard over: hard links (files are never modified in place), else copies. Every shard of a
    state has all its files, each written for it (a dataset has users, and a state's shards are its partitions that
    hold some): a missing one is refused, not skipped (which dropped its users from every later state, silently)."""
    for kind in KINDS:
        a, b = shard_path(src, kind, shard), shard_path(dst, kind, shard)
        if not a.is_file():
            raise ModelInputError(_damaged(src, f"{a} is missing"))
        b.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)


def records_from_events(table: pa.Table, manifest: Manifest) -> dict[str, UserRecord]:
    """A long event table -> one record per user (events sorted by time; no tabular row)."""
    return {r.user_id: r for r in records_from_table(table, manifest)}


def events_from_records(records: list[UserRecord], manifest: Manifest) -> pa.Table:
    """Records -> the long event table (the format of a dataset's events/ files)."""
    cols: dict[str, list] = {k: [] for k in ("user_id", "modality", "ts", "text", "value")}
    extra_cols = {c for m in manifest.sequence_modalities for c in m.numeric_columns}
    cols.update({c: [] for c in extra_cols})
    for rec in records:
        for m in manifest.sequence_modalities:
            seq = rec.events.get(m.name)
            if seq is None:
                continue
            n = len(seq)
            cols["user_id"] += [rec.user_id] * n
            cols["modality"] += [m.name] * n
            cols["ts"] += seq.ts.tolist()
            cols["text"] += list(seq.text)
            cols["value"] += [None if np.isnan(v) else float(v) for v in seq.value]
            for c in extra_cols:
                column = seq.extras[:, m.numeric_columns.index(c)] if c in m.numeric_columns else np.full(n, np.nan)
                cols[c] += [None if np.isnan(x) else float(x) for x in column]
    return events_table(manifest, cols)


def encodings_table(encodings: dict[str, dict[str, Encoding]], hidden: int) -> pa.Table:
    """user -> modality -> Encoding  ->  one row per (user, modality)."""
    users, mods, ns, flat, tokens, at, stats, texts = [], [], [], [], [], [], [], []
    for uid in sorted(encodings):
        for name, e in encodings[uid].items():
            users.append(uid)
            mods.append(name)
            ns.append(e.events.shape[0])
            flat.append(e.events.reshape(-1))  # (n*H,)
            tokens.append(e.token)
            at.append(e.encoded_at)
            stats.append(np.asarray(e.statistics, np.float32))
            texts.append(np.asarray(e.text, np.float32).reshape(-1))
    token_flat = pa.array(np.concatenate(tokens) if tokens else np.zeros(0, np.float32), pa.float32())
    return pa.table({
        "user_id": pa.array(users, pa.string()),
        "modality": pa.array(mods, pa.string()),
        "n": pa.array(ns, pa.int32()),
        "event_tokens": _list_column(flat),
        "modality_token": pa.FixedSizeListArray.from_arrays(token_flat, hidden),
        "encoded_at": pa.array(at, pa.int64()).cast(TS_TYPE),
        "statistics": _list_column(stats),  # the statistics path's block (empty lists without that path)
        "text_vectors": _list_column(texts),  # the kept events' text vectors (empty lists without query evidence)
    })


def _list_column(rows: list[np.ndarray]) -> pa.LargeListArray:
    """Float lists with 64-bit offsets: a shard's event tokens (users x kept events x hidden size) pass 2^31 floats
    at the paper's width (int32 offsets wrapped negative and the shard could not be written)."""
    offsets = pa.array(np.r_[0, np.cumsum([len(r) for r in rows], dtype=np.int64)], pa.int64())
    return pa.LargeListArray.from_arrays(offsets, pa.array(np.concatenate(rows) if rows else np.zeros(0, np.float32),
                                                           pa.float32()))


def decode_encodings(table: pa.Table, user_ids: set[str]) -> dict[str, dict[str, Encoding]]:
    """The rows of ``user_ids`` -> user -> modality -> Encoding."""
    table = table.filter(pc.is_in(table.column("user_id"), pa.array(sorted(user_ids), pa.string())))
    hidden = table.schema.field("modality_token").type.list_size
    out: dict[str, dict[str, Encoding]] = {}
    tokens = np.asarray(table.column("modality_token").combine_chunks().flatten()).reshape(-1, hidden)  # (rows, H)
    at = table.column("encoded_at").cast(pa.int64()).to_numpy()
    events = table.column("event_tokens").combine_chunks()
    flat = np.asarray(events.flatten())  # (sum n * H,)
    offsets = np.asarray(events.offsets)
    offsets = offsets - offsets[0]  # a filtered array may start past zero
    stats, stat_offsets = _list_rows(table, "statistics")  # states written before the statistics path have none
    texts, text_offsets = _list_rows(table, "text_vectors")  # nor before query evidence
    for i, (uid, name) in enumerate(zip(table.column("user_id").to_pylist(), table.column("modality").to_pylist())):
        ev = flat[offsets[i] : offsets[i + 1]].reshape(-1, hidden)  # (n, H)
        block = np.zeros(0, np.float32) if stats is None else stats[stat_offsets[i] : stat_offsets[i + 1]].copy()
        text = np.zeros(0, np.float32) if texts is None else texts[text_offsets[i] : text_offsets[i + 1]].copy()
        out.setdefault(uid, {})[name] = Encoding(ev.copy(), tokens[i].copy(), int(at[i]), block, text)
    return out


def _list_rows(table: pa.Table, name: str) -> tuple[np.ndarray | None, np.ndarray | None]:
    """A float list column's flat values and row offsets (starting at 0); (None, None) if the table lacks it."""
    if name not in table.column_names:
        return None, None
    column = table.column(name).combine_chunks()
    offsets = np.asarray(column.offsets)
    return np.asarray(column.flatten()), offsets - offsets[0]


def write_tables(directory: Path, shard: int, tables: dict[str, pa.Table]) -> None:
    for kind, table in tables.items():
        write_parquet(table, shard_path(directory, kind, shard))


def read_table(directory: Path, kind: str, shard: int) -> pa.Table:
    """A shard file's table (there and readable: :meth:`StateMeta.check_files`; it was None for a missing file, and
    its users were dropped)."""
    return pq.read_table(shard_path(directory, kind, shard))
