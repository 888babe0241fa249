"""benchmarks/quality_probe.py: the few-directions probe reads only the embedding's leading variation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.helpers import load_benchmark


@pytest.fixture(scope="module")
def qp():
    return load_benchmark("quality_probe")


def _folds(n: int, k: int, rng) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(np.setdiff1d(np.arange(n), t), t) for t in np.array_split(rng.permutation(n), k)]


def test_top_directions_are_the_principal_components(qp):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6)) * np.array([5.0, 3.0, 1.0, 0.5, 0.2, 0.1]) + 7.0
    z = qp.top_directions(x, 2)
    assert z.shape == (200, 2)
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-9)
    # The projection's variances are the covariance's top eigenvalues, its columns uncorrelated.
    eigenvalues = np.sort(np.linalg.eigvalsh(np.cov(x, rowvar=False)))[::-1]
    np.testing.assert_allclose(np.cov(z, rowvar=False), np.diag(eigenvalues[:2]), atol=1e-8)
    assert eigenvalues[0] > 20  # the loud axis, not a quiet one


def test_few_directions_miss_a_signal_in_a_quiet_direction(qp):
    """A label carried by a low-variance direction: the full probe reads it, the top direction does not."""
    rng = np.random.default_rng(1)
    n = 400
    y = rng.integers(0, 2, n)
    x = np.column_stack([rng.normal(size=n) * 10.0, y + 0.3 * rng.normal(size=n)])
    folds = _folds(n, 4, rng)
    full_auc, _ = qp.probe(x, y, folds)
    top_auc, _ = qp.probe(qp.top_directions(x, 1), y, folds)
    assert full_auc > 0.9 and top_auc < 0.6
    both_auc, _ = qp.probe(qp.top_directions(x, 2), y, folds)
    assert both_auc == pytest.approx(full_auc, abs=0.01)  # 2 of 2 directions: everything again


def test_run_reports_few_directions_for_every_query(qp, infer_env, tmp_path):
    out = tmp_path / "probe.json"
    assert qp.main(["--checkpoint", str(infer_env.ckpt), "--data", str(infer_env.ds_dir), "--folds", "2",
                    "--shuffle-batches", "0", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["top_directions"]) == {str(k) for k in qp.TOP_DIRECTIONS}
    for k, row in result["top_directions"].items():
        assert set(row) == {"task", "generic", "swapped"}
        assert all(0.0 <= v <= 1.0 for v in row.values()), (k, row)
    for task in result["tasks"]:
        assert set(result["per_task"][task]["top_directions"]) == {str(k) for k in qp.TOP_DIRECTIONS}
    assert "path_part" not in result and "path_to_deep_norm_ratio" not in result  # no statistics path here


def test_seed_summary_of_few_directions():
    qs = load_benchmark("quality_seeds")
    probes = [{"top_directions": {"1": {"task": 0.6, "generic": 0.5}, "8": {"task": 0.7, "generic": 0.7}}},
              {"top_directions": {"1": {"task": 0.8, "generic": 0.5}, "8": {"task": 0.7, "generic": 0.9}}},
              {"task": {"auc": 0.7, "ks": 0.3}}]  # written before the rows existed: left out
    few = qs.top_directions_summary(probes)
    assert few["1"]["task"] == {"auc_mean": pytest.approx(0.7), "auc_std_over_seeds": pytest.approx(0.1),
                                "auc_per_seed": [0.6, 0.8]}
    assert few["8"]["generic"]["auc_mean"] == pytest.approx(0.8)
    table = qs.top_directions_table(few).splitlines()
    assert table[0] == "| top principal directions | task query AUC | generic query AUC |"
    assert table[2] == "| 1 | 0.7000 ± 0.1000 | 0.5000 ± 0.0000 |"
    assert qs.top_directions_summary(probes[2:]) == {}


def test_task_query_replaces_the_question_a_task_row_asks(qp, infer_env, tmp_path):
    """Asked the generic question, a task's row is the generic row exactly; the other tasks keep their own."""
    from qanchor.data.dataset import load_dataset

    ds = load_dataset(infer_env.ds_dir)
    name = sorted(ds.tasks)[0]
    generic = "What kind of user is this?"
    out = tmp_path / "probe.json"
    assert qp.main(["--checkpoint", str(infer_env.ckpt), "--data", str(infer_env.ds_dir), "--folds", "2",
                    "--shuffle-batches", "0", "--generic-query", generic, "--task-query", f"{name}={generic}",
                    "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["queries"][name] == generic
    assert all(result["queries"][t] == ds.tasks[t].query for t in result["tasks"] if t != name)
    assert result["per_task"][name]["task"] == result["per_task"][name]["generic"]
    with pytest.raises(SystemExit, match="unknown task"):
        qp.main(["--checkpoint", str(infer_env.ckpt), "--data", str(infer_env.ds_dir), "--task-query", "no_such_task=Why?"])
