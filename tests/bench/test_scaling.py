"""benchmarks/scaling.py: each step timed at every size on datasets built once, with its growth per doubling."""

from __future__ import annotations

import json

import pytest

from tests.helpers import load_benchmark


@pytest.fixture(scope="module")
def sc():
    return load_benchmark("scaling")


def test_growth_per_doubling(sc):
    assert sc.growth([1000, 4000], [1.0, 4.0]) == pytest.approx(2.0)  # linear
    assert sc.growth([1000, 4000], [1.0, 16.0]) == pytest.approx(4.0)  # quadratic


def test_every_step_at_every_size_and_datasets_reused(sc, tmp_path, capsys):
    out = tmp_path / "s.json"
    assert sc.main(["--users", "40,20", "--root", str(tmp_path / "root"), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["sizes"] == [20, 40] and set(report["growth_per_doubling"]) == {"users_scan", "users_by_id", "labels_check"}
    assert all(v >= 0 for row in report["seconds"].values() for v in row.values())
    built = (tmp_path / "root" / "synth-20" / "manifest.yaml").stat().st_mtime_ns
    capsys.readouterr()
    (tmp_path / "root" / "labels-20.csv").write_text("important,user,file\n")  # --root is the user's folder
    assert sc.main(["--users", "20,40", "--root", str(tmp_path / "root")]) == 0
    assert (tmp_path / "root" / "labels-20.csv").read_text() == "important,user,file\n"  # was overwritten
    assert (tmp_path / "root" / "synth-20" / "manifest.yaml").stat().st_mtime_ns == built  # reused, not rebuilt
    assert "building" not in capsys.readouterr().out
    for bad in ("20", "abc,40", "0,40"):
        with pytest.raises(SystemExit):
            sc.main(["--users", bad, "--root", str(tmp_path / "root")])
    err = capsys.readouterr().err
    assert "give at least two sizes" in err and "give whole numbers of users" in err and "Traceback" not in err
