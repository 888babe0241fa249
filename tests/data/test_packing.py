from __future__ import annotations

import os
from datetime import datetime, timezone

import numpy as np
import pytest

import qanchor
from qanchor.config import DataConfig
from qanchor.data.dataset import EventSeq
from qanchor.data.packing import UserPacker, event_numeric_features, numeric_width, tabular_stats
from qanchor.data.text_cache import SentenceEncoder, TextVectorCache
from qanchor.errors import DataValidationError


@pytest.fixture(scope="module")
def encoder():
    return SentenceEncoder()


def test_numeric_features_hand_computed():
    cutoff = int(np.datetime64("2024-06-30T00:00:00", "us").astype(np.int64))
    ts = np.array([cutoff - 86_400_000_000 * 2 - 6 * 3_600_000_000])  # 2.25 days earlier: Thu 18:00
    seq = EventSeq(ts, ["x"], np.array([np.e - 1], np.float32), np.array([[np.nan]], np.float32))
    f = event_numeric_features(seq, cutoff)[0]
    assert f.shape == (9,)
    assert f[0] == pytest.approx(1.0, abs=1e-6) and f[1] == 0.0  # log1p(e - 1) = 1
    assert f[2] == pytest.approx(np.log1p(2.25) / 5, abs=1e-6)
    assert f[3] == pytest.approx(np.sin(2 * np.pi * 0.75), abs=1e-6) and f[4] == pytest.approx(np.cos(2 * np.pi * 0.75), abs=1e-6)
    assert f[5] == pytest.approx(np.sin(2 * np.pi * 3 / 7), abs=1e-6)  # 2024-06-27 was a Thursday
    assert f[7] == 0.0 and f[8] == 1.0  # missing extra -> 0 plus flag


def test_pack_keeps_most_recent(tiny_dataset, tmp_path, encoder):
    ds = qanchor.load_dataset(tiny_dataset)
    cache = TextVectorCache(tmp_path / "text", encoder)
    packer = UserPacker(ds.manifest, DataConfig(max_events={"bill": 3}, default_max_events=2), cache)
    record = ds.user("u004")
    packed = packer.pack(record)
    assert set(packed.modalities) == {"bill", "app", "search"}
    bill = packed.modalities["bill"]
    assert bill.numeric.shape == (3, numeric_width(ds.manifest.modality("bill")))
    assert [cache.rows([t])[0] for t in record.events["bill"].text[-3:]] == bill.text_rows.tolist()
    assert packed.modalities["app"].text_rows.shape == (2,)
    empty = packer.pack(ds.user("u000"))
    assert empty.num_events == 0 and all(m.numeric.shape[0] == 0 for m in empty.modalities.values())


def test_cache_encodes_each_unique_text_once(tiny_dataset, tmp_path, encoder):
    ds = qanchor.load_dataset(tiny_dataset)
    cache = TextVectorCache(tmp_path / "text", encoder)
    n_events = UserPacker(ds.manifest, DataConfig(), cache).prime(ds.users(), progress=False)
    unique = {t for u in ds.users() for s in u.events.values() for t in s.text}
    assert n_events == 469 and cache.encoded_count == len(unique) == len(cache)
    second = TextVectorCache(tmp_path / "text", encoder)  # a second run encodes nothing
    UserPacker(ds.manifest, DataConfig(), second).prime(ds.users(), progress=False)
    assert second.encoded_count == 0
    texts = sorted(unique)
    assert np.array_equal(second.vectors[second.rows(texts)], cache.vectors[cache.rows(texts)])
    direct = encoder.encode(texts[:3])
    assert np.allclose(direct, cache.vectors[cache.rows(texts[:3])], atol=1e-6)
    assert np.allclose(np.linalg.norm(direct, axis=1), 1.0, atol=1e-5)


