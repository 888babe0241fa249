"""benchmarks/prompt_tune_scale.py: per-run means over tasks, then means, spreads and paired gains over seeds."""

from __future__ import annotations

import pytest

from tests.helpers import load_benchmark


@pytest.fixture(scope="module")
def scale():
    return load_benchmark("prompt_tune_scale")


def _task(lr: float, step0: float, tuned: float, best_step: int, oracle: float | None = 0.9) -> dict:
    rec = {row: {"test": {"auc": auc, "ks": auc - 0.4}} for row, auc in
           (("frozen_lr", lr), ("frozen_proto", step0), ("tuned", tuned))}
    rec.update(best_step=best_step, n={"train": 600, "val": 200, "test": 200})
    if oracle is not None:
        rec["oracle"] = {"test": {"auc": oracle}}
    return rec


def test_run_means_and_seed_aggregate(scale):
    seed0 = {"tasks": {"a": _task(0.70, 0.69, 0.72, 50), "b": _task(0.80, 0.80, 0.79, 0)}}
    seed1 = {"tasks": {"a": _task(0.70, 0.70, 0.74, 25), "b": _task(0.80, 0.79, 0.80, 0)}}
    runs = [scale.run_mean(seed0), scale.run_mean(seed1)]
    assert runs[0]["tuned_auc"] == pytest.approx(0.755) and runs[0]["frozen_lr_auc"] == pytest.approx(0.75)
    assert runs[0]["tuned_wins"] == 1 and runs[0]["best_step_zero"] == 1 and runs[0]["oracle_auc"] == pytest.approx(0.9)
    agg = scale.aggregate(runs)
    assert agg["gain_auc_per_seed"] == pytest.approx([0.005, 0.02])
    assert agg["gain_auc"] == pytest.approx((0.0125, 0.0075))  # mean, population std over the two seeds
    assert agg["gain_over_step0_auc"][0] == pytest.approx(((0.755 - 0.745) + (0.77 - 0.745)) / 2)
    assert agg["tuned_wins"] == [1, 1] and agg["n_tasks"] == 2
    md = scale.table({"world": agg})
    assert "| world | 600 / 200 |" in md and "(+0.0050 / +0.0200)" in md and "1/2 / 1/2" in md


def test_oracle_only_when_every_task_knows_it(scale):
    run = scale.run_mean({"tasks": {"a": _task(0.7, 0.7, 0.7, 0), "b": _task(0.7, 0.7, 0.7, 0, oracle=None)}})
    assert "oracle_auc" not in run
    assert "| - |" in scale.table({"real": scale.aggregate([run])})
