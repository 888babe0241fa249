"""Daily update: only touched modalities re-encode, the result equals a full recompute, others carry over."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from qanchor.data.dataset import EventSeq, UserRecord, order_key
from qanchor.data.history import events_before
from qanchor.data.io import OutputKind, claim_output_dir
from qanchor.data.schema import events_table
from qanchor.errors import CheckpointError, ConfigError, DataValidationError, ModelInputError, OutputError
from qanchor.infer.api import QAnchor
from qanchor.infer.export import read_embeddings
from qanchor.infer.index import check_index_target
from qanchor.infer.state import StateMeta, link_shard, records_from_events
from qanchor.infer.update import init_state, update_state
from qanchor.model.factory import ModelMeta, save_checkpoint
from qanchor.train.pretrain import fit_evidence_stats, fit_input_stats
from tests.conftest import QUERIES
from tests.model.helpers import model_and_stream, tiny_cfg

PAIRS = [(f"q{i}", q) for i, q in enumerate(QUERIES)]
CUTOFF_US = int(np.datetime64("2024-06-30T00:00:00", "us").astype(np.int64))
HOUR = 3_600 * 1_000_000


def day_events(env, rows: list[tuple[str, str, int, str]]) -> pa.Table:
    cols = {"user_id": [r[0] for r in rows], "modality": [r[1] for r in rows], "ts": [r[2] for r in rows],
            "text": [r[3] for r in rows], "value": [5.0 if r[1] == "bill" else None for r in rows]}
    return events_table(env.ds.manifest, cols)


def expected(env, new: pa.Table, user_ids: list[str], cutoff: str | None = None) -> np.ndarray:
    """A full recompute: every dataset event plus the new ones, packed from scratch."""
    old = pa.concat_tables([pq.read_table(p) for p in sorted((env.ds_dir / "events").glob("*.parquet"))])
    both = pa.concat_tables([old.cast(new.schema), new])
    recs = records_from_events(both.filter(pc.is_in(both.column("user_id"), pa.array(user_ids))), env.ds.manifest)
    recs = {u: recs.get(u, UserRecord(u, {})) for u in user_ids}  # u000 has no events at all
    for uid, rec in recs.items():
        rec.tabular = env.ds.user(uid).tabular if uid in set(env.ds.user_ids) else None
    return env.qa.embed([recs[u] for u in user_ids], QUERIES, cutoff=cutoff)


def embeddings(state) -> dict[str, np.ndarray]:
    users, _, vecs = read_embeddings(state)
    return {u: vecs[i : i + len(QUERIES)] for i, u in enumerate(users) if i % len(QUERIES) == 0}  # (Q, D) each


def token(state, user: str) -> dict[str, np.ndarray]:
    table = pq.read_table(state / "encodings" / "part-00000.parquet")
    table = table.filter(pc.equal(table.column("user_id"), user))
    return {m: np.asarray(t) for m, t in zip(table.column("modality").to_pylist(), table.column("modality_token").to_pylist())}


@pytest.fixture(scope="module")
def state0(infer_env, tmp_path_factory):
    out = tmp_path_factory.mktemp("state") / "s0"
    report = init_state(infer_env.qa, infer_env.ds, PAIRS, out, progress=False)
    return out, report


def test_first_state_equals_embed(infer_env, state0):
    out, report = state0
    assert report.users_total == infer_env.ds.num_users and report.modality_encodings_skipped == 0
    got = embeddings(out)
    direct = infer_env.qa.embed(infer_env.ds.users(), QUERIES)
    assert list(got) == list(infer_env.ds.user_ids)
    assert max(np.abs(got[u] - direct[i]).max() for i, u in enumerate(got)) < 1e-5


def test_late_events_reencode_only_touched_modalities(infer_env, state0, tmp_path):
    rows = [("u001", "bill", CUTOFF_US - 2 * HOUR, "Bookshop"), ("u002", "app", CUTOFF_US - 3 * HOUR, "Opened Alipay"),
            ("u002", "search", CUTOFF_US - HOUR, "loan"), ("u005", "search", CUTOFF_US - HOUR, "cheap flights"),
            ("u999", "bill", CUTOFF_US - 5 * HOUR, "Coffee shop")]
    new = day_events(infer_env, rows)
    pq.write_table(new, tmp_path / "day.parquet")
    report = update_state(infer_env.qa, state0[0], [tmp_path / "day.parquet"], tmp_path / "s1", progress=False)
    n_mod = 4  # bill, app, search, tabular
    assert (report.users_changed, report.users_new, report.llm_prefixes_run) == (4, 1, 4)
    assert report.users_new_without_tabular == 1  # u999: an update reads events only; the report says so
    assert report.modality_encodings_run == 1 + 2 + 1 + n_mod and report.age_shift_days == 0
    assert report.modality_encodings_skipped == (infer_env.ds.num_users + 1) * n_mod - report.modality_encodings_run
    before, after = embeddings(state0[0]), embeddings(tmp_path / "s1")
    changed = ["u001", "u002", "u005", "u999"]
    want = expected(infer_env, new, changed)
    assert max(np.abs(after[u] - want[i]).max() for i, u in enumerate(changed)) < 1e-5
    assert all(np.array_equal(after[u], before[u]) for u in before if u not in changed)  # carried over bitwise
    buffer = pq.read_table(tmp_path / "s1" / "buffer" / "part-00000.parquet")
    bill = buffer.filter(pc.and_(pc.equal(buffer.column("user_id"), "u001"), pc.equal(buffer.column("modality"), "bill")))
    assert bill.num_rows == 8 and bill.column("text").to_pylist()[-1] == "Bookshop"  # rolling buffer of max_events


def test_next_day_full_refresh_equals_recompute(infer_env, state0, tmp_path):
    new = day_events(infer_env, [("u003", "app", CUTOFF_US + 10 * HOUR, "Installed TikTok")])
    pq.write_table(new, tmp_path / "day.parquet")
    light = update_state(infer_env.qa, state0[0], [tmp_path / "day.parquet"], tmp_path / "s1", progress=False)
    assert light.age_shift_days == 1.0 and light.as_of.startswith("2024-07-01") and light.shards_rewritten == 1
    full = update_state(infer_env.qa, state0[0], [tmp_path / "day.parquet"], tmp_path / "s1f", full=True, progress=False)
    users = list(infer_env.ds.user_ids)
    assert full.llm_prefixes_run == len(users) and full.modality_encodings_run == len(users) * 3  # tabular is kept
    got, want = embeddings(tmp_path / "s1f"), expected(infer_env, new, users, cutoff=full.as_of)
    assert max(np.abs(got[u] - want[i]).max() for i, u in enumerate(users)) < 1e-5
    light_enc, full_enc, old_enc = (token(d, "u003") for d in (tmp_path / "s1", tmp_path / "s1f", state0[0]))
    assert np.abs(light_enc["app"] - full_enc["app"]).max() < 1e-6  # the touched modality: encoded at the new as_of
    assert np.array_equal(light_enc["bill"], old_enc["bill"])  # skipped: yesterday's ages (the documented drift)
    assert np.abs(embeddings(tmp_path / "s1")["u003"] - want[3]).max() < 1e-2
    history = json.loads((tmp_path / "s1f" / "state.json").read_text())["history"]
    assert len(history) == 2


def test_update_progress_moves_per_batch_of_users(infer_env, state0, tmp_path, monkeypatch):
    """The counter moved once per shard, and a state of one partition is one shard: a full update over thousands of
    users ran silent for minutes on a cluster log."""
    from qanchor.infer import update as update_mod

    steps = []

    class Counting(update_mod.Progress):
        def update(self, n: int = 1) -> None:
            steps.append(n)
            super().update(n)

    monkeypatch.setattr(update_mod, "Progress", Counting)
    new = day_events(infer_env, [("u003", "app", CUTOFF_US + 10 * HOUR, "Installed TikTok")])
    pq.write_table(new, tmp_path / "day.parquet")
    full = update_state(infer_env.qa, state0[0], [tmp_path / "day.parquet"], tmp_path / "s1", full=True, progress=False)
    assert sum(steps) == full.llm_prefixes_run == infer_env.ds.num_users  # every re-encoded user counted once
    assert len(steps) >= full.llm_prefixes_run // infer_env.qa.batch_size > 1  # in batches, within the one shard


def test_no_events_links_shards_and_bad_inputs_refused(infer_env, state0, tmp_path):
    quiet = day_events(infer_env, [])  # a quiet day's file holds no rows: zero events, not "export it again"
    pq.write_table(quiet, tmp_path / "quiet.parquet")
    report = update_state(infer_env.qa, state0[0], [tmp_path / "quiet.parquet"], tmp_path / "s1", progress=False)
    assert report.shards_linked == 1 and report.modality_encodings_run == 0 and report.events_received == 0
    late = day_events(infer_env, [("u001", "bill", CUTOFF_US + 30 * HOUR, "Bookshop")])
    pq.write_table(late, tmp_path / "late.parquet")
    with pytest.raises(DataValidationError, match="not before as_of 2024-07-01"):
        update_state(infer_env.qa, state0[0], [tmp_path / "late.parquet"], tmp_path / "s2", as_of="2024-07-01", progress=False)
    with pytest.raises(ConfigError, match="must differ"):
        update_state(infer_env.qa, state0[0], [], state0[0], progress=False)
    meta = json.loads((tmp_path / "s1" / "state.json").read_text())
    (tmp_path / "s1" / "state.json").write_text(json.dumps({**meta, "checkpoint": "f" * 64}))
    with pytest.raises(CheckpointError, match="rebuild the state"):
        update_state(infer_env.qa, tmp_path / "s1", [], tmp_path / "s3", progress=False)


def test_a_replayed_day_changes_nothing(infer_env, state0, tmp_path):
    """A retried daily job, or a day's file given again, must not count its events twice; identical events of one day
    (two identical purchases) are both kept the first time and both skipped on the replay."""
    rows = [("u001", "bill", CUTOFF_US + 2 * HOUR, "Bookshop"), ("u001", "bill", CUTOFF_US + 2 * HOUR, "Bookshop"),
            ("u004", "app", CUTOFF_US + 3 * HOUR, "Opened Alipay")]
    pq.write_table(day_events(infer_env, rows), tmp_path / "day.parquet")
    first = update_state(infer_env.qa, state0[0], [tmp_path / "day.parquet"], tmp_path / "s1", progress=False)
    assert (first.users_changed, first.events_already_in_state) == (2, 0)

    def bill_texts(state) -> list[str]:
        buffer = pq.read_table(state / "buffer" / "part-00000.parquet")
        keep = pc.and_(pc.equal(buffer.column("user_id"), "u001"), pc.equal(buffer.column("modality"), "bill"))
        return buffer.filter(keep).column("text").to_pylist()

    assert bill_texts(tmp_path / "s1")[-2:] == ["Bookshop", "Bookshop"]
    replay = update_state(infer_env.qa, tmp_path / "s1", [tmp_path / "day.parquet"], tmp_path / "s2", progress=False)
    assert (replay.events_received, replay.events_already_in_state, replay.users_changed) == (3, 3, 0)
    assert replay.shards_linked == 1 and replay.modality_encodings_run == 0
    assert pq.read_table(tmp_path / "s2" / "buffer" / "part-00000.parquet").equals(
        pq.read_table(tmp_path / "s1" / "buffer" / "part-00000.parquet"))
    before, after = embeddings(tmp_path / "s1"), embeddings(tmp_path / "s2")
    assert all(np.array_equal(after[u], before[u]) for u in before)
    # a file that repeats one event and brings one new: only the new one counts
    more = [rows[0], ("u001", "bill", CUTOFF_US + 5 * HOUR, "Taxi")]
    pq.write_table(day_events(infer_env, more), tmp_path / "more.parquet")
    mixed = update_state(infer_env.qa, tmp_path / "s1", [tmp_path / "more.parquet"], tmp_path / "s3", progress=False)
    assert (mixed.events_already_in_state, mixed.users_changed) == (1, 1)
    assert bill_texts(tmp_path / "s3")[-3:] == ["Bookshop", "Bookshop", "Taxi"]
    with pytest.raises(ModelInputError, match="given twice"):
        update_state(infer_env.qa, state0[0], [tmp_path / "day.parquet", tmp_path / "." / "day.parquet"], tmp_path / "s4",
                     progress=False)


def test_tabular_rows_reach_new_users_and_refresh_known_ones(infer_env, state0, tmp_path, capsys):
    """An update read events only: a user first seen in it had no tabular values, for good. tabular=FILE gives them
    (and new values for a known user): the update then equals a recompute with those values."""
    rows = [("u999", "bill", CUTOFF_US - 5 * HOUR, "Coffee shop"), ("u998", "app", CUTOFF_US - 4 * HOUR, "Opened Alipay")]
    new = day_events(infer_env, rows)
    pq.write_table(new, tmp_path / "day.parquet")
    table = pa.table({"user_id": ["u999", "u002"], "income": [61.0, 12.5], "age": pa.array([33.0, None])})  # by name
    pq.write_table(table, tmp_path / "tab.parquet")
    report = update_state(infer_env.qa, state0[0], [tmp_path / "day.parquet"], tmp_path / "s1", tabular=tmp_path / "tab.parquet")
    assert (report.users_new, report.users_changed, report.users_new_without_tabular) == (2, 3, 1)  # u998: no row
    assert "1 users first seen in this update have no tabular values" in capsys.readouterr().err
    got = embeddings(tmp_path / "s1")
    recs = records_from_events(new, infer_env.ds.manifest)
    u002 = infer_env.ds.user("u002")
    want = infer_env.qa.embed([UserRecord("u999", recs["u999"].events, np.array([33.0, 61.0], np.float32)),
                               UserRecord("u998", recs["u998"].events, None),
                               UserRecord("u002", u002.events, np.array([np.nan, 12.5], np.float32))], QUERIES)
    assert list(infer_env.ds.tabular_columns) == ["age", "income"]
    assert max(np.abs(got[u] - want[i]).max() for i, u in enumerate(["u999", "u998", "u002"])) < 1e-5
    assert np.abs(got["u002"] - embeddings(state0[0])["u002"]).max() > 1e-4  # the new values did change it
    pq.write_table(table.slice(0, 0), tmp_path / "none.parquet")  # a day without new or changed rows
    quiet = update_state(infer_env.qa, tmp_path / "s1", [], tmp_path / "s3", tabular=tmp_path / "none.parquet")
    assert quiet.users_changed == 0 and quiet.shards_linked == 1
    pq.write_table(pa.table({"user_id": ["u999"], "income": [1.0]}), tmp_path / "short.parquet")
    with pytest.raises(DataValidationError, match=r"short.parquet.*missing \['age'\]"):
        update_state(infer_env.qa, state0[0], [], tmp_path / "s2", tabular=tmp_path / "short.parquet", progress=False)


def test_an_old_day_replayed_after_the_cap_pushed_it_out_changes_nothing(infer_env, state0, tmp_path):
    """With capped buffers (8 bill events here) a day's oldest event can be pushed out by its own later ones; replayed
    after the date moved on, that event is not found in the buffer, and counting it as new re-encoded the user at the
    later as_of. It can never be kept, so it is skipped and counted."""
    day1 = [("u001", "bill", CUTOFF_US + (i + 1) * HOUR, f"Shop {i}") for i in range(9)]
    pq.write_table(day_events(infer_env, day1), tmp_path / "day1.parquet")
    update_state(infer_env.qa, state0[0], [tmp_path / "day1.parquet"], tmp_path / "s1", progress=False)
    pq.write_table(day_events(infer_env, [("u004", "app", CUTOFF_US + 30 * HOUR, "Opened Alipay")]), tmp_path / "day2.parquet")
    moved = update_state(infer_env.qa, tmp_path / "s1", [tmp_path / "day2.parquet"], tmp_path / "s2", progress=False)
    assert moved.age_shift_days == 1.0
    replay = update_state(infer_env.qa, tmp_path / "s2", [tmp_path / "day1.parquet"], tmp_path / "s3", progress=False)
    assert (replay.events_already_in_state, replay.events_before_kept_window, replay.users_changed) == (8, 1, 0)
    before, after = embeddings(tmp_path / "s2"), embeddings(tmp_path / "s3")
    assert all(np.array_equal(after[u], before[u]) for u in before)


def test_a_first_state_as_of_an_earlier_day_holds_only_what_happened_before_it(infer_env, state0, tmp_path):
    """A state as of T keeps no later event (it used to keep them, describe its users as of later, and skip those
    days as already held when they were applied); applying them brings it to the dataset's state."""
    as_of_us = CUTOFF_US - 5 * 24 * HOUR
    report = init_state(infer_env.qa, infer_env.ds, PAIRS, tmp_path / "s0", as_of="2024-06-25T00:00:00+00:00",
                        progress=False)
    assert report.users_total == infer_env.ds.num_users
    buffer = pq.read_table(tmp_path / "s0" / "buffer" / "part-00000.parquet")
    assert pc.max(buffer.column("ts").cast(pa.int64())).as_py() < as_of_us
    cut = [UserRecord(r.user_id, {m: s for m, s in ((m, events_before(s, as_of_us)) for m, s in r.events.items()) if len(s)},
                      r.tabular) for r in infer_env.ds.users()]
    want, got = infer_env.qa.embed(cut, QUERIES, cutoff="2024-06-25T00:00:00+00:00"), embeddings(tmp_path / "s0")
    assert max(np.abs(got[u] - want[i]).max() for i, u in enumerate(infer_env.ds.user_ids)) < 1e-5
    events = pa.concat_tables([pq.read_table(p) for p in sorted((infer_env.ds_dir / "events").glob("*.parquet"))])
    later = events.filter(pc.greater_equal(events.column("ts").cast(pa.int64()), as_of_us))
    assert later.num_rows > 0
    pq.write_table(later, tmp_path / "later.parquet")
    caught_up = update_state(infer_env.qa, tmp_path / "s0", [tmp_path / "later.parquet"], tmp_path / "s1",
                             as_of="2024-06-30T00:00:00+00:00", full=True, progress=False)
    assert caught_up.events_already_in_state == 0
    assert caught_up.users_changed == len(set(later.column("user_id").to_pylist()))
    now, direct = embeddings(tmp_path / "s1"), embeddings(state0[0])
    assert max(np.abs(now[u] - direct[u]).max() for u in direct) < 1e-5


