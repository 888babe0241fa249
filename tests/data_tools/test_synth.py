"""The synthetic world: deterministic bytes, the declared shape, no leakage past the cutoff, known truth."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from data_tools import synth
from data_tools.synth import build_synthetic
from qanchor.data.manifest import Manifest, ModalityKind

N_USERS = 2000
SEQUENCE = {"bill", "mini", "spm", "app", "search"}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return build_synthetic(tmp_path_factory.mktemp("synth") / "ds", n_users=N_USERS, seed=7)


def _events(path: Path):
    return ds.dataset(path / "events", format="parquet").to_table()


def _file_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes_and_another_seed_differs(world, tmp_path):
    again = _file_bytes(build_synthetic(tmp_path / "again", n_users=N_USERS, seed=7))
    assert again == _file_bytes(world)
    other = _file_bytes(build_synthetic(tmp_path / "other", n_users=N_USERS, seed=8))
    assert other.keys() == again.keys()
    for name in ("events/part-00000.parquet", "tabular.parquet", "tasks/churn.parquet"):
        assert other[name] != again[name], name


def test_manifest_declares_six_modalities_ten_tasks_and_provenance(world):
    m = Manifest.load(world)
    assert m.name == "synth"
    assert {s.name for s in m.sequence_modalities} == SEQUENCE
    assert m.tabular is not None and m.tabular.kind is ModalityKind.TABULAR and len(m.modalities) == 6
    assert m.modality("bill").numeric_columns == ("discount",)
    assert len(m.tasks) == 10 and {t.domain.value for t in m.tasks} == {"engagement", "risk", "marketing"}
    assert all(t.query.endswith("?") and 30 <= t.label_window_days <= 90 for t in m.tasks)
    assert m.provenance == {"generator": "data_tools.synth", "seed": 7, "n_users": N_USERS, "history_days": 180}


def test_data_holds_every_modality_with_the_schema_types(world):
    events = _events(world)
    assert set(pc.unique(events["modality"]).to_pylist()) == SEQUENCE
    assert str(events.schema.field("ts").type) == "timestamp[us, tz=UTC]"
    assert events.schema.field("value").type == events.schema.field("discount").type == "float"
    per_user = events.num_rows / N_USERS
    assert 50 <= per_user <= 110, per_user
    bill = events.filter(pc.equal(events["modality"], "bill"))
    assert pc.min(bill["value"]).as_py() > 0 and 0.02 < 1 - bill["discount"].null_count / bill.num_rows < 0.3
    assert events.filter(pc.not_equal(events["modality"], "bill"))["discount"].null_count == events.num_rows - bill.num_rows
    tab = pq.read_table(world / "tabular.parquet")
    assert 30 <= tab.num_columns - 1 <= 40 and tab.schema.field("age").type == "float"
    missing = [tab[c].null_count / tab.num_rows for c in tab.column_names[1:]]
    assert all(0.05 < f < 0.25 for f in missing), missing


def test_events_lie_before_the_cutoff_within_the_history_window(world):
    ts = _events(world)["ts"]
    cutoff = Manifest.load(world).cutoff
    assert pc.max(ts).as_py() < cutoff
    assert pc.min(ts).as_py() >= cutoff - timedelta(days=180)


def test_custom_cutoff_and_window_are_respected(tmp_path):
    path = build_synthetic(tmp_path / "w", n_users=200, seed=1, cutoff="2023-01-15T12:00:00", history_days=10)
    cutoff = Manifest.load(path).cutoff
    ts = _events(path)["ts"]
    assert cutoff.isoformat() == "2023-01-15T12:00:00+00:00"
    assert cutoff - timedelta(days=10) <= pc.min(ts).as_py() and pc.max(ts).as_py() < cutoff


def test_users_miss_whole_modalities_events_and_tabular_rows(world):
    events = _events(world)
    has = {m: set(pc.unique(events.filter(pc.equal(events["modality"], m))["user_id"]).to_pylist()) for m in sorted(SEQUENCE)}
    for m in ("search", "spm", "mini"):
        assert 0.2 <= 1 - len(has[m]) / N_USERS <= 0.6, m
    silent = N_USERS - len(set().union(*has.values()))
    assert 0.003 * N_USERS <= silent <= 0.03 * N_USERS, silent
    tab_users = pq.read_table(world / "tabular.parquet").num_rows
    assert 0.85 * N_USERS <= tab_users <= 0.95 * N_USERS


def test_user_ids_are_padded_unique_and_each_part_sorted_by_user_then_time(tmp_path, monkeypatch):
    monkeypatch.setattr(synth, "PART_USERS", 300)  # several event files without a big build
    path = build_synthetic(tmp_path / "parts", n_users=1000, seed=3)
    files = sorted((path / "events").glob("*.parquet"))
    assert len(files) == 4
    seen: list[str] = []
    for f in files:
        t = pq.read_table(f)
        users = t["user_id"].to_numpy(zero_copy_only=False)
        ts = t["ts"].cast("int64").to_numpy()
        assert (users[:-1] <= users[1:]).all()
        same = users[:-1] == users[1:]
        assert (ts[:-1][same] <= ts[1:][same]).all()
        seen += list(dict.fromkeys(users))
    assert seen == sorted(seen) and len(seen) == len(set(seen))  # no user split across files
    labels = pq.read_table(path / "tasks" / "churn.parquet")["user_id"].to_pylist()
    assert labels[0] == "u000001" and labels[-1] == "u001000" and labels == sorted(labels)


def test_task_rates_and_prob_give_the_oracle_auc(world):
    for task in Manifest.load(world).tasks:
        t = pq.read_table(world / "tasks" / f"{task.name}.parquet")
        assert t.num_rows == N_USERS and t.schema.field("label").type == "int8"
        label, prob = t["label"].to_numpy(), t["prob"].to_numpy()
        assert 0.02 <= label.mean() <= 0.50, (task.name, label.mean())
        assert abs(label.mean() - prob.mean()) < 0.03, task.name  # labels were drawn from prob
        assert roc_auc_score(label, prob) > 0.65, task.name
    rates = [pq.read_table(world / "tasks" / f"{t.name}.parquet")["label"].to_numpy().mean() for t in Manifest.load(world).tasks]
    assert min(rates) < 0.06 and max(rates) > 0.30  # rare and common tasks both present


def test_the_redrawn_traits_are_the_ones_every_task_probability_was_drawn_from(world, tmp_path):
    """traits_of(world) recovers the hidden traits: each task's logit(prob) is exactly its bias + traits . weights, for
    every user; another seed's traits do not fit."""
    traits = synth.traits_of(world)
    assert len(traits) == N_USERS and all(v.shape == (len(synth.TRAITS),) for v in traits.values())
    wrong = dict(zip(synth.user_ids(N_USERS), synth.latent_traits(8, N_USERS)))
    for task in synth.TASKS:
        t = pq.read_table(world / "tasks" / f"{task.name}.parquet")
        ids, prob = t["user_id"].to_pylist(), t["prob"].to_numpy()
        w = synth._vec(task.weights)
        expected = synth._bias_for_rate(w, task.rate) + np.stack([traits[u] for u in ids]) @ w
        np.testing.assert_allclose(np.log(prob / (1 - prob)), expected, atol=1e-6, err_msg=task.name)
        off = synth._bias_for_rate(w, task.rate) + np.stack([wrong[u] for u in ids]) @ w
        assert np.abs(np.log(prob / (1 - prob)) - off).mean() > 0.1, task.name
    other = tmp_path / "not-synth"
    other.mkdir()
    manifest = Manifest.load(world)
    (other / "manifest.yaml").write_text((world / "manifest.yaml").read_text().replace("data_tools.synth", "elsewhere"))
    assert manifest.provenance["generator"] == "data_tools.synth"
    with pytest.raises(ValueError, match="not-synth.*data_tools.synth"):
        synth.traits_of(other)


