from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import qanchor
from qanchor.data import dataset as dataset_mod


def _raw_events(ds_dir):
    tables = [pq.read_table(p) for p in sorted((ds_dir / "events").glob("*.parquet"))]
    import pyarrow as pa

    return pa.concat_tables(tables)


def test_users_match_raw_events(tiny_dataset):
    ds = qanchor.load_dataset(tiny_dataset)
    raw = _raw_events(tiny_dataset)
    users = list(ds.users())
    assert [u.user_id for u in users] == sorted(u.user_id for u in users)
    assert len(users) == 40 and ds.num_users == 40
    assert users[0].user_id == "u000" and users[0].events == {}  # no events at all: still a user
    assert "search" not in ds.user("u001").events and "search" in ds.user("u002").events
    total = 0
    for u in users:
        for modality, seq in u.events.items():
            mask = pc.and_(pc.equal(raw["user_id"], u.user_id), pc.equal(raw["modality"], modality))
            sub = raw.filter(mask).sort_by("ts")
            assert np.all(np.diff(seq.ts) >= 0)
            assert sorted(seq.text) == sorted(sub["text"].to_pylist())
            assert np.isclose(np.nansum(seq.value), np.nansum(sub["value"].to_numpy(zero_copy_only=False).astype(float)), rtol=1e-5)
            total += len(seq)
    assert total == raw.num_rows


def test_tabular_and_tasks(tiny_dataset):
    ds = qanchor.load_dataset(tiny_dataset)
    assert ds.tabular_columns == ["age", "income"]
    assert ds.user("u001").tabular is None
    tab = ds.user("u000").tabular
    assert tab.dtype == np.float32 and np.isnan(tab[0])  # missing age stays NaN
    churn = ds.tasks["churn"]
    assert churn.positive_rate == pytest.approx(0.25) and churn.prob is None
    assert ds.tasks["coupon"].prob is not None


def test_streaming_partitions_bound_memory(tiny_dataset, tmp_path, monkeypatch):
    """With 8 users per partition only one partition's rows are read at a time, and results match."""
    full = [(u.user_id, {k: v.text for k, v in u.events.items()}) for u in qanchor.load_dataset(tiny_dataset).users()]
    monkeypatch.setattr(dataset_mod, "_PARTITION_USERS", 8)
    ds = qanchor.load_dataset(tiny_dataset, cache_dir=tmp_path / "cache")
    assert ds.partitions.count == 5
    read_sizes = []
    original = dataset_mod._Partitions.read
    monkeypatch.setattr(dataset_mod._Partitions, "read", lambda self, p: read_sizes.append(p) or original(self, p))
    small = [(u.user_id, {k: v.text for k, v in u.events.items()}) for u in ds.users()]
    assert small == full and read_sizes == [0, 1, 2, 3, 4]


def test_partition_cache_reused_and_refreshed(tiny_dataset, tmp_path, monkeypatch):
    """Reused while the files are unchanged (built once for two loads); cut again when an events file changes, so the
    loader never serves events the files no longer hold."""
    import pyarrow.parquet as pq

    data = tmp_path / "ds"
    shutil.copytree(tiny_dataset, data, ignore=shutil.ignore_patterns(".qanchor_cache"))
    built = []
    real = dataset_mod._write_partitions
    monkeypatch.setattr(dataset_mod, "_write_partitions", lambda *a, **k: (built.append(1), real(*a, **k))[1])
    ds = qanchor.load_dataset(data, cache_dir=tmp_path / "c")
    first = ds.partitions.directory
    again = qanchor.load_dataset(data, cache_dir=tmp_path / "c")
    assert again.partitions.directory == first and (first / "index.json").exists() and len(built) == 1
    part = sorted((data / "events").glob("*.parquet"))[0]
    table = pq.read_table(part)
    pq.write_table(table.slice(0, table.num_rows - 5), part)  # five events fewer
    raw = sum(pq.read_metadata(p).num_rows for p in (data / "events").glob("*.parquet"))
    fresh = qanchor.load_dataset(data, cache_dir=tmp_path / "c")
    assert sum(len(s) for u in fresh.users() for s in u.events.values()) == raw and len(built) == 2


def test_select_users_and_unknown(tiny_dataset):
    ds = qanchor.load_dataset(tiny_dataset)
    got = [u.user_id for u in ds.users(["u010", "u003"])]
    assert got == ["u003", "u010"]
    with pytest.raises(KeyError, match="nobody"):
        list(ds.users(["nobody"]))


def test_a_manifest_edit_refreshes_the_user_partitions(tmp_path):
    """The partitions are written with the manifest's columns: declaring a column the files already hold must not
    keep serving partitions cut before it (where it would read as all NaN)."""
    import pyarrow as pa
    import yaml

    from tests.conftest import build_tiny_dataset

    root = build_tiny_dataset(tmp_path / "ds", n_users=6)
    for path in sorted((root / "events").glob("*.parquet")):
        table = pq.read_table(path)
        pq.write_table(table.append_column("quantity", pa.array(np.arange(table.num_rows, dtype=np.float32) + 1)), path)
    before = qanchor.load_dataset(root).user("u001").events["app"].extras
    manifest = yaml.safe_load((root / "manifest.yaml").read_text())
    app = next(m for m in manifest["modalities"] if m["name"] == "app")
    app["numeric_columns"] = ["quantity"]
    (root / "manifest.yaml").write_text(yaml.safe_dump(manifest))
    after = qanchor.load_dataset(root).user("u001").events["app"].extras
    assert before.shape[1] == 0 and after.shape[1] == 1
    assert np.all(np.isfinite(after[:, 0])) and np.all(after[:, 0] >= 1)


