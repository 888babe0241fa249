"""Build UserU pretraining pairs (DESIGN section 6) into ``<dataset>/userU.parquet``.

The paper's two sources, forecast questions asked the way scenario tasks ask, and distinctive items:

- ``future``: at a few internal cutoffs ``c`` inside a user's history, the profile is the events before
  ``c`` and the answer summarises what the user does in ``[c, c + window)``: the most frequent items,
  at most ``MAX_PER_CATEGORY`` from one category, e.g.
  ``"Next 30 days: bill: Starbucks coffee (x5), Shell fuel station (x3); app: Opened Alipay (x12);
  9 active days."`` The query is fixed: ``"What will this user do in the next 30 days?"``.
- ``uqa``: about ten topics per user (activity, amounts, categories, recency, habits...), each a
  grounded question and an answer computed from the user's events before the dataset cutoff. Every
  answer carries claims that :func:`qanchor.data.userU_topics.verify` recomputes; pairs that fail are
  dropped and counted (the paper's reflection step). Templates by default; any :class:`QAGenerator`
  (an LLM wrapper, say) can replace them and is held to the same check.

- ``forecast``: yes / no questions about the next window at the same kind of internal cutoffs (will the user
  be active, less active, use modality *m*, touch a category again or for the first time, spend less), with
  the counts behind the answer; see :mod:`qanchor.data.forecast`. Windows without events are kept.
- ``signature`` (``signature=True``): "what sets this user apart?", at the dataset cutoff and at each future
  pair's cutoff, answered with the items the user repeats that few other users have (tf-idf over users; see
  :func:`qanchor.data.userU_topics.signature`), each count verified.

No pair looks past the dataset cutoff: uqa pairs use it as their cutoff and future windows end by it.
Users stream from :meth:`Dataset.users` one partition at a time; only the output rows are kept.

Example:
    >>> from qanchor.data.userU import build_userU
    >>> stats = build_userU("data/synth", seed=0)                 # doctest: +SKIP
    >>> stats.pairs                                                # doctest: +SKIP
    {'future': 5883, 'uqa': 19846}
    >>> load_dataset("data/synth").userU().slice(0, 1).to_pylist()  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from itertools import compress
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa

from qanchor.data.dataset import Dataset, load_dataset
from qanchor.data.forecast import forecast_pairs
from qanchor.data.io import write_parquet
from qanchor.data.schema import (
    TS_TYPE,
    USERU_FILE,
    USERU_OWNER_KEY,
    USERU_OWNER_VALUE,
    USERU_SCHEMA,
    check_userU_target,
    userU_metadata,
)
from qanchor.data.userU_topics import (
    DAY_US,
    QA,
    TOPIC_BRIEFS,
    TOPICS,
    Claim,
    History,
    ItemAdoption,
    category,
    item_groups,
    named,
    summarize,
    verify,
)
from qanchor.data.userU_topics import signature as signature_topic
from qanchor.data.validate import event_files
from qanchor.logs import progress as progress_iter

__all__ = ["build_userU", "UserUStats", "QAGenerator", "future_pairs", "uqa_pairs", "summarize_future",
           "FUTURE_QUERY", "MAX_ITEMS", "MAX_PER_CATEGORY", "MAX_TOPICS", "stale_userU", "USERU_VERSION", "events_digest"]

log = logging.getLogger(__name__)

FUTURE_QUERY = "What will this user do in the next {days} days?"
MAX_ITEMS, MAX_PER_CATEGORY = 6, 2  # a future answer names at most 6 items, at most 2 from one category
MAX_WORDS = 55  # long item texts (product paths) shed items until the answer fits
MAX_TOPICS = 10  # the paper asks for ten topics per user
_FLUSH_ROWS = 65_536
# Which pairs this generator writes, stamped in the file's metadata beside the owner key. Bump it (and add the reason
# to USERU_CHANGES) when a change alters the pairs a dataset gets, so that pretraining on an older file says so.
USERU_VERSION_KEY, USERU_VERSION = "qanchor_userU_version", 5
USERU_EVENTS_KEY = "qanchor_userU_events"  # events_digest of the data the pairs were computed from
USERU_CHANGES = {
    2: 'a "name, attributes" text\'s category comes from its attributes, not the title\'s first word ("rating/horror", '
       'not "rating/quiet")',
    3: "a forecast pair's question depends on nothing after its cutoff (the modality asked about is drawn from the "
       "dataset's modalities, not the ones the user has by the dataset cutoff; the amount question is asked of users "
       "with values before the cutoff)",
    4: "a pair at an internal cutoff counts only what had happened by then: forecast's first-time questions ask about "
       "categories some user had before the cutoff, and signature answers weigh items by the users who had them "
       "before it (both counted at the dataset cutoff before, so a later event of another user changed the pair); each "
       "cutoff's signature question is drawn on its own; a category question that would not fit the tiny presets' 32-token query budget (a URL's) is never asked; "
       "amounts are summed in float64",
    5: "amounts are never added or compared across modalities, whose values have their own units (forecast's amount "
       "question and the largest-single-amount topic ask of one modality: the first in the manifest with values); two "
       "sums that round alike are shown with the decimals that tell them apart; a blank event text is never named as "
       "an item or a category; events at one instant are read in the order of their content",
}


class QAGenerator(Protocol):
    """Writes one uqa pair about a topic from a text fact sheet of the user (see ``summarize``).

    ``claims`` must back the answer (numbers and item names, as :class:`Claim`); pairs whose claims are
    empty or do not recompute from the user's events are dropped. Never required: ``None`` = templates.
    """

    def generate(self, user_summary: str, topic: str) -> tuple[str, str, list[Claim]]: ...


@dataclass
class UserUStats:
    """What :func:`build_userU` wrote."""

    users: int = 0  # users streamed, with or without events
    users_with_pairs: int = 0
    pairs: dict[str, int] = field(default_factory=lambda: {"future": 0, "uqa": 0, "forecast": 0})
    dropped_unverified: int = 0  # uqa pairs whose claims did not hold
    seconds: float = 0.0
    path: Path | None = None  # None when no user yielded a pair (no file is written then)

    @property
    def total(self) -> int:
        return sum(self.pairs.values())


def build_userU(dataset_dir: str | Path, seed: int = 0, n_future_cutoffs: int = 3, future_window_days: int = 30,
                min_history_days: int = 14, generator: QAGenerator | None = None,
                progress: bool = True, forecast: bool = True, signature: bool = False) -> UserUStats:
    """Write ``<dataset_dir>/userU.parquet`` (atomically) and return the counts.

    Deterministic for a ``seed``: each user's draws come from ``(seed, crc32(user_id))``.

    Example:
        >>> build_userU("data/synth", seed=0, progress=False).pairs  # doctest: +SKIP
        {'future': 5883, 'uqa': 19846}
    """
    if seed < 0 or n_future_cutoffs < 0 or future_window_days < 1 or min_history_days < 0:
        raise ValueError("seed, n_future_cutoffs and min_history_days must be >= 0 and future_window_days >= 1")
    start = time.perf_counter()
    check_userU_target(Path(dataset_dir) / USERU_FILE)
    ds = load_dataset(dataset_dir, pairs=False)  # the pairs it replaces may not fit a dataset changed since
    cutoff_us = ds.manifest.cutoff_us
    extra_names = {m.name: m.numeric_columns for m in ds.manifest.sequence_modalities}
    query = FUTURE_QUERY.format(days=future_window_days)
    stats, rows = UserUStats(), _Rows()
    # one pass over every user: when each user first had each text, so that a pair at any cutoff counts only what
    # had happened by then (signature pairs' weights; the categories of forecast's first-time questions)
    adoption = (ItemAdoption((History(u.events, cutoff_us, extra_names) for u in ds.users()), per_user=signature)
                if forecast or signature else None)
    for user in progress_iter(ds.users(), total=ds.num_users, desc="userU", unit="user", enabled=progress):
        h = History(user.events, cutoff_us, extra_names)
        rng_future, rng_uqa = (np.random.default_rng([seed, zlib.crc32(user.user_id.encode()), s]) for s in (0, 1))
        before = len(rows)
        future = future_pairs(h, rng_future, n_future_cutoffs, future_window_days, min_history_days)
        for c, answer in future:
            rows.add(user.user_id, c, query, answer, "future")
        if signature and len(h.all):  # at the dataset cutoff and at each future pair's internal cutoff
            for c in [cutoff_us, *(c for c, _ in future)]:
                hc = h if c == cutoff_us else h.before(c)
                # a draw of its own per cutoff: a shared stream would let the pair at a later cutoff decide this one's
                rng_sig = np.random.default_rng([seed, zlib.crc32(user.user_id.encode()), 3, c & 0xFFFF_FFFF_FFFF_FFFF])
                qa = signature_topic(hc, rng_sig, adoption.users_as_of(c), adoption.n_users(c))
                if qa is not None and verify(qa.claims, hc, qa.answer):
                    rows.add(user.user_id, c, qa.question, qa.answer, "signature")
        for qa in uqa_pairs(h, rng_uqa, generator, stats):
            rows.add(user.user_id, cutoff_us, qa.question, qa.answer, "uqa")
        if forecast and len(h.all):
            rng_fc = np.random.default_rng([seed, zlib.crc32(user.user_id.encode()), 2])
            cuts = _pick_cutoffs(int(h.all.ts.min()), h.cutoff_us, rng_fc, n_future_cutoffs, future_window_days,
                                 min_history_days)
            for c, q, a in forecast_pairs(h, cuts, rng_fc, adoption, list(extra_names), future_window_days):
                rows.add(user.user_id, c, q, a, "forecast")
        stats.users += 1
        stats.users_with_pairs += len(rows) > before
    table = rows.table()
    for source, n in zip(*np.unique(table.column("source").to_numpy(zero_copy_only=False), return_counts=True)):
        stats.pairs[str(source)] = int(n)
    stats.path = _write(table, Path(dataset_dir) / USERU_FILE, events_digest(ds))
    stats.seconds = time.perf_counter() - start
    return stats


# ----------------------------------------------------------------------------------------- future
def future_pairs(h: History, rng: np.random.Generator, n_cutoffs: int, window_days: int,
                 min_history_days: int) -> list[tuple[int, str]]:
    """``(cutoff_us, answer)`` for up to ``n_cutoffs`` internal cutoffs whose window holds events."""
    if not len(h.all):
        return []
    out = []
    for c in _pick_cutoffs(int(h.all.ts.min()), h.cutoff_us, rng, n_cutoffs, window_days, min_history_days):
        answer = summarize_future(h, c, window_days)
        if answer is not None:
            out.append((c, answer))
    return out


def _pick_cutoffs(first_us: int, cutoff_us: int, rng: np.random.Generator, n: int, window_days: int,
                  min_history_days: int) -> list[int]:
    """Whole UTC days, one drawn per equal stratum of [first + min history, cutoff - window]: spread out."""
    lo = -(-(first_us + min_history_days * DAY_US) // DAY_US)  # ceil: the profile spans the minimum history
    hi = (cutoff_us - window_days * DAY_US) // DAY_US  # floor: the window ends by the dataset cutoff
    span = hi - lo + 1
    k = min(n, span)
    if k <= 0:
        return []
    edges = lo + (np.arange(k + 1) * span) // k  # strictly increasing since span >= k
    return [int(rng.integers(edges[i], edges[i + 1])) * DAY_US for i in range(k)]


def summarize_future(h: History, start_us: int, window_days: int) -> str | None:
    """The answer of a future pair: frequent items of ``[start, start + window)``, diverse by category."""
    end_us = start_us + window_days * DAY_US
    assert end_us <= h.cutoff_us, "a future window must end by the dataset cutoff"
    counts: Counter[tuple[int, str]] = Counter()
    days: set[int] = set()
    for i, m in enumerate(h.modalities):
        s = h.events[m]
        sel = (s.ts >= start_us) & (s.ts < end_us)
        assert not (s.ts[sel] >= h.cutoff_us).any(), "future answers must not see events after the cutoff"
        counts.update((i, t) for t in compress(s.text, sel) if named(t))  # a blank text is an event, not an item
        days.update((s.ts[sel] // DAY_US).tolist())
    if not counts:
        return None
    chosen = _diverse_top(counts, h.modalities)
    while True:
        body = item_groups([(i, text, k) for (i, text), k in chosen], h.modalities)  # frequency order per modality
        day_word = "active day" if len(days) == 1 else "active days"
        answer = f"Next {window_days} days: {body}; {len(days)} {day_word}."
        if len(answer.split()) <= MAX_WORDS or len(chosen) == 1:
            return answer
        chosen = chosen[:-1]


def _diverse_top(counts: Counter, modalities: list[str]) -> list[tuple[tuple[int, str], int]]:
    """Greedy by frequency, skipping items of a category already full.

    Equal counts alternate between modalities (then text order), so a window of one-off events does not
    become six items of whichever modality the manifest lists first.
    """
    rank: dict[tuple[int, str], int] = {}
    seen: Counter[tuple[int, int]] = Counter()  # (modality, count) -> items ranked so far
    for (i, text), k in sorted(counts.items(), key=lambda kv: kv[0]):
        rank[(i, text)], seen[(i, k)] = seen[(i, k)], seen[(i, k)] + 1
    per_category: Counter[str] = Counter()
    chosen = []
    for (i, text), k in sorted(counts.items(), key=lambda kv: (-kv[1], rank[kv[0]], kv[0])):
        cat = category(modalities[i], text)
        if per_category[cat] < MAX_PER_CATEGORY:
            per_category[cat] += 1
            chosen.append(((i, text), k))
            if len(chosen) == MAX_ITEMS:
                break
    return chosen


# -------------------------------------------------------------------------------------------- uqa
def uqa_pairs(h: History, rng: np.random.Generator, generator: QAGenerator | None, stats: UserUStats) -> list[QA]:
    """Verified pairs for up to ``MAX_TOPICS`` topics the user has data for; failures go to ``stats``."""
    if not len(h.all):
        return []
    drafts = {name: qa for name, fn in TOPICS.items() if (qa := fn(h, rng)) is not None}
    names = list(drafts)
    if len(names) > MAX_TOPICS:
        names = [names[i] for i in sorted(rng.choice(len(names), MAX_TOPICS, replace=False))]
    if generator is not None:
        summary = summarize(h)
        drafts = {n: _from_generator(generator, summary, f"{n}: {TOPIC_BRIEFS[n]}") for n in names}
    kept = []
    for name in names:
        qa = drafts[name]
        if qa is not None and verify(qa.claims, h, qa.answer):
            kept.append(qa)
        else:
            stats.dropped_unverified += 1
    return kept


def _from_generator(generator: QAGenerator, summary: str, topic: str) -> QA | None:
    """The generator's output as a QA, or None when it is not (question, answer, claims) of the right types."""
    out = generator.generate(summary, topic)
    if not (isinstance(out, tuple) and len(out) == 3):
        return None
    q, a, claims = out
    if not (isinstance(q, str) and q.strip() and isinstance(a, str) and a.strip() and isinstance(claims, list)):
        return None
    return QA(q.strip(), a.strip(), claims)


