"""Prefix KV reuse: encode each user's prefix once, then run any number of suffixes on its keys/values.

The prefix (user, modality and event tokens) does not depend on the query, the scenario head or the
question being answered, so it runs through the LLM once per user and its keys/values are kept in an
HF ``Cache``. Everything a scenario changes is a *suffix* run on that cache: ``[soft prompt] query
<|user_emb|>`` for an embedding, or a question and its answer tokens for generation. Prefixes are
right-padded; every padded row still attends to real tokens (no fully masked rows, hence no NaN), and
suffix tokens get position ids that continue each user's own prefix, so a cached run equals the
uncached forward of prefix + suffix (tested to < 1e-5).

- :func:`encode_prefixes` / :func:`encode_prefix_embeddings`: run prefixes once -> :class:`PrefixCache`.
- :func:`suffix_hidden` / :func:`anchor_hidden`: run suffixes on gathered cache rows (differentiable).
- :class:`PrefixStore`: the keys/values of many users as padded tensors, from which any batch of rows
  is served (prompt tuning runs hundreds of steps over the same users).

Example:
    >>> prefix = encode_prefixes(model, user_batch)  # doctest: +SKIP
    >>> hidden = anchor_hidden(model, prefix, torch.tensor([0, 0, 1]), [s_a, s_b, s_a])  # (3, H)  # doctest: +SKIP
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, replace

import torch

from qanchor.data.batch import UserBatch
from qanchor.logs import progress as progress_iter
from qanchor.model.layout import pad_right
from qanchor.model.qanchor_model import QAnchorModel

__all__ = ["PrefixCache", "encode_prefixes", "encode_prefix_embeddings", "suffix_hidden", "anchor_hidden",
           "anchor_hidden_uncached", "PrefixStore"]

# The evidence key of :meth:`PrefixStore.with_lookup`: it starts with a NUL, so no question one asks will shadow it.
LOOKUP_KEY = "\x00fixed look-up"


def _new_cache(data: list[tuple[torch.Tensor, torch.Tensor]] | None = None):
    from transformers import DynamicCache  # heavy import, needed only once caches are built

    return DynamicCache(data) if data is not None else DynamicCache()


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


def encode_prefix_embeddings(model: QAnchorModel, prefixes: list[torch.Tensor]) -> PrefixCache:
    """Run already built prefix embeddings ((L_b, H) each) once; keep the keys/values."""
    embeds, mask, lengths = pad_right(prefixes)
    cache = _new_cache()
    model.decoder(embeds, mask, cache=cache, use_cache=True)
    return PrefixCache(cache, mask, lengths)


def encode_prefixes(model: QAnchorModel, users: UserBatch) -> PrefixCache:
    """Run every user's prefix once; keep the keys/values."""
    return encode_prefix_embeddings(model, model.prefixes(users))


