"""Whole-history statistics of one modality's events: recency, frequency and monetary features (RFM).

The sequence encoder keeps only a modality's ``max_events`` most recent events (48 purchase lines cover about a
tenth of a Complete Journey household's year), so whatever the older events say (how many, over how long, how
much) never reaches the model through its event tokens. These are the statistics a practitioner computes from the
whole log before the cutoff; the peers (``qanchor.bench.features``) and the modality tokens
(``model.user_encoder.summary_stats=history``) compute them with this one function, so the model reads exactly
the counts a LightGBM or logistic regression on RFM features reads.

Example:
    >>> ts = np.array([0, 86_400_000_000]); seq = EventSeq(ts, ["a", "a"], np.array([1.0, 3.0], np.float32),
    ...                                                    np.zeros((2, 0), np.float32))
    >>> modality_features(seq, 2 * 86_400_000_000, 0)[[0, 5, 6, 10]].tolist()
    [2.0, 1.0, 2.0, 4.0]
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from qanchor.data.dataset import EventSeq

__all__ = ["HISTORY_STATS", "TIMING_STATS", "PACKED_HISTORY", "WINDOW_STATS", "modality_features", "modality_feature_names",
           "events_before", "timing_features", "history_stats", "window_stats"]

_US_PER_DAY = 86_400 * 1_000_000
_WINDOWS_DAYS = (7, 30, 90)
HISTORY_STATS = 15  # modality_features' width without the extra numeric columns' means
# When in the day and the week the events fall: the shares of events in each 6-hour UTC block (the time-of-day
# buckets of qanchor.data.userU_topics: night 0-6, morning 6-12, afternoon 12-18, evening 18-24) and the weekend share
_HOUR_BLOCKS = 4
TIMING_STATS = _HOUR_BLOCKS + 1
PACKED_HISTORY = HISTORY_STATS + TIMING_STATS  # history_stats' width


def modality_feature_names(modality: str, extra_columns: Sequence[str]) -> list[str]:
    """Names of :func:`modality_features`' outputs, in order."""
    names = ["count", "log_count", *(f"count_{w}d" for w in _WINDOWS_DAYS), "recency_days", "tenure_days",
             "active_days", "events_per_active_day", "distinct_texts", "value_sum", "value_mean", "value_max",
             "value_std", "value_sum_30d", *(f"{c}_mean" for c in extra_columns)]
    return [f"{modality}_{n}" for n in names]


# What :func:`window_stats` reports of a window of days: how much the user did, on how many days, how varied, for how much
WINDOW_STATS = ("count", "active_days", "distinct_texts", "value_sum")


def modality_features(seq: EventSeq | None, cutoff_us: int, n_extra: int) -> np.ndarray:
    """RFM features of one modality's events (all before ``cutoff_us``) -> float64 ``[15 + n_extra]``."""
    if seq is None or not len(seq):
        # Counts are truly zero; recency, tenure and value statistics are undefined, not zero.
        out = np.full(HISTORY_STATS + n_extra, np.nan)
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


def events_before(seq: EventSeq, cutoff_us: int) -> EventSeq:
    """The events of ``seq`` (sorted by time) strictly before ``cutoff_us``."""
    n = int(np.searchsorted(seq.ts, cutoff_us, side="left"))
    return seq if n == len(seq) else EventSeq(seq.ts[:n], seq.text[:n], seq.value[:n], seq.extras[:n])


def timing_features(seq: EventSeq | None) -> np.ndarray:
    """Shares of ``seq``'s events in each 6-hour UTC block of the day, then on Saturday or Sunday: float64
    ``[5]``, zeros without events. The per-event hour (sin / cos in the event tokens) covers only the kept events;
    a habit ("shops in the mornings", "mostly on weekends") is a property of the whole history.

    Example:
        >>> ts = np.array([2 * 3_600_000_000, 86_400_000_000 * 2 + 13 * 3_600_000_000])  # Thu 02:00, Sat 13:00
        >>> timing_features(EventSeq(ts, ["a", "b"], np.ones(2, np.float32), np.zeros((2, 0), np.float32))).tolist()
        [0.5, 0.0, 0.5, 0.0, 0.5]
    """
    if seq is None or not len(seq):
        return np.zeros(TIMING_STATS)
    block = (seq.ts % _US_PER_DAY) * _HOUR_BLOCKS // _US_PER_DAY  # 0..3
    weekend = (seq.ts // _US_PER_DAY + 3) % 7 >= 5  # 1970-01-01 was a Thursday (Monday = 0)
    shares = np.bincount(block.astype(np.int64), minlength=_HOUR_BLOCKS) / len(seq)
    return np.append(shares, weekend.mean())


def history_stats(seq: EventSeq | None, cutoff_us: int) -> np.ndarray:
    """What the model reads of a modality's whole history before ``cutoff_us``: float32 ``[15 + 5]``, the signed
    logs of :func:`modality_features` (the linear peers' transform), 0 where a statistic is undefined (no event
    with a value, a single value's spread), then :func:`timing_features` (shares, as they are). A user without
    events of the modality never reads them (its modality token is the learned empty token).
    ``model.user_encoder.summary_stats="history"`` reads the first 15, ``"history_timing"`` all 20.

    Example:
        >>> seq = EventSeq(np.array([0]), ["a"], np.array([np.nan], np.float32), np.zeros((1, 0), np.float32))
        >>> history_stats(seq, 86_400_000_000)[[0, 10, 15, 19]].tolist()  # log1p(1 event); no value sum; night; Thu
        [0.6931471824645996, 0.0, 1.0, 0.0]
    """
    before = None if seq is None else events_before(seq, cutoff_us)
    raw = modality_features(before, cutoff_us, 0)
    rfm = np.nan_to_num(np.sign(raw) * np.log1p(np.abs(raw)), nan=0.0)
    return np.concatenate([rfm, timing_features(before)]).astype(np.float32)


_WINDOW_INDEX = [modality_feature_names("m", ()).index(f"m_{name}") for name in WINDOW_STATS]


def window_stats(seq: EventSeq | None, start_us: int, days: int) -> np.ndarray:
    """A modality's activity in ``[start_us, start_us + days)``: float32 ``[4]``, the signed logs of
    :data:`WINDOW_STATS` as :func:`modality_features` computes them (events, active days, distinct texts, value sum),
    zeros without events or without values. The future-profile loss's target (``loss.future_weight``).

    Example:
        >>> day = 86_400_000_000
        >>> seq = EventSeq(np.array([0, day, 40 * day]), ["a", "b", "a"], np.array([1.0, 2.0, 5.0], np.float32),
        ...                np.zeros((3, 0), np.float32))
        >>> np.expm1(window_stats(seq, 0, 30)).round(3).tolist()  # the third event falls after the window
        [2.0, 2.0, 2.0, 3.0]
    """
    end_us = start_us + days * _US_PER_DAY
    window = None
    if seq is not None:
        lo, hi = np.searchsorted(seq.ts, [start_us, end_us], side="left")
        window = EventSeq(seq.ts[lo:hi], seq.text[lo:hi], seq.value[lo:hi], seq.extras[lo:hi])
    raw = modality_features(window, end_us, 0)[_WINDOW_INDEX]
    return np.nan_to_num(np.sign(raw) * np.log1p(np.abs(raw)), nan=0.0).astype(np.float32)
