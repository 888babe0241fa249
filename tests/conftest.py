"""Shared fixtures: a small hand-written dataset (exact values known) built once per session."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the suite may reach a model hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one pytest-xdist worker per core: each worker (and the commands it starts) takes one thread,
    # since two workers each spinning two torch threads on two cores run several times slower than one each.
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

from qanchor.data.manifest import Manifest  # noqa: E402
from qanchor.data.schema import events_table, write_dataset  # noqa: E402

CUTOFF = "2024-06-30T00:00:00+00:00"


def tiny_manifest() -> Manifest:
    return Manifest.from_dict(
        {
            "name": "tiny",
            "cutoff": CUTOFF,
            "modalities": [
                {"name": "bill", "kind": "sequence", "numeric_columns": ["discount"]},
                {"name": "app", "kind": "sequence"},
                {"name": "search", "kind": "sequence"},
                {"name": "tabular", "kind": "tabular"},
            ],
            "tasks": [
                {"name": "churn", "domain": "engagement", "query": "Will this user stop paying?", "label_window_days": 30},
                {"name": "coupon", "domain": "marketing", "query": "Will this user redeem a coupon?", "label_window_days": 30},
            ],
        }
    )


def build_tiny_dataset(out: Path, n_users: int = 40, seed: int = 0) -> Path:
    """``n_users`` users over 3 sequence modalities; user 0 has no events, odd users miss `search`."""
    rng = np.random.default_rng(seed)
    manifest = tiny_manifest()
    cutoff_us = np.datetime64("2024-06-30T00:00:00", "us").astype(np.int64)
    cols: dict[str, list] = {k: [] for k in ("user_id", "modality", "ts", "text", "value", "discount")}
    merchants = ["Coffee shop", "Grocery store", "Fuel station", "Cinema", "Online casino"]
    apps = ["Opened Alipay", "Installed TikTok", "Opened bank app"]
    for u in range(1, n_users):
        uid = f"u{u:03d}"
        for modality, vocab, count in (("bill", merchants, 6 + u % 5), ("app", apps, 3), ("search", ["cheap flights", "loan"], 2)):
            if modality == "search" and u % 2:
                continue
            for _ in range(count):
                cols["user_id"].append(uid)
                cols["modality"].append(modality)
                cols["ts"].append(cutoff_us - int(rng.integers(3600, 90 * 86400)) * 1_000_000)
                cols["text"].append(vocab[int(rng.integers(len(vocab)))])
                cols["value"].append(float(rng.gamma(2.0, 20.0)) if modality == "bill" else None)
                cols["discount"].append(float(rng.uniform(1, 5)) if modality == "bill" and rng.random() < 0.3 else None)
    events = events_table(manifest, cols)
    half = events.num_rows // 2  # two files, shuffled rows: the loader must not rely on order
    order = rng.permutation(events.num_rows)
    parts = [events.take(order[:half]), events.take(order[half:])]
    ids = [f"u{u:03d}" for u in range(n_users)]
    tab_ids = ids[::2]
    tabular = pa.table({
        "user_id": tab_ids,
        "age": pa.array([float(20 + i) if i % 3 else None for i in range(len(tab_ids))], pa.float64()),
        "income": rng.normal(50, 10, len(tab_ids)),
    })
    tasks = {
        "churn": pa.table({"user_id": ids, "label": pa.array([u % 4 == 0 for u in range(n_users)]).cast(pa.int8())}),
        "coupon": pa.table({"user_id": ids[1:], "label": pa.array([u % 3 == 0 for u in range(1, n_users)]).cast(pa.int8()),
                            "prob": np.linspace(0.1, 0.9, n_users - 1)}),
    }
    return write_dataset(out, manifest, parts, tabular, tasks)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    return build_tiny_dataset(tmp_path_factory.mktemp("tiny") / "ds")


QUERIES = ["Will this user stop paying?", "Will this user redeem a coupon?", "Does this user search for loans?"]


@pytest.fixture(scope="session")
def infer_env(tiny_dataset, tmp_path_factory) -> SimpleNamespace:
    """A tiny randomly initialised model saved as a checkpoint, over a copy of the hand-written dataset."""
    import torch

    from qanchor.data.dataset import load_dataset
    from qanchor.data.text_cache import TextVectorCache
    from qanchor.infer.api import QAnchor
    from qanchor.model.factory import ModelMeta, build_model, save_checkpoint
    from tests.model.helpers import encoder, tiny_cfg

    root = tmp_path_factory.mktemp("infer")
    ds_dir = root / "ds"
    shutil.copytree(tiny_dataset, ds_dir, ignore=shutil.ignore_patterns(".qanchor_cache"))
    ds = load_dataset(ds_dir)
    cache = TextVectorCache(ds.text_cache_dir, encoder())
    cfg = tiny_cfg(["model.max_query_tokens=16"])
    torch.manual_seed(0)
    model, tokenizer = build_model(cfg.model, ds.manifest, cache.dim, ds.tabular_columns)
    meta = ModelMeta(ds.manifest.to_dict(), cache.dim, {}, list(ds.tabular_columns))
    ckpt = save_checkpoint(root / "ckpt", model, tokenizer, cfg, meta)
    qa = QAnchor.from_pretrained(ckpt, text_cache=cache, batch_size=8)
    return SimpleNamespace(root=root, ds=ds, ds_dir=ds_dir, qa=qa, ckpt=ckpt, cache=cache, cfg=cfg)


# The longest test files (whole pretraining runs in subprocesses, kills and resumes), longest first (summed durations of
# `make test PYTEST_ARGS=--durations=0`, 2026-12-07). `make test` hands files to its workers in collection order
# (xdist --dist loadfile --no-loadscope-reorder: xdist's own order, most tests first, put the one-test 0.5B file last);
# collected last, a long file left one worker running it alone at the end. Handed out first, the short files fill in
# around them. A stale list costs minutes, not correctness.
LONGEST_FIRST = ("test_faults.py", "train/test_resume.py", "train/test_pretrain.py", "model/test_model.py",
                 "train/test_paper_scale.py", "bench/test_quality_probe.py", "bench/test_integration.py",
                 "bench/test_forecast_check.py", "bench/test_label_budget.py", "bench/test_uqa.py",
                 "tune/test_prompt_tune.py")


def pytest_collection_modifyitems(config, items):
    """The longest files first (see LONGEST_FIRST); `gpu` tests need CUDA: skip them, with the reason, on machines
    without it."""
    import torch

    def rank(item) -> int:
        path = item.nodeid.split("::")[0].removeprefix("tests/")
        return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: every other file keeps its place, and every test its place in its file
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