@pytest.mark.parametrize("tz", ["UTC", None])
def test_nanosecond_timestamps_are_read_at_microsecond_precision(tmp_path, tz):
    """pandas writes timestamp[ns]; a sub-microsecond part is floored, never an error or a traceback."""
    import pyarrow as pa

    from qanchor.data.validate import validate_dataset
    from tests.conftest import build_tiny_dataset

    root = build_tiny_dataset(tmp_path / "ds", n_users=6)
    reference = {u.user_id: {m: s.ts.copy() for m, s in u.events.items()} for u in qanchor.load_dataset(root).users()}
    for path in sorted((root / "events").glob("*.parquet")):
        table = pq.read_table(path)
        ns = table.column("ts").cast(pa.int64()).to_numpy() * 1000 + 999  # 0.999 us past each original instant
        pq.write_table(table.set_column(table.schema.get_field_index("ts"), "ts", pa.array(ns, pa.timestamp("ns", tz=tz))), path)
    validate_dataset(root)
    got = {u.user_id: {m: s.ts for m, s in u.events.items()} for u in qanchor.load_dataset(root).users()}
    assert got.keys() == reference.keys()
    for user, seqs in reference.items():
        assert got[user].keys() == seqs.keys()
        for modality, ts in seqs.items():
            np.testing.assert_array_equal(got[user][modality], ts)


