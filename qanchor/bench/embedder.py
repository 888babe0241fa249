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

__all__ = ["Embedder", "QAnchorEmbedder"]

_CHUNK_USERS = 512  # users read and embedded at a time: bounded memory on large datasets


class Embedder(Protocol):
    """What the benchmark needs from a Q-Anchor model (rows follow ``user_ids``' order)."""

    def embed_many(self, user_ids: Sequence[str], requests: Sequence[tuple[str, Any]]) -> np.ndarray:
        """float32 ``[U, R, D]`` unit vectors, one per (query, head or None) request; a head's soft
        prompt precedes its query. One prefix pass per user serves every request."""


class QAnchorEmbedder:
    """:class:`Embedder` over ``qanchor.infer.api.QAnchor``, reading users (before the cutoff) from ``ds``."""

    def __init__(self, model: Any, ds: Dataset, progress: bool = False):
        self.model, self.ds, self.progress = model, ds, progress

    @classmethod
    def open(cls, checkpoint: str | Path, ds: Dataset, progress: bool = False) -> QAnchorEmbedder:
        from qanchor.infer.api import QAnchor

        # The dataset's own text cache already holds its event texts: nothing is re-encoded.
        return cls(QAnchor.from_pretrained(checkpoint, text_cache_dir=ds.text_cache_dir), ds, progress)

    @property
    def checkpoint_hash(self) -> str | None:
        return self.model.checkpoint_hash

    def _chunks(self, user_ids: Sequence[str]):
        """Records of ``user_ids`` in sorted id order, ``_CHUNK_USERS`` at a time, from one streaming pass
        (each dataset partition is read once, not once per chunk)."""
        from tqdm.auto import tqdm

        chunk = []
        for record in tqdm(self.ds.users(user_ids), total=len(user_ids), desc="embed users", unit="user",
                           disable=not self.progress or None):
            chunk.append(record)
            if len(chunk) == _CHUNK_USERS:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    def embed_many(self, user_ids: Sequence[str], requests: Sequence[tuple[str, Any]]) -> np.ndarray:
        ids, parts = [], []
        for records in self._chunks(user_ids):
            parts.append(self.model.embed_many(records, list(requests), cutoff=self.ds.manifest.cutoff))
            ids += [r.user_id for r in records]
        if not parts:
            return np.zeros((0, len(requests), 0), np.float32)
        row = {u: i for i, u in enumerate(ids)}  # the dataset streams sorted ids: restore the caller's order
        return np.concatenate(parts).astype(np.float32)[[row[u] for u in user_ids]]