# --------------------------------------------------------------------------------------------- io
class _Rows:
    """Output rows, packed into Arrow every ``_FLUSH_ROWS`` so 100k users' strings stay compact."""

    def __init__(self) -> None:
        self._cols: dict[str, list] = {f.name: [] for f in USERU_SCHEMA}
        self._tables: list[pa.Table] = []
        self._packed = 0

    def __len__(self) -> int:
        return self._packed + len(self._cols["user_id"])

    def add(self, user_id: str, cutoff_us: int, query: str, answer: str, source: str) -> None:
        for name, v in zip(self._cols, (user_id, cutoff_us, query, answer, source)):
            self._cols[name].append(v)
        if len(self._cols["user_id"]) >= _FLUSH_ROWS:
            self._pack()

    def _pack(self) -> None:
        arrays = [pa.array(self._cols["user_id"], pa.string()),
                  pa.array(self._cols["cutoff"], pa.int64()).cast(TS_TYPE),
                  *(pa.array(self._cols[k], pa.string()) for k in ("query", "answer", "source"))]
        self._tables.append(pa.Table.from_arrays(arrays, schema=USERU_SCHEMA))
        self._packed += len(self._cols["user_id"])
        self._cols = {k: [] for k in self._cols}

    def table(self) -> pa.Table:
        self._pack()
        return pa.concat_tables(self._tables).combine_chunks()