def test_zoned_nanoseconds_in_a_daylight_saving_fall_back_hour_are_two_instants():
    """pandas writes datetime64[ns, America/New_York]; 01:30 EDT and 01:30 EST (one local hour, twice) were refused as
    "ambiguous" by flooring in local time. They are two UTC instants, an hour apart."""
    import pyarrow as pa

    from qanchor.data.schema import utc_micros

    utc = [int(np.datetime64(t, "ns").astype(np.int64)) + 999 for t in ("2023-11-05T05:30:00", "2023-11-05T06:30:00")]
    got = utc_micros(pa.array(utc, pa.timestamp("ns", tz="America/New_York"))).cast(pa.int64()).to_pylist()
    assert got == [(t - 999) // 1000 for t in utc] and got[1] - got[0] == 3_600_000_000


def test_user_pairs_with_cutoffs_in_another_unit_are_read_as_microseconds(tmp_path):
    """Pairs of the user's own may store cutoffs in milliseconds or naive; pretraining reads them as UTC us."""
    import pyarrow as pa

    from qanchor.data.schema import TS_TYPE
    from tests.conftest import build_tiny_dataset

    root = build_tiny_dataset(tmp_path / "ds", n_users=6)
    cutoff_ms = int(np.datetime64("2024-06-01T12:00:00", "ms").astype(np.int64))
    pq.write_table(pa.table({"user_id": ["u001", "u002"], "cutoff": pa.array([cutoff_ms, cutoff_ms], pa.timestamp("ms")),
                             "query": ["Is this user active?"] * 2, "answer": ["Yes", "No"], "source": ["uqa", "uqa"]}),
                   root / "userU.parquet")
    cutoff = qanchor.load_dataset(root).userU().column("cutoff")
    assert cutoff.type == TS_TYPE
    assert cutoff.cast(pa.int64()).to_pylist() == [cutoff_ms * 1000] * 2


def test_a_rebuild_passes_over_what_qanchor_wrote_and_stops_at_what_it_did_not(tiny_dataset, tmp_path):
    """A dataset directory holding only what builds write (and a temporary a killed `data userU` left) may be rebuilt;
    one holding a file of the user's own may not, and keeps it."""
    from qanchor.data.schema import check_dataset_target
    from qanchor.errors import OutputError

    ds = tmp_path / "ds"
    shutil.copytree(tiny_dataset, ds)
    (ds / ".userU.parquet.qanchor-tmp.12345-abcdef.0badc0de").write_bytes(b"half")
    check_dataset_target(ds)
    (ds / "events" / "mine.csv").write_text("user_id\n")
    with pytest.raises(OutputError, match=r"holds files a dataset build does not write \('events/mine.csv'\)"):
        check_dataset_target(ds)
    assert (ds / "events" / "mine.csv").exists()


def test_a_rebuild_keeps_files_named_like_the_builds_own(tmp_path):
    """A build records what it wrote by content: an events part of the user's own named like ours, a task of their own
    declared in the manifest, or one of the build's files overwritten by the user, made a rebuild delete them (names
    alone said they were the build's)."""
    import yaml

    from data_tools.synth import build_synthetic
    from qanchor.data.schema import check_dataset_target
    from qanchor.errors import OutputError

    ds = tmp_path / "ds"
    build_synthetic(ds, n_users=8, seed=0)
    check_dataset_target(ds)  # only what the build wrote: may be rebuilt

    own_part = ds / "events" / "part-00099.parquet"
    pq.write_table(pq.read_table(ds / "events" / "part-00000.parquet").slice(0, 2), own_part)
    with pytest.raises(OutputError, match=r"\('events/part-00099.parquet'\)"):
        check_dataset_target(ds)
    own_part.unlink()

    (ds / "tasks" / "my_task.parquet").write_bytes((ds / "tasks" / "churn.parquet").read_bytes())
    built_manifest = (ds / "manifest.yaml").read_text()
    manifest = yaml.safe_load(built_manifest)
    manifest["tasks"].append({**manifest["tasks"][0], "name": "my_task", "query": "My own question?"})
    (ds / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    with pytest.raises(OutputError, match=r"\('manifest.yaml', 'tasks/my_task.parquet'\)"):  # the edit is the user's too
        check_dataset_target(ds)
    (ds / "tasks" / "my_task.parquet").unlink()
    (ds / "manifest.yaml").write_text(built_manifest)

    churn = pq.read_table(ds / "tasks" / "churn.parquet")
    pq.write_table(churn.slice(0, 3), ds / "tasks" / "churn.parquet")  # the user's own labels over the build's file
    with pytest.raises(OutputError, match=r"\('tasks/churn.parquet'\)"):
        check_dataset_target(ds)
    assert pq.read_table(ds / "tasks" / "churn.parquet").num_rows == 3


def test_integer_amounts_beyond_float32_integers_load(tiny_dataset, tmp_path):
    """Amounts in cents are integers; above 2**24 Arrow's checked cast to float32 refused them after validation had
    passed, and every command failed with a traceback. They load as float32, to float32's precision."""
    import pyarrow as pa

    from qanchor.cli import main

    ds = tmp_path / "ds"
    shutil.copytree(tiny_dataset, ds, ignore=shutil.ignore_patterns(".qanchor_cache"))
    path = sorted((ds / "events").glob("*.parquet"))[0]
    table = pq.read_table(path)
    cents = [None if v is None else round(v * 100) for v in table.column("value").to_pylist()]
    first = next(i for i, v in enumerate(cents) if v is not None)
    cents[first] = 2**24 + 1
    discounts = [None if v is None else 2**25 + 3 for v in table.column("discount").to_pylist()]
    table = table.set_column(table.schema.get_field_index("value"), "value", pa.array(cents, pa.int64()))
    table = table.set_column(table.schema.get_field_index("discount"), "discount", pa.array(discounts, pa.int64()))
    pq.write_table(table, path)
    assert main(["data", "validate", str(ds)]) == 0
    record = dataset_mod.load_dataset(ds).user(table.column("user_id")[first].as_py())
    seq = record.events[table.column("modality")[first].as_py()]
    assert np.float32(2**24 + 1) in seq.value  # float32 rounds it to 2**24: loaded, not refused
    assert np.isfinite(seq.value[~np.isnan(seq.value)]).all()
    extras = seq.extras[~np.isnan(seq.extras)]
    assert np.float32(2**25 + 3) in extras


def test_a_cache_folder_this_user_cannot_write_is_not_chosen(tmp_path, monkeypatch):
    """A dataset shipped with its .qanchor_cache on a read-only mount: the cache goes to the user's own folder
    instead of failing at the first write (only an unwritable dataset root was detected)."""
    import os

    root = tmp_path / "ds"
    (root / ".qanchor_cache").mkdir(parents=True)
    monkeypatch.setenv("QANCHOR_CACHE", str(tmp_path / "home-cache"))
    assert dataset_mod.default_cache_dir(root) == root / ".qanchor_cache"
    writable = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p).endswith(".qanchor_cache") else writable(p, mode))
    assert dataset_mod.default_cache_dir(root).parent == tmp_path / "home-cache" / "datasets"


def test_manifest_time_varying_tabular_round_trips_and_is_checked():
    from qanchor.data.manifest import Manifest
    from qanchor.errors import DataValidationError

    raw = {"name": "x", "cutoff": "2024-01-01T00:00:00+00:00",
           "modalities": [{"name": "app", "kind": "sequence"}, {"name": "tabular", "kind": "tabular", "time_varying": True}]}
    m = Manifest.from_dict(raw)
    assert m.tabular.time_varying and not m.modality("app").time_varying
    assert Manifest.from_dict(m.to_dict()) == m
    static = Manifest.from_dict({**raw, "modalities": [raw["modalities"][0], {"name": "tabular", "kind": "tabular"}]})
    assert "time_varying" not in static.to_dict()["modalities"][1]  # the default is not written: old manifests stay as they were
    with pytest.raises(DataValidationError, match=r"modalities\[0\]\.time_varying.*tabular modality only"):
        Manifest.from_dict({**raw, "modalities": [{"name": "app", "kind": "sequence", "time_varying": True}]})
    with pytest.raises(DataValidationError, match=r"time_varying.*true or false"):
        Manifest.from_dict({**raw, "modalities": [{"name": "tabular", "kind": "tabular", "time_varying": "yes"}]})


