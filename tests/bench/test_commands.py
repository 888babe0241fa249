"""``qanchor bench`` on the command line: custom labels end to end, and user errors as exit code 2."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qanchor.cli import main


def _labels(tmp_path, user_ids, labels, name="bikes.parquet", column="label"):
    path = tmp_path / name
    pq.write_table(pa.table({"user_id": user_ids, column: labels}), path)
    return str(path)


def test_custom_labels_end_to_end(tiny_dataset, tmp_path, capsys):
    ids = [f"u{u:03d}" for u in range(1, 40)]
    path = _labels(tmp_path, ids, [int(u % 2 == 0) for u in range(1, 40)])
    out = tmp_path / "out"
    query = "Will this user buy a bike: yes, [really]?"  # a string setting is taken verbatim, whatever its characters
    code = main(["bench", f"data.path={tiny_dataset}", f"labels={path}", f"query={query}", f"output_dir={out}",
                 "methods=[rfm_lgbm]", "folds=3"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| `rfm_lgbm` |" in printed and f"report: {out / 'report.md'}" in printed
    assert "Average over 1 task(s), 3-fold CV (" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["tasks"]["bikes"]["query"] == query and len(results["tasks"]["bikes"]["methods"]["rfm_lgbm"]["auc"]) == 3
    assert (out / "auc_ks.png").exists() and "Task `bikes`" in (out / "report.md").read_text()


def test_a_bench_into_a_folder_another_bench_is_writing_is_refused(tiny_dataset, tmp_path, capsys):
    """A second bench into one output_dir resumed the first one's rows under its own settings and reported the mix."""
    import fcntl
    import os

    from qanchor.data.io import OutputKind, claim_output_dir

    out = tmp_path / "o"
    claim_output_dir(out, OutputKind.RESULTS)  # the first bench's folder, claimed ...
    running = os.open(out, os.O_RDONLY)  # ... and locked, as that other process holds it
    fcntl.flock(running, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        assert main(["bench", f"data.path={tiny_dataset}", "methods=[rfm_lr]", f"output_dir={out}", "--quiet"]) == 2
        assert "is being written by another running qanchor benchmark" in capsys.readouterr().err
        assert not (out / "results.json").exists()
    finally:
        os.close(running)
    assert main(["bench", f"data.path={tiny_dataset}", "methods=[rfm_lr]", f"output_dir={out}", "--quiet"]) == 0


def test_the_summary_line_counts_the_folds_each_task_got(tiny_dataset, tmp_path, capsys):
    """With 12 users churn has 4 positives, so 4 folds; the line said "5-fold CV" whatever each task got."""
    assert main(["bench", f"data.path={tiny_dataset}", "methods=[rfm_lr]", "max_users=12", "--quiet",
                 f"output_dir={tmp_path / 'o'}"]) == 0
    assert "Average over 2 task(s), 4/5-fold CV (by task) (" in capsys.readouterr().out


@pytest.mark.parametrize("ids,labels,column,match", [
    (["u001", "ghost"], [0, 1], "label", "user 'ghost' is not in dataset"),
    (["u001", "u002"], [1, 1], "label", "every label is 1"),
    (["u001", "u002"], [0, 1], "y", "column 'label': required column missing"),
])
def test_bad_labels_exit_2_with_error_line(tiny_dataset, tmp_path, capsys, ids, labels, column, match):
    path = _labels(tmp_path, ids, labels, column=column)
    code = main(["bench", f"data.path={tiny_dataset}", f"labels={path}", "query=q?", f"output_dir={tmp_path / 'o'}"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and match in err


def test_labels_without_query_and_bad_override(tiny_dataset, tmp_path, capsys):
    path = _labels(tmp_path, ["u001", "u002"], [0, 1])
    assert main(["bench", f"data.path={tiny_dataset}", f"labels={path}"]) == 2
    assert "needs both labels" in capsys.readouterr().err
    assert main(["bench", f"data.path={tiny_dataset}", "fold=3"]) == 2
    assert "fold" in capsys.readouterr().err