def suffix_hidden(model: QAnchorModel, prefix: PrefixCache, user_index: torch.Tensor,
                  suffixes: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``suffixes[n]`` ((Ls_n, H) embeddings) on user ``user_index[n]``'s cached prefix.

    Returns the suffixes' hidden states (N, Ls, H), right-padded, and their lengths (N,).
    """
    rows = prefix.select(user_index)
    embeds, suffix_mask, suffix_len = pad_right(suffixes)  # (N, Ls, H)
    steps = torch.arange(embeds.shape[1], device=embeds.device)
    position_ids = rows.lengths[:, None] + steps[None, :]  # continue each user's own positions
    out = model.decoder(embeds, torch.cat([rows.mask, suffix_mask], dim=1), cache=rows.cache, use_cache=True,
                        position_ids=position_ids)
    return out.last_hidden_state, suffix_len


def anchor_hidden(model: QAnchorModel, prefix: PrefixCache, user_index: torch.Tensor,
                  suffixes: list[torch.Tensor]) -> torch.Tensor:
    """Hidden state at the last token of each suffix (the anchor), on the cached prefixes -> (N, H)."""
    hidden, suffix_len = suffix_hidden(model, prefix, user_index, suffixes)  # (N, Ls, H)
    return hidden[torch.arange(len(suffixes), device=hidden.device), suffix_len - 1]


def anchor_hidden_uncached(model: QAnchorModel, users: UserBatch, user_index: torch.Tensor,
                           suffixes: list[torch.Tensor]) -> torch.Tensor:
    """Reference path: each (user, suffix) as one full sequence, no cache -> (N, H)."""
    prefixes = model.prefixes(users)
    rows = [torch.cat([prefixes[int(u)], s], dim=0) for u, s in zip(user_index, suffixes)]
    embeds, mask, lengths = pad_right(rows)
    hidden = model.decoder(embeds, mask).last_hidden_state  # (N, L, H)
    return hidden[torch.arange(len(rows), device=hidden.device), lengths - 1]


@dataclass
class PrefixStore:
    """Per layer keys and values (N, kv_heads, L, head_dim), right-padded; ``lengths`` long (N,).

    Memory: 2 (keys, values) x layers x kv_heads x head_dim x L x 4 bytes per user; the tiny preset
    (2 layers, 2 kv heads of 16) with ~150-token prefixes takes ~77 KB per user, 190 MB for 2,500 users.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    lengths: torch.Tensor
    user_ids: list[str]
    statistics: torch.Tensor | None = None  # (N, S) the statistics path's input (model.statistics_path), else None
    # model.query_evidence: query text -> (N, F) each user's evidence for it (queries given to encode), and the
    # query whose evidence the embeddings use (:meth:`at_query`)
    evidence: dict[str, torch.Tensor] | None = None
    query: str | None = None
    # model.query_evidence, for a head that learns what to look up (PromptTuneConfig.lookup_lr): every kept event's
    # text vector, deduplicated (V, T), and per sequence modality each user's kept events as rows of it (N, E), -1 where
    # a user has fewer; the query vectors given to encode (text -> (T,)), where a head's look-up starts
    event_vectors: torch.Tensor | None = None
    event_rows: dict[str, torch.Tensor] | None = None
    query_vectors: dict[str, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.user_ids)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.keys, *self.values])

    @classmethod
    @torch.no_grad()  # not inference_mode: these tensors later enter autograd graphs as constants
    def encode(cls, model: QAnchorModel, batches: Iterable[UserBatch], progress: bool = False,
               queries: dict[str, torch.Tensor] | None = None, total: int | None = None) -> PrefixStore:
        """Run every batch's prefixes once through the frozen model and keep the keys/values. A model with
        ``model.query_evidence`` also needs ``queries`` (query text -> its (T,) sentence vector, ``QAnchor.
        query_vectors``): each user's evidence for each is kept, and :meth:`at_query` picks one. ``total``: how many
        batches there are, for the progress lines."""
        if model.query_evidence is not None and not queries:
            raise ValueError("PrefixStore.encode: this model weighs the user's events by the query (model.query_evidence); "
                             "pass queries={text: vector} for the queries the store will embed")
        chunks, ids, stats = [], [], []
        wanted = dict(queries or {}) if model.query_evidence is not None else {}  # a model without evidence ignores them
        evidence: dict[str, list[torch.Tensor]] = {q: [] for q in wanted}
        events = _EventTable(model.query_evidence.names, model.query_evidence.text_mean.shape[1]) if model.query_evidence is not None else None
        for users in progress_iter(batches, total=total, desc="encode prefixes", unit="chunk", enabled=progress):
            prefix = encode_prefixes(model, users)
            chunks.append(([k for k, _, _ in prefix.cache], [v for _, v, _ in prefix.cache], prefix.lengths))
            ids += list(users.user_ids)
            stats.append(model.user_statistics(users))
            every = torch.arange(len(users), device=prefix.lengths.device)
            for text, vector in wanted.items():
                evidence[text].append(model.evidence(users, every, vector.to(every.device).expand(len(users), -1)))
            if events is not None:
                events.add(users)
        if not chunks:
            raise ValueError("PrefixStore.encode: no users given")
        width = max(int(c[2].max()) for c in chunks)

        def stack(layer: int, which: int) -> torch.Tensor:
            parts = [c[which][layer] for c in chunks]  # each (n_c, kvh, L_c, hd)
            return torch.cat([torch.nn.functional.pad(p, (0, 0, 0, width - p.shape[2])) for p in parts])  # (N, kvh, W, hd)

        n_layers = len(chunks[0][0])
        vectors, rows = events.build() if events is not None else (None, None)
        return cls([stack(i, 0) for i in range(n_layers)], [stack(i, 1) for i in range(n_layers)],
                   torch.cat([c[2] for c in chunks]), ids, None if stats[0] is None else torch.cat(stats),
                   {q: torch.cat(parts) for q, parts in evidence.items()} or None, None, vectors, rows,
                   {q: v.detach().clone() for q, v in wanted.items()} or None)

    def query_vector(self, query: str) -> torch.Tensor:
        """The (T,) sentence vector ``query`` was encoded with (where a head's look-up starts)."""
        if self.query_vectors is None or query not in self.query_vectors:
            raise KeyError(f"this prefix store holds query vectors for {sorted(self.query_vectors or {})}, not {query!r}; "
                           "pass the query to PrefixStore.encode")
        return self.query_vectors[query]

    def lookup_evidence(self, model: QAnchorModel, index: torch.Tensor, lookup: torch.Tensor) -> torch.Tensor:
        """(N, F) the query evidence of rows ``index`` under the look-up vector ``lookup`` (T,) instead of a query
        text's vector: the same features as :meth:`at_query`'s for that query's vector, differentiable in ``lookup``."""
        if model.query_evidence is None or self.event_rows is None:
            raise ValueError("lookup_evidence needs a model with model.query_evidence and a store encoded with it")
        events = {name: (self.event_vectors[rows[index].clamp_min(0)], rows[index] >= 0)
                  for name, rows in self.event_rows.items()}
        return model.query_evidence.features_of(events, lookup)

    @torch.no_grad()
    def with_lookup(self, model: QAnchorModel, lookup: torch.Tensor, chunk: int = 1024) -> PrefixStore:
        """The same store, its embeddings using every user's evidence under the fixed look-up vector ``lookup`` (T,),
        computed here once. A head whose look-up does not learn (``lookup_lr: 0``) would otherwise recompute the same
        features at every step and evaluation, a quarter of its tuning time. The features are row-wise: each user's
        are what :meth:`lookup_evidence` gives that user in any batch, up to float rounding (1e-5)."""
        index = torch.arange(len(self), device=self.lengths.device)
        features = torch.cat([self.lookup_evidence(model, index[start : start + chunk], lookup)
                              for start in range(0, len(index), chunk)])
        return replace(self, evidence={**(self.evidence or {}), LOOKUP_KEY: features}, query=LOOKUP_KEY)

    def at_query(self, query: str) -> PrefixStore:
        """The same store, its embeddings using each user's evidence for ``query`` (``model.query_evidence``; a
        store without evidence returns itself)."""
        if self.evidence is None:
            return self
        if query not in self.evidence:
            raise KeyError(f"this prefix store holds query evidence for {sorted(self.evidence)}, not {query!r}; "
                           "pass the query to PrefixStore.encode")
        return replace(self, query=query)

    def rows(self, index: torch.Tensor) -> PrefixCache:
        """A fresh cache holding rows ``index`` (repeats allowed), cut to their longest prefix."""
        lengths = self.lengths[index]  # (B,)
        width = int(lengths.max())
        data = [(k[index, :, :width], v[index, :, :width]) for k, v in zip(self.keys, self.values)]  # (B, kvh, W, hd)
        mask = (torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]).long()  # (B, W)
        return PrefixCache(_new_cache(data), mask, lengths)

    def hidden(self, model: QAnchorModel, suffixes: list[torch.Tensor], index: torch.Tensor) -> torch.Tensor:
        """Hidden state at the last token of ``suffixes[n]`` run on row ``index[n]`` -> (N, H); differentiable."""
        return anchor_hidden(model, self.rows(index), torch.arange(len(index)), suffixes)

    def anchor_embedding(self, model: QAnchorModel, suffixes: list[torch.Tensor], index: torch.Tensor,
                         lookup: torch.Tensor | None = None) -> torch.Tensor:
        """Unit embedding of ``suffixes[n]`` run on row ``index[n]`` -> (N, D); differentiable. With ``lookup`` (T,),
        a head's look-up vector, the query evidence is that vector's (:meth:`lookup_evidence`), not the query text's."""
        stats = None if self.statistics is None else self.statistics[index]
        evidence = None
        if model.query_evidence is not None and lookup is not None:
            evidence = self.lookup_evidence(model, index, lookup)
        elif model.query_evidence is not None:
            if self.evidence is None or self.query is None:
                raise ValueError("this model weighs the user's events by the query (model.query_evidence): embed "
                                 "through store.at_query(query), from a store encoded with that query")
            evidence = self.evidence[self.query][index]
        return model.project(self.hidden(model, suffixes, index), stats, evidence)

    @torch.no_grad()
    def embed(self, model: QAnchorModel, suffix: torch.Tensor, index: torch.Tensor, batch_size: int = 256,
              lookup: torch.Tensor | None = None) -> torch.Tensor:
        """One suffix (Ls, H) on every row of ``index`` -> unit embeddings (N, D), in batches, no gradient."""
        out = []
        for start in range(0, len(index), batch_size):
            part = index[start : start + batch_size]
            out.append(self.anchor_embedding(model, [suffix] * len(part), part, lookup))
        return torch.cat(out) if out else suffix.new_zeros((0, model.cfg.embedding_dim))


