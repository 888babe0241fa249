"""benchmarks/label_budget.py: paired label-budget draws, and budget 'all' reproduces the bench's LR rows."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qanchor.bench.features import extract_features
from qanchor.bench.peers import Classifier, MethodInput, evaluate_folds, stratified_folds
from qanchor.bench.tasks import dataset_tasks, fold_count
from tests.helpers import load_benchmark

GENERIC = "What kind of user is this?"


@pytest.fixture(scope="module")
def lb():
    return load_benchmark("label_budget")


def test_draw_keeps_the_class_ratio_and_both_classes(lb):
    labels = np.array([1] * 10 + [0] * 90)
    train = np.arange(0, 100, 1)
    rng = np.random.default_rng(0)
    fit = lb.draw(train, labels, 20, rng)
    assert len(fit) == 20 and labels[fit].sum() == 2 and len(set(fit)) == 20 and set(fit) <= set(train)
    fit = lb.draw(train, labels, 5, np.random.default_rng(1))  # 10% of 5 rounds to 0: at least 2 positives anyway
    assert labels[fit].sum() == 2 and (labels[fit] == 0).sum() == 3
    assert lb.draw(train, labels, None, rng) is train and lb.draw(train, labels, 500, rng) is train
    assert np.array_equal(lb.draw(train, labels, 20, np.random.default_rng(7)), lb.draw(train, labels, 20, np.random.default_rng(7)))


def test_curve_all_reproduces_the_bench_and_rows_are_paired(lb, infer_env):
    ds, qa = infer_env.ds, infer_env.qa
    tasks = lb.eligible_tasks(ds)
    assert [t.name for t in tasks] == [t.name for t in dataset_tasks(ds, [], None, 0) if fold_count(t.labels, 5) >= 2]
    user_ids = sorted({u for t in tasks for u in t.user_ids})
    queries = [*dict.fromkeys(t.query for t in tasks), GENERIC]
    emb = lb.query_embeddings(qa, ds, user_ids, queries)
    assert emb.shape == (len(user_ids), len(queries), qa.embedding_dim)
    feats = extract_features(ds, user_ids, None)
    rfm = feats.rfm_log
    # a peer equal to the generic-query embedding must score exactly as the generic row, draw for draw
    peers = {"rfm_lr": rfm, "union_lr": emb[:, -1], "rfm_lgbm": feats.rfm}
    curve = lb.budget_curve(tasks, emb, peers, user_ids, [8, None], draws=2)
    alone = lb.budget_curve(tasks, None, peers, user_ids, [8, None], draws=2)  # the peers fitted once, on their own
    assert alone["auc"]["8"]["task"] is None and alone["auc"]["8"]["rfm_lr"] == curve["auc"]["8"]["rfm_lr"]
    assert set(curve["auc"]) == {"8", "all"}
    for b in ("8", "all"):
        assert curve["auc"][b]["union_lr"] == curve["auc"][b]["generic"]
    row = {u: i for i, u in enumerate(user_ids)}
    col = {q: i for i, q in enumerate(queries)}
    bench = []  # the bench's qanchor_task: evaluate_folds with the LR probe on every fold's whole training split
    for t in tasks:
        r = np.array([row[u] for u in t.user_ids])
        folds = stratified_folds(t.labels, fold_count(t.labels, 5), 0)
        bench.append(np.mean(evaluate_folds(MethodInput(features=emb[r, col[t.query]], classifier=Classifier.LR), t.labels,
                                            folds, 0).auc))
    assert curve["auc"]["all"]["task"] == pytest.approx(np.mean(bench), abs=1e-12)  # per task over folds, then over tasks
    lgbm = []  # a _lgbm peer is fitted as the bench fits rfm_lgbm: LightGBM on the raw features
    for t in tasks:
        r = np.array([row[u] for u in t.user_ids])
        folds = stratified_folds(t.labels, fold_count(t.labels, 5), 0)
        lgbm.append(np.mean(evaluate_folds(MethodInput(features=feats.rfm[r], classifier=Classifier.LGBM), t.labels, folds,
                                           0).auc))
    assert curve["auc"]["all"]["rfm_lgbm"] == pytest.approx(np.mean(lgbm), abs=1e-12)
    assert curve["auc"]["all"]["rfm_lgbm"] != curve["auc"]["all"]["rfm_lr"]
    summary = lb.summarise([{"checkpoint": "a", **curve}, {"checkpoint": "b", **curve}])
    assert summary["all"]["task-generic"][0] == pytest.approx(curve["auc"]["all"]["task"] - curve["auc"]["all"]["generic"])
    assert summary["8"]["task"][1] == 0.0  # two identical checkpoints: no spread
    assert "| 8 |" in lb.markdown(summary, 2)


def test_budgets_parse_with_errors_that_name_the_entry(lb):
    assert lb.parse_budgets("50, 100,all") == [50, 100, None]
    for bad, says in (("50,lots", "'lots'"), ("2,all", "2 users is too few"), ("50,50", "twice"), ("", "''")):
        with pytest.raises(ValueError, match=says):
            lb.parse_budgets(bad)
    with pytest.raises(SystemExit) as exit_:
        lb.main(["--checkpoint", "x", "--data", "y", "--budgets", "50,lots"])
    assert exit_.value.code == 2  # argparse's usage error, before any data is read


def test_without_checkpoints_the_peers_alone_are_fitted(lb, tiny_dataset, tmp_path, capsys):
    assert lb.main(["--data", str(tiny_dataset), "--budgets", "8,all", "--draws", "1", "--out", str(tmp_path / "p.json")]) == 0
    summary = json.loads((tmp_path / "p.json").read_text())["summary"]
    assert set(summary) == {"8", "all"}
    for b in summary.values():  # every peer row, no query row and no query difference
        assert set(b) == {"rfm_lr", "union_lr", "rfm_lgbm", "union_lgbm"} and b["rfm_lgbm"][1] == 0.0
    assert "peers only" in capsys.readouterr().out


def test_peers_can_be_limited(lb, tiny_dataset, tmp_path):
    """--peers keeps only the named peer rows (LightGBM on many users is the slow part); unknown names are refused."""
    assert lb.main(["--data", str(tiny_dataset), "--budgets", "all", "--draws", "1", "--peers", "rfm_lr,union_lr",
                    "--out", str(tmp_path / "p.json")]) == 0
    assert set(json.loads((tmp_path / "p.json").read_text())["summary"]["all"]) == {"rfm_lr", "union_lr"}
    for bad in (["--peers", "rfm_xgb"], ["--peers", "none"]):  # an unknown row; nothing left to fit
        with pytest.raises(SystemExit):
            lb.main(["--data", str(tiny_dataset), *bad])



def test_a_task_with_fewer_folds_weighs_as_much_as_any_other_as_in_the_bench(lb, infer_env):
    """The curve took one flat mean over every (task, fold) AUC: a task with 3 folds weighed less than one with 5, and
    the `all` budget did not reproduce the bench's rows."""
    from dataclasses import replace

    ds = infer_env.ds
    tasks = lb.eligible_tasks(ds)
    few = np.zeros(len(tasks[1].labels), np.int8)
    few[[1, 5, 9]] = 1  # three positives: three folds
    tasks = [tasks[0], replace(tasks[1], labels=few)]
    assert [fold_count(t.labels, 5) for t in tasks] == [5, 3]
    user_ids = sorted({u for t in tasks for u in t.user_ids})
    rfm = extract_features(ds, user_ids, None).rfm_log
    curve = lb.budget_curve(tasks, None, {"rfm_lr": rfm}, user_ids, [None], draws=1)
    row = {u: i for i, u in enumerate(user_ids)}
    per_task = []
    for t in tasks:
        r = np.array([row[u] for u in t.user_ids])
        folds = stratified_folds(t.labels, fold_count(t.labels, 5), 0)
        per_task.append(evaluate_folds(MethodInput(features=rfm[r], classifier=Classifier.LR), t.labels, folds, 0).auc)
    assert curve["auc"]["all"]["rfm_lr"] == pytest.approx(np.mean([np.mean(a) for a in per_task]), abs=1e-12)
    assert curve["auc"]["all"]["rfm_lr"] != pytest.approx(np.mean(np.concatenate(per_task)), abs=1e-9)


def test_a_missing_checkpoint_or_dataset_is_refused_before_the_peers_are_fitted(lb, tiny_dataset, tmp_path, monkeypatch,
                                                                                 capsys):
    """Each --checkpoint was opened only after the peers' curves and every earlier checkpoint's (minutes to hours),
    then ended in a traceback with nothing saved; a missing --data was a traceback too."""
    fitted = []
    monkeypatch.setattr(lb, "peer_features", lambda *a: fitted.append(a) or {})
    with pytest.raises(SystemExit):
        lb.main(["--data", str(tiny_dataset), "--checkpoint", str(tmp_path / "nope"), "--budgets", "all"])
    assert fitted == [] and f"--checkpoint {tmp_path / 'nope'}: no checkpoint there" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="^error: .*nowhere"):
        lb.main(["--data", str(tmp_path / "nowhere"), "--budgets", "all"])