def test_a_cache_opened_earlier_reads_what_another_writer_stored_after_it(tmp_path, encoder):
    """refresh(): a rank that opened the cache before rank 0 stored new texts (the pretraining questions) loads
    exactly those rows, once, and encodes nothing itself."""
    writer, reader = TextVectorCache(tmp_path / "text", encoder), TextVectorCache(tmp_path / "text", encoder)
    writer.ensure(["Will this user churn?", "Who is this?"])
    assert reader.refresh() == 2 and reader.refresh() == 0 and writer.refresh() == 0
    rows = reader.ensure(["Who is this?", "Will this user churn?"])
    assert reader.encoded_count == 0 and len(reader) == len(writer) == 2
    assert np.array_equal(reader.vectors[rows], writer.vectors[writer.rows(["Who is this?", "Will this user churn?"])])


def _shards(cache: TextVectorCache) -> list:
    return sorted(cache.dir.glob("shard-*.parquet"))


def _rows_on_disk(cache: TextVectorCache) -> list[str]:
    import pyarrow.parquet as pq

    return [t for s in _shards(cache) for t in pq.read_table(s).column("text").to_pylist()]


def test_a_cache_fed_one_text_per_call_keeps_few_shards_and_every_vector(tmp_path, encoder, monkeypatch):
    """A service embedding one user per request wrote a shard per request: every process start read them all. Past
    COMPACT_AT shards the small ones are merged; every text stays stored once, with the vector it was given."""
    from qanchor.data import text_cache

    monkeypatch.setattr(text_cache, "COMPACT_AT", 6)
    cache = TextVectorCache(tmp_path / "text", encoder)
    texts = [f"merchant number {i}" for i in range(60)]
    counts = []
    for t in texts:
        cache.ensure([t])
        counts.append(len(_shards(cache)))
    assert max(counts) < 6 and min(counts[10:]) >= 1  # bounded, and merges really happened (60 calls, < 6 files)
    assert sorted(_rows_on_disk(cache)) == sorted(texts)  # each text once on disk
    assert cache.encoded_count == 60 and len(cache) == 60
    fresh = TextVectorCache(tmp_path / "text", encoder)
    assert fresh.encoded_count == 0 and len(fresh) == 60
    assert np.array_equal(fresh.vectors[fresh.rows(texts)], cache.vectors[cache.rows(texts)])
    # rows handed out before the merges still name the same texts
    assert np.allclose(cache.vectors[cache.rows(texts[:3])], encoder.encode(texts[:3]), atol=1e-6)


def test_a_large_shard_is_not_rewritten_by_merges_of_small_ones(tmp_path, encoder, monkeypatch):
    """Merging rewrites a row only when its shard at least doubles: a big shard stays as it is while small ones
    are merged beside it."""
    from qanchor.data import text_cache

    cache = TextVectorCache(tmp_path / "text", encoder)
    cache.ensure([f"product {i}" for i in range(40)])
    big = _shards(cache)[0]
    stamp = big.stat().st_mtime_ns
    monkeypatch.setattr(text_cache, "COMPACT_AT", 4)
    for i in range(6):
        cache.ensure([f"new text {i}"])
    assert big.exists() and big.stat().st_mtime_ns == stamp and len(_shards(cache)) < 4
    assert sorted(_rows_on_disk(cache)) == sorted([f"product {i}" for i in range(40)] + [f"new text {i}" for i in range(6)])


def test_a_reader_whose_shard_is_merged_away_mid_read_finds_it_in_the_merged_shard(tmp_path, encoder, monkeypatch):
    """A process listing the shards while another merges them read a removed file: it must neither crash (it used to
    call the shard damaged) nor miss its texts."""
    from qanchor.data import text_cache

    writer = TextVectorCache(tmp_path / "text", encoder)
    reader = TextVectorCache(tmp_path / "text", encoder)
    for t in ("a", "b", "c"):
        writer.ensure([t])
    real_read, merged = text_cache.pq.read_table, []

    def read_after_a_merge(path, *args, **kwargs):
        if not merged:
            merged.append(None)  # the merge reads the shards through here too
            merged[0] = writer.compact(at=2)  # removes the very shard the reader is about to open
        return real_read(path, *args, **kwargs)

    monkeypatch.setattr(text_cache.pq, "read_table", read_after_a_merge)
    assert reader.refresh() == 3 and merged == [3] and len(_shards(writer)) == 1
    assert np.array_equal(reader.vectors[reader.rows(["a", "b", "c"])], writer.vectors[writer.rows(["a", "b", "c"])])


