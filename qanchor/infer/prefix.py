"""Prefix KV reuse: encode each user's prefix once, then run many suffixes on the cached keys/values.

The prefix (user, modality and event tokens) does not depend on the query or the scenario head, so
``encode_prefixes`` runs it once per user and keeps an HF ``Cache``; ``anchor_hidden`` then runs any
number of suffixes ([soft prompt] query <|user_emb|>) against it. Prefixes are right-padded: every pad
row still attends to real tokens (no fully masked rows, hence no NaN), and suffix tokens get position
ids that continue each user's own prefix, so the result equals the uncached forward.

Example:
    >>> prefix = encode_prefixes(model, user_batch)  # doctest: +SKIP
    >>> hidden = anchor_hidden(model, prefix, torch.tensor([0, 0, 1]), [s_a, s_b, s_a])  # doctest: +SKIP
    >>> hidden.shape  # (3, H)  # doctest: +SKIP
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from qanchor.data.batch import UserBatch
from qanchor.model.layout import pad_right
from qanchor.model.qanchor_model import QAnchorModel

__all__ = ["PrefixCache", "encode_prefixes", "anchor_hidden", "anchor_hidden_uncached", "pad_right"]


@dataclass
class PrefixCache:
    """Keys/values of B right-padded prefixes. ``mask`` long (B, Lp); ``lengths`` long (B,)."""

    cache: object  # transformers Cache with batch size B
    mask: torch.Tensor
    lengths: torch.Tensor

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    def select(self, index: torch.Tensor) -> PrefixCache:
        """A copy holding rows ``index`` (repeats allowed): one row per suffix to run.

        A forward appends the suffix's keys/values to its cache, so every run needs its own copy.
        """
        cache = copy.deepcopy(self.cache)
        cache.batch_select_indices(index)
        return PrefixCache(cache, self.mask[index], self.lengths[index])


def encode_prefixes(model: QAnchorModel, users: UserBatch) -> PrefixCache:
    """Run every user's prefix once; keep the keys/values."""
    from transformers import DynamicCache

    embeds, mask, lengths = pad_right(model.prefixes(users))
    cache = DynamicCache()
    model.decoder(embeds, mask, past_key_values=cache, use_cache=True)
    return PrefixCache(cache, mask, lengths)


def anchor_hidden(model: QAnchorModel, prefix: PrefixCache, user_index: torch.Tensor, suffixes: list[torch.Tensor]) -> torch.Tensor:
    """Hidden state at the last token of each suffix, run on user ``user_index[n]``'s cached prefix -> (N, H)."""
    rows = prefix.select(user_index)
    embeds, suffix_mask, suffix_len = pad_right(suffixes)  # (N, Ls, H)
    lp, ls = rows.mask.shape[1], embeds.shape[1]
    steps = torch.arange(ls, device=embeds.device)
    position_ids = rows.lengths[:, None] + steps[None, :]  # continue each user's own positions
    out = model.decoder(embeds, torch.cat([rows.mask, suffix_mask], dim=1), past_key_values=rows.cache, use_cache=True,
                        position_ids=position_ids, cache_position=lp + steps)
    hidden = out.last_hidden_state  # (N, Ls, H)
    return hidden[torch.arange(len(suffixes), device=hidden.device), suffix_len - 1]


def anchor_hidden_uncached(model: QAnchorModel, users: UserBatch, user_index: torch.Tensor, suffixes: list[torch.Tensor]) -> torch.Tensor:
    """Reference path: each (user, suffix) as one full sequence, no cache -> (N, H)."""
    prefixes = model.prefixes(users)
    rows = [torch.cat([prefixes[int(u)], s], dim=0) for u, s in zip(user_index, suffixes)]
    embeds, mask, lengths = pad_right(rows)
    hidden = model.decoder(embeds, mask).last_hidden_state  # (N, L, H)
    return hidden[torch.arange(len(rows), device=hidden.device), lengths - 1]