def test_an_update_never_replaces_a_state_holding_files_of_the_users(infer_env, state0, tmp_path):
    """A state is replaced whole: one that also holds the user's notes, or an index built into it, is refused (they
    were deleted without a word), and an index may not be built inside a state (tomorrow's update replaces it)."""
    target = tmp_path / "s1"
    shutil.copytree(state0[0], target)
    (target / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="notes.txt"):
        update_state(infer_env.qa, state0[0], [], target, progress=False)
    assert (target / "notes.txt").read_text() == "mine"
    with pytest.raises(OutputError, match="inside"):
        check_index_target(target / "churn.faiss")
    claim_output_dir(tmp_path / "run", OutputKind.RUN)  # a run or a bench folder is written into, never replaced whole
    check_index_target(tmp_path / "run" / "ix" / "churn.faiss")
    (target / "notes.txt").unlink()
    assert update_state(infer_env.qa, state0[0], [], target, progress=False).users_total == infer_env.ds.num_users
    with pytest.raises(ModelInputError, match="checkpoint=CKPT data.path=DATASET queries=FILE out=DIR"):
        update_state(infer_env.qa, tmp_path, [], tmp_path / "s2", progress=False)  # not a state: says how to build one


def test_a_bfloat16_backbone_keeps_a_state_that_equals_embed(tiny_dataset, tmp_path):
    """`model.backbone.dtype=bfloat16` (the usual GPU setting) with float32 adapters: the cached encodings go back
    into the float32 user encoder, not in the backbone's dtype (which failed: "mat1 and mat2 must have the same
    dtype")."""
    ds_dir = tmp_path / "ds"
    shutil.copytree(tiny_dataset, ds_dir, ignore=shutil.ignore_patterns(".qanchor_cache"))
    cfg = tiny_cfg(["model.backbone.dtype=bfloat16"])
    model, tokenizer, stream, ds, pipe, _ = model_and_stream(ds_dir, cfg)
    meta = ModelMeta(ds.manifest.to_dict(), pipe.cache.dim, {}, list(ds.tabular_columns))
    qa = QAnchor.from_pretrained(save_checkpoint(tmp_path / "ck", model, tokenizer, cfg, meta),
                                 text_cache_dir=ds.text_cache_dir, batch_size=4)
    assert qa.model.embed_tokens.weight.dtype == torch.bfloat16
    init_state(qa, ds, PAIRS, tmp_path / "s0", progress=False)
    got = np.stack(list(embeddings(tmp_path / "s0").values()))
    assert np.abs(got - qa.embed(ds.users(), QUERIES)).max() < 2e-2  # bfloat16: both read the same prefix