def test_events_and_text_cache_gone_while_reading_are_an_error_not_users_without_events(tiny_dataset, tmp_path):
    """A dataset rebuilt (or its cache cleared) while a command read it: the partitions it had opened read as users with
    no events, silently (an embed exported half its users empty), and its text cache wrote into an unmarked folder that
    every later run refused."""
    import shutil

    from qanchor.data.text_cache import TextVectorCache
    from qanchor.errors import DataValidationError
    from tests.model.helpers import encoder

    root = tmp_path / "ds"
    shutil.copytree(tiny_dataset, root, ignore=shutil.ignore_patterns(".qanchor_cache"))
    ds = qanchor.load_dataset(root)
    parts = ds.partitions
    assert parts.written and all((parts.directory / f"part-{p:05d}.parquet").exists() for p in parts.written)
    cache = TextVectorCache(ds.text_cache_dir, encoder())
    cache.ensure(["Coffee shop"])
    shutil.rmtree(ds.cache_dir)  # what a rebuild does to an open dataset's cache
    with pytest.raises(DataValidationError, match="gone since the command opened the dataset"):
        list(ds.users())
    with pytest.raises(DataValidationError, match="text-vector cache is gone"):
        cache.ensure(["Bookshop"])
    assert not ds.cache_dir.exists()
    assert sum(1 for _ in qanchor.load_dataset(root).users()) == ds.num_users  # opened again: rebuilt, every user


def test_isin_ids_is_set_membership_of_text_ids():
    """Reading given users compared object arrays pair by pair (quadratic); the string comparison must agree with plain
    membership, ids of other types matching nothing."""
    from qanchor.data.dataset import isin_ids

    rng = np.random.default_rng(0)
    among = np.array([f"u{i:05d}" for i in rng.choice(20_000, 5_000, replace=False)] + ["007", "", "é", "a"], object)
    values = np.array([f"u{i:05d}" for i in rng.choice(20_000, 3_000)] + ["7", "007", "", "é", 7, None, "a\x00",
                                                                        "caf\udce9"], object)
    members = set(among.tolist())
    assert isin_ids(values, among).tolist() == [isinstance(v, str) and v in members for v in values]
    assert isin_ids(np.array([], object), among).tolist() == [] and not isin_ids(values, np.array([], object)).any()


def test_a_cache_dir_given_with_a_tilde_is_the_home_folder(tiny_dataset, tmp_path, monkeypatch):
    """`data.cache_dir=~/cache` made a folder literally named "~" in the working directory while pyarrow, expanding "~"
    itself, wrote elsewhere and failed; an unknown user's "~name" is one clear error."""
    from qanchor.errors import ConfigError

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    ds = qanchor.load_dataset(tiny_dataset, cache_dir="~/cache")
    assert ds.cache_dir == tmp_path / "home" / "cache"
    with pytest.raises(ConfigError, match="data.cache_dir=~nosuchuser_qanchor/c: no such user's home directory"):
        qanchor.load_dataset(tiny_dataset, cache_dir="~nosuchuser_qanchor/c")
    assert not (tmp_path / "~").exists()


def test_ids_that_differ_only_by_a_trailing_nul_stay_apart_when_subsampled():
    """numpy's fixed-width strings drop trailing NULs: max_users read "u1\\x00" as "u1" and dropped those users."""
    from qanchor.bench.tasks import subsample
    from qanchor.data.dataset import Task
    from qanchor.data.manifest import TaskDomain, TaskSpec

    ids = np.array([f"u{i}" + "\x00" * (i % 2) for i in range(10)], object)
    task = Task(TaskSpec("t", TaskDomain.PROFILE, "Will it?", 0), ids, np.arange(10) % 2)
    kept = subsample([task], 8, seed=0)[0]
    assert len(kept.user_ids) == 8 and len(set(kept.user_ids.tolist())) == 8


