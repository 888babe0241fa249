"""benchmarks/uqa_seeds.py: the seed summary pairs seeds question by question and resamples users."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.helpers import load_benchmark


@pytest.fixture(scope="module")
def uqa_seeds():
    return load_benchmark("uqa_seeds")


ASKED = [{"user_id": u, "family": f, "topic": "t"} for u in ("a", "b", "c", "d") for f in ("sequence", "interest")]


def _result(qanchor: list[int], prior: list[int]) -> dict:
    return {"asked": ASKED, "rows": {"qanchor": {"correct": [bool(x) for x in qanchor], "prompt_tokens": 100.0},
                                     "prior": {"correct": [bool(x) for x in prior], "prompt_tokens": 14.0},
                                     "random": {"correct": None, "prompt_tokens": 0.0}}}


def test_means_spread_and_paired_gaps(uqa_seeds):
    #            a: seq int   b: seq int   c: seq int   d: seq int
    seeds = [_result([1, 1, 1, 0, 1, 1, 0, 0], [0, 1, 0, 0, 0, 0, 0, 0]),
             _result([1, 1, 1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 1, 0, 0, 0]),
             _result([1, 0, 1, 1, 1, 1, 0, 1], [1, 0, 0, 0, 0, 0, 0, 1])]
    s = uqa_seeds.summarise(seeds, ["s0", "s1", "s2"], bootstrap=500)
    assert s["users"] == 4 and s["by_family"] == {"sequence": 4, "interest": 4, "all": 8}  # no action question asked
    assert s["rows"]["qanchor"]["sequence"]["per_seed"] == [0.75, 0.75, 0.75]
    assert s["rows"]["qanchor"]["all"]["mean"] == pytest.approx(np.mean([5 / 8, 5 / 8, 6 / 8]))
    assert s["rows"]["prior"]["interest"]["std"] == pytest.approx(np.std([0.25, 0.0, 0.25]))
    gap = s["gaps"]["prior"]["sequence"]
    assert gap["per_seed"] == pytest.approx([0.75 - 0.0, 0.75 - 0.25, 0.75 - 0.25])
    assert gap["mean"] == pytest.approx(np.mean(gap["per_seed"]))
    assert gap["ci95_users"][0] <= gap["mean"] <= gap["ci95_users"][1]
    assert "qanchor" not in s["gaps"] and "random" not in s["rows"]


def test_same_gap_for_every_user_gives_a_point_interval(uqa_seeds):
    s = uqa_seeds.summarise([_result([1] * 8, [0, 1] * 4)] * 3, ["s0", "s1", "s2"], bootstrap=200)
    assert s["gaps"]["prior"]["sequence"]["ci95_users"] == [1.0, 1.0]
    assert s["gaps"]["prior"]["interest"]["ci95_users"] == [0.0, 0.0]


def test_a_row_from_some_seeds_only_is_paired_on_those(uqa_seeds):
    one = _result([1, 1, 1, 1, 0, 0, 0, 0], [0] * 8)
    two, three = _result([1] * 8, [0] * 8), _result([0, 0, 0, 0, 1, 1, 1, 1], [0] * 8)
    for r in (two, three):
        del r["rows"]["prior"]  # Q-Anchor only: the prior was retrained for the first seed
    s = uqa_seeds.summarise([one, two, three], ["s0", "s1", "s2"], bootstrap=200)
    assert s["rows"]["qanchor"]["seeds"] == 3 and s["rows"]["prior"]["seeds"] == 1
    assert s["rows"]["qanchor"]["all"]["per_seed"] == [0.5, 1.0, 0.5]
    assert s["gaps"]["prior"]["seeds"] == 1 and s["gaps"]["prior"]["all"]["per_seed"] == [0.5]
    assert s["gaps"]["prior"]["all"]["mean"] == pytest.approx(0.5)


def test_seeds_asked_other_questions_are_refused(uqa_seeds):
    other = _result([1] * 8, [0] * 8)
    other["asked"] = list(reversed(ASKED))
    with pytest.raises(SystemExit, match="s1 asked other questions than s0"):
        uqa_seeds.summarise([_result([1] * 8, [0] * 8), other], ["s0", "s1"])
    old = _result([1] * 8, [0] * 8)
    del old["asked"]
    with pytest.raises(SystemExit, match="no per-question record"):
        uqa_seeds.summarise([old], ["s0"])


def test_results_mode_writes_the_summary(uqa_seeds, tmp_path, capsys):
    dirs = []
    for i, r in enumerate([_result([1] * 8, [0] * 8), _result([1, 0] * 4, [0] * 8)]):
        d = tmp_path / f"u{i}"
        d.mkdir()
        (d / "results.json").write_text(json.dumps(r))
        dirs.append(str(d))
    assert uqa_seeds.main(["--results", *dirs, "--root", str(tmp_path / "sum")]) == 0
    text = (tmp_path / "sum" / "summary.md").read_text()
    assert "| qanchor (2) | 1.000 ± 0.000 | 0.500 ± 0.500 | 0.750 ± 0.250 | 100 |" in text and "| prior (2) | +100.0" in text and text.strip() in capsys.readouterr().out
    assert json.loads((tmp_path / "sum" / "summary.json").read_text())["seeds"] == 2


def test_topics_split_a_family(uqa_seeds):
    asked = [{"user_id": u, "family": "interest", "topic": t} for u in ("a", "b") for t in ("categories", "time_of_day")]
    run = lambda q, p: {"asked": asked, "rows": {"qanchor": {"correct": q, "prompt_tokens": 100.0},  # noqa: E731
                                                 "prior": {"correct": p, "prompt_tokens": 14.0}}}
    #        a: cat tod  b: cat tod
    seeds = [run([1, 0, 1, 1], [0, 0, 1, 0]), run([1, 0, 1, 0], [0, 1, 0, 0])]
    s = uqa_seeds.summarise(seeds, ["s0", "s1"], bootstrap=100)
    assert s["by_topic"] == {"categories": 2, "time_of_day": 2}
    assert s["topics"]["qanchor"]["categories"]["per_seed"] == [1.0, 1.0]
    assert s["topics"]["qanchor"]["time_of_day"]["per_seed"] == [0.5, 0.0]
    assert s["gaps"]["prior"]["topics"]["categories"]["per_seed"] == [0.5, 1.0]
    assert s["gaps"]["prior"]["topics"]["time_of_day"]["mean"] == pytest.approx(0.0)  # (0.5 - 0) and (0 - 0.5)
    text = uqa_seeds.table(s)
    assert "| qanchor (2) | 1.000 ± 0.000 | 0.250 ± 0.250 |" in text
    assert "| Q-Anchor - prior (2) | +75.0 (+50.0 .. +100.0) | +0.0 (-50.0 .. +50.0) |" in text


def test_a_seed_made_with_other_settings_is_refused_not_summarised(uqa_seeds, tiny_dataset, tmp_path):
    """A root's uqa-seed<k>/results.json was reused whatever made it: another --set was summarised as this one."""
    root = tmp_path / "root"
    out = root / "uqa-seed0"
    out.mkdir(parents=True)
    (out / "results.json").write_text(json.dumps(_result([1] * 8, [0] * 8)))
    args = ["--root", str(root), "--seeds", "0", "--data", str(tiny_dataset)]
    wanted = {"seed": 0, "pretrain_config": uqa_seeds.file_sha256("configs/pretrain/tiny-cj.yaml"),
              "uqa_config": uqa_seeds.file_sha256("configs/uqa/tiny-cj.yaml"), "set": ["train.max_steps=6000"],
              "uqa_set": [], "data": uqa_seeds.trained_data_id(uqa_seeds.load_dataset(tiny_dataset))}
    (out / "results.json.settings.json").write_text(json.dumps(wanted))
    with pytest.raises(SystemExit, match=r"other settings \(set: \['train.max_steps=6000'\] -> \['train.max_steps=3000'\]\)"):
        uqa_seeds.main([*args, "--set", "train.max_steps=3000"])
    assert uqa_seeds.main([*args, "--set", "train.max_steps=6000"]) == 0  # the same settings: reused
    # the data's id as recorded before it went by content (the files' times): the same data, reused
    older = {**wanted, "data": uqa_seeds.legacy_trained_data_id(uqa_seeds.load_dataset(tiny_dataset))}
    (out / "results.json.settings.json").write_text(json.dumps(older))
    assert older["data"] != wanted["data"] and uqa_seeds.main([*args, "--set", "train.max_steps=6000"]) == 0
    (out / "results.json.settings.json").write_text(json.dumps({**wanted, "data": "0123456789abcdef"}))
    with pytest.raises(SystemExit, match=r"other settings \(data: '0123456789abcdef' -> "):
        uqa_seeds.main([*args, "--set", "train.max_steps=6000"])


def test_a_failed_child_is_one_error_line_not_a_traceback(uqa_seeds):
    """uqa_seeds.py ran its qanchor commands with check=True: a failed pretraining or uqa run (an hour in) ended in a
    CalledProcessError traceback on top of the command's own error line."""
    with pytest.raises(SystemExit, match=r"^error: `qanchor pretrain` failed \(exit code 2\); its message is above$"):
        uqa_seeds._qanchor("pretrain", "train.no_such_key=1")