# What the modality tokens read of the whole history: its statistics, or (with the window statistics) its mean text
# vector, whose content components the statistics path then reads too
WHOLE_HISTORY = {"statistics": ["model.user_encoder.summary_stats=history"],
                 "text": ["model.user_encoder.summary_text=history", "data.history_text=true",
                          "model.user_encoder.content_components=4", "model.user_encoder.content_use=path"]}


@pytest.fixture(scope="module", params=sorted(WHOLE_HISTORY))
def history_env(tiny_dataset, tmp_path_factory, request) -> SimpleNamespace:
    """A checkpoint whose modality tokens read the whole history (its statistics, or its mean text vector), with a
    query-gated statistics path and query evidence (so the state must also keep the kept events' text vectors)."""
    root = tmp_path_factory.mktemp("history")
    ds_dir = root / "ds"
    shutil.copytree(tiny_dataset, ds_dir, ignore=shutil.ignore_patterns(".qanchor_cache"))
    cfg = tiny_cfg([*WHOLE_HISTORY[request.param], "model.statistics_path=gated", "model.query_evidence=true"])
    model, tokenizer, stream, ds, pipe, _ = model_and_stream(ds_dir, cfg)
    fit_input_stats(model, ds, pipe)
    fit_evidence_stats(model, stream, 4, 8)
    with torch.no_grad():  # a trained gate is not the identity
        model.statistics_path.gate.weight.normal_(0.0, 0.5)
    meta = ModelMeta(ds.manifest.to_dict(), pipe.cache.dim, {}, list(ds.tabular_columns))
    ckpt = save_checkpoint(root / "ck", model, tokenizer, cfg, meta)
    return SimpleNamespace(ds=ds, ds_dir=ds_dir, qa=QAnchor.from_pretrained(ckpt, text_cache_dir=ds.text_cache_dir, batch_size=4))


