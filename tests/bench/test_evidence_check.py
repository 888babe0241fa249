"""benchmarks/evidence_check.py: the query evidence of the kept events and of the whole history, read from the data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.helpers import copy_dataset, load_benchmark


@pytest.fixture(scope="module")
def ec():
    return load_benchmark("evidence_check")


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def test_scoped_keeps_the_most_recent_cap_or_everything(ec):
    rows = np.arange(10)
    np.testing.assert_array_equal(ec.scoped(rows, 3), [7, 8, 9])  # oldest first: the last rows are the newest
    np.testing.assert_array_equal(ec.scoped(rows, 50), rows)
    assert ec.scoped(rows, None) is rows


def test_an_old_relevant_event_is_evidence_only_in_the_whole_history(ec):
    """User a's one event that matches the question is older than the cap: the kept scope's strongest relevance is an
    unrelated event's, the whole history's is that event's. User b has no events: zeros, as the model gives."""
    rng = np.random.default_rng(0)
    vectors = _unit(rng.normal(size=(40, 16)))
    query = vectors[0:1].copy()  # the question's vector is text 0's
    events = {"a": {"bill": np.array([0, *range(10, 20)])},  # text 0 first (oldest), then ten others
              "b": {"bill": np.zeros(0, np.int64)},
              "c": {"bill": np.arange(20, 40)}}
    caps = {"bill": 5}
    kept = ec.evidence_table(ec.fit_evidence(["bill"], vectors, events, caps), vectors, events, ["a", "b", "c"],
                             query, caps)
    whole_evidence = ec.fit_evidence(["bill"], vectors, events, None)
    whole = ec.evidence_table(whole_evidence, vectors, events, ["a", "b", "c"], query, None)
    assert kept.shape == whole.shape == (3, 1, 7)
    top = 0  # EVIDENCE_FEATURES[0]: the strongest relevance
    assert whole[0, 0, top] > kept[0, 0, top] + 1.0
    np.testing.assert_array_equal(whole[1], 0.0)
    np.testing.assert_array_equal(kept[1], 0.0)
    # The model's own summaries of the same events, in one padded batch: the table is exactly them.
    padded = torch.zeros(3, 20, 16)
    mask = torch.zeros(3, 20, dtype=torch.bool)
    for i, u in enumerate("abc"):
        rows = events[u]["bill"]
        padded[i, : len(rows)] = torch.from_numpy(vectors[rows])
        mask[i, : len(rows)] = True
    batch = whole_evidence.features_of({"bill": (padded, mask)}, torch.from_numpy(query[0]))
    np.testing.assert_allclose(whole[:, 0], batch.numpy(), rtol=1e-5, atol=1e-5)


def test_the_rows_tell_evidence_that_adds_to_the_counts_from_evidence_that_does_not(ec):
    rng = np.random.default_rng(1)
    n = 600
    rfm = rng.normal(size=(n, 3))
    evidence = rng.normal(size=(n, 7))
    folds = [(np.setdiff1d(np.arange(n), t), t) for t in np.array_split(rng.permutation(n), 5)]
    by_evidence = (evidence[:, 0] + 0.3 * rng.normal(size=n) > 0).astype(int)
    rows = ec.compare(rfm, evidence, evidence, rng.normal(size=(n, 7)), by_evidence, folds)
    assert set(rows) == set(ec.ROWS)
    assert rows["rfm"][0] < 0.6 and rows["rfm_evidence_whole"][0] > 0.9 and rows["evidence_whole"][0] > 0.9
    assert rows["rfm_evidence_generic"][0] < 0.6  # another question's evidence does not stand in for the task's
    by_counts = (rfm[:, 0] + 0.3 * rng.normal(size=n) > 0).astype(int)
    rows = ec.compare(rfm, evidence, evidence, evidence, by_counts, folds)
    assert rows["rfm"][0] > 0.9 and rows["evidence_whole"][0] < 0.6
    assert rows["rfm_evidence_whole"][0] == pytest.approx(rows["rfm"][0], abs=0.02)


def test_main_reads_the_caps_from_the_config_and_scores_every_task(ec, tiny_dataset, tmp_path, monkeypatch):
    from tests.model.helpers import encoder

    ds_dir = copy_dataset(tiny_dataset, tmp_path / "ds")
    config = tmp_path / "pretrain.yaml"
    config.write_text("data:\n  default_max_events: 2\n  max_events: {bill: 3}\n")
    result = ec.run(str(ds_dir), str(config), "What kind of user is this?", folds=3, encoder=encoder())
    assert result["caps"] == {"bill": 3, "app": 2, "search": 2}
    assert set(result["per_task"]) == {"churn", "coupon"}
    for key in ec.ROWS:
        assert 0.0 <= result[key]["auc"] <= 1.0 and 0.0 <= result[key]["ks"] <= 1.0
    out = tmp_path / "ec.json"
    monkeypatch.setattr(ec, "run", lambda *a, **k: result)  # main's own plumbing, without encoding the dataset twice
    assert ec.main(["--data", str(ds_dir), "--config", str(config), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["caps"] == result["caps"]


def test_a_cap_for_a_modality_the_data_lacks_is_refused(ec, tiny_dataset, tmp_path):
    config = tmp_path / "pretrain.yaml"
    config.write_text("data:\n  max_events: {purchase: 48}\n")
    with pytest.raises(SystemExit, match=r"purchase.*does not have"):
        ec.run(str(tiny_dataset), str(config), "What kind of user is this?")


def test_a_task_of_your_own_and_a_dataset_without_tasks(ec, tiny_dataset, tmp_path):
    """On own data with only a labels file the README's check ended in a traceback ("pass labels= and query=", options
    the script lacked); it takes --labels / --query, and a refusal is one error line."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    from tests.model.helpers import encoder

    ds_dir = copy_dataset(tiny_dataset, tmp_path / "ds")
    manifest = yaml.safe_load((ds_dir / "manifest.yaml").read_text())
    manifest.pop("tasks")
    (ds_dir / "manifest.yaml").write_text(yaml.safe_dump(manifest))
    for path in (ds_dir / "tasks").glob("*.parquet"):
        path.unlink()
    with pytest.raises(SystemExit, match="^error: dataset .* declares no tasks"):
        ec.main(["--data", str(ds_dir)])
    ids = [f"u{u:03d}" for u in range(1, 40)]
    pq.write_table(pa.table({"user_id": ids, "label": [u % 2 for u in range(1, 40)]}), tmp_path / "bikes.parquet")
    result = ec.run(str(ds_dir), None, "What kind of user is this?", folds=3, encoder=encoder(),
                    labels=str(tmp_path / "bikes.parquet"), query="Will this user buy a bike?")
    assert list(result["per_task"]) == ["bikes"] and result["queries"] == {"bikes": "Will this user buy a bike?"}
    with pytest.raises(SystemExit, match="--labels and --query together"):
        ec.run(str(ds_dir), None, "q?", labels=str(tmp_path / "bikes.parquet"))
