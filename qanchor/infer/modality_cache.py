"""Per-modality encodings that can be cached, and embeddings assembled from them (daily updates).

The hierarchical encoder is split at the modality boundary: a modality's *encoding* is its event tokens
(event adapter outputs, ``(n, H)``) plus its modality token (modal adapter of their masked mean, or
the learned empty token). These depend only on that modality's events (and their ages), so a day
without events in a modality reuses yesterday's. The user token (user adapter of the mean modality
token) is cheap and always recomputed; the LLM prefix depends on every token, so it re-runs for any
user with any change.

Example:
    >>> enc = encode_modalities(qa, packed_users, ["bill"], as_of_us)  # doctest: +SKIP
    >>> enc["bill"][0].events.shape  # (n_events, H)  # doctest: +SKIP
    >>> emb = embed_from_encodings(qa, [{"bill": ..., "app": ..., ...}], suffixes)  # (B, R, D)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from qanchor.data.batch import ModalityBatch, UserBatch
from qanchor.data.packing import PackedModality, PackedUser, numeric_width
from qanchor.errors import CheckpointError
from qanchor.infer.api import QAnchor
from qanchor.model.layout import build_prefixes
from qanchor.model.user_encoder import ModalityEncoding, UserTokens

__all__ = ["Encoding", "encode_modalities", "embed_from_encodings"]


@dataclass
class Encoding:
    """One (user, modality) encoding: event tokens float32 (n, H), modality token (H,), when computed, the
    modality's block of the statistics path's input (float32 (S_m,); empty for a model without that path) and the
    kept events' text vectors, flattened (float32 (n T,); what ``model.query_evidence`` compares a query with; empty
    for a model without it)."""

    events: np.ndarray
    token: np.ndarray
    encoded_at: int  # microseconds since the epoch: ages inside ``events`` count from this moment
    statistics: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    text: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))


def _only(user: PackedUser, name: str, q: QAnchor) -> PackedUser:
    """``user`` with every sequence modality but ``name`` emptied: collate then gathers only what is encoded."""
    mods = {s.name: user.modalities[s.name] if s.name == name else
            PackedModality(np.zeros(0, np.int64), np.zeros((0, numeric_width(s)), np.float32))
            for s in q.manifest.sequence_modalities}
    return PackedUser(user.user_id, mods, user.tabular)


@torch.inference_mode()
def encode_modalities(q: QAnchor, packed: Sequence[PackedUser], names: Sequence[str], encoded_at: int) -> dict[str, list[Encoding]]:
    """Encode modalities ``names`` of every user in ``packed`` -> name -> one :class:`Encoding` per user."""
    out = {}
    for name in names:
        batch = q.pipeline.collate([_only(u, name, q) for u in packed]).to(q.device)
        enc = q.model.user_encoder.encode_modality(name, batch)  # the model's own modality step
        stats = (q.model.user_encoder.modality_statistics(name, batch).cpu().numpy() if q.model.statistics_path is not None
                 else np.zeros((len(packed), 0), np.float32))
        texts = [np.zeros(0, np.float32)] * len(packed)
        if q.model.query_evidence is not None and name in q.model.query_evidence.names:
            m = batch.modalities[name]
            texts = [m.text_vec[b][m.mask[b]].float().cpu().numpy().reshape(-1) for b in range(len(packed))]
        out[name] = [Encoding(enc.events[b][enc.mask[b]].float().cpu().numpy(), enc.token[b].float().cpu().numpy(),
                              encoded_at, stats[b], texts[b]) for b in range(len(packed))]
    return out


def _user_tokens(q: QAnchor, users: Sequence[dict[str, Encoding]]) -> UserTokens:
    # the user encoder's dtype (float32 beside a bfloat16 backbone); the decoder casts the user tokens to the backbone's
    enc, device = q.model.user_encoder, q.device
    dtype = next(enc.parameters()).dtype
    encodings = []
    for name in enc.names:
        rows = [torch.from_numpy(u[name].events) for u in users]
        lengths = torch.tensor([r.shape[0] for r in rows])
        events = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True).to(device, dtype)  # (B, E, H)
        mask = (torch.arange(events.shape[1])[None, :] < lengths[:, None]).to(device)  # (B, E)
        token = torch.from_numpy(np.stack([u[name].token for u in users])).to(device, dtype)  # (B, H)
        encodings.append(ModalityEncoding(events, mask, token))
    return enc.tokens_from_encodings(encodings)


def embed_from_encodings(q: QAnchor, users: Sequence[dict[str, Encoding]], suffixes: Sequence[torch.Tensor],
                         query_vectors: torch.Tensor | None = None) -> np.ndarray:
    """Embeddings from cached modality encodings (every modality of every user) -> float32 ``[B, R, D]``.
    ``query_vectors`` (R, T): ``QAnchor.query_vectors`` of the suffixes' queries, for a model with query evidence."""
    if not users:
        return np.zeros((0, len(suffixes), q.embedding_dim), np.float32)
    with torch.inference_mode():
        tokens = _user_tokens(q, users)
        prefixes = build_prefixes(tokens, q.model.token_ids, q.model.embed_tokens, q.model.cfg.user_encoder.summary_tokens)
        evidence = _evidence(q, users, len(suffixes), query_vectors)
    return q.embed_prefixes(prefixes, suffixes, _statistics(q, users), evidence)  # the prefix runs for every changed user