def test_a_text_two_writers_stored_is_read_once_and_merged_to_one_row(tmp_path, encoder):
    """Two processes that opened the cache before either stored a text both store it (and a merge killed before it
    removed its parts leaves texts twice): readers keep one row per text, and the next merge drops the repeat."""
    first, second = TextVectorCache(tmp_path / "text", encoder), TextVectorCache(tmp_path / "text", encoder)
    first.ensure(["same", "x"])
    second.ensure(["same", "y"])
    both = TextVectorCache(tmp_path / "text", encoder)
    assert len(both) == 3 and both.vectors.shape == (3, encoder.dim)
    assert both.compact(at=2) == 2 and sorted(_rows_on_disk(both)) == ["same", "x", "y"]
    assert TextVectorCache(tmp_path / "text", encoder).vectors.shape == (3, encoder.dim)


def test_a_merge_the_file_system_refuses_stores_the_texts_and_is_not_retried(tmp_path, encoder, monkeypatch, capsys):
    """A cache shared by two users: a shard the other one wrote cannot be removed here. The texts are stored all the
    same, and the merge, which would fail again on every call, is said once and left off."""
    from qanchor.data import text_cache

    monkeypatch.setattr(text_cache, "COMPACT_AT", 2)
    cache = TextVectorCache(tmp_path / "text", encoder)
    tries = []

    def refused(self):
        tries.append(1)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(TextVectorCache, "_compact", refused)
    for t in ("a", "b", "c"):
        rows = cache.ensure([t])
        assert cache.vectors[rows].shape == (1, encoder.dim)
    assert len(tries) == 1 and capsys.readouterr().err.count("its shards cannot be merged (Permission denied)") == 1
    assert len(TextVectorCache(tmp_path / "text", encoder)) == 3


def test_shards_named_the_old_way_never_survive_a_merge_and_a_dangling_link_is_named(tmp_path, encoder):
    """A process of the qanchor before merging named its next shard by the count of shards, which drops after a merge:
    it overwrote the big shard a merge had kept under such a name. And a dangling link named like a shard (a cache
    whose shards linked into another cache that merged) was taken for a merged-away shard and re-listed forever."""
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    cache = TextVectorCache(tmp_path / "text", encoder)
    cache.ensure([f"small {i}" for i in range(2)])
    cache.ensure(["one more"])
    big = [f"old big {i}" for i in range(50)]
    vectors = encoder.encode(big)
    flat = pa.array(vectors.reshape(-1), pa.float32())
    pq.write_table(pa.table({"text": big, "vector": pa.FixedSizeListArray.from_arrays(flat, encoder.dim)}),
                   cache.dir / "shard-00000-4242.parquet")  # the old naming, and the largest shard by far
    assert TextVectorCache(tmp_path / "text", encoder).compact(at=2) == 2  # the old-named one with the smallest
    names = [p.name for p in _shards(cache)]
    assert len(names) == 2 and not any(n.startswith("shard-00000-") for n in names)
    assert sorted(_rows_on_disk(cache)) == sorted(big + ["small 0", "small 1", "one more"])
    os.symlink(tmp_path / "gone.parquet", cache.dir / "shard-99999999999999999999-1.parquet")
    with pytest.raises(DataValidationError, match="damaged text-vector cache shard"):
        TextVectorCache(tmp_path / "text", encoder)


