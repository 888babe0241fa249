"""benchmarks/head_curves.py: reads prompt-tune records, tabulates validation curves, refuses empty runs."""

from __future__ import annotations

import json

import pytest

from tests.helpers import load_benchmark


@pytest.fixture(scope="module")
def curves():
    return load_benchmark("head_curves")


def _record(directory, task: str, val: list[float], best: int, step0_test: float, tuned_test: float) -> None:
    (directory / task).mkdir(parents=True)
    history = [{"step": 25 * i, "loss": None if i == 0 else 0.6, "val_auc": v} for i, v in enumerate(val)]
    rec = {"history": history, "best_step": best, "frozen_proto": {"test": {"auc": step0_test}},
           "tuned": {"test": {"auc": tuned_test}}}
    (directory / task / "record.json").write_text(json.dumps(rec))


def test_table_and_plot_of_common_tasks(curves, tmp_path):
    fixed, learned = tmp_path / "fixed", tmp_path / "learned"
    _record(fixed, "coupon", [0.74, 0.66, 0.69], 0, 0.7274, 0.7274)
    _record(fixed, "churn", [0.73, 0.72], 0, 0.76, 0.76)
    _record(learned, "coupon", [0.74, 0.73, 0.745], 50, 0.7274, 0.7301)  # churn unfinished here: left out
    runs = curves.read_runs({"fixed": fixed, "learned": learned})
    assert list(runs["fixed"]) == ["coupon"] and list(runs["learned"]) == ["coupon"]
    md = curves.table(runs)
    assert "| fixed | coupon | 0.740 | 0.660 | 0.690 | 0 | 0.7274 -> 0.7274 |" in md
    assert "| learned | coupon | 0.740 | 0.730 | 0.745 | 50 | 0.7274 -> 0.7301 |" in md
    assert curves.main(["--run", f"fixed={fixed}", "--run", f"learned={learned}", "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG" and not list(tmp_path.glob(".*tmp*"))


def test_refuses_runs_without_records_or_shared_tasks(curves, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no <task>/record.json"):
        curves.read_runs({"a": tmp_path / "empty"})
    _record(tmp_path / "a", "x", [0.7], 0, 0.7, 0.7)
    _record(tmp_path / "b", "y", [0.7], 0, 0.7, 0.7)
    with pytest.raises(SystemExit, match="share no finished task"):
        curves.read_runs({"a": tmp_path / "a", "b": tmp_path / "b"})
    with pytest.raises(SystemExit):
        curves.main(["--run", "nolabel", "--out", str(tmp_path / "c.png")])