def events_digest(ds: Dataset) -> str:
    """What a dataset's UserU pairs are computed from, cheaply: the cutoff, the sequence modalities with their
    columns, and each event file's name and size. Not the files' times, so that a copy of the dataset still matches;
    a rewrite that keeps every file's size to the byte escapes it (hashing every event at each pretraining start
    would cost a read of the whole dataset)."""
    m = ds.manifest
    blob = json.dumps([m.cutoff.isoformat(), [[s.name, list(s.numeric_columns)] for s in m.sequence_modalities],
                       [[f.name, f.stat().st_size] for f in event_files(ds.root)]])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def stale_userU(target: Path, ds: Dataset | None = None) -> str | None:
    """Why ``target``, a ``userU.parquet`` that ``qanchor data userU`` wrote, holds pairs this generator would not
    write today (one line naming the file, what changed since and the command that rebuilds it), or None: current,
    not ours (pairs of the user's own are theirs to keep) or absent.

    Stale means an older generator version (files written before the stamp existed count as version 1) or, with
    ``ds`` (the dataset the file belongs to), other events than the dataset holds now (:func:`events_digest`;
    files written before that stamp are not checked).
    """
    if (meta := userU_metadata(target)) is None:  # absent or not Parquet (the loaders say so), or the user's own
        return None
    rebuild = (f"rebuild them with `qanchor data userU {target.parent}` (it replaces only its own file) to train on "
               "the current pairs")
    stamp = meta.get(USERU_VERSION_KEY.encode())
    try:
        version = 1 if stamp is None else int(stamp)
    except ValueError:
        version = 1
    if version >= USERU_VERSION:
        built_from = meta.get(USERU_EVENTS_KEY.encode())
        if ds is None or built_from is None or built_from.decode(errors="replace") == events_digest(ds):
            return None
        return (f"{target} holds UserU pairs built from other events than {ds.root} holds now (its event files, "
                f"cutoff or modalities changed since), so their answers may not match what the model reads; {rebuild}")
    changes = "; ".join(f"version {v}: {USERU_CHANGES[v]}" for v in sorted(USERU_CHANGES) if v > version)
    # An unstamped file may also have been written just after the last change and before the stamp: say both.
    written = ("carries no UserU version (written before qanchor stamped it, so perhaps before these changes)"
               if stamp is None else f"holds UserU pairs of version {version}, before these changes")
    return f"{target} {written}: {changes}; {rebuild}"


def _write(table: pa.Table, target: Path, built_from: str) -> Path | None:
    if table.num_rows == 0:
        # the validator refuses an empty userU file, and a stale one would describe other data
        check_userU_target(target)  # again: a file of the user's own may have been put there while the pairs were built
        target.unlink(missing_ok=True)
        log.warning("no user in %s has events to build UserU pairs from; %s not written", target.parent, target.name)
        return None
    write_parquet(table, target, metadata={USERU_OWNER_KEY: USERU_OWNER_VALUE, USERU_VERSION_KEY: str(USERU_VERSION),
                                           USERU_EVENTS_KEY: built_from},
                  before_publish=lambda: check_userU_target(target))  # again, last: see above
    return target
