"""Build a tiny model and real pretraining batches from the hand-written dataset."""

from __future__ import annotations

from pathlib import Path

import torch

from qanchor.config import DataConfig, PretrainConfig, load_config
from qanchor.data.dataset import load_dataset
from qanchor.data.pipeline import UserPipeline
from qanchor.data.text_cache import SentenceEncoder
from qanchor.data.userU import build_userU
from qanchor.model.factory import build_model
from qanchor.train.pairs import PretrainStream

_ENCODER: SentenceEncoder | None = None


def encoder() -> SentenceEncoder:
    global _ENCODER  # one MiniLM per test session: loading it costs seconds
    if _ENCODER is None:
        _ENCODER = SentenceEncoder()
    return _ENCODER


def tiny_cfg(overrides: list[str] | None = None) -> PretrainConfig:
    base = ["model.preset=tiny", "model.user_encoder.dropout=0.0", "data.default_max_events=8",
            "train.batch_size=4", "train.max_steps=4", "train.warmup_steps=1"]
    return load_config(None, base + list(overrides or []), schema=PretrainConfig)


def model_and_stream(dataset_dir: Path, cfg: PretrainConfig | None = None, seed: int = 0):
    cfg = cfg or tiny_cfg()
    ds = load_dataset(dataset_dir)
    if not (Path(dataset_dir) / "userU.parquet").exists():
        build_userU(dataset_dir, progress=False)
        ds = load_dataset(dataset_dir)
    pipe = UserPipeline.for_dataset(ds, cfg.data, encoder())
    pipe.prime(ds.users(), progress=False, all_events=True)
    torch.manual_seed(seed)
    model, tokenizer = build_model(cfg.model, ds.manifest, pipe.cache.dim, ds.tabular_columns,
                                   training_aids=cfg.loss)
    stream = PretrainStream.for_run(ds, pipe, tokenizer, model.token_ids, cfg, seed=0)
    return model, tokenizer, stream, ds, pipe, cfg


__all__ = ["encoder", "tiny_cfg", "model_and_stream", "DataConfig"]
