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

from qanchor.data.packing import PackedModality, PackedUser, numeric_width
from qanchor.errors import CheckpointError
from qanchor.infer.api import QAnchor
from qanchor.model.layout import build_prefixes
from qanchor.model.user_encoder import ModalityEncoding, UserTokens

__all__ = ["Encoding", "encode_modalities", "embed_from_encodings"]


@dataclass
class Encoding:
    """One (user, modality) encoding: event tokens float32 (n, H), modality token (H,), when computed, and the
    modality's block of the statistics path's input (float32 (S_m,); empty for a model without that path)."""

    events: np.ndarray
    token: np.ndarray
    encoded_at: int  # microseconds since the epoch: ages inside ``events`` count from this moment
    statistics: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))


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
        out[name] = [Encoding(enc.events[b][enc.mask[b]].float().cpu().numpy(), enc.token[b].float().cpu().numpy(),
                              encoded_at, stats[b]) for b in range(len(packed))]
    return out


def _user_tokens(q: QAnchor, users: Sequence[dict[str, Encoding]]) -> UserTokens:
    enc, dtype, device = q.model.user_encoder, q.model.embed_tokens.weight.dtype, q.device
    encodings = []
    for name in enc.names:
        rows = [torch.from_numpy(u[name].events) for u in users]
        lengths = torch.tensor([r.shape[0] for r in rows])
        events = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True).to(device, dtype)  # (B, E, H)
        mask = (torch.arange(events.shape[1])[None, :] < lengths[:, None]).to(device)  # (B, E)
        token = torch.from_numpy(np.stack([u[name].token for u in users])).to(device, dtype)  # (B, H)
        encodings.append(ModalityEncoding(events, mask, token))
    return enc.tokens_from_encodings(encodings)


def embed_from_encodings(q: QAnchor, users: Sequence[dict[str, Encoding]], suffixes: Sequence[torch.Tensor]) -> np.ndarray:
    """Embeddings from cached modality encodings (every modality of every user) -> float32 ``[B, R, D]``."""
    if not users:
        return np.zeros((0, len(suffixes), q.embedding_dim), np.float32)
    with torch.inference_mode():
        tokens = _user_tokens(q, users)
        prefixes = build_prefixes(tokens, q.model.token_ids, q.model.embed_tokens, q.model.cfg.user_encoder.summary_tokens)
    return q.embed_prefixes(prefixes, suffixes, _statistics(q, users))  # the prefix still runs for every changed user


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
