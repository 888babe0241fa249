"""The one batch type that crosses the data -> model boundary, and its collate function.

Shapes (B users, E_m kept events of modality m padded to the batch maximum, D text-vector width,
F_m numeric features of modality m, T tabular features):

- ``ModalityBatch.text_vec``  float32 [B, E_m, D]   frozen sentence vectors of the event texts
- ``ModalityBatch.numeric``   float32 [B, E_m, F_m] numeric event features (see packing.py)
- ``ModalityBatch.mask``      bool    [B, E_m]      True at real events
- ``ModalityBatch.history``   float32 [B, S]        whole-history statistics (qanchor.data.history), 0 without events
- ``ModalityBatch.history_text`` float32 [B, D]     whole-history mean text vector (data.history_text), else None
- ``UserBatch.tabular``       float32 [B, T]        raw values, 0 where missing
- ``UserBatch.tabular_missing`` bool  [B, T]        True where a value is missing
- ``UserBatch.has_tabular``   bool    [B]           False for users without a tabular row
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from qanchor.data.history import PACKED_HISTORY
from qanchor.data.manifest import Manifest
from qanchor.data.packing import PackedUser, numeric_width

__all__ = ["ModalityBatch", "UserBatch", "collate_users", "TextBatch", "pad_token_ids"]


@dataclass
class ModalityBatch:
    text_vec: torch.Tensor
    numeric: torch.Tensor
    mask: torch.Tensor
    history: torch.Tensor | None = None
    history_text: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> ModalityBatch:
        def move(t):
            return None if t is None else t.to(device)
        return ModalityBatch(self.text_vec.to(device), self.numeric.to(device), self.mask.to(device), move(self.history),
                             move(self.history_text))


@dataclass
class UserBatch:
    user_ids: list[str]
    modalities: dict[str, ModalityBatch]  # every sequence modality of the manifest, in manifest order
    tabular: torch.Tensor | None = None
    tabular_missing: torch.Tensor | None = None
    has_tabular: torch.Tensor | None = None
    event_lines: list[list[str]] | None = None  # a text-prefix model's input (data.text_events > 0)

    def __len__(self) -> int:
        return len(self.user_ids)

    def to(self, device: torch.device | str) -> UserBatch:
        def move(t):
            return (t.to(device) if t is not None else None)
        return UserBatch(self.user_ids, {k: v.to(device) for k, v in self.modalities.items()},
                         move(self.tabular), move(self.tabular_missing), move(self.has_tabular), self.event_lines)


def collate_users(users: list[PackedUser], manifest: Manifest, vectors: np.ndarray, n_tabular: int) -> UserBatch:
    """Stack packed users into a :class:`UserBatch`, gathering text vectors from ``vectors`` [N_texts, D]."""
    b, dim = len(users), vectors.shape[1]
    modalities = {}
    for spec in manifest.sequence_modalities:
        lengths = [len(u.modalities[spec.name].text_rows) for u in users]
        e = max(max(lengths, default=0), 1)  # keep a 1-wide all-masked slot so shapes are never empty
        text_vec = np.zeros((b, e, dim), np.float32)
        numeric = np.zeros((b, e, numeric_width(spec)), np.float32)
        mask = np.zeros((b, e), bool)
        history = np.zeros((b, PACKED_HISTORY), np.float32)
        # the whole history's text vector only when every user carries it (data.history_text): a mixed batch would
        # read zeros as content
        packed_text = all(u.modalities[spec.name].history_text is not None for u in users if u.modalities[spec.name].text_rows.size)
        history_text = np.zeros((b, dim), np.float32) if packed_text else None
        for i, u in enumerate(users):
            pm, n = u.modalities[spec.name], lengths[i]
            if n:
                text_vec[i, :n] = vectors[pm.text_rows]
                numeric[i, :n] = pm.numeric
                mask[i, :n] = True
                history[i] = pm.history
                if history_text is not None:
                    history_text[i] = pm.history_text
        modalities[spec.name] = ModalityBatch(torch.from_numpy(text_vec), torch.from_numpy(numeric), torch.from_numpy(mask),
                                              torch.from_numpy(history),
                                              None if history_text is None else torch.from_numpy(history_text))
    tabular = missing = has = None
    if manifest.tabular is not None:
        raw = np.zeros((b, n_tabular), np.float32)
        missing_np = np.ones((b, n_tabular), bool)
        for i, u in enumerate(users):
            if u.tabular is not None:
                missing_np[i] = np.isnan(u.tabular)
                raw[i] = np.nan_to_num(u.tabular, nan=0.0)
        tabular, missing = torch.from_numpy(raw), torch.from_numpy(missing_np)
        has = torch.tensor([u.tabular is not None for u in users], dtype=torch.bool)
    lines = [u.event_lines or [] for u in users] if any(u.event_lines is not None for u in users) else None
    return UserBatch([u.user_id for u in users], modalities, tabular, missing, has, lines)


@dataclass
class TextBatch:
    """Right-padded token ids. ``ids`` long [B, L]; ``lengths`` long [B]."""

    ids: torch.Tensor
    lengths: torch.Tensor
    texts: list[str] = field(default_factory=list)

    def to(self, device: torch.device | str) -> TextBatch:
        return TextBatch(self.ids.to(device), self.lengths.to(device), self.texts)


def pad_token_ids(seqs: list[list[int]], pad_id: int, texts: list[str] | None = None) -> TextBatch:
    length = max(max((len(s) for s in seqs), default=0), 1)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return TextBatch(ids, torch.tensor([len(s) for s in seqs], dtype=torch.long), texts or [])