def test_merge_plan_keeps_shards_larger_than_all_smaller_ones_together():
    from pathlib import Path

    from qanchor.data.text_cache import _merge_plan

    names = lambda sizes: [p.name for p in _merge_plan([(n, Path(str(n))) for n in sizes])]  # noqa: E731
    assert names([1, 1, 100]) == ["1", "1"]
    assert names([1, 2, 100]) == []  # merging would rewrite the 2 into a shard of 3, less than double
    assert names([1, 2, 3]) == ["1", "2", "3"]
    assert names([5, 100]) == [] and names([7]) == []
    assert names([1, 1, 3, 100, 1000]) == ["1", "1"]  # 3 > 1 + 1: kept too


def test_encoder_is_semantic(encoder):
    v = encoder.encode(["coffee shop", "cafe espresso bar", "car insurance payment"])
    assert v[0] @ v[1] > v[0] @ v[2] + 0.1


def test_tabular_stats(tiny_dataset):
    ds = qanchor.load_dataset(tiny_dataset)
    mean, std = tabular_stats(ds.users(), 2)
    ages = np.array([20 + i for i in range(20) if i % 3], dtype=float)
    assert mean[0] == pytest.approx(ages.mean(), rel=1e-5) and std[0] == pytest.approx(ages.std(), rel=1e-4)


