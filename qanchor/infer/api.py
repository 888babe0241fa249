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
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from qanchor.config import InferConfig, PretrainConfig, require
from qanchor.data.dataset import Dataset, UserRecord
from qanchor.data.manifest import Manifest
from qanchor.data.packing import PackedUser
from qanchor.data.pipeline import UserPipeline, batched
from qanchor.data.text_cache import SentenceEncoder, TextVectorCache
from qanchor.errors import CheckpointError, ModelInputError
from qanchor.infer.user_input import record_adapter, to_microseconds, to_record
from qanchor.model.backbone import check_device
from qanchor.model.factory import (
    ModelMeta,
    checkpoint_hash,
    load_checkpoint,
    resolve_checkpoint_dir,
    text_encoder_config,
)
from qanchor.model.layout import tokenize_query
from qanchor.model.prefix_cache import anchor_hidden, anchor_hidden_uncached, encode_prefix_embeddings
from qanchor.model.qanchor_model import QAnchorModel

__all__ = ["Head", "QAnchor", "embed", "head_scores", "default_text_cache_dir"]

User = UserRecord | Mapping[str, Any]
Users = User | Iterable[User] | Dataset


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
                 text_cache: TextVectorCache | None = None, batch_size: int = 32, max_rows: int = 512,
                 stream_users: int = 1024):
        if batch_size < 1 or max_rows < 1 or stream_users < 1:
            raise ModelInputError("batch_size, max_rows and stream_users must be >= 1")
        self.model, self.tokenizer, self.meta, self.run_cfg = model.eval(), tokenizer, meta, run_cfg
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self._text_cache_dir = Path(text_cache_dir) if text_cache_dir is not None else default_text_cache_dir()
        self._text_cache = text_cache
        self.batch_size, self.max_rows, self.stream_users = batch_size, max_rows, stream_users

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu", **kwargs: Any) -> QAnchor:
        """Load a checkpoint directory (or a pretraining output_dir); raises CheckpointError if incompatible.

        Example:
            >>> model = QAnchor.from_pretrained("runs/synth", text_cache_dir="data/synth/.qanchor_cache/text")  # doctest: +SKIP
        """
        ckpt = resolve_checkpoint_dir(path)
        if not ckpt.is_dir():
            raise CheckpointError(f"{path}: no such checkpoint directory")
        model, tokenizer, meta, run_cfg = load_checkpoint(ckpt, check_device(device))
        return cls(model, tokenizer, meta, run_cfg, checkpoint_dir=ckpt, **kwargs)

    @classmethod
    def from_config(cls, cfg: InferConfig, **kwargs: Any) -> QAnchor:
        """Load ``cfg.checkpoint`` on ``cfg.device`` with its batch sizes (what every inference command does)."""
        require(cfg.checkpoint, "checkpoint", "<checkpoint dir>")
        kwargs.setdefault("text_cache_dir", cfg.text_cache_dir)
        return cls.from_pretrained(cfg.checkpoint, device=check_device(cfg.device), batch_size=cfg.batch_size,
                                   max_rows=cfg.max_rows, **kwargs)

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

    @cached_property
    def pipeline(self) -> UserPipeline:
        """Packing with the checkpoint's own event caps and encoder; the text cache loads on first use."""
        cache = self._text_cache
        if cache is None:  # loading the sentence encoder costs seconds: only when first needed
            pipe = UserPipeline.at(self.manifest, self.run_cfg.data, self._text_cache_dir, len(self.tabular_columns),
                                   SentenceEncoder(text_encoder_config(self.meta)))
        else:
            pipe = UserPipeline(self.manifest, self.run_cfg.data, cache, len(self.tabular_columns))
        if pipe.cache.dim != self.meta.text_dim:
            raise CheckpointError(f"text vectors are {pipe.cache.dim}-d but the checkpoint expects {self.meta.text_dim}-d")
        return pipe

    @property
    def text_cache(self) -> TextVectorCache:
        return self.pipeline.cache

    # -------------------------------------------------------------------------------------- inputs
    def records(self, users: Users) -> Iterator[UserRecord]:
        """Users (records, dicts, a :class:`Dataset` or one user) as records in the model's layout, lazily.

        A dataset whose columns are laid out differently from the model's is remapped by name
        (``record_adapter``); records and dicts are validated one by one as they stream.
        """
        if isinstance(users, Dataset):
            adapt = record_adapter(users.manifest, users.tabular_columns, self.manifest, self.tabular_columns)
            return (adapt(r) for r in users.users())
        if isinstance(users, (UserRecord, Mapping)):
            users = [users]
        return (to_record(u, self.manifest, self.tabular_columns) for u in users)

    def cutoff_us(self, cutoff: datetime | str | None) -> int:
        """The moment ages count from, in microseconds since the epoch: ``cutoff`` or the model's cutoff."""
        try:
            return to_microseconds(self.cutoff if cutoff is None else cutoff)
        except ValueError as exc:
            raise ModelInputError(f"cutoff: {exc}") from None

    def pack(self, records: Sequence[UserRecord], cutoff_us: int) -> list[PackedUser]:
        """Keep each modality's most recent ``max_events``, encode new texts in one pass, build features.

        Unlike training packing, events at or after the cutoff are kept (with age 0): at inference the
        caller decides the moment the embedding describes.
        """
        kept = [self.pipeline.packer.recent(r) for r in records]
        late = sum(int((s.ts > cutoff_us).sum()) for k in kept for s in k.values())
        if late:
            warnings.warn(f"{late} events are after the cutoff and count as age 0; pass cutoff= the moment the "
                          "embedding should describe (e.g. now)", stacklevel=3)
        return self.pipeline.pack_kept(records, kept, cutoff_us)

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
    def iter_embed(self, users: Users, requests: Sequence[tuple[str, Head | None]], use_cache: bool = True,
                   cutoff: datetime | str | None = None) -> Iterator[tuple[list[str], np.ndarray]]:
        """The one embedding loop: stream users, yield ``(user_ids, float32 [B, R, D])`` per batch.

        Memory stays flat in the number of users: ``stream_users`` records are held at a time (their new
        event texts encoded in one pass), ``batch_size`` of them share one prefix pass, at most ``max_rows``
        (user, request) suffixes run per forward. Export, the daily update and the benchmark all embed here.

        Example:
            >>> for ids, emb in model.iter_embed(load_dataset("data/synth"), [("Will this user churn?", None)]):  # doctest: +SKIP
            ...     write(ids, emb)
        """
        suffixes = self.suffixes(requests)
        cutoff_us = self.cutoff_us(cutoff)
        for records in batched(self.records(users), self.stream_users):
            packed = self.pack(records, cutoff_us)
            for start in range(0, len(packed), self.batch_size):
                part = packed[start : start + self.batch_size]
                yield [p.user_id for p in part], self.embed_packed(part, suffixes, use_cache)

    def embed_many(self, users: Users, requests: Sequence[tuple[str, Head | None]],
                   use_cache: bool = True, cutoff: datetime | str | None = None) -> np.ndarray:
        """Embed every user under every (query, head) request -> float32 ``[U, R, D]`` unit vectors.

        One cached prefix per user serves all requests, so several heads cost one prefix pass.

        Example:
            >>> model.embed_many(users, [("Will this user churn?", None), (head.query, head)]).shape  # doctest: +SKIP
            (5, 2, 128)
        """
        parts = [emb for _, emb in self.iter_embed(users, requests, use_cache, cutoff)]
        if not parts:
            return np.zeros((0, len(requests), self.embedding_dim), np.float32)
        return np.concatenate(parts)

    def embed(self, users: Users, queries: str | Sequence[str], head: Head | None = None,
              use_cache: bool = True, cutoff: datetime | str | None = None) -> np.ndarray:
        """Embed users under queries -> float32 ``[U, Q, D]``; ``head``'s prompt (if any) joins every query.

        ``users`` may be one user, records or dicts (any iterable, streamed), or a whole :class:`Dataset`.

        Example:
            >>> model.embed(load_dataset("data/synth"), ["Will this user redeem a coupon?"]).shape  # doctest: +SKIP
            (2000, 1, 128)
        """
        queries = [queries] if isinstance(queries, str) else list(queries)
        return self.embed_many(users, [(q, head) for q in queries], use_cache=use_cache, cutoff=cutoff)

    def score(self, users: Users, head: Head, cutoff: datetime | str | None = None) -> np.ndarray:
        """The head's score of each user's embedding under the head's own query -> ``[U]``."""
        return self.score_many(users, [head], cutoff)[:, 0]

    def score_many(self, users: Users, heads: Sequence[Head], cutoff: datetime | str | None = None) -> np.ndarray:
        """Scores of several heads from one prefix pass per user -> ``[U, n_heads]``."""
        return head_scores(heads, self.embed_many(users, [(h.query, h) for h in heads], cutoff=cutoff), self.device)

    @torch.inference_mode()
    def embed_packed(self, packed: Sequence[PackedUser], suffixes: Sequence[torch.Tensor], use_cache: bool = True) -> np.ndarray:
        """Packed users x suffixes -> float32 ``[B, R, D]`` (the step inside :meth:`iter_embed`)."""
        if not packed:
            return np.zeros((0, len(suffixes), self.embedding_dim), np.float32)
        batch = self.pipeline.collate(packed).to(self.device)
        if not use_cache:
            b, r = len(packed), len(suffixes)
            user_index = torch.arange(b, device=self.device).repeat_interleave(r)  # (B*R,): requests fastest
            rows = [s for _ in range(b) for s in suffixes]
            hidden = torch.cat([anchor_hidden_uncached(self.model, batch, user_index[i : i + self.max_rows],
                                                       rows[i : i + self.max_rows]) for i in range(0, len(rows), self.max_rows)])
            return self.model.project(hidden).view(b, r, -1).cpu().numpy()
        return self.embed_prefixes(self.model.prefixes(batch), suffixes)

    @torch.inference_mode()
    def embed_prefixes(self, prefixes: list[torch.Tensor], suffixes: Sequence[torch.Tensor]) -> np.ndarray:
        """Built prefix embeddings ((L_b, H) each) x suffixes -> float32 ``[B, R, D]``: each prefix runs once.

        The daily update builds prefixes from cached modality encodings and embeds them here too.
        """
        b, r = len(prefixes), len(suffixes)
        prefix = encode_prefix_embeddings(self.model, prefixes)  # each user's prefix runs once
        user_index = torch.arange(b, device=self.device).repeat_interleave(r)  # (B*R,): requests fastest
        rows = [s for _ in range(b) for s in suffixes]  # B*R suffixes in the same order
        hidden = torch.cat([anchor_hidden(self.model, prefix, user_index[i : i + self.max_rows], rows[i : i + self.max_rows])
                            for i in range(0, len(rows), self.max_rows)])  # (B*R, H)
        return self.model.project(hidden).view(b, r, -1).cpu().numpy()  # (B*R, D) -> (B, R, D)


def head_scores(heads: Sequence[Head], embeddings: np.ndarray, device: torch.device | str = "cpu") -> np.ndarray:
    """Each head's score of its own column of ``embeddings`` [U, n_heads, D] -> float32 ``[U, n_heads]``."""
    with torch.inference_mode():
        cols = [h.score(torch.from_numpy(embeddings[:, i]).to(device)).detach().float().cpu().numpy()
                for i, h in enumerate(heads)]
    return np.stack(cols, axis=1) if cols else np.zeros((embeddings.shape[0], 0), np.float32)


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
