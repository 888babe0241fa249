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

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from qanchor.data.dataset import Dataset, UserRecord
from qanchor.data.history import events_before, modality_feature_names, modality_features
from qanchor.data.packing import signed_log
from qanchor.data.text_cache import TextVectorCache
from qanchor.logs import progress as progress_iter

__all__ = ["PeerFeatures", "modality_features", "modality_feature_names", "extract_features", "signed_log"]

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
    # (D,), weighted by how often each text occurs; summed in float64, so that users of one same text get one same
    # vector whatever their event count (float32 sums left a 1e-9 trace of the count, which standardising revealed)
    return cache.vectors[cache.rows(texts)].mean(axis=0, dtype=np.float64).astype(np.float32)


def _before_cutoff(record: UserRecord, cutoff_us: int) -> UserRecord:
    """Drop any event at or after the cutoff: peers must not see the label window."""
    events = {name: events_before(seq, cutoff_us) for name, seq in record.events.items()}
    return UserRecord(record.user_id, {name: seq for name, seq in events.items() if len(seq)}, record.tabular)


def extract_features(ds: Dataset, user_ids: Sequence[str], text_cache: TextVectorCache | None,
                     progress: bool = False) -> PeerFeatures:
    """RFM / count features (and text means when ``text_cache`` is given) for ``user_ids``.

    The text cache must already hold every event text of these users (see ``UserPacker.prime``).
    """
    specs = ds.manifest.sequence_modalities
    cutoff_us = ds.manifest.cutoff_us
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