def test_history_stats_read_the_whole_history_before_the_cutoff(tiny_dataset, tmp_path, encoder):
    """The kept events are the most recent cap; the history statistics count every event before the cutoff (the
    peers' RFM features, signed logs, 0 where undefined), and never one at or after it."""
    from qanchor.bench.features import modality_features
    from qanchor.data.history import HISTORY_STATS, PACKED_HISTORY

    ds = qanchor.load_dataset(tiny_dataset)
    packer = UserPacker(ds.manifest, DataConfig(max_events={"bill": 3}, default_max_events=2),
                        TextVectorCache(tmp_path / "text", encoder))
    record = ds.user("u004")
    bill = record.events["bill"]
    assert len(bill) > 3
    packed = packer.pack(record).modalities["bill"]
    assert packed.text_rows.shape == (3,) and packed.history.shape == (PACKED_HISTORY,)
    raw = modality_features(bill, packer.cutoff_us, 0)
    assert packed.history[0] == pytest.approx(np.log1p(len(bill)), rel=1e-6)  # every event, not the 3 kept
    expected = np.nan_to_num(np.sign(raw) * np.log1p(np.abs(raw)), nan=0.0)
    assert np.allclose(packed.history[:HISTORY_STATS], expected, rtol=1e-6)
    # Timing habit of every event, recomputed from the timestamps here: 6-hour UTC blocks, then Saturday / Sunday.
    hours = (bill.ts % 86_400_000_000) // 3_600_000_000
    blocks = [np.mean((hours >= lo) & (hours < lo + 6)) for lo in (0, 6, 12, 18)]
    weekdays = [datetime.fromtimestamp(t / 1e6, tz=timezone.utc).weekday() for t in bill.ts]
    assert np.allclose(packed.history[HISTORY_STATS:], [*blocks, np.mean(np.array(weekdays) >= 5)], atol=1e-6)
    assert packed.history[HISTORY_STATS:HISTORY_STATS + 4].sum() == pytest.approx(1.0, abs=1e-6)
    # At an earlier cutoff (a pretraining pair's) the later events do not exist yet, and days count from there.
    cut = int(bill.ts[len(bill) // 2])
    earlier = packer.pack(record, cut).modalities["bill"]
    n_before = int((bill.ts < cut).sum())
    assert 0 < n_before < len(bill) and earlier.history[0] == pytest.approx(np.log1p(n_before), rel=1e-6)
    assert earlier.history[5] == pytest.approx(np.log1p((cut - bill.ts[n_before - 1]) / 86_400e6), rel=1e-5)
    # A modality without events reads zeros (its token is the learned empty token anyway).
    assert not packer.pack(ds.user("u000")).modalities["bill"].history.any()


def test_cache_key_follows_the_tokenizer_not_the_folder(tmp_path, encoder):
    """The same weights beside a changed tokenizer read texts differently: their cached vectors must not be served.
    The same encoder in another folder reads them the same: its vectors are not re-encoded."""
    import json
    import shutil

    from qanchor.config import TextEncoderConfig
    from qanchor.data.text_cache import default_encoder_path

    same, cased = tmp_path / "a" / "minilm", tmp_path / "b" / "minilm"
    for folder in (same, cased):
        shutil.copytree(default_encoder_path(), folder)
    for name, edit in (("tokenizer_config.json", lambda c: c.update(do_lower_case=False)),
                       ("tokenizer.json", lambda t: t["normalizer"].update(lowercase=False))):
        raw = json.loads((cased / name).read_text())
        edit(raw)
        (cased / name).write_text(json.dumps(raw))
    moved = SentenceEncoder(TextEncoderConfig(path=str(same)), device="cpu")
    relowered = SentenceEncoder(TextEncoderConfig(path=str(cased)), device="cpu")
    text = "GROCERY / FROZEN PIZZA"
    original = SentenceEncoder(TextEncoderConfig(path=str(default_encoder_path())), device="cpu")
    assert moved.key.rsplit("-", 1)[1] == original.key.rsplit("-", 1)[1]  # the folder's name is only a label
    assert relowered.key != moved.key
    key = moved.key
    assert float(relowered.encode([text])[0] @ moved.encode([text])[0]) < 0.9  # they do read it differently
    assert moved.key == key  # encoding sets the tokenizer's padding and truncation: not part of what it is


def test_a_killed_writers_shard_temporary_is_cleared_and_a_damaged_shard_named(tmp_path, encoder):
    """A shard's name holds its writer's pid, so a writer killed mid-write left a full-size temporary no later write
    would ever clear; a truncated shard crashed every command with pyarrow's traceback."""
    import subprocess
    import sys

    from qanchor.errors import DataValidationError

    cache = TextVectorCache(tmp_path / "text", encoder)
    cache.ensure(["a", "b"])
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited
    from qanchor.data.io import _host

    left = cache.dir / f".shard-00001-{pid}.parquet.qanchor-tmp.{pid}-{_host()}.abcd1234"
    left.write_bytes(b"x" * 1000)
    alive = cache.dir / f".shard-00002-1.parquet.qanchor-tmp.{os.getpid()}-{_host()}.abcd1234"  # a live writer's
    alive.write_bytes(b"y")
    again = TextVectorCache(tmp_path / "text", encoder)
    assert not left.exists() and alive.exists() and len(again) == 2
    shard = next(cache.dir.glob("shard-*.parquet"))
    shard.write_bytes(shard.read_bytes()[:40])
    with pytest.raises(DataValidationError, match=r"shard-.*damaged text-vector cache shard.*delete it"):
        TextVectorCache(tmp_path / "text", encoder)


def test_a_tabular_column_of_small_numbers_keeps_its_spread():
    """An absolute 1e-6 floor on the std made a column of rates around 1e-7 a constant (std 1: every z-score about
    1e-7), informative to every peer and invisible to the model; a constant column, at any scale, still gets std 1."""
    from qanchor.data.dataset import UserRecord

    rates = np.array([1e-7, 3e-7, 2e-7, 5e-7])
    records = [UserRecord(f"u{i}", {}, np.array([r, 1e6, 0.0, 7.0], np.float32)) for i, r in enumerate(rates)]
    mean, std = tabular_stats(records, 4)
    assert std[0] == pytest.approx(rates.std(), rel=1e-3)
    assert std[1:].tolist() == [1.0, 1.0, 1.0]  # constants: 1e6 (float32), 0 and 7
    z = (rates.astype(np.float32) - mean[0]) / std[0]
    assert z.std() == pytest.approx(1.0, rel=1e-2)