def test_make_clean_removes_only_the_repositorys_own_outputs_with_nothing_of_the_users_in_them(tmp_path, monkeypatch):
    """`make clean` removed every marked folder whole: through a link under runs/ it emptied a run archive outside the
    repository, and it deleted a user's labels and notes kept in a dataset."""
    import json

    from data_tools.synth import build_synthetic
    from qanchor.data.io import MARKER_FILE
    from qanchor.data.schema import clean_outputs

    repo, outside = tmp_path / "repo", tmp_path / "outside"
    monkeypatch.chdir(tmp_path)
    for name in ("clean", "noted"):
        build_synthetic(repo / "data" / name, n_users=6, seed=0, progress=False)
    (repo / "data" / "noted" / "my_labels.csv").write_text("user_id,label\n")
    archived = outside / "archive" / "cj-6000"
    archived.mkdir(parents=True)
    (archived / MARKER_FILE).write_text(json.dumps({"kind": "pretraining run"}))
    (repo / "runs").mkdir()
    (repo / "runs" / "archive").symlink_to(outside / "archive")
    ckpt = repo / "runs" / "demo" / "pretrain" / "checkpoint"
    ckpt.mkdir(parents=True)
    (ckpt.parent / MARKER_FILE).write_text(json.dumps({"kind": "pretraining run"}))
    (ckpt / MARKER_FILE).write_text(json.dumps({"kind": "checkpoint", "holds": ["model.safetensors"]}))
    (ckpt / "model.safetensors").write_text("w")
    (ckpt / "eval.md").write_text("mine")
    # a run, a prompt-tune folder and a head (saved before heads recorded their names) holding a note of the user's
    for folder, kind in (("runs/synth/pretrain", "pretraining run"), ("runs/synth/heads", "prompt-tune output"),
                         ("runs/h2/heads", "prompt-tune output")):
        (repo / folder).mkdir(parents=True)
        (repo / folder / MARKER_FILE).write_text(json.dumps({"kind": kind}))
    (repo / "runs/synth/pretrain/notes.md").write_text("mine")
    (repo / "runs/synth/heads/summary.json").write_text("{}")
    head = repo / "runs/h2/heads/churn"
    head.mkdir()
    (head / MARKER_FILE).write_text(json.dumps({"kind": "scenario head"}))
    (head / "head.yaml").write_text("x")
    (head / "notes.md").write_text("mine")
    monkeypatch.chdir(repo)
    kept = clean_outputs(["data/clean", "data/noted", "runs/archive/cj-6000", "runs/demo/pretrain", "runs/none",
                          "runs/synth/pretrain", "runs/synth/heads", "runs/h2/heads"])
    assert not (repo / "data" / "clean").exists() and not (repo / "runs/synth/heads").exists()  # ours alone: removed
    assert (repo / "data" / "noted" / "my_labels.csv").exists() and (archived / MARKER_FILE).exists()
    assert (ckpt / "eval.md").exists() and (repo / "runs/synth/pretrain/notes.md").exists() and (head / "notes.md").exists()
    assert [line.split(":")[0] for line in kept] == ["kept data/noted", "kept runs/archive/cj-6000", "kept runs/demo/pretrain",
                                                     "kept runs/synth/pretrain", "kept runs/h2/heads"]


def test_the_data_layer_knows_a_heads_files_as_the_head_writes_them():
    from qanchor.data.io import HEAD_FILES
    from qanchor.tune.head import HEAD_FOLDER_FILES

    assert HEAD_FILES == set(HEAD_FOLDER_FILES)


def test_the_same_events_in_another_row_order_are_the_same_users(tiny_dataset, tmp_path):
    """Ties (a basket's lines share one timestamp) kept their file row order: the same events exported in another
    order gave 73% of Complete Journey's households other kept events at the cap, and other embeddings."""
    import pyarrow as pa

    raw = _raw_events(tiny_dataset)
    # every bill event of u001 and u002 moved onto one instant, so the cap has to cut the group
    tied = pc.and_(pc.is_in(raw.column("user_id"), pa.array(["u001", "u002"])), pc.equal(raw.column("modality"), "bill"))
    instant = pc.max(raw.column("ts")).as_py()
    raw = raw.set_column(raw.schema.get_field_index("ts"), "ts",
                         pc.if_else(tied, pa.scalar(instant, raw.schema.field("ts").type), raw.column("ts")))
    manifest = qanchor.load_dataset(tiny_dataset).manifest
    reads = []
    for seed in range(3):
        shuffled = raw.take(np.random.default_rng(seed).permutation(raw.num_rows))
        reads.append({r.user_id: r for r in dataset_mod.records_from_table(shuffled, manifest)})
        if seed == 0:  # through a dataset too: its partitions are written and read back
            copy = tmp_path / "shuffled"
            shutil.copytree(tiny_dataset, copy, ignore=shutil.ignore_patterns(".qanchor_cache", "events"))
            (copy / "events").mkdir()
            pq.write_table(shuffled, copy / "events" / "part-00000.parquet")
            reads.append({r.user_id: r for r in qanchor.load_dataset(copy).users()})
    first = reads[0]
    assert sum(len(first[u].events["bill"]) for u in ("u001", "u002")) > 8  # groups the tiny caps cut
    for other in reads[1:]:
        assert [u for u in other if other[u].events] == list(first)
        for uid, rec in first.items():
            for m, seq in rec.events.items():
                got = other[uid].events[m]
                assert got.text == seq.text and np.array_equal(got.ts, seq.ts), (uid, m)
                assert np.array_equal(got.value, seq.value, equal_nan=True)
                assert np.array_equal(got.extras, seq.extras, equal_nan=True)


def test_order_key_sorts_as_event_order_does():
    rng = np.random.default_rng(0)
    n = 200
    ts = rng.integers(0, 5, n)
    text = [f"t{k}" for k in rng.integers(0, 6, n)]
    value = rng.integers(0, 3, n).astype(np.float32)
    value[rng.random(n) < 0.3] = np.nan
    extras = rng.integers(0, 2, (n, 2)).astype(np.float32)
    extras[rng.random((n, 2)) < 0.3] = np.nan
    seq = dataset_mod.EventSeq(ts, text, value, extras)
    order = dataset_mod.event_order(ts, text, value, extras)
    keys = [dataset_mod.order_key(seq, i) for i in order]
    assert keys == sorted(keys) and len(set(keys)) < n  # in key order, ties of whole content included