def test_a_whole_history_model_keeps_every_event(history_env, tmp_path):
    """Counts, tenure and active days over the whole history, and what its events were about, cannot come from the last
    max_events events: for a model that reads them the state keeps every event, so a day of late events gives what a
    full recompute gives."""
    env = history_env
    uid, modality, n = max(((r.user_id, m, len(seq)) for r in env.ds.users() for m, seq in r.events.items()),
                           key=lambda x: x[2])
    assert n >= 8 and uid != "u002"  # beyond the cap (data.default_max_events=8) once a late event arrives
    new = day_events(env, [(uid, modality, CUTOFF_US - 2 * HOUR, "Bookshop"), ("u002", "search", CUTOFF_US - HOUR, "loan")])
    pq.write_table(new, tmp_path / "day.parquet")
    init_state(env.qa, env.ds, PAIRS, tmp_path / "s0", progress=False)
    first = np.stack(list(embeddings(tmp_path / "s0").values()))
    assert np.abs(first - env.qa.embed(env.ds.users(), QUERIES)).max() < 1e-5
    update_state(env.qa, tmp_path / "s0", [tmp_path / "day.parquet"], tmp_path / "s1", progress=False)
    got, want = embeddings(tmp_path / "s1"), expected(env, new, [uid, "u002"])
    assert max(np.abs(got[u] - want[i]).max() for i, u in enumerate([uid, "u002"])) < 1e-5
    buffer = pq.read_table(tmp_path / "s1" / "buffer" / "part-00000.parquet")
    kept = buffer.filter(pc.and_(pc.equal(buffer.column("user_id"), uid), pc.equal(buffer.column("modality"), modality)))
    assert kept.num_rows == n + 1  # every event, not the cap of 8
    # the statistics path's input is cached per (user, modality) with the encodings, and read back for the prefix
    table = pq.read_table(tmp_path / "s1" / "encodings" / "part-00000.parquet")
    widths = {len(x) for x in table.column("statistics").to_pylist()}
    enc = env.qa.model.user_encoder
    sequence_width = enc.summary_width + 1 + (enc.content_components if enc.content_in_path else 0)
    assert widths == {sequence_width, 2 * len(env.ds.tabular_columns)}
    # and so are the kept events' text vectors, which the query evidence compares each query with
    dim = env.qa.pipeline.cache.dim
    for row in table.filter(pc.equal(table.column("user_id"), uid)).to_pylist():
        assert len(row["text_vectors"]) == (row["n"] * dim if row["modality"] != "tabular" else 0)