def _evidence(q: QAnchor, users: Sequence[dict[str, Encoding]], n_queries: int,
              query_vectors: torch.Tensor | None) -> torch.Tensor | None:
    """(B*R, F) query evidence (requests fastest) from the cached text vectors; None for a model without it."""
    evidence = q.model.query_evidence
    if evidence is None:
        return None
    if query_vectors is None or len(query_vectors) != n_queries:
        raise ValueError(f"this model weighs the user's events by the query (model.query_evidence): pass query_vectors, "
                         f"one per suffix ({n_queries})")
    dim, modalities = q.pipeline.cache.dim, {}
    for name in evidence.names:
        rows = [u[name].text.reshape(-1, dim) if u[name].text.size else np.zeros((0, dim), np.float32) for u in users]
        if any(len(r) != len(u[name].events) for r, u in zip(rows, users)):
            raise CheckpointError(f"this model weighs events by the query (model.query_evidence), but the cached {name!r} "
                                  "encodings hold no text vectors for their events (a state written by another model?); "
                                  "build a first state again: `qanchor update checkpoint=... data.path=DATASET "
                                  "queries=... out=DIR`")
        lengths = torch.tensor([len(r) for r in rows])
        width = max(int(lengths.max()), 1)
        text = torch.zeros(len(rows), width, dim)
        for b, r in enumerate(rows):
            text[b, : len(r)] = torch.from_numpy(r)
        mask = torch.arange(width)[None, :] < lengths[:, None]
        modalities[name] = ModalityBatch(text, torch.zeros(len(rows), width, 0), mask)
    batch = UserBatch([str(b) for b in range(len(users))], modalities).to(q.device)
    index = torch.arange(len(users), device=q.device).repeat_interleave(n_queries)
    return q.model.evidence(batch, index, query_vectors.to(q.device).repeat(len(users), 1))


def _statistics(q: QAnchor, users: Sequence[dict[str, Encoding]]) -> torch.Tensor | None:
    """(B, S) the statistics path's input, assembled from the cached blocks; None without that path."""
    if q.model.statistics_path is None:
        return None
    rows = [np.concatenate([u[name].statistics for name in q.model.user_encoder.names]) for u in users]
    width = q.model.user_encoder.statistics_width()
    if any(r.shape != (width,) for r in rows):
        raise CheckpointError(f"this model's statistics path reads {width} statistics per user, but cached modality "
                              "encodings hold other counts (a state written by another model?); build a first state "
                              "again: `qanchor update checkpoint=... data.path=DATASET queries=... out=DIR`")
    return torch.from_numpy(np.stack(rows)).to(q.device)