def test_a_dataset_holding_pairs_of_the_users_own_is_neither_cleaned_nor_rebuilt(tmp_path, monkeypatch):
    """`make clean` removed a dataset whose userU.parquet held the user's own pairs (a rebuild refused it, the clean
    did not look), and a task's question edited in manifest.yaml was undone by a rebuild and removed by a clean."""
    import pyarrow as pa

    from data_tools.synth import build_synthetic
    from qanchor.data.schema import check_dataset_target, clean_outputs
    from qanchor.errors import OutputError

    monkeypatch.chdir(tmp_path)
    for name in ("paired", "edited", "cut", "plain"):
        build_synthetic(tmp_path / "data" / name, n_users=6, seed=0, progress=False)
    pq.write_table(pa.table({"user_id": ["u000001"], "query": ["mine?"], "answer": ["hand-written"]}),
                   tmp_path / "data" / "paired" / "userU.parquet")
    manifest = tmp_path / "data" / "edited" / "manifest.yaml"
    manifest.write_text(manifest.read_text().replace("query: ", "query: (edited) ", 1))
    (tmp_path / "data" / "cut" / "userU.parquet").write_bytes(b"PAR1 cut short")
    with pytest.raises(OutputError, match="was not written by `qanchor data userU`"):
        check_dataset_target("data/paired")
    with pytest.raises(OutputError, match=r"holds files a dataset build does not write \('manifest.yaml'\)"):
        check_dataset_target("data/edited")
    with pytest.raises(OutputError, match=r"cannot be read as Parquet .*\(a damaged or cut copy"):
        check_dataset_target("data/cut")
    kept = clean_outputs(["data/paired", "data/edited", "data/cut", "data/plain"])
    assert [line.split(":")[0] for line in kept] == ["kept data/paired", "kept data/edited", "kept data/cut"]
    assert (tmp_path / "data" / "paired" / "userU.parquet").exists() and "(edited)" in manifest.read_text()
    assert not (tmp_path / "data" / "plain").exists()
    build_synthetic(tmp_path / "data" / "plain", n_users=6, seed=0, progress=False)  # its own manifest: rebuilt
    build_synthetic(tmp_path / "data" / "plain", n_users=6, seed=0, progress=False)


def test_a_file_put_into_a_dataset_while_it_is_rebuilt_is_not_deleted(tmp_path, monkeypatch):
    """The check for files of the user's own ran before the build only: a note put into the folder during a rebuild
    (minutes at scale) was deleted with the old directory."""
    from data_tools.synth import build_synthetic
    from qanchor.data import schema
    from qanchor.errors import OutputError

    out = tmp_path / "race"
    build_synthetic(out, n_users=6, seed=0, progress=False)
    real_parquet = schema.write_parquet

    def note_once(table, path):  # the rebuild writes its first file; the user adds a note to the old folder meanwhile
        real_parquet(table, path)
        if not (out / "notes.txt").exists():
            (out / "notes.txt").write_text("mine")

    monkeypatch.setattr(schema, "write_parquet", note_once)
    with pytest.raises(OutputError, match=r"holds files a dataset build does not write \('notes.txt'\)"):
        build_synthetic(out, n_users=6, seed=0, progress=False)
    assert (out / "notes.txt").read_text() == "mine" and (out / "manifest.yaml").exists()


def test_a_rebuilt_dataset_keeps_its_folders_permissions_and_a_mount_point_is_refused_first(tmp_path, monkeypatch):
    """A rebuild swapped in a new folder with this process's umask: a shared dataset's `chmod 2770` was lost. A
    mount point could never be swapped, and failed with a traceback after the whole build."""
    import os
    import stat

    from data_tools.synth import build_synthetic
    from qanchor.data import io
    from qanchor.errors import OutputError

    out = tmp_path / "shared"
    build_synthetic(out, n_users=6, seed=0, progress=False)
    os.chmod(out, 0o2770)
    build_synthetic(out, n_users=6, seed=0, progress=False)
    assert stat.S_IMODE(out.stat().st_mode) == 0o2770
    if os.geteuid() == 0:  # a team's group on every file inside too, not only on the folder (root may give any group)
        team = os.getegid() + 4321
        for path in [out, *out.rglob("*")]:
            os.chown(path, -1, team)
        os.chmod(out, 0o2770)
        build_synthetic(out, n_users=6, seed=0, progress=False)
        assert {p.stat().st_gid for p in [out, *out.rglob("*")]} == {team}
    monkeypatch.setattr(io.os.path, "ismount", lambda p: os.fspath(p) == os.fspath(out))
    with pytest.raises(OutputError, match="is a mount point.*name a folder inside it"):
        build_synthetic(out, n_users=6, seed=0, progress=False)


