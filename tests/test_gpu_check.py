"""`make gpu-check` runs its whole path on the CPU with tiny sizes (DEVICE=cpu SMALL=1), and fails loudly."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tests.helpers import load_benchmark

ROOT = Path(__file__).resolve().parent.parent


def _check(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DEVICE": "cpu", "SMALL": "1", "STEPS": "2", "USERS": "30", "GPU_CHECK_OUT": str(tmp_path / "gc.json"), "OUT": str(tmp_path),
           "PY": str(Path(os.sys.executable))}
    return subprocess.run(["bash", "benchmarks/gpu_check.sh", "--queries", "2", *extra], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_cpu_path_reports_every_figure(tmp_path):
    done = _check(tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "gc.json").read_text())
    assert report["pretrain"]["samples_per_s"] > 0 and report["pretrain"]["tokens_per_s_upper_bound"] > 0
    assert report["embed"]["users"] == 30 and report["embed"]["max_abs_diff_cached_uncached"] < 1e-4
    assert "gpu-check ok" in done.stdout and "Loading weights" not in done.stdout + done.stderr


def test_mismatch_and_missing_gpu_fail_loudly(tmp_path, capsys):
    import numpy as np
    import pytest

    gpu_check = load_benchmark("gpu_check")
    a = np.zeros((2, 3, 4), np.float32)
    assert gpu_check.compare(a, a + 1e-5, 1e-4) == pytest.approx(1e-5)
    with pytest.raises(gpu_check.CheckFailed, match="cached vs uncached embeddings differ by 1.00e-02"):
        gpu_check.compare(a, a + 1e-2, 1e-4)
    out = tmp_path / "gc.json"
    assert gpu_check.main(["--device", "cuda", "--out", str(out)]) == 1  # this machine has no GPU
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gpu-check FAILED: DEVICE=cuda but torch sees no GPU")
    assert "failed" in json.loads(out.read_text())