class _EventTable:
    """Collects every user's kept event text vectors per sequence modality as rows of one deduplicated table: a
    user's events repeat the same few thousand texts, so the table is far smaller than (users x events x T)."""

    def __init__(self, names: list[str], text_dim: int):
        self.names, self.text_dim = list(names), text_dim
        self.index: dict[bytes, int] = {}
        self.vectors: list[torch.Tensor] = []
        self.rows: dict[str, list[torch.Tensor]] = {name: [] for name in self.names}

    def add(self, users: UserBatch) -> None:
        for name in self.names:
            batch = users.modalities[name]
            rows = torch.full(batch.mask.shape, -1, dtype=torch.long, device=batch.mask.device)  # (b, E)
            valid = batch.text_vec[batch.mask]  # (n, T)
            if len(valid):
                unique, inverse = torch.unique(valid.detach().cpu().float(), dim=0, return_inverse=True)
                ids = torch.tensor([self._id(u) for u in unique], dtype=torch.long)
                rows[batch.mask] = ids[inverse].to(rows.device)
            self.rows[name].append(rows)

    def _id(self, vector: torch.Tensor) -> int:
        key = vector.numpy().tobytes()
        if key not in self.index:
            self.index[key] = len(self.vectors)
            self.vectors.append(vector)
        return self.index[key]

    def build(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        device = self.rows[self.names[0]][0].device if self.names else torch.device("cpu")
        vectors = torch.stack(self.vectors).to(device) if self.vectors else torch.zeros((1, self.text_dim), device=device)
        out = {}
        for name, parts in self.rows.items():
            width = max(max(p.shape[1] for p in parts), 1)
            out[name] = torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1]), value=-1) for p in parts])
        return vectors, out
