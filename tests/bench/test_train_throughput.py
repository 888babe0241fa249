"""benchmarks/train_throughput.py never builds into a dataset folder the user named."""

from __future__ import annotations

import shutil

from tests.helpers import load_benchmark


def test_a_named_dataset_without_pairs_is_refused_not_rebuilt(tiny_dataset, tmp_path, capsys):
    """--data DIR without userU.parquet used to be rebuilt as --users synthetic users, replacing the user's dataset."""
    data = tmp_path / "mine"
    shutil.copytree(tiny_dataset, data, ignore=shutil.ignore_patterns(".qanchor_cache", "userU.parquet"))
    before = {p.relative_to(data): p.read_bytes() for p in data.rglob("*") if p.is_file()}
    tt = load_benchmark("train_throughput")
    assert tt.main(["--data", str(data), "--presets", "tiny", "--steps", "1", "--batch-size", "2", "--users", "7"]) == 2
    assert "holds no userU.parquet; run `qanchor data userU" in capsys.readouterr().err
    assert {p.relative_to(data): p.read_bytes() for p in data.rglob("*") if p.is_file()} == before