def test_a_damaged_events_cache_is_rebuilt_not_a_traceback_on_every_run(tiny_dataset, tmp_path, capsys):
    """The users' partition cache was read as it was: a copy cut short (file times kept, so the same fingerprint)
    or a damaged index ended every command in a pyarrow or JSON traceback, rerun after rerun."""
    copy = tmp_path / "copy"
    shutil.copytree(tiny_dataset, copy, ignore=shutil.ignore_patterns(".qanchor_cache"))
    expected = {u.user_id: u for u in qanchor.load_dataset(copy).users()}
    (cache,) = (copy / ".qanchor_cache").glob("users-*")
    part = next(cache.glob("part-*.parquet"))
    for damage in (lambda: part.write_bytes(part.read_bytes()[:100]), lambda: (cache / "index.json").write_text('{"bou'),
                   lambda: part.unlink()):
        damage()
        capsys.readouterr()
        users = {u.user_id: u for u in qanchor.load_dataset(copy).users()}
        assert "events cache is damaged or incomplete; rebuilding it" in capsys.readouterr().err
        assert users.keys() == expected.keys()
        assert all(users[k].events.keys() == expected[k].events.keys() and
                   all(np.array_equal(users[k].events[m].ts, expected[k].events[m].ts) for m in users[k].events)
                   for k in users)


def test_a_cache_dir_inside_the_datasets_events_is_refused(tiny_dataset, tmp_path):
    """`data.cache_dir=DATA/events/vec` was claimed, and from then on the dataset failed validation for a folder in
    events/ that qanchor had made itself."""
    from qanchor.errors import ConfigError

    copy = tmp_path / "copy"
    shutil.copytree(tiny_dataset, copy, ignore=shutil.ignore_patterns(".qanchor_cache"))
    for inside in ("events/vec", "tasks", "tasks/x/y"):
        with pytest.raises(ConfigError, match=r"data.cache_dir=.* lies in .*(events|tasks), which holds only the "
                                              "dataset's own files"):
            qanchor.load_dataset(copy, cache_dir=copy / inside)
    assert not (copy / "events" / "vec").exists()
    assert qanchor.load_dataset(copy, cache_dir=copy / "vec").num_users == 40


def test_the_ratings_world_draws_in_bounded_memory_with_the_same_titles(tmp_path, monkeypatch):
    """Titles were drawn from a (ratings, 400) float64 array at once: 0.5 GB per 1,000 users, so `qanchor data
    ratings users=50000` needed 25 GB. Drawn in blocks of ratings, the same numbers come out in the same order."""
    from data_tools import ratings

    monkeypatch.setattr(ratings, "_DRAW_ROWS", 10**9)  # one block: as the whole array was drawn
    whole = ratings.build_ratings(tmp_path / "whole", n_users=60, seed=4)
    monkeypatch.setattr(ratings, "_DRAW_ROWS", 7)
    blocks = ratings.build_ratings(tmp_path / "blocks", n_users=60, seed=4)
    assert pq.read_table(whole / "events").equals(pq.read_table(blocks / "events"))


def test_a_changed_dataset_leaves_one_events_cache_not_a_copy_per_version(tiny_dataset, tmp_path):
    """Every change to a dataset's event files or manifest wrote a whole new copy of its events under .qanchor_cache
    and kept the old ones. An old copy goes only once no process holds it and none has opened it for a day: a
    pretraining run reads its copy to the end, whatever the dataset became (removed at once, a long run died at its
    next partition). A cache folder shared with another dataset keeps that dataset's copy."""
    import os
    import time

    first, second = tmp_path / "first", tmp_path / "second"
    for copy in (first, second):
        shutil.copytree(tiny_dataset, copy, ignore=shutil.ignore_patterns(".qanchor_cache"))
    shared = tmp_path / "cache"
    assert qanchor.load_dataset(second, cache_dir=shared).num_users == 40

    def change_and_load(age_days: float):
        part = first / "events" / "part-00000.parquet"
        table = pq.read_table(part)
        pq.write_table(table.slice(0, table.num_rows - 1), part)  # the dataset changes: another fingerprint
        past = time.time() - age_days * 86400
        for cache in shared.glob("users-*"):
            os.utime(cache / "index.json", (past, past))
        ds = qanchor.load_dataset(first, cache_dir=shared)
        assert sum(len(u.events) > 0 for u in ds.users()) > 0
        return ds

    change_and_load(2)
    change_and_load(0.5)  # the copy it leaves was opened hours ago: kept
    assert len(list(shared.glob("users-*"))) == 3
    reader = qanchor.load_dataset(first, cache_dir=shared)
    before = {u.user_id: u for u in reader.users()}  # a long job holds this copy, opened days ago
    change_and_load(2)
    caches = sorted(shared.glob("users-*"))
    assert len(caches) == 3 and reader.partitions.directory in caches  # the held copy and the newest, and second's
    assert {u.user_id: len(u.events) for u in reader.users()} == {k: len(v.events) for k, v in before.items()}
    del reader, before
    change_and_load(2)
    caches = sorted(shared.glob("users-*"))
    assert len(caches) == 2  # the first dataset's newest copy and the second dataset's own
    assert qanchor.load_dataset(second, cache_dir=shared).partitions.directory in caches


