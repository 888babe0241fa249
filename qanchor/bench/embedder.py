"""How the benchmark gets Q-Anchor embeddings and head scores: a two-method protocol and its adapter.

The runner only needs ``embed_many(user_ids, [(query, head or None), ...]) -> [U, R, D]`` (a head
scores its own embeddings with ``head.score``); tests may pass a fake, and :class:`QAnchorEmbedder` wraps the
inference API (``qanchor.infer.api.QAnchor``) over a dataset directory.

Example:
    >>> emb = QAnchorEmbedder.open("runs/demo/pretrain", ds)  # doctest: +SKIP
    >>> emb.embed_many(["u1", "u2"], [("Will this user churn?", None)]).shape  # doctest: +SKIP
    (2, 1, 128)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from qanchor.data.dataset import Dataset
from qanchor.infer.api import QAnchor
from qanchor.logs import progress

__all__ = ["Embedder", "QAnchorEmbedder"]


class Embedder(Protocol):
    """What the benchmark needs from a Q-Anchor model (rows follow ``user_ids``' order)."""

    def embed_many(self, user_ids: Sequence[str], requests: Sequence[tuple[str, Any]]) -> np.ndarray:
        """float32 ``[U, R, D]`` unit vectors, one per (query, head or None) request; a head's soft
        prompt precedes its query. One prefix pass per user serves every request."""


class QAnchorEmbedder:
    """:class:`Embedder` over ``qanchor.infer.api.QAnchor``, reading users (before the cutoff) from ``ds``."""

    def __init__(self, model: QAnchor, ds: Dataset, progress: bool = False):
        self.model, self.ds, self.progress = model, ds, progress

    @classmethod
    def open(cls, checkpoint: str | Path, ds: Dataset, progress: bool = False) -> QAnchorEmbedder:
        # The dataset's own text cache already holds its event texts: nothing is re-encoded.
        return cls(QAnchor.from_pretrained(checkpoint, text_cache_dir=ds.text_cache_dir), ds, progress)

    @property
    def checkpoint_hash(self) -> str | None:
        return self.model.checkpoint_hash

    @property
    def text_encoder_digest(self) -> str | None:
        """What the sentence encoder the model reads its event texts with computes (:attr:`SentenceEncoder.digest`):
        the encoder as it is now at the path its checkpoint records (or the installed package), which serving only
        warns about where it differs from the one trained with. None for a stand-in encoder (tests)."""
        return getattr(self.model.text_cache.encoder, "digest", None)

    def embed_many(self, user_ids: Sequence[str], requests: Sequence[tuple[str, Any]]) -> np.ndarray:
        """Every user under every request through :meth:`QAnchor.iter_embed`, rows in ``user_ids``' order."""
        ids, parts = [], []
        records = progress(self.model.dataset_records(self.ds, user_ids), total=len(user_ids), desc="embed users", unit="user",
                           enabled=self.progress)
        for chunk_ids, emb in self.model.iter_embed(records, list(requests), cutoff=self.ds.manifest.cutoff):
            ids += chunk_ids
            parts.append(emb)
        if not parts:
            return np.zeros((0, len(requests), self.model.embedding_dim), np.float32)
        row = {u: i for i, u in enumerate(ids)}  # the dataset streams sorted ids: restore the caller's order
        return np.concatenate(parts)[[row[u] for u in user_ids]]
