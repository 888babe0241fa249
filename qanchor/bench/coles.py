"""CoLES peer (Babaev et al. 2022) through pytorch-lifestream: a GRU over each user's event sequence,
trained self-supervised (sub-sequences of one user are positives), then a logistic regression.

pytorch-lifestream is optional: its own requirements pin spacy and pull Spark-era extras, but CoLES needs
only ``pytorch-lifestream``, ``pytorch-lightning``, ``torchmetrics`` and ``lightning-utilities``, all
installable with ``pip install --no-deps``. Without them the method is reported as skipped.

Training sees every benchmarked user's events before the cutoff and no labels (transductive, as CoLES
is used in practice); each fold's classifier then sees only its training users' labels.

Example:
    >>> vecs = coles_embeddings(ds, ds.user_ids, cfg)  # doctest: +SKIP
    >>> vecs.shape  # doctest: +SKIP
    (2469, 64)
"""

from __future__ import annotations

import sys
import warnings
from collections import Counter
from collections.abc import Sequence
from functools import partial

import numpy as np
import torch

from qanchor.bench.peers import Skip
from qanchor.config import BenchConfig
from qanchor.data.dataset import Dataset, UserRecord

__all__ = ["INSTALL_HINT", "require_ptls", "user_sequences", "coles_embeddings"]

INSTALL_HINT = "pip install --no-deps pytorch-lifestream pytorch-lightning torchmetrics lightning-utilities"
_VOCAB = 4000  # most frequent event texts get their own id; the rest share one
_US_PER_DAY = 86_400 * 1_000_000


def require_ptls() -> None:
    """Raise :class:`Skip` with an install hint when pytorch-lifestream cannot be imported."""
    try:
        import ptls.frames.coles  # noqa: F401
        import pytorch_lightning  # noqa: F401
    except ImportError as exc:
        raise Skip(f"pytorch-lifestream not importable ({exc.name or exc}); install it with `{INSTALL_HINT}`") from None


def _merged(record: UserRecord, modalities: list[str], cutoff_us: int, cap: int) -> dict[str, np.ndarray]:
    """All of a user's events before the cutoff, every modality merged by time, the last ``cap`` kept."""
    ts, text, value, mod = [], [], [], []
    for m_id, name in enumerate(modalities, start=1):
        seq = record.events.get(name)
        if seq is None or not len(seq):
            continue
        keep = seq.ts < cutoff_us
        ts.append(seq.ts[keep])
        text += [t for t, k in zip(seq.text, keep) if k]
        value.append(seq.value[keep])
        mod.append(np.full(int(keep.sum()), m_id))
    if not text:
        return {"ts": np.zeros(0, np.int64), "text": np.zeros(0, object), "value": np.zeros(0), "mod": np.zeros(0, int)}
    ts_all = np.concatenate(ts)
    order = np.argsort(ts_all, kind="stable")[-cap:]
    return {"ts": ts_all[order], "text": np.asarray(text, dtype=object)[order],
            "value": np.concatenate(value)[order], "mod": np.concatenate(mod)[order]}


def user_sequences(ds: Dataset, user_ids: Sequence[str], cap: int) -> list[dict[str, torch.Tensor]]:
    """ptls feature dicts, one per user in ``user_ids`` order: text id, modality id, amount, event_time.

    A user without events gets one padding event (ids 0), so every user has an embedding.
    """
    modalities = [m.name for m in ds.manifest.sequence_modalities]
    cutoff_us = ds.manifest.cutoff_us
    by_id = {r.user_id: _merged(r, modalities, cutoff_us, cap) for r in ds.users(user_ids)}
    counts = Counter(t for s in by_id.values() for t in s["text"])
    vocab = {t: i for i, (t, _) in enumerate(counts.most_common(_VOCAB), start=1)}  # 0 = padding, _VOCAB + 1 = rare
    out = []
    for u in user_ids:
        s = by_id[u]
        if not len(s["ts"]):
            s = {"ts": np.zeros(1, np.int64), "text": np.array([None], object), "value": np.zeros(1), "mod": np.zeros(1, int)}
        v = np.nan_to_num(s["value"].astype(np.float64))
        out.append({
            "text_id": torch.tensor([vocab.get(t, _VOCAB + 1) if t is not None else 0 for t in s["text"]], dtype=torch.long),
            "modality": torch.as_tensor(s["mod"], dtype=torch.long),
            "amount": torch.as_tensor(np.sign(v) * np.log1p(np.abs(v)), dtype=torch.float32),
            "event_time": torch.as_tensor((s["ts"] - cutoff_us) / _US_PER_DAY, dtype=torch.float32),
        })
    return out