def test_bias_tuning_hits_the_target_rate_in_expectation():
    for task in synth.TASKS:
        w = synth._vec(task.weights)
        traits = synth._rng(99, 0).multivariate_normal(np.zeros(len(synth.TRAITS)), synth.SIGMA, 200_000)
        rate = synth._sigmoid(synth._bias_for_rate(w, task.rate) + traits @ w).mean()
        assert abs(rate - task.rate) < 0.005, task.name


def test_rejects_an_empty_world(tmp_path):
    with pytest.raises(ValueError, match="n_users"):
        build_synthetic(tmp_path / "x", n_users=0, seed=0)


def test_a_world_of_one_user_is_a_valid_dataset(tmp_path):
    """Each user misses its tabular row, or all its events, with some probability: a one-user world whose user drew
    "no row" wrote a tabular file with no rows (seed 0), and one whose user drew "no events" wrote no events file
    (seed 25), and so did one whose user, kept from "no events", then missed every modality (seed 47); the validator
    refuses all three."""
    from qanchor.data.validate import validate_dataset

    for seed in (0, 1, 2, 25, 47):
        out = build_synthetic(tmp_path / f"one-{seed}", n_users=1, seed=seed)
        report = validate_dataset(out)
        assert report.n_tabular_users == 1 and report.n_events > 0


def test_the_dataset_validator_accepts_the_world(world):
    validate = pytest.importorskip("qanchor.data.validate").validate_dataset
    report = validate(world)
    assert set(report.events_per_modality) == SEQUENCE and min(report.events_per_modality.values()) > 0
    assert len(report.task_counts) == 10


def test_an_events_part_whose_users_are_all_silent_is_left_out_and_the_world_stays_valid(tmp_path, monkeypatch):
    """One user per part; seed 23 draws the third of four users with no events. That part has no rows, and the
    validator refuses an events file without rows: it is left out, the others are kept."""
    from qanchor.data.validate import validate_dataset

    monkeypatch.setattr(synth, "PART_USERS", 1)
    path = build_synthetic(tmp_path / "w", n_users=4, seed=23)
    rows = [pq.read_metadata(f).num_rows for f in sorted((path / "events").glob("*.parquet"))]
    assert len(rows) == 3 and min(rows) > 0
    report = validate_dataset(path)
    assert sum(report.events_per_modality.values()) == sum(rows)