def test_a_model_that_reads_event_text_is_refused_a_state(infer_env, state0, tmp_path):
    """A `model.user_input=text` model reads users as lines of event text: a state of user-token encodings cannot
    serve it (its prefixes came out 0.36 away from `embed`), so building or updating one is refused by name."""
    from dataclasses import replace as dc_replace

    text = tiny_cfg(["model.max_query_tokens=16", "model.user_input=text", "data.text_events=5"])
    qa = QAnchor(infer_env.qa.model, infer_env.qa.tokenizer, infer_env.qa.meta,
                 dc_replace(infer_env.qa.run_cfg, model=text.model), text_cache=infer_env.cache)
    with pytest.raises(CheckpointError, match="reads users as event text.*qanchor embed"):
        init_state(qa, infer_env.ds, PAIRS, tmp_path / "s", progress=False)
    with pytest.raises(CheckpointError, match="reads users as event text"):
        update_state(qa, state0[0], [], tmp_path / "s1", progress=False)
    assert not (tmp_path / "s").exists() and not (tmp_path / "s1").exists()


def test_state_lists_have_64_bit_offsets_and_older_32_bit_states_still_read():
    """A shard's event tokens (users x kept events x hidden size) pass 2^31 floats at the paper's width: int32 offsets
    wrapped negative and `qanchor update` could not write the shard."""
    from qanchor.infer.modality_cache import Encoding
    from qanchor.infer.state import decode_encodings, encodings_table

    rng = np.random.default_rng(0)
    enc = {u: {"app": Encoding(rng.normal(size=(n, 4)).astype(np.float32), rng.normal(size=4).astype(np.float32), 7,
                               rng.normal(size=3).astype(np.float32), np.zeros(0, np.float32))}
           for u, n in (("a", 2), ("b", 0), ("c", 5))}
    table = encodings_table(enc, 4)
    assert table.schema.field("event_tokens").type == pa.large_list(pa.float32())
    old = table.cast(pa.schema([f.with_type(pa.list_(pa.float32())) if pa.types.is_large_list(f.type) else f
                                for f in table.schema]))  # as states were written before
    for t in (table, old, pa.concat_tables([old.cast(table.schema), table])):  # the update path upgrades old rows
        back = decode_encodings(t, {"a", "c"})
        for u in ("a", "c"):
            np.testing.assert_array_equal(back[u]["app"].events, enc[u]["app"].events)
            np.testing.assert_array_equal(back[u]["app"].statistics, enc[u]["app"].statistics)