def _encoder(n_modalities: int, hidden: int):
    from ptls.nn import RnnSeqEncoder, TrxEncoder

    trx = TrxEncoder(embeddings={"text_id": {"in": _VOCAB + 2, "out": 24}, "modality": {"in": n_modalities + 1, "out": 4}},
                     numeric_values={"amount": "identity"})
    return RnnSeqEncoder(trx_encoder=trx, hidden_size=hidden, type="gru")


def _train(module, data: list[dict], epochs: int, progress: bool) -> None:
    import pytorch_lightning as pl
    from ptls.frames.coles import ColesDataset
    from ptls.frames.coles.split_strategy import SampleSlices

    trainable = [d for d in data if len(d["event_time"]) >= 2]
    if not trainable:  # a tabular-only dataset, or a cold-start task whose users have 0-1 events each
        raise Skip("no user has 2 or more events before the cutoff: CoLES has no sequence to learn from")
    dataset = ColesDataset(trainable, splitter=SampleSlices(split_count=4, cnt_min=10, cnt_max=80))
    loader = torch.utils.data.DataLoader(dataset, batch_size=64, shuffle=True, collate_fn=ColesDataset.collate_fn)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=progress and sys.stderr.isatty(), enable_model_summary=False)
    with warnings.catch_warnings():  # "no val_dataloader", "few workers", deprecations: nothing to act on here
        warnings.simplefilter("ignore")
        trainer.fit(module, loader)


@torch.no_grad()
def _infer(seq_encoder, data: list[dict], batch_size: int = 256) -> np.ndarray:
    from ptls.data_load.utils import collate_feature_dict

    seq_encoder.eval()
    parts = [seq_encoder(collate_feature_dict(data[i : i + batch_size])).numpy() for i in range(0, len(data), batch_size)]
    return np.concatenate(parts).astype(np.float32)  # (U, hidden)


def coles_embeddings(ds: Dataset, user_ids: Sequence[str], cfg: BenchConfig, progress: bool = False) -> np.ndarray:
    """Train CoLES on ``user_ids``' event sequences (no labels) and embed them -> float32 ``[U, coles_hidden]``."""
    require_ptls()
    import logging

    from ptls.frames.coles import CoLESModule

    # pytorch-lifestream's slicing draws from numpy's global generator; seeding it keeps runs repeatable.
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)  # "GPU available: False" etc. at every run
    data = user_sequences(ds, list(user_ids), cfg.coles_max_events)
    encoder = _encoder(len(ds.manifest.sequence_modalities), cfg.coles_hidden)
    module = CoLESModule(seq_encoder=encoder, optimizer_partial=partial(torch.optim.Adam, lr=2e-3),
                         lr_scheduler_partial=partial(torch.optim.lr_scheduler.StepLR, step_size=10, gamma=0.9))
    # With 2+ threads some CPU kernel of the training step sums in an order that varies from run to run: the same seed
    # gave embeddings 5e-7 apart and the demo's coles row moved in the 4th decimal. Deterministic kernels make a
    # peer's numbers repeatable, as every other row's are (at no measurable cost at this size).
    deterministic, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)  # warn_only: an op without a deterministic kernel still runs
    try:
        _train(module, data, cfg.coles_epochs, progress)  # threads: run_bench sets cfg.n_jobs for the whole run
        return _infer(module.seq_encoder, data)
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
