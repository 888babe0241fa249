"""RFM / count features and text means: hand-computed values on tiny inputs, and the tiny dataset."""

from __future__ import annotations

import numpy as np
import pytest

from qanchor.bench.features import extract_features, modality_feature_names, modality_features, signed_log
from qanchor.config import DataConfig
from qanchor.data.dataset import EventSeq, load_dataset
from qanchor.data.packing import UserPacker
from qanchor.data.text_cache import TextVectorCache
from tests.bench.helpers import HashEncoder

DAY = 86_400 * 1_000_000


def _seq(days_before: list[float], values: list[float], texts: list[str], cutoff: int) -> EventSeq:
    ts = np.array([cutoff - int(d * DAY) for d in days_before], np.int64)
    return EventSeq(ts, texts, np.array(values, np.float32), np.zeros((len(ts), 1), np.float32))


def test_modality_features_by_hand():
    cutoff = 1000 * DAY
    seq = _seq([40, 10, 2.5], [10.0, np.nan, 30.0], ["a", "b", "a"], cutoff)
    f = dict(zip(modality_feature_names("m", ["x"]), modality_features(seq, cutoff, 1)))
    assert f["m_count"] == 3 and f["m_count_7d"] == 1 and f["m_count_30d"] == 2 and f["m_count_90d"] == 3
    assert f["m_recency_days"] == pytest.approx(2.5) and f["m_tenure_days"] == pytest.approx(40)
    assert f["m_active_days"] == 3 and f["m_distinct_texts"] == 2
    assert f["m_value_sum"] == 40 and f["m_value_mean"] == 20 and f["m_value_max"] == 30
    assert f["m_value_sum_30d"] == 30  # the NaN-valued event 10 days ago adds nothing
    assert f["m_x_mean"] == 0


def test_no_events_zero_counts_undefined_recency():
    f = dict(zip(modality_feature_names("m", []), modality_features(None, 0, 0)))
    assert f["m_count"] == 0 and f["m_count_30d"] == 0 and f["m_value_sum"] == 0 and f["m_value_sum_30d"] == 0
    assert np.isnan(f["m_recency_days"]) and np.isnan(f["m_value_mean"])


def test_signed_log_by_hand_keeps_nan_and_sign():
    x = np.array([[0.0, 9.0, -99.0, np.nan]], np.float32)
    out = signed_log(x)
    assert out.dtype == np.float32 and out[0, 0] == 0 and np.isnan(out[0, 3])
    assert out[0, 1] == pytest.approx(np.log(10)) and out[0, 2] == pytest.approx(-np.log(100))


def test_extract_on_tiny_dataset(tiny_dataset, tmp_path):
    ds = load_dataset(tiny_dataset, cache_dir=tmp_path / "cache")
    cache = TextVectorCache(tmp_path / "text", HashEncoder())
    UserPacker(ds.manifest, DataConfig(), cache).prime(ds.users(), progress=False, all_events=True)
    ids = list(ds.user_ids[::-1])  # any order in, sorted rows out
    feats = extract_features(ds, ids, cache)
    assert list(feats.user_ids) == sorted(ids)
    assert feats.rfm.shape == (len(ids), len(feats.rfm_names)) and feats.text_mean.shape == (len(ids), 8)
    col = {n: i for i, n in enumerate(feats.rfm_names)}
    u0, u1, u2 = feats.rows(["u000", "u001", "u002"])
    assert feats.rfm[u0, col["all_count"]] == 0 and np.isnan(feats.rfm[u0, col["all_recency_days"]])
    assert not feats.text_mean[u0].any()  # no events: zero vector
    assert feats.rfm[u1, col["search_count"]] == 0 and feats.rfm[u2, col["search_count"]] == 2  # odd users lack search
    assert feats.rfm[u1, col["bill_count"]] == 6 + 1 % 5 and feats.rfm[u1, col["app_count"]] == 3
    assert feats.rfm[u2, col["tab_income"]] == pytest.approx(ds.user("u002").tabular[1])
    log = feats.rfm_log  # the linear peers' input: same NaN cells, each value sign(x) log(1 + |x|)
    assert np.array_equal(np.isnan(log), np.isnan(feats.rfm))
    assert log[u1, col["bill_count"]] == pytest.approx(np.log1p(7))
    record = ds.user("u003")
    texts = [t for s in record.events.values() for t in s.text]
    assert np.allclose(feats.text_mean[feats.rows(["u003"])[0]], cache.vectors[cache.rows(texts)].mean(0))


def test_one_text_gives_one_mean_vector_whatever_the_event_count(tmp_path):
    """Averaged in float32, users who read one same text got means 1e-9 apart by their event count; standardised by the
    probe, that trace read the count (`text_mean_lr` 0.60 on a world where every user has the same one text)."""
    from qanchor.bench.features import _text_mean
    from qanchor.data.dataset import UserRecord

    cache = TextVectorCache(tmp_path / "text", HashEncoder())
    cache.ensure(["Coffee shop"])
    means = np.stack([_text_mean(UserRecord(f"u{n}", {"bill": _seq([1.0] * n, [1.0] * n, ["Coffee shop"] * n, DAY)}),
                                 cache) for n in (1, 3, 7, 11, 1000)])
    assert (means == cache.vectors[0]).all()