def test_an_events_file_with_a_column_name_not_utf8_is_named(infer_env, tmp_path):
    """The row count read before validation raised UnicodeDecodeError: a traceback instead of the validator's line."""
    from qanchor.infer.update import read_events

    path = tmp_path / "day.parquet"
    new = day_events(infer_env, [("u001", "bill", CUTOFF_US - HOUR, "Bookshop")])
    pq.write_table(new.append_column("QQQQQ", pa.array([1.0])), path, store_schema=False)
    path.write_bytes(path.read_bytes().replace(b"QQQQQ", b"\xe2ge\xa0Q"))
    with pytest.raises(DataValidationError, match="column name is not valid UTF-8"):
        read_events([path], infer_env.qa, None)


def test_new_events_at_a_buffered_events_instant_equal_a_recompute(infer_env, state0, tmp_path):
    """The merge put the state's buffered events first among events of one instant, a full read put them in file row
    order: a day whose events shared a timestamp with the buffer's newest (a basket split across two loads) gave
    another embedding than a recompute from all the events."""
    last = infer_env.ds.user("u001").events["bill"]
    instant = int(last.ts[-1])
    texts = ["Aardvark deli", "Zebra bar", "Coffee shop", "Mid market", "Bakery", "Yoga club", "Night bus"]
    new = day_events(infer_env, [("u001", "bill", instant, t) for t in texts])
    pq.write_table(new, tmp_path / "day.parquet")
    update_state(infer_env.qa, state0[0], [tmp_path / "day.parquet"], tmp_path / "s1", progress=False)
    want = expected(infer_env, new, ["u001"])
    assert np.abs(embeddings(tmp_path / "s1")["u001"] - want[0]).max() < 1e-5
    buffer = pq.read_table(tmp_path / "s1" / "buffer" / "part-00000.parquet")
    bill = buffer.filter(pc.and_(pc.equal(buffer.column("user_id"), "u001"), pc.equal(buffer.column("modality"), "bill")))
    full = records_from_events(pa.concat_tables([
        pq.read_table(p).cast(new.schema) for p in sorted((infer_env.ds_dir / "events").glob("*.parquet"))] + [new]),
        infer_env.ds.manifest)["u001"].events["bill"]
    assert bill.column("text").to_pylist() == full.text[-bill.num_rows:]  # the recompute's newest, in its order


