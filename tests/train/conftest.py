"""The pretraining tests' dataset: shared by test_pretrain.py and test_resume.py (split so that they run on different
xdist workers)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.model.helpers import model_and_stream
from tests.train.test_pretrain import ENV


@pytest.fixture(scope="module")
def prepared(tiny_dataset, tmp_path_factory) -> Path:
    """A copy of the tiny dataset with UserU pairs and a full text cache."""
    ds_dir = tmp_path_factory.mktemp("pt") / "ds"
    shutil.copytree(tiny_dataset, ds_dir, ignore=shutil.ignore_patterns(".qanchor_cache"))
    model_and_stream(ds_dir)
    # A stale JIT-build lock, as a process killed while DeepSpeed compiled an op leaves behind: training on CPU
    # must not wait on it (it once hung every later run).
    extensions = tmp_path_factory.mktemp("torch_extensions")
    (extensions / "deepspeed_shm_comm").mkdir(parents=True)
    (extensions / "deepspeed_shm_comm" / "lock").touch()
    ENV["TORCH_EXTENSIONS_DIR"] = str(extensions)
    return ds_dir
