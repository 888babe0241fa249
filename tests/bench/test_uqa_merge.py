"""Merging `qanchor uqa` rows scored in several runs on the same questions (benchmarks/uqa_merge.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qanchor.bench.uqa import _row, merge_results
from tests.helpers import load_benchmark

ASKED = [{"user_id": u, "family": f, "topic": t} for u in ("a", "b", "c", "d")
         for f, t in (("sequence", "activity"), ("interest", "categories"))]
FAMILY_MASKS = {f: np.array([a["family"] == f for a in ASKED]) for f in ("sequence", "interest", "action")}


def _run(rows: dict[str, tuple[list[int], float]], checkpoint: str = "runs/uqa/pretrain") -> dict:
    """A results.json as `qanchor uqa` writes it, with the given rows (per-question correctness, prompt tokens)."""
    out = {name: _row(np.array(c, bool), np.full(len(c), tokens), FAMILY_MASKS, 1.0) for name, (c, tokens) in rows.items()}
    out["random"] = {"accuracy": {f: [0.25, 0.0, 1.0] for f in (*FAMILY_MASKS, "all")}, "prompt_tokens": 0.0,
                     "seconds": 0.0, "correct": None}
    run = {"dataset": "toy", "checkpoint": checkpoint, "held_out_users": 4, "holdout_fraction": 0.1, "seconds": 5.0,
           "pretrain_steps": 6000, "pretrain_batch": 16}
    return {"run": run, "questions": len(ASKED), "by_family": {"sequence": 4, "interest": 4, "action": 0},
            "rows": out, "asked": ASKED}


def test_rows_of_several_runs_merge_in_report_order_and_disagreement_is_counted():
    cpu = _run({"qanchor": ([1, 1, 0, 1, 1, 0, 0, 1], 103.0), "text4": ([0, 1, 0, 0, 1, 0, 0, 0], 99.0),
                "prior": ([0, 0, 1, 0, 0, 0, 0, 0], 14.0)})
    gpu128 = _run({"qanchor": ([1, 1, 0, 1, 1, 0, 1, 0], 103.0), "text128": ([1, 1, 1, 0, 1, 0, 0, 0], 3000.0)})
    gpu32 = _run({"qanchor": ([1, 1, 0, 1, 1, 0, 0, 1], 103.0), "text32": ([1, 0, 1, 0, 1, 0, 0, 0], 768.0)})
    merged, differ = merge_results([cpu, gpu128, gpu32], ["cpu", "gpu128", "gpu32"])
    assert list(merged.rows) == ["qanchor", "text4", "text32", "text128", "prior", "random"]
    assert merged.rows["qanchor"] is cpu["rows"]["qanchor"]  # the first run's copy is kept
    assert differ == {"qanchor": 2}  # gpu128 picked differently on two questions, gpu32 on none
    assert merged.rows["text128"]["accuracy"]["all"][0] == pytest.approx(4 / 8)
    assert merged.run["merged_from"] == ["cpu", "gpu128", "gpu32"] and merged.asked == ASKED


def test_runs_that_asked_other_questions_or_trained_another_budget_are_refused():
    other = _run({"qanchor": ([1] * 8, 103.0)})
    other["asked"] = list(reversed(ASKED))
    with pytest.raises(ValueError, match="b asked other questions than a"):
        merge_results([_run({"qanchor": ([1] * 8, 103.0)}), other], ["a", "b"])
    shorter = _run({"text32": ([1] * 8, 768.0)})
    shorter["run"]["pretrain_steps"] = 3000
    with pytest.raises(ValueError, match="b trained its rows for 3000 steps x 16 pairs, a for 6000 x 16"):
        merge_results([_run({"qanchor": ([1] * 8, 103.0)}), shorter], ["a", "b"])
    old = _run({"qanchor": ([1] * 8, 103.0)})
    del old["asked"]
    with pytest.raises(ValueError, match="no per-question record"):
        merge_results([old], ["a"])


def test_runs_asked_with_another_question_seed_are_refused_and_older_records_still_pair():
    """The record kept user, family and topic only, which another question seed (other distractors, other order)
    leaves alike: two such runs were merged, noting only that they "picked differently"."""
    seeded = [{**a, "digest": f"{i:016x}"} for i, a in enumerate(ASKED)]
    first, other = _run({"qanchor": ([1] * 8, 103.0)}), _run({"text4": ([1] * 8, 99.0)})
    first["asked"], other["asked"] = seeded, [{**a, "digest": "f" * 16} if i == 3 else a for i, a in enumerate(seeded)]
    with pytest.raises(ValueError, match="b asked other questions than a"):
        merge_results([first, other], ["a", "b"])
    other["asked"] = [dict(a) for a in seeded]
    assert merge_results([first, other], ["a", "b"])[0].asked == seeded
    older = _run({"text4": ([1] * 8, 99.0)})  # written before the digest: paired by user, family and topic
    assert merge_results([first, older], ["a", "b"])[0].asked == seeded
    # a run whose checkpoint was pretrained on other data keeps its warning in the merge
    first["run"]["checkpoint_data_matches"], other["run"]["checkpoint_data_matches"] = True, False
    assert merge_results([first, other], ["a", "b"])[0].run["checkpoint_data_matches"] is False


def test_script_writes_the_merged_report(tmp_path, capsys):
    merge = load_benchmark("uqa_merge")
    dirs = []
    for name, run in (("cpu", _run({"qanchor": ([1] * 8, 103.0), "prior": ([0] * 8, 14.0)})),
                      ("gpu", _run({"qanchor": ([1] * 8, 103.0), "text128": ([1, 0] * 4, 3000.0)}))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(run))
        dirs.append(str(tmp_path / name))
    assert merge.main(["--results", *dirs, "--out", str(tmp_path / "m")]) == 0
    report = (tmp_path / "m" / "report.md").read_text()
    assert "Rows merged from 2 runs on the same questions" in report
    assert "| TextN: last 128 events as text | 1.000 [" in report and "| 3000 |" in report
    assert (tmp_path / "m" / "uqa_cost.png").stat().st_size > 1000 and "uqa_cost.png" in report
    assert "qanchor: scored by several runs; the later copies picked differently on 0 of 8 questions" in capsys.readouterr().out
    # a directory without results.json, or a foreign output directory: one error line, exit 2
    assert merge.main(["--results", str(tmp_path), "--out", str(tmp_path / "m2")]) == 2
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    assert merge.main(["--results", *dirs, "--out", str(tmp_path / "foreign")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err)
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine"
