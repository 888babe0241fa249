"""Prefix keys/values of many users, computed once, from which any batch of users is served.

Prompt tuning runs hundreds of steps over the same training users, and the prefix (user, modality and
event tokens) does not depend on the prompt. :class:`PrefixStore` runs ``encode_prefixes`` over the
users in chunks, keeps each layer's keys/values as one right-padded tensor, and hands out a
:class:`~qanchor.infer.prefix.PrefixCache` for any batch of rows, trimmed to the batch's longest
prefix. A step then costs a suffix forward (k + Lq + 1 tokens) whatever the history length.

Memory: 2 (keys, values) x layers x kv_heads x head_dim x L x 4 bytes per user; the tiny preset
(2 layers, 2 kv heads of 16) with ~150-token prefixes takes ~77 KB per user, 190 MB for 2,500 users.

Example:
    >>> store = PrefixStore.encode(model, user_batches)  # doctest: +SKIP
    >>> emb = store.embed(model, model.suffix(query_ids, None), torch.arange(len(store)))  # (N, D)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from qanchor.data.batch import UserBatch
from qanchor.infer.prefix import PrefixCache, anchor_hidden, encode_prefixes
from qanchor.model.qanchor_model import QAnchorModel

__all__ = ["PrefixStore"]


@dataclass
class PrefixStore:
    """Per layer keys and values (N, kv_heads, L, head_dim), right-padded; ``lengths`` long (N,)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    lengths: torch.Tensor
    user_ids: list[str]

    def __len__(self) -> int:
        return len(self.user_ids)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.keys, *self.values])

    @classmethod
    @torch.no_grad()  # not inference_mode: these tensors later enter autograd graphs as constants
    def encode(cls, model: QAnchorModel, batches: Iterable[UserBatch], progress: bool = False) -> PrefixStore:
        """Run every batch's prefixes once through the frozen model and keep the keys/values."""
        chunks, ids = [], []
        for users in tqdm(batches, desc="encode prefixes", unit="chunk", disable=not progress or None):
            prefix = encode_prefixes(model, users)
            chunks.append(([k for k, _, _ in prefix.cache], [v for _, v, _ in prefix.cache], prefix.lengths))
            ids += list(users.user_ids)
        if not chunks:
            raise ValueError("PrefixStore.encode: no users given")
        width = max(int(c[2].max()) for c in chunks)

        def stack(layer: int, which: int) -> torch.Tensor:
            parts = [c[which][layer] for c in chunks]  # each (n_c, kvh, L_c, hd)
            return torch.cat([torch.nn.functional.pad(p, (0, 0, 0, width - p.shape[2])) for p in parts])  # (N, kvh, W, hd)

        n_layers = len(chunks[0][0])
        keys = [stack(i, 0) for i in range(n_layers)]
        values = [stack(i, 1) for i in range(n_layers)]
        return cls(keys, values, torch.cat([c[2] for c in chunks]), ids)

    def rows(self, index: torch.Tensor) -> PrefixCache:
        """A fresh cache holding rows ``index`` (repeats allowed), cut to their longest prefix."""
        from transformers import DynamicCache

        lengths = self.lengths[index]  # (B,)
        width = int(lengths.max())
        data = [(k[index, :, :width], v[index, :, :width]) for k, v in zip(self.keys, self.values)]  # (B, kvh, W, hd)
        mask = (torch.arange(width)[None, :] < lengths[:, None]).long()  # (B, W)
        return PrefixCache(DynamicCache(data), mask, lengths)

    def hidden(self, model: QAnchorModel, suffixes: list[torch.Tensor], index: torch.Tensor) -> torch.Tensor:
        """Hidden state at the last token of ``suffixes[n]`` run on row ``index[n]`` -> (N, H); differentiable."""
        rows = self.rows(index)
        return anchor_hidden(model, rows, torch.arange(len(index)), suffixes)

    @torch.no_grad()
    def embed(self, model: QAnchorModel, suffix: torch.Tensor, index: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """One suffix (Ls, H) on every row of ``index`` -> unit embeddings (N, D), in batches, no gradient."""
        out = []
        for start in range(0, len(index), batch_size):
            part = index[start : start + batch_size]
            out.append(model.project(self.hidden(model, [suffix] * len(part), part)))
        return torch.cat(out) if out else suffix.new_zeros((0, model.cfg.embedding_dim))