def test_a_replayed_basket_the_cap_cut_changes_nothing(infer_env, state0, tmp_path):
    """A full buffer that starts inside a basket (lines at one instant) did not hold the lines the cap cut, and the
    old test (older than the buffer's oldest) let them through: each replay of the day re-encoded the user, kept the
    replayed lines and dropped held ones, rotating the buffer away from a recompute."""
    instant = CUTOFF_US - 2 * HOUR  # before the state's as_of: the date does not move
    # ten lines, the third in event order twice: the cap of 8 cuts the first three and keeps the other copy
    lines = [f"Item {i}" for i in range(10)]
    lines.append(sorted(lines, key=lambda t: dataset_order_key(t, instant))[2])
    new = day_events(infer_env, [("u001", "bill", instant, t) for t in lines])
    pq.write_table(new, tmp_path / "day.parquet")
    update_state(infer_env.qa, state0[0], [tmp_path / "day.parquet"], tmp_path / "s1", progress=False)
    again = update_state(infer_env.qa, tmp_path / "s1", [tmp_path / "day.parquet"], tmp_path / "s2", progress=False)
    assert (again.users_changed, again.events_already_in_state, again.events_before_kept_window) == (0, 8, 3)
    want = expected(infer_env, new, ["u001"])[0]
    for state in ("s1", "s2"):
        assert np.abs(embeddings(tmp_path / state)["u001"] - want).max() < 1e-5, state


def test_a_model_built_in_code_never_updates_a_checkpoints_state(infer_env, state0, tmp_path):
    """Only two recorded hashes were compared: a model built in code (no checkpoint) updated a checkpoint's state
    unchecked, and the new state still named the checkpoint, which then accepted the mixed encodings."""
    import copy

    changed = copy.deepcopy(infer_env.qa.model)
    with torch.no_grad():
        for p in changed.user_encoder.parameters():
            p.add_(0.5)
    in_code = QAnchor(changed, infer_env.qa.tokenizer, infer_env.qa.meta, infer_env.qa.run_cfg,
                      text_cache=infer_env.qa.text_cache, batch_size=8)
    assert in_code.checkpoint_hash is None and in_code.weights_id().startswith("in-code:")
    new = day_events(infer_env, [("u001", "bill", CUTOFF_US - HOUR, "Taxi")])
    pq.write_table(new, tmp_path / "day.parquet")
    with pytest.raises(CheckpointError, match=r"built with checkpoint [0-9a-f]{12}, not this one \(a model built in code"):
        update_state(in_code, state0[0], [tmp_path / "day.parquet"], tmp_path / "s1", progress=False)
    assert not (tmp_path / "s1").exists()
    init_state(in_code, infer_env.ds, PAIRS, tmp_path / "mine", progress=False)
    with pytest.raises(CheckpointError, match="was built with a model built in code"):
        update_state(infer_env.qa, tmp_path / "mine", [tmp_path / "day.parquet"], tmp_path / "s2", progress=False)
    # nor another model built in code: two of them were both "no checkpoint", and compared equal
    other = copy.deepcopy(changed)
    with torch.no_grad():
        next(other.user_encoder.parameters()).add_(0.1)
    another = QAnchor(other, infer_env.qa.tokenizer, infer_env.qa.meta, infer_env.qa.run_cfg,
                      text_cache=infer_env.qa.text_cache, batch_size=8)
    with pytest.raises(CheckpointError, match=r"built with a model built in code \(weights [0-9a-f]{12}\), not this one"):
        update_state(another, tmp_path / "mine", [tmp_path / "day.parquet"], tmp_path / "s4", progress=False)
    update_state(in_code, tmp_path / "mine", [tmp_path / "day.parquet"], tmp_path / "s5", progress=False)  # its own
    (tmp_path / "days").mkdir()
    with pytest.raises(ModelInputError, match=r"days is a folder; give its Parquet files"):
        update_state(infer_env.qa, state0[0], [tmp_path / "days"], tmp_path / "s3", progress=False)


