"""benchmarks/uqa_habit_probe.py: habit labels match the topics' answers; the probe scores what the features hold."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qanchor.data.dataset import load_dataset
from qanchor.data.userU_topics import TOPICS, History
from qanchor.infer.api import events_before
from qanchor.infer.user_input import to_microseconds
from tests.helpers import load_benchmark


@pytest.fixture(scope="module")
def hp():
    return load_benchmark("uqa_habit_probe")


def test_labels_are_the_habits_the_topics_answer_and_timing_is_per_modality(hp, tiny_dataset):
    ds = load_dataset(tiny_dataset)
    cutoff = to_microseconds(ds.manifest.cutoff)
    labels, timing = hp.habit_labels(ds, cutoff)
    n_modalities = len(ds.manifest.sequence_modalities)
    assert set(timing) == set(ds.user_ids.tolist())
    assert all(v.shape == (5 * n_modalities,) for v in timing.values())
    assert not timing["u000"].any()  # user 0 has no events: no shares
    extras = {m.name: m.numeric_columns for m in ds.manifest.sequence_modalities}
    for topic in hp.HABIT_TOPICS:
        assert labels[topic], topic
        for user, value in labels[topic].items():
            h = History(events_before(ds.user(user).events, cutoff), cutoff, extras)
            assert value == hp.habit(topic, TOPICS[topic](h, np.random.default_rng(0)).answer)
    # Each modality's block shares (the first 4 of its 5) sum to 1 where it has events, 0 where it has none.
    block_sums = timing["u001"].reshape(n_modalities, 5)[:, :4].sum(1)
    assert np.all(np.isclose(block_sums, 1.0) | np.isclose(block_sums, 0.0)) and block_sums.max() == pytest.approx(1.0)
    # each block is that modality's own timing, not the user's events pooled; the labels vary from user to user
    from qanchor.data.history import timing_features

    for user in ("u001", "u004"):
        before = events_before(ds.user(user).events, cutoff)
        for k, m in enumerate(ds.manifest.sequence_modalities):
            np.testing.assert_allclose(timing[user].reshape(n_modalities, 5)[k], timing_features(before.get(m.name)))
    assert len(set(labels["time_of_day"].values())) > 1


def test_probe_reads_informative_features_and_majority_is_the_floor(hp):
    rng = np.random.default_rng(0)
    y = np.asarray(["evening"] * 60 + ["night"] * 25 + ["afternoon"] * 15, dtype=object)
    folds = [(np.setdiff1d(np.arange(100), t), t) for t in np.array_split(rng.permutation(100), 5)]
    onehot = (y[:, None] == np.asarray(["evening", "night", "afternoon"])[None]).astype(float)
    acc, bal = hp.probe_accuracy(onehot + 0.01 * rng.normal(size=onehot.shape), y, folds)
    assert acc == 1.0 and bal == 1.0
    acc, bal = hp.probe_accuracy(None, y, folds)
    assert acc == pytest.approx(0.6) and bal == pytest.approx(1 / 3)
    noise_acc, noise_bal = hp.probe_accuracy(rng.normal(size=(100, 8)), y, folds)
    assert noise_bal < 0.6


def test_rare_habits_are_dropped(hp):
    kept = hp.usable({"a": "x", "b": "x", "c": "y", "d": "x"}, 2)
    assert kept == {"a": "x", "b": "x", "d": "x"}


def test_run_on_a_checkpoint_reports_every_row(hp, infer_env, tmp_path):
    out = tmp_path / "probe.json"
    assert hp.main(["--checkpoints", str(infer_env.ckpt), "--data", str(infer_env.ds_dir), "--folds", "2",
                    "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["mean"] and (tmp_path / "probe.md").exists()
    for topic, rows in result["mean"].items():
        assert set(rows) == set(hp.ROWS)
        assert all(0.0 <= a <= 1.0 and 0.0 <= b <= 1.0 for a, b in rows.values()), (topic, rows)
        assert min(result["habits"][topic].values()) >= 2  # every habit kept has a user in each of the 2 folds
