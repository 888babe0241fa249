"""The runner end to end on the tiny dataset with a fake embedder and head: same folds for every method,
honest head evaluation, oracle rows, report, results and plots."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qanchor.bench.features import extract_features, signed_log
from qanchor.bench.peers import Classifier, MethodInput, evaluate_folds, stratified_folds
from qanchor.bench.plots import write_plots
from qanchor.bench.report import average_table, write_report, write_results
from qanchor.bench.runner import prepare, run_bench
from qanchor.config import BenchConfig, DataConfig
from qanchor.data.dataset import load_dataset
from qanchor.errors import ConfigError
from qanchor.tune.head import HeadEntry
from tests.bench.helpers import FakeEmbedder, FakeHead


def _cfg(tiny_dataset, tmp_path, **kw) -> BenchConfig:
    base = dict(data=DataConfig(path=str(tiny_dataset)), folds=3, output_dir=str(tmp_path / "out"),
                methods=["qanchor_task", "qanchor_generic", "qanchor_swapped_query", "qanchor_head", "rfm_lgbm",
                         "rfm_lr", "union_lgbm", "union_lr", "coles"])
    return BenchConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def bench(tiny_dataset, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    cfg = _cfg(tiny_dataset, tmp, coles_epochs=1)
    _, tasks = prepare(cfg)
    churn = next(t for t in tasks if t.name == "churn")
    held_out = churn.user_ids[::2]  # the head "saw" the other half while tuning
    embedder = FakeEmbedder(tasks)
    heads = {"churn": HeadEntry(FakeHead("churn", churn.query), held_out)}
    result = run_bench(cfg, embedder=embedder, heads=heads, progress=False)
    return cfg, result, embedder, held_out


def test_every_method_same_folds_and_users(bench):
    _, result, _, _ = bench
    for task in result.tasks.values():
        sizes = {m: r.n_test for m, r in task.methods.items() if r.ok and m != "qanchor_head"}
        assert len(set(map(tuple, sizes.values()))) == 1, sizes  # identical test folds for every fitted method
        assert sum(next(iter(sizes.values()))) == task.n_users and task.folds == 3


def test_one_embedding_call_for_all_queries_and_heads(bench):
    _, _, embedder, _ = bench
    assert embedder.calls == [(40, 4)]  # two task queries + generic + one head: one prefix pass per user


def test_task_query_beats_generic_and_swapped_and_head_needs_a_model(bench):
    _, result, _, _ = bench
    churn = result.tasks["churn"]
    task = churn.methods["qanchor_task"].auc_mean_std[0]
    assert task > churn.methods["qanchor_generic"].auc_mean_std[0] + 0.1
    assert task > churn.methods["qanchor_swapped_query"].auc_mean_std[0] + 0.1  # the fake's signal is in its own query
    assert churn.methods["qanchor_head"].skipped.startswith("per-fold heads need a real checkpoint")
    assert churn.methods["union_lgbm"].ok


def test_linear_peers_are_the_lr_probe_on_signed_log_features(bench, tiny_dataset, tmp_path):
    """rfm_lr / union_lr: exactly the LR probe on signed-log RFM features (and the text mean), same folds."""
    cfg, result, _, _ = bench
    _, tasks = prepare(cfg)
    churn = next(t for t in tasks if t.name == "churn")
    feats = extract_features(load_dataset(tiny_dataset, cache_dir=tmp_path / "cache"), churn.user_ids, None)
    rows = feats.rows(churn.user_ids)
    folds = stratified_folds(churn.labels, 3, cfg.seed)
    rfm = evaluate_folds(MethodInput(features=signed_log(feats.rfm[rows]), classifier=Classifier.LR), churn.labels, folds,
                         cfg.seed)
    got = result.tasks["churn"].methods
    assert got["rfm_lr"].auc == pytest.approx(rfm.auc) and got["rfm_lr"].ks == pytest.approx(rfm.ks)
    assert got["union_lr"].ok and len(got["union_lr"].auc) == 3
    assert got["rfm_lr"].auc != pytest.approx(got["rfm_lgbm"].auc)  # a different classifier, not an alias


def test_coles_runs_or_says_why(bench):
    coles = bench[1].tasks["churn"].methods["coles"]
    assert coles.ok or "pip install --no-deps pytorch-lifestream" in coles.skipped


def test_oracle_only_where_prob_exists(bench):
    _, result, _, _ = bench
    coupon, churn = result.tasks["coupon"], result.tasks["churn"]
    assert churn.oracle is None and churn.oracle_auc is None
    assert coupon.oracle.ok and 0 <= coupon.oracle_auc <= 1 and len(coupon.oracle.auc) == 3


def test_results_json_report_and_plots(bench, tmp_path):
    _, result, _, _ = bench
    plots = write_plots(result, tmp_path)
    assert {p.name for p in plots} == {"auc_ks.png", "pca_churn.png"}
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)
    data = json.loads(write_results(result, tmp_path).read_text())
    task = data["tasks"]["churn"]["methods"]["qanchor_task"]
    assert len(task["auc"]) == 3 and len(task["ks"]) == 3 and task["auc_mean"] == pytest.approx(np.mean(task["auc"]))
    assert data["run"]["folds"] == 3 and "qanchor_task" in data["average"]
    report = write_report(result, tmp_path, [str(p) for p in plots]).read_text()
    assert report.count("## Task `") == 2 and "## Average over tasks" in report and "![auc_ks](auc_ks.png)" in report
    assert "*oracle*" in report and "**" in report and "skipped: per-fold heads need a real checkpoint" in report
    table = average_table(result)
    best = max(a["auc_mean"] for a in result.average().values())
    assert f"**{best:.4f}" in table  # the best average AUC is bold


def test_peers_only_without_model(tiny_dataset, tmp_path):
    cfg = _cfg(tiny_dataset, tmp_path, methods=["qanchor_task", "rfm_lgbm"], tasks=["coupon"])
    result = run_bench(cfg, progress=False)
    assert result.tasks["coupon"].methods["rfm_lgbm"].ok
    assert "no model given" in result.tasks["coupon"].methods["qanchor_task"].skipped


def test_unknown_method_and_missing_data(tiny_dataset, tmp_path):
    with pytest.raises(ConfigError, match="unknown"):
        run_bench(_cfg(tiny_dataset, tmp_path, methods=["gpt5"]), progress=False)
    with pytest.raises(ConfigError, match="data.path"):
        run_bench(BenchConfig(), progress=False)
