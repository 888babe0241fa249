"""Inference API: ``QAnchor.from_pretrained(dir).embed(users, queries)`` -> float32 ``[U, Q, 128]``.

Each user's prefix (user, modality and event tokens) is run through the LLM once and its keys/values
cached; every (query, head) request of that user then runs as a short suffix on the cache, batched
across users and requests (``qanchor.infer.prefix``). ``use_cache=False`` runs every (user, request)
as one full uncached sequence: the reference the cached path is tested against.

Example:
    >>> from qanchor.infer.api import QAnchor
    >>> model = QAnchor.from_pretrained("runs/synth")  # doctest: +SKIP
    >>> user = {"user_id": "u1", "events": {"bill": [{"ts": "2024-06-01T12:00", "text": "Coffee shop", "value": 4.5}]}}
    >>> model.embed([user], ["Will this user redeem a coupon?", "Will this user churn?"]).shape  # doctest: +SKIP
    (1, 2, 128)
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from qanchor.config import PretrainConfig
from qanchor.data.batch import UserBatch, collate_users
from qanchor.data.dataset import UserRecord
from qanchor.data.manifest import Manifest
from qanchor.data.packing import PackedUser, UserPacker
from qanchor.data.text_cache import TextVectorCache
from qanchor.errors import CheckpointError, ModelInputError
from qanchor.model.prefix_cache import anchor_hidden, anchor_hidden_uncached, encode_prefixes
from qanchor.infer.user_input import to_microseconds, to_record
from qanchor.model.factory import (
    ModelMeta,
    checkpoint_hash,
    load_checkpoint,
    resolve_checkpoint_dir,
    text_encoder_config,
)
from qanchor.model.qanchor_model import QAnchorModel
from qanchor.model.layout import tokenize_query

__all__ = ["Head", "QAnchor", "embed", "default_text_cache_dir"]

User = UserRecord | Mapping[str, Any]


class Head(Protocol):
    """What ``embed`` needs of a scenario head (``qanchor.tune.head.ScenarioHead`` fits)."""

    query: str
    prompt: torch.Tensor  # (k, H) soft prompt placed at the start of the suffix
    checkpoint_hash: str

    def score(self, embeddings: torch.Tensor) -> torch.Tensor: ...


def default_text_cache_dir() -> Path:
    """Where event-text vectors are cached when no dataset cache is given: ``~/.cache/qanchor/text``."""
    return Path.home() / ".cache" / "qanchor" / "text"


class QAnchor:
    """A loaded Q-Anchor model ready to embed users under natural-language queries.

    ``batch_size`` users share one prefix pass; at most ``max_rows`` (user, request) suffixes run in one
    forward. Event texts are encoded once by the checkpoint's sentence encoder and cached on disk in
    ``text_cache_dir`` (or pass a ready ``text_cache``).
    """

    def __init__(self, model: QAnchorModel, tokenizer: Any, meta: ModelMeta, run_cfg: PretrainConfig,
                 checkpoint_dir: str | Path | None = None, text_cache_dir: str | Path | None = None,
                 text_cache: TextVectorCache | None = None, batch_size: int = 32, max_rows: int = 512):
        if batch_size < 1 or max_rows < 1:
            raise ModelInputError("batch_size and max_rows must be >= 1")
        self.model, self.tokenizer, self.meta, self.run_cfg = model.eval(), tokenizer, meta, run_cfg
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self._text_cache_dir = Path(text_cache_dir) if text_cache_dir is not None else default_text_cache_dir()
        self._text_cache = text_cache
        self.batch_size, self.max_rows = batch_size, max_rows

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu", **kwargs: Any) -> QAnchor:
        """Load a checkpoint directory (or a pretraining output_dir); raises CheckpointError if incompatible.

        Example:
            >>> model = QAnchor.from_pretrained("runs/synth", text_cache_dir="data/synth/.qanchor_cache/text")  # doctest: +SKIP
        """
        ckpt = resolve_checkpoint_dir(path)
        if not ckpt.is_dir():
            raise CheckpointError(f"{path}: no such checkpoint directory")
        model, tokenizer, meta, run_cfg = load_checkpoint(ckpt, device)
        return cls(model, tokenizer, meta, run_cfg, checkpoint_dir=ckpt, **kwargs)

    # ----------------------------------------------------------------------------------- properties
    @property
    def manifest(self) -> Manifest:
        return self.model.manifest

    @property
    def cutoff(self) -> datetime:
        """The training data's cutoff: event ages count from here unless ``cutoff=`` is given."""
        return self.manifest.cutoff

    @property
    def embedding_dim(self) -> int:
        return int(self.model.cfg.embedding_dim)

    @property
    def tabular_columns(self) -> list[str]:
        return list(self.meta.tabular_columns)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @cached_property
    def checkpoint_hash(self) -> str | None:
        """SHA-256 of the weights file, or None for a model built in memory."""
        return checkpoint_hash(self.checkpoint_dir) if self.checkpoint_dir is not None else None

    @property
    def text_cache(self) -> TextVectorCache:
        if self._text_cache is None:  # loading the sentence encoder costs seconds: only when first needed
            from qanchor.data.text_cache import SentenceEncoder

            self._text_cache = TextVectorCache(self._text_cache_dir, SentenceEncoder(text_encoder_config(self.meta)))
        if self._text_cache.dim != self.meta.text_dim:
            raise CheckpointError(f"text vectors are {self._text_cache.dim}-d but the checkpoint expects {self.meta.text_dim}-d")
        return self._text_cache

    @cached_property
    def packer(self) -> UserPacker:
        return UserPacker(self.manifest, self.run_cfg.data, self.text_cache)

    # -------------------------------------------------------------------------------------- inputs
    def records(self, users: User | Iterable[User]) -> list[UserRecord]:
        """Validate users (records or dicts) into the model's layout; a single user becomes a list of one."""
        if isinstance(users, (UserRecord, Mapping)):
            users = [users]
        return [to_record(u, self.manifest, self.tabular_columns) for u in users]

    def cutoff_us(self, cutoff: datetime | str | None) -> int:
        """The moment ages count from, in microseconds since the epoch: ``cutoff`` or the model's cutoff."""
        try:
            return to_microseconds(self.cutoff if cutoff is None else cutoff)
        except ValueError as exc:
            raise ModelInputError(f"cutoff: {exc}") from None

    def prime(self, records: Sequence[UserRecord]) -> None:
        """Encode, in one pass, every not yet cached text among the events ``records`` keep."""
        self.text_cache.ensure(sorted({t for r in records for s in self.packer.recent(r).values() for t in s.text}))

    def pack(self, records: Sequence[UserRecord], cutoff_us: int) -> list[PackedUser]:
        """Keep each modality's most recent ``max_events``, encode new texts in one pass, build features.

        Unlike training packing, events at or after the cutoff are kept (with age 0): at inference the
        caller decides the moment the embedding describes.
        """
        kept = [self.packer.recent(r) for r in records]
        self.text_cache.ensure(sorted({t for k in kept for s in k.values() for t in s.text}))
        late = sum(int((s.ts > cutoff_us).sum()) for k in kept for s in k.values())
        if late:
            warnings.warn(f"{late} events are after the cutoff and count as age 0; pass cutoff= the moment the "
                          "embedding should describe (e.g. now)", stacklevel=3)
        return [self.packer.pack_kept(record, seqs, cutoff_us) for record, seqs in zip(records, kept)]

    def suffixes(self, requests: Sequence[tuple[str, Head | None]]) -> list[torch.Tensor]:
        """One suffix per (query, head): [head prompt] query tokens <|user_emb|> -> (k + Lq + 1, H)."""
        if not requests:
            raise ModelInputError("no queries given; pass at least one query")
        out = []
        for query, head in requests:
            if not isinstance(query, str) or not query.strip():
                raise ModelInputError(f"a query must be a non-empty question, got {query!r}")
            ids = tokenize_query(self.tokenizer, query.strip(), self.run_cfg.model.max_query_tokens)
            prompt = None if head is None else self._check_head(head)
            with torch.inference_mode():
                out.append(self.model.suffix(torch.tensor(ids, dtype=torch.long, device=self.device), prompt))
        return out

    def _check_head(self, head: Head) -> torch.Tensor:
        for attr in ("prompt", "checkpoint_hash", "query", "score"):
            if not hasattr(head, attr):
                raise ModelInputError(f"head has no '{attr}': pass a ScenarioHead (qanchor.tune) or None")
        if self.checkpoint_hash is not None and head.checkpoint_hash != self.checkpoint_hash:
            raise CheckpointError(f"head for query {head.query!r} was tuned on checkpoint {head.checkpoint_hash[:12]}, "
                                  f"not this one ({self.checkpoint_hash[:12]}); re-run prompt-tune on this checkpoint")
        prompt = head.prompt.detach().to(self.device)
        if prompt.ndim != 2 or prompt.shape[1] != self.model.hidden_size:
            raise CheckpointError(f"head prompt has shape {tuple(prompt.shape)}, expected (k, {self.model.hidden_size})")
        return prompt

    # ------------------------------------------------------------------------------------- embedding
    def embed_many(self, users: User | Iterable[User], requests: Sequence[tuple[str, Head | None]],
                   use_cache: bool = True, cutoff: datetime | str | None = None) -> np.ndarray:
        """Embed every user under every (query, head) request -> float32 ``[U, R, D]`` unit vectors.

        One cached prefix per user serves all requests, so several heads cost one prefix pass.

        Example:
            >>> model.embed_many(users, [("Will this user churn?", None), (head.query, head)]).shape  # doctest: +SKIP
            (5, 2, 128)
        """
        records = self.records(users)
        suffixes = self.suffixes(requests)
        cutoff_us = self.cutoff_us(cutoff)
        out = np.zeros((len(records), len(suffixes), self.embedding_dim), np.float32)
        for start in range(0, len(records), self.batch_size):
            chunk = records[start : start + self.batch_size]
            out[start : start + len(chunk)] = self.embed_packed(self.pack(chunk, cutoff_us), suffixes, use_cache)
        return out

    def embed(self, users: User | Iterable[User], queries: str | Sequence[str], head: Head | None = None,
              use_cache: bool = True, cutoff: datetime | str | None = None) -> np.ndarray:
        """Embed users under queries -> float32 ``[U, Q, D]``; ``head``'s prompt (if any) joins every query.

        Example:
            >>> model.embed(ds.users(), ["Will this user redeem a coupon?"]).shape  # doctest: +SKIP
            (2000, 1, 128)
        """
        queries = [queries] if isinstance(queries, str) else list(queries)
        return self.embed_many(users, [(q, head) for q in queries], use_cache=use_cache, cutoff=cutoff)

    def score(self, users: User | Iterable[User], head: Head, cutoff: datetime | str | None = None) -> np.ndarray:
        """The head's score of each user's embedding under the head's own query -> ``[U]``."""
        return self.score_many(users, [head], cutoff)[:, 0]

    def score_many(self, users: User | Iterable[User], heads: Sequence[Head], cutoff: datetime | str | None = None) -> np.ndarray:
        """Scores of several heads from one prefix pass per user -> ``[U, n_heads]``."""
        emb = torch.from_numpy(self.embed_many(users, [(h.query, h) for h in heads], cutoff=cutoff))  # (U, n_heads, D)
        with torch.inference_mode():
            cols = [h.score(emb[:, i].to(self.device)).detach().float().cpu().numpy() for i, h in enumerate(heads)]
        return np.stack(cols, axis=1) if cols else np.zeros((emb.shape[0], 0), np.float32)

    @torch.inference_mode()
    def embed_packed(self, packed: Sequence[PackedUser], suffixes: Sequence[torch.Tensor], use_cache: bool = True) -> np.ndarray:
        """The core: packed users x suffixes -> float32 ``[B, R, D]`` (use :meth:`embed` unless streaming)."""
        if not packed:
            return np.zeros((0, len(suffixes), self.embedding_dim), np.float32)
        batch = collate_users(list(packed), self.manifest, self.text_cache.vectors, len(self.tabular_columns)).to(self.device)
        b, r = len(packed), len(suffixes)
        user_index = torch.arange(b, device=self.device).repeat_interleave(r)  # (B*R,): user of each row, requests fastest
        rows = [s for _ in range(b) for s in suffixes]  # B*R suffixes in the same order
        hidden = self._hidden(batch, user_index, rows) if use_cache else self._hidden_uncached(batch, user_index, rows)
        return self.model.project(hidden).view(b, r, -1).cpu().numpy()  # (B*R, D) -> (B, R, D)

    def _hidden(self, batch: UserBatch, user_index: torch.Tensor, rows: list[torch.Tensor]) -> torch.Tensor:
        prefix = encode_prefixes(self.model, batch)  # each user's prefix runs once
        parts = [anchor_hidden(self.model, prefix, user_index[i : i + self.max_rows], rows[i : i + self.max_rows])
                 for i in range(0, len(rows), self.max_rows)]
        return torch.cat(parts)  # (B*R, H)

    def _hidden_uncached(self, batch: UserBatch, user_index: torch.Tensor, rows: list[torch.Tensor]) -> torch.Tensor:
        parts = [anchor_hidden_uncached(self.model, batch, user_index[i : i + self.max_rows], rows[i : i + self.max_rows])
                 for i in range(0, len(rows), self.max_rows)]
        return torch.cat(parts)  # (B*R, H)


def embed(user: User, query: str, model: QAnchor | str | Path, head: Head | None = None,
          cutoff: datetime | str | None = None) -> np.ndarray:
    """One-off: embed one user under one query -> float32 ``[D]`` unit vector.

    ``model`` is a loaded :class:`QAnchor` or a checkpoint path (loaded on every call: keep a
    ``QAnchor`` for repeated use).

    Example:
        >>> import qanchor
        >>> vec = qanchor.embed({"user_id": "u1", "events": {}}, "Will this user churn?", model="runs/synth")  # doctest: +SKIP
        >>> vec.shape  # doctest: +SKIP
        (128,)
    """
    if not isinstance(model, QAnchor):
        model = QAnchor.from_pretrained(model)
    if not isinstance(query, str):
        raise ModelInputError("qanchor.embed takes one query string; use QAnchor.embed for several")
    return model.embed([user], [query], head=head, cutoff=cutoff)[0, 0]