def dataset_order_key(text: str, ts: int) -> tuple:
    """Where a bill line with this text (value 5, no discount) falls among lines of one instant."""
    return order_key(EventSeq(np.array([ts]), [text], np.array([5.0], np.float32), np.full((1, 1), np.nan, np.float32)), 0)


def test_a_state_of_the_older_event_order_is_refused(state0, tmp_path):
    """A format-1 state's buffers kept a basket's lines in their file row order; updating one no longer equals a
    recompute, so it is refused with what to do."""
    import shutil as sh

    old = tmp_path / "old"
    sh.copytree(state0[0], old)
    meta = json.loads((old / "state.json").read_text())
    (old / "state.json").write_text(json.dumps({**meta, "format": 1}))
    with pytest.raises(ModelInputError, match="state format 1, this qanchor reads 2; rebuild it"):
        StateMeta.load(old)


def test_an_update_never_replaces_a_state_holding_files_of_the_users_in_its_folders(infer_env, state0, tmp_path):
    """Only the state's top-level names were checked, so a README in its embeddings/ or a folder of the user's in its
    buffer/ was deleted with the old state; a state's folders hold only its shards (and qanchor's temporaries)."""
    target = tmp_path / "s1"
    shutil.copytree(state0[0], target)
    (target / "embeddings" / "README.txt").write_text("mine")
    (target / "buffer" / "mine").mkdir()
    (target / "buffer" / "mine" / "f").write_text("mine too")
    with pytest.raises(OutputError, match=r"also 'buffer/mine', 'embeddings/README\.txt', which .*; replacing it would "
                                          r"delete them"):
        update_state(infer_env.qa, state0[0], [], target, progress=False)
    assert (target / "embeddings" / "README.txt").read_text() == "mine" and (target / "buffer" / "mine" / "f").exists()
    (target / "embeddings" / "README.txt").unlink()
    shutil.rmtree(target / "buffer" / "mine")
    (target / "encodings" / ".part-00000.parquet.qanchor-tmp.999999999-00000000.abcd").write_bytes(b"")  # a killed write's
    assert update_state(infer_env.qa, state0[0], [], target, progress=False).users_total == infer_env.ds.num_users
    assert sorted(p.name for p in (target / "encodings").iterdir()) == ["part-00000.parquet"]


def test_the_data_layer_knows_a_states_folders_as_the_state_writes_them():
    from qanchor.data.io import FOLDER_LAYOUT, SHARD_FILE
    from qanchor.infer.state import KINDS, shard_path

    assert set(FOLDER_LAYOUT[OutputKind.STATE]) == set(KINDS)
    assert all(SHARD_FILE.fullmatch(shard_path(Path("s"), kind, shard).name) for kind in KINDS for shard in (0, 123456))


def _without_u001(path: Path) -> None:
    table = pq.read_table(path)
    pq.write_table(table.filter(pc.not_equal(table.column("user_id"), "u001")), path)


@pytest.mark.parametrize("kind, how", [(k, h) for h in ("missing", "truncated") for k in ("buffer", "encodings", "embeddings")]
                         + [("embeddings", "rows"), ("encodings", "users")])
def test_a_state_missing_or_with_a_damaged_shard_file_is_refused(infer_env, state0, tmp_path, kind, how):
    """A missing shard file was read as an empty shard, or skipped when the shard was carried over: its users' buffers,
    encodings or embeddings were dropped from the next state without a word; a truncated one ended in a pyarrow
    traceback. Row counts that disagree with each other or state.json (a shard of another state copied in) are refused
    too."""
    state = tmp_path / "s0"
    shutil.copytree(state0[0], state)
    path = state / kind / "part-00000.parquet"
    if how == "missing":
        path.unlink()
        match = r"part-00000\.parquet is missing"
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        match = r"part-00000\.parquet is not a readable Parquet file"
    elif how == "rows":  # one user's embeddings lost
        _without_u001(path)
        match = r"encodings/part-00000\.parquet holds \d+ rows and .*embeddings/part-00000\.parquet \d+, which are not"
    else:  # one user lost from both
        _without_u001(path)
        _without_u001(state / "embeddings" / "part-00000.parquet")
        match = rf"its encodings hold {infer_env.ds.num_users - 1} users, and its state.json says {infer_env.ds.num_users}"
    with pytest.raises(ModelInputError, match=rf"the state .*s0 is damaged: .*{match}.*; rebuild it with `qanchor update"):
        update_state(infer_env.qa, state, [], tmp_path / "s1", progress=False)
    assert not (tmp_path / "s1").exists()
    if how == "missing":  # carrying a shard over refuses a missing file too, not skips it
        with pytest.raises(ModelInputError, match=match):
            link_shard(state, tmp_path / "s2", 0)
