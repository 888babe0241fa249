"""Handcrafted peer features: recency / frequency / monetary and per-modality counts, and text means.

Both come from one pass over the users' events before the dataset cutoff, so every method sees the same
history. RFM features keep NaN where a user has no event of a modality (LightGBM routes missing values
itself); the text mean is the average event-text vector over all of a user's events (zeros if none).

Example:
    >>> ds = load_dataset("data/completejourney")  # doctest: +SKIP
    >>> feats = extract_features(ds, ds.user_ids[:10], text_cache=None)  # doctest: +SKIP
    >>> feats.rfm.shape, feats.rfm_names[:3]  # doctest: +SKIP
    ((10, 65), ['purchase_count', 'purchase_log_count', 'purchase_count_7d'])
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from qanchor.data.dataset import Dataset, EventSeq, UserRecord
from qanchor.data.packing import signed_log
from qanchor.data.text_cache import TextVectorCache
from qanchor.logs import progress as progress_iter

__all__ = ["PeerFeatures", "modality_features", "modality_feature_names", "extract_features", "signed_log"]

_US_PER_DAY = 86_400 * 1_000_000
_WINDOWS_DAYS = (7, 30, 90)


@dataclass
class PeerFeatures:
    """Per-user peer inputs, rows aligned with ``user_ids``."""

    user_ids: np.ndarray  # object [U]
    rfm: np.ndarray  # float32 [U, F], NaN = not defined for this user
    rfm_names: list[str]
    text_mean: np.ndarray | None  # float32 [U, D] mean event-text vector; None when not asked for

    @cached_property
    def rfm_log(self) -> np.ndarray:
        """float32 [U, F]: :attr:`rfm` through :func:`signed_log` (the linear peers' input, the transform the
        model's own numeric inputs get), NaN kept; computed once, every task reads its rows."""
        return signed_log(self.rfm)

    def rows(self, user_ids: Sequence[str]) -> np.ndarray:
        """Row indices of ``user_ids`` (every id must be present)."""
        index = {u: i for i, u in enumerate(self.user_ids)}
        return np.fromiter((index[u] for u in user_ids), dtype=np.int64, count=len(user_ids))


def modality_feature_names(modality: str, extra_columns: Sequence[str]) -> list[str]:
    """Names of :func:`modality_features`' outputs, in order."""
    names = ["count", "log_count", *(f"count_{w}d" for w in _WINDOWS_DAYS), "recency_days", "tenure_days",
             "active_days", "events_per_active_day", "distinct_texts", "value_sum", "value_mean", "value_max",
             "value_std", "value_sum_30d", *(f"{c}_mean" for c in extra_columns)]
    return [f"{modality}_{n}" for n in names]


def modality_features(seq: EventSeq | None, cutoff_us: int, n_extra: int) -> np.ndarray:
    """RFM features of one modality's events (all before ``cutoff_us``) -> float64 ``[15 + n_extra]``.

    Example:
        >>> ts = np.array([0, 86_400_000_000]); seq = EventSeq(ts, ["a", "a"], np.array([1.0, 3.0], np.float32),
        ...                                                    np.zeros((2, 0), np.float32))
        >>> modality_features(seq, 2 * 86_400_000_000, 0)[[0, 5, 6, 10]].tolist()
        [2.0, 1.0, 2.0, 4.0]
    """
    if seq is None or not len(seq):
        # Counts are truly zero; recency, tenure and value statistics are undefined, not zero.
        out = np.full(15 + n_extra, np.nan)
        out[[0, 1, 2, 3, 4, 7, 9, 10, 14]] = 0.0
        return out
    age_days = (cutoff_us - seq.ts) / _US_PER_DAY  # (n,), > 0 for events before the cutoff
    days = np.unique(seq.ts // _US_PER_DAY)
    value = seq.value.astype(np.float64)
    known = ~np.isnan(value)
    v = value[known]
    recent_30 = known & (age_days <= 30)
    n = len(seq)
    stats = [n, np.log1p(n), *((age_days <= w).sum() for w in _WINDOWS_DAYS), age_days.min(), age_days.max(),
             len(days), n / len(days), len(set(seq.text)),
             v.sum() if v.size else np.nan, v.mean() if v.size else np.nan, v.max() if v.size else np.nan,
             v.std() if v.size > 1 else np.nan, value[recent_30].sum()]
    with warnings.catch_warnings():  # an all-NaN extra column has no mean: NaN is the right answer
        warnings.simplefilter("ignore", RuntimeWarning)
        extras = np.nanmean(seq.extras.astype(np.float64), axis=0) if n_extra else np.zeros(0)
    return np.concatenate([np.asarray(stats, dtype=np.float64), extras])


def _user_rfm(record: UserRecord, specs, cutoff_us: int, n_tabular: int) -> np.ndarray:
    parts = [modality_features(record.events.get(m.name), cutoff_us, len(m.numeric_columns)) for m in specs]
    counts = np.array([p[0] for p in parts])
    recencies = np.array([p[5] for p in parts])
    overall = [counts.sum(), (counts > 0).sum(), np.nanmin(recencies) if np.isfinite(recencies).any() else np.nan]
    tabular = record.tabular if record.tabular is not None else np.full(n_tabular, np.nan)
    return np.concatenate([*parts, overall, tabular]).astype(np.float32)


def _text_mean(record: UserRecord, cache: TextVectorCache) -> np.ndarray:
    texts = [t for seq in record.events.values() for t in seq.text]
    if not texts:
        return np.zeros(cache.dim, np.float32)
    return cache.vectors[cache.rows(texts)].mean(axis=0)  # (D,), weighted by how often each text occurs


def _before_cutoff(record: UserRecord, cutoff_us: int) -> UserRecord:
    """Drop any event at or after the cutoff: peers must not see the label window."""
    events = {}
    for name, seq in record.events.items():
        n = int(np.searchsorted(seq.ts, cutoff_us, side="left"))
        if n:
            events[name] = EventSeq(seq.ts[:n], seq.text[:n], seq.value[:n], seq.extras[:n])
    return UserRecord(record.user_id, events, record.tabular)


def extract_features(ds: Dataset, user_ids: Sequence[str], text_cache: TextVectorCache | None,
                     progress: bool = False) -> PeerFeatures:
    """RFM / count features (and text means when ``text_cache`` is given) for ``user_ids``.

    The text cache must already hold every event text of these users (see ``UserPacker.prime``).
    """
    specs = ds.manifest.sequence_modalities
    cutoff_us = int(ds.manifest.cutoff.timestamp() * 1_000_000)
    names = [n for m in specs for n in modality_feature_names(m.name, m.numeric_columns)]
    names += ["all_count", "modalities_present", "all_recency_days", *(f"tab_{c}" for c in ds.tabular_columns)]
    ids = np.array(sorted(set(user_ids)), dtype=object)
    rfm = np.zeros((len(ids), len(names)), np.float32)
    text = np.zeros((len(ids), text_cache.dim), np.float32) if text_cache is not None else None
    for i, record in enumerate(progress_iter(ds.users(ids), total=len(ids), desc="peer features", unit="user",
                                             enabled=progress)):
        record = _before_cutoff(record, cutoff_us)
        rfm[i] = _user_rfm(record, specs, cutoff_us, len(ds.tabular_columns))
        if text is not None:
            text[i] = _text_mean(record, text_cache)
    return PeerFeatures(ids, rfm, names, text)
