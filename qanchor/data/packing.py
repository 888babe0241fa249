"""Per-user packing: a user's events -> per-modality arrays ready to batch (DESIGN section 3).

Each event becomes [text vector ; numeric features]. The numeric part is, in order:
signed log1p(value), value-missing flag, log1p(age in days before the cutoff) / 5, hour sin/cos,
weekday sin/cos, then for every extra numeric column of the modality signed log1p(x) and a missing flag.
Only the ``max_events[m]`` most recent events of a modality are kept; what the older ones say reaches the model
as the modality's whole-history statistics (:func:`qanchor.data.history.history_stats`).

Example:
    >>> packer = UserPacker(ds.manifest, cfg.data, cache)  # doctest: +SKIP
    >>> packed = packer.pack(ds.user("u000001"))  # doctest: +SKIP
    >>> packed.modalities["bill"].numeric.shape  # doctest: +SKIP
    (64, 9)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from qanchor.config import DataConfig
from qanchor.data.dataset import EventSeq, UserRecord
from qanchor.data.history import PACKED_HISTORY, events_before, history_stats
from qanchor.data.manifest import Manifest, ModalitySpec
from qanchor.data.text_cache import TextVectorCache
from qanchor.logs import progress as progress_iter

__all__ = ["BASE_NUMERIC_FEATURES", "AGE_FEATURE", "numeric_width", "signed_log", "numeric_stats", "event_numeric_features", "PackedModality", "PackedUser", "event_lines",
           "UserPacker", "tabular_stats"]

BASE_NUMERIC_FEATURES = 7
AGE_FEATURE = 2  # log1p(age in days before the cutoff) / 5
_US_PER_DAY = 86_400 * 1_000_000
_EPOCH_WEEKDAY = 3  # 1970-01-01 was a Thursday (Monday = 0)


def numeric_width(spec: ModalitySpec) -> int:
    """Width of the numeric part of an event of modality ``spec``."""
    return BASE_NUMERIC_FEATURES + 2 * len(spec.numeric_columns)


def signed_log(x: np.ndarray) -> np.ndarray:
    """sign(x) * log1p(|x|) in ``x``'s dtype, NaN kept: counts, amounts and durations are heavy-tailed.

    Example:
        >>> signed_log(np.array([0.0, np.e - 1, -(np.e - 1), np.nan])).round(6).tolist()[:3]
        [0.0, 1.0, -1.0]
    """
    return (np.sign(x) * np.log1p(np.abs(x))).astype(x.dtype, copy=False)


def event_numeric_features(seq: EventSeq, cutoff_us: int) -> np.ndarray:
    """Numeric features of every event in ``seq``: float32 ``[n, 7 + 2 * n_extra]``."""
    value = seq.value.astype(np.float64)
    missing = np.isnan(value)
    age_days = (cutoff_us - seq.ts) / _US_PER_DAY
    day_frac = (seq.ts % _US_PER_DAY) / _US_PER_DAY
    weekday = ((seq.ts // _US_PER_DAY) + _EPOCH_WEEKDAY) % 7
    cols = [
        np.where(missing, 0.0, signed_log(np.nan_to_num(value))),
        missing.astype(np.float64),
        np.log1p(np.maximum(age_days, 0.0)) / 5.0,  # 5 ~ log1p(150 days): keeps the scale near 1
        np.sin(2 * np.pi * day_frac),
        np.cos(2 * np.pi * day_frac),
        np.sin(2 * np.pi * weekday / 7),
        np.cos(2 * np.pi * weekday / 7),
    ]
    for j in range(seq.extras.shape[1]):
        x = seq.extras[:, j].astype(np.float64)
        cols += [np.where(np.isnan(x), 0.0, signed_log(np.nan_to_num(x))), np.isnan(x).astype(np.float64)]
    return np.stack(cols, axis=1).astype(np.float32) if len(seq) else np.zeros((0, len(cols)), np.float32)


@dataclass
class PackedModality:
    text_rows: np.ndarray  # int64 [n], rows of the TextVectorCache
    numeric: np.ndarray  # float32 [n, numeric_width]
    # float32 [PACKED_HISTORY]: the whole history's RFM and timing statistics before the cutoff
    # (qanchor.data.history), not only the kept events'; read by the modality token with
    # model.user_encoder.summary_stats=history (RFM) or history_timing (both)
    history: np.ndarray = field(default_factory=lambda: np.zeros(PACKED_HISTORY, np.float32))
    # float32 [D] with data.history_text: the mean text vector of every event before the cutoff (the whole history,
    # not only the kept events), read by model.user_encoder.summary_text=history; None when not packed
    history_text: np.ndarray | None = None


@dataclass
class PackedUser:
    """A user ready for batching: every sequence modality present (``n`` may be 0)."""

    user_id: str
    modalities: dict[str, PackedModality]
    tabular: np.ndarray | None  # float32 [n_features], NaN = missing; None = no tabular row
    event_lines: list[str] | None = None  # data.text_events > 0: the most recent events as text, oldest first

    @property
    def num_events(self) -> int:
        return sum(len(m.text_rows) for m in self.modalities.values())


def event_lines(kept: dict[str, EventSeq], cutoff_us: int, n: int) -> list[str]:
    """The ``n`` most recent of the ``kept`` events (all modalities, by time; oldest first) as plain text lines,
    ``"<age>d ago <modality>: <text> (<value>)"``: what a text-prefix model (TextN) reads instead of user tokens.
    ``kept`` in the manifest's modality order, which events of equal times keep."""
    events = [(int(s.ts[i]), m, s.text[i], float(s.value[i])) for m, s in kept.items() for i in range(len(s))]
    events.sort(key=lambda e: e[0])  # stable: equal times keep kept's modality order
    lines = []
    for ts, m, text, value in events[-n:]:
        age = max(0, (cutoff_us - ts) // _US_PER_DAY)
        lines.append(f"{age}d ago {m}: {text}" + (f" ({value:.2f})" if np.isfinite(value) else ""))
    return lines


class UserPacker:
    """Turns :class:`UserRecord` objects into :class:`PackedUser` objects for one manifest."""

    def __init__(self, manifest: Manifest, data_cfg: DataConfig, cache: TextVectorCache):
        self.manifest, self.data_cfg, self.cache = manifest, data_cfg, cache
        self.cutoff_us = manifest.cutoff_us

    def recent(self, record: UserRecord, cutoff_us: int | None = None) -> dict[str, EventSeq]:
        """The kept (most recent ``cap``, and before ``cutoff_us`` if given) events of each modality."""
        out = {}
        for name, seq in record.events.items():
            if cutoff_us is not None and len(seq) and seq.ts[-1] >= cutoff_us:
                n = int(np.searchsorted(seq.ts, cutoff_us, side="left"))  # ts sorted ascending
                seq = EventSeq(seq.ts[:n], seq.text[:n], seq.value[:n], seq.extras[:n])
            cap = self.data_cfg.cap(name)
            if len(seq) > cap:
                seq = EventSeq(seq.ts[-cap:], seq.text[-cap:], seq.value[-cap:], seq.extras[-cap:])
            out[name] = seq
        return out

    def pack(self, record: UserRecord, cutoff_us: int | None = None) -> PackedUser:
        """Pack ``record`` as seen at ``cutoff_us`` (default: the dataset cutoff); ages count from there."""
        cutoff_us = self.cutoff_us if cutoff_us is None else int(cutoff_us)
        return self.pack_kept(record, self.recent(record, cutoff_us), cutoff_us)

    def pack_kept(self, record: UserRecord, kept: dict[str, EventSeq], cutoff_us: int) -> PackedUser:
        """Pack the events ``kept`` of ``record`` (as :meth:`recent` chose them); ages count from ``cutoff_us``.

        Texts not yet in the cache are encoded here, one user at a time: callers packing many users
        ``ensure`` all their texts in one batch first.
        """
        modalities = {}
        for spec in self.manifest.sequence_modalities:
            seq = kept.get(spec.name)
            if seq is None or not len(seq):
                modalities[spec.name] = PackedModality(np.zeros(0, np.int64), np.zeros((0, numeric_width(spec)), np.float32))
            else:
                whole = record.events.get(spec.name)
                modalities[spec.name] = PackedModality(self.cache.ensure(seq.text), event_numeric_features(seq, cutoff_us),
                                                       history_stats(whole, cutoff_us),
                                                       self.history_text(whole, cutoff_us) if self.data_cfg.history_text else None)
        # in the manifest's modality order, not the record's (a caller's dict user may list them in any order)
        ordered = {m.name: kept[m.name] for m in self.manifest.sequence_modalities if m.name in kept}
        lines = event_lines(ordered, cutoff_us, self.data_cfg.text_events) if self.data_cfg.text_events else None
        return PackedUser(record.user_id, modalities, record.tabular, lines)

    def history_texts(self, record: UserRecord, cutoff_us: int) -> list[str]:
        """Every event text of ``record`` before ``cutoff_us``, all sequence modalities (what
        :meth:`history_text` reads)."""
        return [t for seq in record.events.values() for t in events_before(seq, cutoff_us).text]

    def history_text(self, seq: EventSeq | None, cutoff_us: int) -> np.ndarray:
        """The mean text vector of every event of ``seq`` before ``cutoff_us``: float32 [D], zeros without events.
        Each distinct text's vector is gathered once and weighted by how often it occurs."""
        before = None if seq is None else events_before(seq, cutoff_us)
        if before is None or not len(before):
            return np.zeros(self.cache.dim, np.float32)
        rows, counts = np.unique(self.cache.ensure(before.text), return_counts=True)
        return (counts.astype(np.float64) @ self.cache.vectors[rows].astype(np.float64) / len(before)).astype(np.float32)

    def prime(self, records: Iterable[UserRecord], progress: bool = True, flush_every: int = 50_000,
              all_events: bool = False, total: int | None = None) -> int:
        """Encode every unique kept text of ``records`` in large batches; return how many events were seen.

        ``all_events`` covers every event, not only the most recent ``cap``: pretraining packs users at
        earlier internal cutoffs, whose kept events are older. With ``data.history_text`` every event is covered
        anyway (the whole history's mean text vector reads them all).
        """
        all_events = all_events or self.data_cfg.history_text
        pending: set[str] = set()
        n_events = 0
        for record in progress_iter(records, total=total, desc="collect event texts", unit="user", enabled=progress):
            for seq in (record.events if all_events else self.recent(record)).values():
                n_events += len(seq)
                pending.update(t for t in seq.text if t not in self.cache)
            if len(pending) >= flush_every:
                self.cache.ensure(sorted(pending), progress=progress)
                pending.clear()
        if pending:
            self.cache.ensure(sorted(pending), progress=progress)
        return n_events

    def pack_many(self, records: Iterable[UserRecord]) -> Iterator[PackedUser]:
        for record in records:
            yield self.pack(record)


def tabular_stats(records: Iterable[UserRecord], n_features: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of each tabular feature over users that have it (Welford-free: two sums, float64)."""
    total = np.zeros(n_features)
    total_sq = np.zeros(n_features)
    count = np.zeros(n_features)
    for record in records:
        if record.tabular is None:
            continue
        x = record.tabular.astype(np.float64)
        seen = ~np.isnan(x)
        total[seen] += x[seen]
        total_sq[seen] += x[seen] ** 2
        count += seen
    mean = np.divide(total, count, out=np.zeros(n_features), where=count > 0)
    var = np.divide(total_sq, count, out=np.ones(n_features), where=count > 0) - mean**2
    std = np.sqrt(np.maximum(var, 0.0))
    # constant: no spread relative to the column's own scale (an absolute 1e-6 floor made a column of rates or
    # probabilities around 1e-7, informative to every peer, a constant the model never saw)
    constant = std <= 1e-6 * np.maximum(np.abs(mean), 1e-12)
    return mean.astype(np.float32), np.where(constant, 1.0, std).astype(np.float32)


def numeric_stats(packed: Iterable[PackedUser], manifest: Manifest) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per sequence modality, mean and std of each numeric event feature over the kept events of ``packed``
    (float64 sums; a constant feature gets std 1): what the event adapters standardise with."""
    sums = {m.name: [np.zeros(numeric_width(m)), np.zeros(numeric_width(m)), 0] for m in manifest.sequence_modalities}
    for user in packed:
        for name, acc in sums.items():
            x = user.modalities[name].numeric.astype(np.float64)
            acc[0] += x.sum(0)
            acc[1] += (x**2).sum(0)
            acc[2] += len(x)
    out = {}
    for name, (total, total_sq, n) in sums.items():
        mean = total / max(n, 1)
        std = np.sqrt(np.maximum(total_sq / max(n, 1) - mean**2, 0.0))
        out[name] = (mean.astype(np.float32), np.where(std > 1e-6, std, 1.0).astype(np.float32))
    return out