def test_a_byte_flipped_on_disk_in_a_dataset_or_its_events_cache_is_refused_not_read(tiny_dataset, tmp_path):
    """The events cache's partitions were written without page checksums and a dataset's files read without verifying
    them: one byte flipped on disk inside a page was read as another event, silently."""
    from qanchor.errors import DataValidationError
    from tests.helpers import copy_dataset, flip_a_byte_unnoticed

    copy = copy_dataset(tiny_dataset, tmp_path / "copy")
    list(qanchor.load_dataset(copy).users())  # builds the events cache
    (cache,) = (copy / ".qanchor_cache").glob("users-*")
    flip_a_byte_unnoticed(next(cache.glob("part-*.parquet")))
    with pytest.raises(DataValidationError, match=r"part-\d+\.parquet: this partition of the dataset's events cache "
                                                  r"cannot be read \(could not verify page integrity.*delete "):
        list(qanchor.load_dataset(copy).users())
    event_file = next((copy / "events").glob("*.parquet"))
    flip_a_byte_unnoticed(event_file)
    with pytest.raises(DataValidationError, match=rf"{event_file.name}: unreadable \(could not verify page integrity"):
        qanchor.load_dataset(copy)


def test_the_fingerprint_goes_by_content_not_file_times(tiny_dataset, tmp_path, monkeypatch):
    """The dataset's fingerprint (and the pretraining's record of its data) went by each file's size and time: the
    same bytes written again (a `make data` rebuild, a copy without its times) read as other data, and a bench
    recomputed every row; while other bytes of the same size, written back with the old time, read as the same."""
    import os

    from qanchor.train.pretrain import trained_data_id

    copy = tmp_path / "copy"
    shutil.copytree(tiny_dataset, copy, ignore=shutil.ignore_patterns(".qanchor_cache"))
    ds = qanchor.load_dataset(copy)
    assert ds.num_users == 40  # the events cache is built, so its folder is a qanchor cache
    fingerprint, data_id = ds.fingerprint, trained_data_id(ds)
    part = next((copy / "events").glob("*.parquet"))
    st = part.stat()
    part.write_bytes(part.read_bytes())
    os.utime(part, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the same bytes, written later
    assert ds.fingerprint == fingerprint and trained_data_id(ds) == data_id
    task = next((copy / "tasks").glob("*.parquet"))
    table = pq.read_table(task)
    plain = {"compression": "none", "use_dictionary": False}  # fixed-width labels: other labels, the same size
    pq.write_table(table, task, **plain)
    fingerprint, data_id, st = ds.fingerprint, trained_data_id(ds), task.stat()
    labels = pa.array([1 - v for v in table.column("label").to_pylist()], table.schema.field("label").type)
    pq.write_table(table.set_column(table.column_names.index("label"), "label", labels), task, **plain)
    os.utime(task, ns=(st.st_atime_ns, st.st_mtime_ns))  # and its old time put back
    assert task.stat().st_size == st.st_size
    assert ds.fingerprint != fingerprint and trained_data_id(ds) != data_id


def test_file_digests_are_remembered_with_their_stat(tiny_dataset, tmp_path, monkeypatch):
    """Hashing a paper-scale dataset takes seconds per gigabyte: a later process reads the digests the cache folder
    remembers for files whose stat has not moved, and reads a file again once it has."""
    import json

    copy = tmp_path / "copy"
    shutil.copytree(tiny_dataset, copy, ignore=shutil.ignore_patterns(".qanchor_cache"))
    ds = qanchor.load_dataset(copy)
    assert ds.num_users == 40
    first = ds.fingerprint
    memo = copy / ".qanchor_cache" / "file-digests.json"
    assert memo.is_file()
    read = []
    real = dataset_mod.file_sha256
    monkeypatch.setattr(dataset_mod, "file_sha256", lambda path: read.append(path) or real(path))
    monkeypatch.setattr(dataset_mod, "_known_digests", {})  # a new process
    assert ds.fingerprint == first and read == []
    part = next((copy / "events").glob("*.parquet"))
    part.write_bytes(part.read_bytes())  # its stat moves: read again, the same digest
    assert ds.fingerprint == first and read == [part]
    saved = json.loads(memo.read_text())
    saved[str(part.resolve())][-1] = "0" * 64  # a memo entry that no longer matches its file's bytes ...
    saved[str(part.resolve())][0] += 1  # ... is recognised by its stat, which does not match either
    memo.write_text(json.dumps(saved))
    monkeypatch.setattr(dataset_mod, "_known_digests", {})
    assert ds.fingerprint == first and read == [part, part]
    memo.write_text("{damaged")  # only a memo: rebuilt
    monkeypatch.setattr(dataset_mod, "_known_digests", {})
    assert ds.fingerprint == first
    assert json.loads(memo.read_text())[str(part.resolve())][-1] == real(part)
    memo.write_text("[" * 200_000)  # nested past the JSON reader's recursion limit: a RecursionError, not a ValueError
    monkeypatch.setattr(dataset_mod, "_known_digests", {})
    assert ds.fingerprint == first
    memo.unlink()
    memo.mkdir()  # a folder by the memo's name: the digests stand, the memo is not kept, nothing is said
    monkeypatch.setattr(dataset_mod, "_known_digests", {})
    assert ds.fingerprint == first and memo.is_dir()
