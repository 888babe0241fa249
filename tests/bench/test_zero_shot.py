"""benchmarks/zero_shot.py: yes/no scores per user and query, and the AUC matrix read from them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.helpers import load_benchmark


@pytest.fixture(scope="module")
def zs():
    return load_benchmark("zero_shot")


def test_scores_are_the_choice_margin_and_batch_invariant(zs, infer_env):
    ds, qa = infer_env.ds, infer_env.qa
    ids = zs.labelled_users(ds, None, 0)
    assert ids == sorted(ids) and len(ids) == ds.num_users  # the tiny dataset labels every user (churn)
    queries = [t.query for t in ds.tasks.values()]
    scores = zs.yes_no_scores(qa, ds, ids[:6], queries)
    assert scores.shape == (2, 6) and np.isfinite(scores).all()
    one = qa.choose([ds.user(ids[3])], queries[1], ["Yes", "No"], use_cache=False)[0].scores
    assert scores[1, 3] == pytest.approx(one["Yes"] - one["No"], abs=1e-4)
    assert zs.labelled_users(ds, 5, 0) == zs.labelled_users(ds, 5, 0) and len(zs.labelled_users(ds, 5, 0)) == 5


def test_auc_matrix_reads_own_swapped_and_negated(zs, infer_env):
    ds = infer_env.ds
    ids = zs.labelled_users(ds, None, 0)
    churn, coupon = ds.tasks["churn"], ds.tasks["coupon"]
    label = {u: int(y) for u, y in zip(churn.user_ids.astype(str), churn.labels)}
    # query 0 (churn's) answers churn exactly; query 1 (coupon's) answers churn backwards
    exact = np.array([label[u] for u in ids], float)
    m = zs.auc_matrix(ds, ids, np.stack([exact, -exact]))
    t = m["tasks"]["churn"]
    assert t["own"] == 1.0 and t["auc"][coupon.name] == 0.0 and t["own_strength"] == 0.5
    assert t["swapped_strength"] == 0.5  # backwards is as informative as forwards, up to the sign
    assert m["mean_query_correlation"] == pytest.approx(-1.0)
    assert "coupon" in m["tasks"] and m["tasks"]["coupon"]["auc"]["coupon"] == pytest.approx(
        1 - m["tasks"]["coupon"]["auc"]["churn"])


def test_command_writes_every_checkpoint(zs, infer_env, tmp_path, capsys):
    import shutil

    out = tmp_path / "zs.json"
    other = tmp_path / "ckpt2"
    shutil.copytree(infer_env.ckpt, other)  # a second checkpoint: every one given gets its own matrix
    assert zs.main(["--checkpoint", str(infer_env.ckpt), str(other), "--data", str(infer_env.ds_dir), "--users", "12",
                    "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert set(saved["results"]) == {str(infer_env.ckpt), str(other)}
    r = saved["results"][str(infer_env.ckpt)]
    assert saved["users"] == 12 and set(r["tasks"]) <= {"churn", "coupon"} and r["tasks"]
    # the matrix is the AUC of the model's own yes/no margins, as the functions above compute it
    ds = infer_env.ds
    ids = zs.labelled_users(ds, 12, 0)
    expected = zs.auc_matrix(ds, ids, zs.yes_no_scores(infer_env.qa, ds, ids, [t.query for t in ds.tasks.values()]))
    for name, t in r["tasks"].items():
        assert t["auc"] == pytest.approx(expected["tasks"][name]["auc"], abs=1e-4), name
    assert "own-query AUC" in capsys.readouterr().out
