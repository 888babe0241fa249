"""A tiny randomly initialised model saved as a checkpoint, over the hand-written test dataset."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
import torch

from qanchor.data.dataset import load_dataset
from qanchor.data.text_cache import TextVectorCache
from qanchor.infer.api import QAnchor
from qanchor.model.factory import ModelMeta, build_model, save_checkpoint
from tests.model.helpers import encoder, tiny_cfg

QUERIES = ["Will this user stop paying?", "Will this user redeem a coupon?", "Does this user search for loans?"]


@pytest.fixture(scope="session")
def infer_env(tiny_dataset, tmp_path_factory) -> SimpleNamespace:
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
