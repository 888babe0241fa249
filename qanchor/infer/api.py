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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from qanchor.config import DataOverrides, InferConfig, PretrainConfig, TextEncoderConfig, require
from qanchor.config.sections import reading_saved_run
from qanchor.data.dataset import Dataset, EventSeq, UserRecord, in_event_order
from qanchor.data.manifest import Manifest
from qanchor.data.packing import PackedUser
from qanchor.data.pipeline import UserPipeline, batched, check_caps
from qanchor.data.profile import ASPECTS, PROFILE_QUESTIONS, tidy, verify_answer
from qanchor.data.text_cache import SentenceEncoder, TextVectorCache, default_encoder_path, weights_sha256
from qanchor.data.userU_topics import History
from qanchor.errors import CheckpointError, ConfigError, ModelInputError
from qanchor.infer.user_input import record_adapter, to_microseconds, to_record
from qanchor.logs import caller_stacklevel
from qanchor.model.backbone import check_device
from qanchor.model.factory import (
    ModelMeta,
    check_encoder_digest,
    checkpoint_hash,
    head_label,
    load_checkpoint,
    resolve_checkpoint_dir,
    same_model,
    text_encoder_config,
)
from qanchor.model.generation import (
    answer_suffix,
    greedy_generate,
    greedy_generate_uncached,
    language_head,
    option_logprobs,
    option_logprobs_uncached,
)
from qanchor.model.layout import check_utf8, tokenize_query
from qanchor.model.prefix_cache import anchor_hidden, anchor_hidden_uncached, encode_prefix_embeddings
from qanchor.model.qanchor_model import QAnchorModel

__all__ = ["Head", "QAnchor", "Choice", "Profile", "embed", "head_scores", "default_text_cache_dir"]

User = UserRecord | Mapping[str, Any]
Users = User | Iterable[User] | Dataset
_OptionSpec = tuple[torch.Tensor, list[str], list[list[int]]]  # a question's suffix, its option texts and their ids


class Head(Protocol):
    """What ``embed`` needs of a scenario head (``qanchor.tune.head.ScenarioHead`` fits)."""

    query: str
    prompt: torch.Tensor  # (k, H) soft prompt placed at the start of the suffix
    checkpoint_hash: str

    def score(self, embeddings: torch.Tensor) -> torch.Tensor: ...


def default_text_cache_dir() -> Path:
    """Where event-text vectors are cached when no dataset cache is given: ``~/.cache/qanchor/text``."""
    return Path.home() / ".cache" / "qanchor" / "text"


@dataclass(frozen=True)
class Choice:
    """What :meth:`QAnchor.choose` picked for one user: the option and every option's score (mean log-probability
    of its tokens after the user prefix and the question; higher is more likely)."""

    option: str
    scores: dict[str, float]


@dataclass
class Profile:
    """A readable profile (:meth:`QAnchor.describe`): one sentence per aspect, made only of facts that recompute
    from the user's events.

    ``kept`` / ``dropped`` count facts (a clause that could not be read counts as dropped); ``answers`` holds each
    aspect's generated answer and the sentence kept from it (None when no fact of it held).
    """

    user_id: str
    sentences: list[str]
    kept: int
    dropped: int
    answers: dict[str, tuple[str, str | None]] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return " ".join(self.sentences)


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
        if not isinstance(path, (str, Path)) or not str(path):
            raise CheckpointError(f"a checkpoint is a directory path (a pretraining output_dir or its checkpoint/), got {path!r}")
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
        model = cls.from_pretrained(cfg.checkpoint, device=check_device(cfg.device), batch_size=cfg.batch_size,
                                    max_rows=cfg.max_rows, **kwargs)
        if isinstance(getattr(cfg, "data", None), DataOverrides):  # the command's data.max_events etc.
            model.use_packing(cfg.data)
        return model

    def use_packing(self, overrides: DataOverrides) -> None:
        """Pack users with the checkpoint's data section as ``overrides`` changes it (its event caps; the text
        encoder is always the checkpoint's). Only before the first user is packed: one object packs one way."""
        if "pipeline" in self.__dict__:
            raise ModelInputError("use_packing: this model has packed users already; set the event caps first")
        data = overrides.apply(self.run_cfg.data)
        check_caps(data, self.manifest)  # a cap for a modality the model does not have is a typo, not a no-op
        if data.default_max_events < 1 or any(v < 1 for v in data.max_events.values()):
            raise ConfigError(f"data.max_events / default_max_events must be >= 1, got {data.max_events} / "
                              f"{data.default_max_events}")
        with reading_saved_run():  # the checkpoint's recipe, re-checked: a model saved before a check stays usable
            self.run_cfg = replace(self.run_cfg, data=data)

    @property
    def event_caps(self) -> dict[str, int]:
        """How many of each sequence modality's most recent events a user is packed with."""
        return {m.name: self.run_cfg.data.cap(m.name) for m in self.manifest.sequence_modalities}

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
        """The id of the checkpoint this object loaded (``factory.checkpoint_id``: its weights and the files that say
        what they compute, taken as they were read, not later from files a running pretraining may have replaced
        since), or None for a model built in memory."""
        if self.checkpoint_dir is None:
            return None
        return getattr(self.model, "checkpoint_id", None) or checkpoint_hash(self.checkpoint_dir)

    def weights_id(self) -> str:
        """What an output this model writes records as its maker: :attr:`checkpoint_hash`, or for a model built in code
        ``in-code:`` and the SHA-256 of its weights as they are now (taken again on each call: weights in memory can
        change between two calls), so that an update state or a resumed export is never carried on by another model."""
        if self.checkpoint_hash is not None:
            return self.checkpoint_hash
        return f"in-code:{weights_sha256(self.model)}"

    def is_maker(self, recorded: str | None, what: str) -> bool:
        """Whether this model made the output (``what``: a head, an export, a state) whose record names ``recorded``
        as its model; a record written before ids covered the config is accepted for the same weights, with a warning
        (``factory.same_model``)."""
        return same_model(recorded, self.weights_id(), what)

    @cached_property
    def pipeline(self) -> UserPipeline:
        """Packing with the checkpoint's own event caps and encoder; the text cache loads on first use."""
        cache = self._text_cache
        if cache is None:  # loading the sentence encoder costs seconds: only when first needed
            encoder = SentenceEncoder(text_encoder_config(self.meta))
            # the encoder at the recorded path (or the installed package) may no longer be the one trained with: a
            # replaced folder or an upgraded package changes every embedding
            check_encoder_digest(encoder, self.meta.text_encoder_digest, self.checkpoint_dir)
            pipe = UserPipeline.at(self.manifest, self.run_cfg.data, self._text_cache_dir, len(self.tabular_columns),
                                   encoder)
        else:
            _check_cache_encoder(cache, text_encoder_config(self.meta), self.meta.text_encoder_digest, self.checkpoint_dir)
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

        A dataset, or records read from one (which carry its :class:`RecordLayout`), whose columns are laid out
        differently from the model's is remapped by name (``record_adapter``); records built by hand are read in the
        model's column order. Records and dicts are validated one by one as they stream.
        """
        if isinstance(users, Dataset):
            return self.dataset_records(users)
        if isinstance(users, (UserRecord, Mapping)):
            users = [users]
        elif hasattr(users, "to_dict") and "user_id" in getattr(users, "index", ()):  # a DataFrame's row (iterrows,
            # apply) holding one user: iterated, it gave its values, and the error spoke of a DataFrame's column names
            raise ModelInputError("users is a pandas Series holding one user's fields (user_id, events...); pass "
                                  "row.to_dict()")
        elif isinstance(users, (str, bytes)) or not isinstance(users, Iterable):  # a user id is not a user
            raise ModelInputError(f"users must be a user (a dict or UserRecord), an iterable of users or a Dataset, got "
                                  f"{type(users).__name__}" + (f" {users!r}: to embed a dataset's user, pass "
                                                               "dataset.user(id)" if isinstance(users, str) else ""))
        return (to_record(u, self.manifest, self.tabular_columns) for u in users)

    def dataset_records(self, ds: Dataset, user_ids: Sequence[str] | None = None) -> Iterator[UserRecord]:
        """``ds``'s users (all, or ``user_ids`` in the dataset's order) in the model's layout: extra numeric columns and
        tabular features matched by name (``record_adapter``)."""
        adapt = record_adapter(ds.manifest, ds.tabular_columns, self.manifest, self.tabular_columns)
        return (adapt(r) for r in ds.users(user_ids))

    def cutoff_us(self, cutoff: datetime | str | None, key: str = "cutoff") -> int:
        """The moment ages count from, in microseconds since the epoch: ``cutoff`` or the model's cutoff (an error
        names the setting ``key`` it came from)."""
        try:
            return to_microseconds(self.cutoff if cutoff is None else cutoff)
        except ValueError as exc:
            raise ModelInputError(f"{key}: {exc}") from None

    def pack(self, records: Sequence[UserRecord], cutoff_us: int, warned: list[bool] | None = None) -> list[PackedUser]:
        """Keep each modality's most recent ``max_events``, encode new texts in one pass, build features.

        Unlike training packing, events at or after the cutoff are kept, as events of the last moment before it
        (age 0): at inference the caller decides the moment the embedding describes. They are moved there before
        anything reads them, so the event tokens and every statistic (the whole history's included, which counts only
        events before the cutoff) see the same events.
        """
        # sequences are oldest first: only one whose newest event is late holds late events (no scan on the usual path)
        late = sum(int((s.ts >= cutoff_us).sum()) for r in records for s in r.events.values()
                   if len(s.ts) and s.ts[-1] >= cutoff_us)
        if late:
            if not (warned and warned[0]):  # ``warned``: once per call of iter_embed (a 1M-user stream said it 1,000 times)
                more = "" if warned is None else f" among {len(records):,} users (said once per call: others may hold more)"
                warnings.warn(f"{late} events are at or after the cutoff{more} and count as events of its last moment "
                              "(age 0); pass cutoff= the moment the embedding should describe (e.g. now)",
                              stacklevel=caller_stacklevel())
                if warned:
                    warned[0] = True
            records = [_moved_before(r, cutoff_us) for r in records]
        kept = [self.pipeline.packer.recent(r) for r in records]
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

    def query_vectors(self, queries: Sequence[str]) -> torch.Tensor | None:
        """(R, T) the frozen sentence encoder's vectors of ``queries`` (the event texts' encoder), which a model with
        ``model.query_evidence`` compares with the user's events; None for a model without it."""
        texts = [q.strip() for q in queries]
        for i, text in enumerate(texts):
            check_utf8(text, f"query {i}")
        if self.model.query_evidence is None:
            return None
        self.pipeline.cache.encoder.refuse_cut(texts, "query")
        vectors = self.pipeline.cache.encoder.encode(texts)
        return torch.from_numpy(vectors).to(self.device)

    def request_vectors(self, requests: Sequence[tuple[str, Head | None]]) -> torch.Tensor | None:
        """(R, T) what each (query, head) request looks up in the user's events (``model.query_evidence``): the
        head's tuned look-up vector where it has one (``ScenarioHead.lookup``), else the query's sentence vector;
        None for a model without query evidence."""
        vectors = self.query_vectors([q for q, _ in requests])
        if vectors is None:
            return None
        for i, (_, head) in enumerate(requests):
            lookup = getattr(head, "lookup", None)
            if lookup is not None:
                if lookup.shape != vectors[i].shape:
                    raise CheckpointError(f"head for query {head.query!r} has a look-up vector of shape "
                                          f"{tuple(lookup.shape)}; this model's event texts are {tuple(vectors[i].shape)}")
                vectors[i] = lookup.detach().to(vectors.device, vectors.dtype)
        return vectors

    def _check_head(self, head: Head) -> torch.Tensor:
        for attr in ("prompt", "checkpoint_hash", "query", "score"):
            if not hasattr(head, attr):
                raise ModelInputError(f"head has no '{attr}': pass a ScenarioHead (qanchor.tune) or None")
        if self.checkpoint_hash is not None and not self.is_maker(head.checkpoint_hash,
                                                                  head_label(getattr(head, "source", None), head.query)):
            raise CheckpointError(f"head for query {head.query!r} was tuned on checkpoint {head.checkpoint_hash[:12]}, "
                                  f"not this one ({self.checkpoint_hash[:12]}); re-run prompt-tune on this checkpoint")
        caps = getattr(head, "extra", {}).get("event_caps")  # None: a head saved before heads recorded them
        if caps is not None and dict(caps) != self.event_caps:  # its readout was fitted on users packed otherwise
            raise CheckpointError(f"head for query {head.query!r} was tuned on users packed with {dict(caps)} most recent "
                                  f"events per modality, and this model packs {self.event_caps}: serve it with the "
                                  f"caps it was tuned with (data.max_events={dict(caps)}), or tune it again")
        prompt = head.prompt.detach().to(self.device)
        if prompt.ndim != 2 or prompt.shape[1] != self.model.hidden_size:
            raise CheckpointError(f"head prompt has shape {tuple(prompt.shape)}, expected (k, {self.model.hidden_size})")
        return prompt

    # ------------------------------------------------------------------------------------- embedding
    def iter_embed(self, users: Users, requests: Sequence[tuple[str, Head | None]], use_cache: bool = True,
                   cutoff: datetime | str | None = None, late_said: list[bool] | None = None
                   ) -> Iterator[tuple[list[str], np.ndarray]]:
        """The one embedding loop: stream users, yield ``(user_ids, float32 [B, R, D])`` per batch.

        Memory stays flat in the number of users: ``stream_users`` records are held at a time (their new
        event texts encoded in one pass), ``batch_size`` of them share one prefix pass, at most ``max_rows``
        (user, request) suffixes run per forward. Export, the daily update and the benchmark all embed here.

        ``late_said``: a flag shared by several calls (an export's shards) so that events past the cutoff are said once
        for all of them; by default once per call.

        Example:
            >>> for ids, emb in model.iter_embed(load_dataset("data/synth"), [("Will this user churn?", None)]):  # doctest: +SKIP
            ...     write(ids, emb)
        """
        suffixes = self.suffixes(requests)
        query_vectors = self.request_vectors(requests)
        cutoff_us = self.cutoff_us(cutoff)
        warned = [False] if late_said is None else late_said
        for records in batched(self.records(users), self.stream_users):
            packed = self.pack(records, cutoff_us, warned)
            for start in range(0, len(packed), self.batch_size):
                part = packed[start : start + self.batch_size]
                yield [p.user_id for p in part], self.embed_packed(part, suffixes, use_cache, query_vectors)

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
        # one question, or questions in an order (any iterable but a set or mapping, whose order the caller cannot
        # know, and bytes, which iterate as numbers); the result's query axis follows it
        if not isinstance(queries, Iterable) or isinstance(queries, (AbstractSet, Mapping, bytes, bytearray)):
            raise ModelInputError(f"queries must be a question or a list of questions, got {type(queries).__name__}")
        queries = [queries] if isinstance(queries, str) else list(queries)
        return self.embed_many(users, [(q, head) for q in queries], use_cache=use_cache, cutoff=cutoff)

    def score(self, users: Users, head: Head, cutoff: datetime | str | None = None) -> np.ndarray:
        """The head's score of each user's embedding under the head's own query -> ``[U]``."""
        return self.score_many(users, [head], cutoff)[:, 0]

    def score_many(self, users: Users, heads: Sequence[Head], cutoff: datetime | str | None = None) -> np.ndarray:
        """Scores of several heads from one prefix pass per user -> ``[U, n_heads]``."""
        return head_scores(heads, self.embed_many(users, [(h.query, h) for h in heads], cutoff=cutoff))

    @torch.inference_mode()
    def embed_packed(self, packed: Sequence[PackedUser], suffixes: Sequence[torch.Tensor], use_cache: bool = True,
                     query_vectors: torch.Tensor | None = None) -> np.ndarray:
        """Packed users x suffixes -> float32 ``[B, R, D]`` (the step inside :meth:`iter_embed`). ``query_vectors``
        (R, T): :meth:`query_vectors` of the suffixes' queries, required by a model with ``model.query_evidence``."""
        if not packed:
            return np.zeros((0, len(suffixes), self.embedding_dim), np.float32)
        batch = self.pipeline.collate(packed).to(self.device)
        b, r = len(packed), len(suffixes)
        user_index = torch.arange(b, device=self.device).repeat_interleave(r)  # (B*R,): requests fastest
        if self.model.query_evidence is not None and (query_vectors is None or len(query_vectors) != r):
            raise ModelInputError(f"this model weighs the user's events by the query (model.query_evidence): pass "
                                  f"query_vectors, one per suffix ({r}), from QAnchor.query_vectors(queries)")
        evidence = self.model.evidence(batch, user_index, None if query_vectors is None else query_vectors.repeat(b, 1))
        if not use_cache:
            rows = [s for _ in range(b) for s in suffixes]
            hidden = torch.cat([anchor_hidden_uncached(self.model, batch, user_index[i : i + self.max_rows],
                                                       rows[i : i + self.max_rows]) for i in range(0, len(rows), self.max_rows)])
            stats = self.model.user_statistics(batch)
            return self.model.project(hidden, None if stats is None else stats[user_index], evidence).view(b, r, -1).cpu().numpy()
        return self.embed_prefixes(self.model.prefixes(batch), suffixes, self.model.user_statistics(batch), evidence)

    @torch.inference_mode()
    def embed_prefixes(self, prefixes: list[torch.Tensor], suffixes: Sequence[torch.Tensor],
                       statistics: torch.Tensor | None = None, evidence: torch.Tensor | None = None) -> np.ndarray:
        """Built prefix embeddings ((L_b, H) each) x suffixes -> float32 ``[B, R, D]``: each prefix runs once.
        ``statistics`` (B, S): the users' :meth:`QAnchorModel.user_statistics`, required with a statistics path;
        ``evidence`` (B*R, F), requests fastest: :meth:`QAnchorModel.evidence` of each (user, query), required with
        ``model.query_evidence``.

        The daily update builds prefixes from cached modality encodings and embeds them here too.
        """
        b, r = len(prefixes), len(suffixes)
        prefix = encode_prefix_embeddings(self.model, prefixes)  # each user's prefix runs once
        user_index = torch.arange(b, device=self.device).repeat_interleave(r)  # (B*R,): requests fastest
        rows = [s for _ in range(b) for s in suffixes]  # B*R suffixes in the same order
        hidden = torch.cat([anchor_hidden(self.model, prefix, user_index[i : i + self.max_rows], rows[i : i + self.max_rows])
                            for i in range(0, len(rows), self.max_rows)])  # (B*R, H)
        stats = None if statistics is None else statistics[user_index]
        return self.model.project(hidden, stats, evidence).view(b, r, -1).cpu().numpy()  # (B*R, D) -> (B, R, D)

    # ----------------------------------------------------------------------------------- in words
    def check_language_head(self) -> None:
        """CheckpointError unless this checkpoint's next-token tower was trained (answer / choose / describe need it)."""
        if self.run_cfg.loss.mode == "contrastive":
            raise CheckpointError(f"{self.checkpoint_dir or 'this model'} was pretrained with loss.mode=contrastive: its "
                                  "language head never learned to answer; use a checkpoint pretrained with loss.mode=both")
        language_head(self.model)

    def _question_suffix(self, question: object) -> torch.Tensor:
        if not isinstance(question, str) or not question.strip():
            raise ModelInputError(f"a question must be non-empty text, got {question!r}")
        ids = tokenize_query(self.tokenizer, question.strip(), self.run_cfg.model.max_query_tokens)
        with torch.inference_mode():
            return answer_suffix(self.model, torch.tensor(ids, dtype=torch.long, device=self.device))

    def option_ids(self, text: str, truncate: bool = False) -> list[int]:
        """Token ids of an option as an answer: at most the ``model.max_answer_tokens - 1`` tokens the model learned to
        write (pretraining cut longer answers there, then closed them); longer is an error unless ``truncate``."""
        if not isinstance(text, str):
            raise ModelInputError(f"an option must be text, got {type(text).__name__} {text!r}")
        check_utf8(text, f"option {text[:60]!r}")
        ids = self.tokenizer(text, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]
        limit = self.run_cfg.model.max_answer_tokens - 1
        if not ids:  # it would be scored on the end token alone, and could win
            raise ModelInputError(f"option {text!r} has no tokens (only characters the tokenizer drops, such as zero-width "
                                  "spaces); write the answer in words")
        if len(ids) > limit and not truncate:
            raise ModelInputError(f"option {text[:60]!r} has {len(ids)} tokens, more than the {limit} answer tokens this "
                                  "model was trained to write (model.max_answer_tokens - 1); shorten it (in Python, truncate=True cuts it)")
        return ids[:limit]

    def _options(self, options: object, truncate: bool = False) -> tuple[list[str], list[list[int]]]:
        """Option texts and their token ids; at least two distinct, non-empty options the model can have written."""
        if isinstance(options, str) or not isinstance(options, Sequence) or len(options) < 2:
            raise ModelInputError(f"options must be a list of at least 2 answers to choose from, got {options!r}")
        texts = []
        for o in options:
            if not isinstance(o, str) or not o.strip():
                raise ModelInputError(f"every option must be non-empty text, got {o!r}")
            texts.append(o.strip())
        ids = [self.option_ids(t, truncate) for t in texts]
        if len(set(map(tuple, ids))) < len(texts):
            same = [t for t, i in zip(texts, ids) if ids.count(i) > 1]
            if len(set(same)) < len(same):
                raise ModelInputError(f"options repeat: {same}; give distinct options")
            raise ModelInputError(f"options {same} are read the same by this model's tokenizer"
                                  f"{' once cut to the answer length' if truncate else ''} (it may drop case, accents and "
                                  "characters it does not know); give options that differ in words")
        return texts, ids

    def decode(self, ids: Sequence[int]) -> str:
        """Generated ids -> readable text (special tokens dropped, WordPiece spacing tidied)."""
        return tidy(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def _user_batches(self, users: Users, cutoff: datetime | str | None
                      ) -> Iterator[tuple[list[UserRecord], list[torch.Tensor]]]:
        """Stream users as (records, prefix embeddings) of ``batch_size`` users, packed as :meth:`iter_embed` packs."""
        cutoff_us = self.cutoff_us(cutoff)
        warned = [False]
        for records in batched(self.records(users), self.stream_users):
            packed = self.pack(records, cutoff_us, warned)
            for start in range(0, len(packed), self.batch_size):
                with torch.inference_mode():
                    prefixes = self.model.prefixes(self.pipeline.collate(packed[start : start + self.batch_size]).to(self.device))
                yield records[start : start + self.batch_size], prefixes

    def prefix_lengths(self, users: Users, cutoff: datetime | str | None = None) -> np.ndarray:
        """How many positions each user's prefix takes in the LLM (the prompt cost of reading the user) -> ``[U]``."""
        return np.array([p.shape[0] for _, prefixes in self._user_batches(users, cutoff) for p in prefixes], np.int64)

    def _chunks(self, rows: list[tuple[int, torch.Tensor]]) -> Iterator[tuple[torch.Tensor, list[torch.Tensor], slice]]:
        for i in range(0, len(rows), self.max_rows):
            part = rows[i : i + self.max_rows]
            yield torch.tensor([u for u, _ in part], device=self.device), [s for _, s in part], slice(i, i + len(part))

    def _generate(self, prefixes: list[torch.Tensor], rows: list[tuple[int, torch.Tensor]], max_new_tokens: int,
                  use_cache: bool) -> list[list[int]]:
        out: list[list[int]] = []
        with torch.inference_mode():
            cache = encode_prefix_embeddings(self.model, prefixes) if use_cache else None  # each prefix runs once
            for index, suffixes, _ in self._chunks(rows):
                out += (greedy_generate(self.model, cache, index, suffixes, max_new_tokens) if cache is not None
                        else greedy_generate_uncached(self.model, prefixes, index, suffixes, max_new_tokens))
        return out

    def answer(self, users: Users, questions: str | Sequence[str], max_new_tokens: int = 48, use_cache: bool = True,
               cutoff: datetime | str | None = None) -> list[list[str]]:
        """Greedy answer to every question about every user -> ``[U][Q]`` texts.

        The user's prefix is the one :meth:`embed` caches; each question runs on it in the pretraining layout
        ``question <|user_emb|> <|answer|>``. ``use_cache=False`` re-runs every full sequence (the reference).

        Example:
            >>> model.answer(ds.user("1234"), ["How recently was this user active?"])  # doctest: +SKIP
            [['Last event by modality: purchase 3 days ago, visit 3 days ago.']]
        """
        self.check_language_head()
        questions = [questions] if isinstance(questions, str) else list(questions)
        if not questions:
            raise ModelInputError("no question given; pass at least one question")
        if max_new_tokens < 1:
            raise ModelInputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        suffixes = [self._question_suffix(q) for q in questions]
        out: list[list[str]] = []
        for records, prefixes in self._user_batches(users, cutoff):
            ids = self._generate(prefixes, [(b, s) for b in range(len(records)) for s in suffixes], max_new_tokens, use_cache)
            texts = [self.decode(t) for t in ids]
            out += [texts[b * len(suffixes) : (b + 1) * len(suffixes)] for b in range(len(records))]
        return out

    def choose(self, users: Users, question: str | Sequence[str], options: Sequence[str] | Sequence[Sequence[str]],
               use_cache: bool = True, cutoff: datetime | str | None = None, truncate: bool = False) -> list[Choice]:
        """Multiple choice: per user, the option with the highest mean log-probability of its tokens (and the end
        token) after the user prefix and the question -> one :class:`Choice` per user.

        ``question`` and ``options`` are shared by every user, or given per user (a list of questions, a list of
        option lists, in the users' order). ``truncate`` scores only the first ``model.max_answer_tokens - 1`` tokens
        of a longer option (what pretraining taught the model to write) instead of refusing it.

        Example:
            >>> model.choose(user, "Which categories does this user engage with most?",
            ...              ["Top categories: purchase/grocery", "Top categories: purchase/produce"])[0].option  # doctest: +SKIP
            'Top categories: purchase/grocery'
        """
        self.check_language_head()
        shared_q = isinstance(question, str)
        shared_o = isinstance(options, Sequence) and not isinstance(options, str) and all(isinstance(o, str) for o in options)
        fixed_q = self._question_suffix(question) if shared_q else None
        fixed_o = self._options(options, truncate) if shared_o else None

        def specs(i: int) -> list[_OptionSpec]:
            for name, per_user, shared in (("question", question, shared_q), ("options", options, shared_o)):
                if not shared and i >= len(per_user):  # type: ignore[arg-type]
                    raise ModelInputError(f"{name} is given per user but has {len(per_user)} entries for more users")  # type: ignore[arg-type]
            suffix = fixed_q if fixed_q is not None else self._question_suffix(question[i])
            texts, ids = fixed_o if fixed_o is not None else self._options(options[i], truncate)  # type: ignore[index]
            return [(suffix, texts, ids)]

        out = [row[0] for row in self._choose_rows(users, specs, use_cache, cutoff)]
        for name, per_user, shared in (("question", question, shared_q), ("options", options, shared_o)):
            if not shared and len(per_user) != len(out):  # type: ignore[arg-type]
                raise ModelInputError(f"{name} is given per user: {len(per_user)} entries for {len(out)} users")  # type: ignore[arg-type]
        return out

    def choose_many(self, users: Users, questions: Sequence[tuple[str, Sequence[str]]] | Sequence[Sequence[tuple[str, Sequence[str]]]],
                    use_cache: bool = True, cutoff: datetime | str | None = None, truncate: bool = False
                    ) -> list[list[Choice]]:
        """Several multiple-choice questions per user on one reading of the user -> ``[U][Q]`` :class:`Choice` s.

        ``questions`` is a list of ``(question, options)`` pairs asked of every user, or one such list per user (in
        the users' order; the lists may differ in length). Each user's prefix runs through the model once, and every
        question and option of that user is scored on it, where :meth:`choose` would re-read the user for each
        question. Each result equals :meth:`choose` of that question alone (tested).

        Example:
            >>> model.choose_many(users, [("Will this household redeem a coupon?", ["Yes", "No"]),
            ...                           ("Will this household churn?", ["Yes", "No"])])[0][1].option  # doctest: +SKIP
            'No'
        """
        self.check_language_head()
        if isinstance(questions, str) or not isinstance(questions, Sequence) or not questions:
            raise ModelInputError(f"questions must be a non-empty list of (question, options) pairs, got {questions!r}")

        def is_pair(item: object) -> bool:
            return (isinstance(item, Sequence) and not isinstance(item, str) and len(item) == 2
                    and isinstance(item[0], str))

        def parse(pairs: object, where: str) -> list[_OptionSpec]:
            if isinstance(pairs, str) or not isinstance(pairs, Sequence) or not pairs or not all(map(is_pair, pairs)):
                raise ModelInputError(f"{where}: expected a non-empty list of (question, options) pairs, got {pairs!r}")
            return [(self._question_suffix(q), *self._options(o, truncate)) for q, o in pairs]  # type: ignore[misc]

        if is_pair(questions[0]):
            shared = parse(questions, "questions")
            return self._choose_rows(users, lambda i: shared, use_cache, cutoff)

        def per_user(i: int) -> list[_OptionSpec]:
            if i >= len(questions):
                raise ModelInputError(f"questions are given per user but have {len(questions)} entries for more users")
            return parse(questions[i], f"questions for user {i}")

        out = self._choose_rows(users, per_user, use_cache, cutoff)
        if len(questions) != len(out):
            raise ModelInputError(f"questions are given per user: {len(questions)} entries for {len(out)} users")
        return out

    def _choose_rows(self, users: Users, specs: Callable[[int], list[_OptionSpec]], use_cache: bool,
                     cutoff: datetime | str | None) -> list[list[Choice]]:
        """``specs(i)``: user ``i``'s (question suffix, option texts, option ids) -> per user, one Choice per spec."""
        out: list[list[Choice]] = []
        for records, prefixes in self._user_batches(users, cutoff):
            asked = [specs(len(out) + b) for b in range(len(records))]
            rows = [(b, s, o) for b, user_specs in enumerate(asked) for s, _, ids in user_specs for o in ids]
            scores = self._option_scores(prefixes, rows, use_cache).tolist()
            at = 0
            for user_specs in asked:
                row = []
                for _, texts, _ in user_specs:
                    own = scores[at : at + len(texts)]
                    at += len(texts)
                    row.append(Choice(texts[int(np.argmax(own))], dict(zip(texts, own))))
                out.append(row)
        return out

    def _option_scores(self, prefixes: list[torch.Tensor], rows: list[tuple[int, torch.Tensor, list[int]]],
                       use_cache: bool) -> np.ndarray:
        options = [o for _, _, o in rows]
        out = []
        with torch.inference_mode():
            cache = encode_prefix_embeddings(self.model, prefixes) if use_cache else None
            for index, suffixes, part in self._chunks([(u, s) for u, s, _ in rows]):
                out.append(option_logprobs(self.model, cache, index, suffixes, options[part]) if cache is not None
                           else option_logprobs_uncached(self.model, prefixes, index, suffixes, options[part]))
        return torch.cat(out).cpu().numpy().astype(np.float64) if out else np.zeros(0)

    def describe(self, user: User, aspects: Sequence[str] | None = None, cutoff: datetime | str | None = None,
                 use_cache: bool = True) -> Profile:
        """A short profile from the model's own answers to the profile questions (``qanchor.data.profile``): each
        answer is read fact by fact, and only facts that recompute from the user's events before the cutoff are
        written out (in the aspect's template, with the user's own names); the rest are counted as dropped.

        Example:
            >>> p = model.describe(ds.user("hh_0841"))  # doctest: +SKIP
            >>> p.text, p.kept, p.dropped  # doctest: +SKIP
            ('Time of day: most active in the evening, 18:00-24:00 UTC. Last event: purchase 1 day ago.', 2, 19)
        """
        if isinstance(user, Dataset) or not isinstance(user, (UserRecord, Mapping)):
            raise ModelInputError("describe takes one user (a record or a dict); use describe_many for several")
        return self.describe_many([user], aspects, cutoff, use_cache)[0]

    def describe_many(self, users: Users, aspects: Sequence[str] | None = None, cutoff: datetime | str | None = None,
                      use_cache: bool = True) -> list[Profile]:
        """:meth:`describe` for many users, each batch of users sharing one prefix pass."""
        self.check_language_head()
        # each aspect once: a repeat was asked and counted twice, and shown once
        aspects = list(dict.fromkeys(ASPECTS if aspects is None else aspects))
        unknown = [a for a in aspects if a not in PROFILE_QUESTIONS]
        if unknown or not aspects:
            raise ModelInputError(f"unknown profile aspects {unknown}; choose from {', '.join(ASPECTS)}")
        suffixes = [self._question_suffix(PROFILE_QUESTIONS[a]) for a in aspects]
        cutoff_us = self.cutoff_us(cutoff)
        extra = {m.name: m.numeric_columns for m in self.manifest.sequence_modalities}

        @lru_cache(maxsize=65_536)
        def as_read(text: str) -> str:  # a user's item as an answer can spell it (an uncased WordPiece: "cafe", [UNK])
            return tidy(self.tokenizer.decode(self.tokenizer(text, add_special_tokens=False)["input_ids"],
                                              skip_special_tokens=True))  # as decode() writes an answer

        out = []
        for records, prefixes in self._user_batches(users, cutoff):
            ids = self._generate(prefixes, [(b, s) for b in range(len(records)) for s in suffixes],
                                 self.run_cfg.model.max_answer_tokens, use_cache)
            for b, record in enumerate(records):
                # the events the model read: late ones count as the cutoff's last moment (pack), not dropped
                history = History(_moved_before(record, cutoff_us).events, cutoff_us, extra)
                answers, kept, dropped = {}, 0, 0
                for a, t in zip(aspects, ids[b * len(aspects) : (b + 1) * len(aspects)]):
                    text = self.decode(t)
                    checked = verify_answer(a, text, history, as_read)
                    answers[a] = (text, checked.sentence)
                    kept, dropped = kept + checked.kept, dropped + checked.dropped
                sentences = [s for _, s in answers.values() if s is not None]
                out.append(Profile(record.user_id, sentences, kept, dropped, answers))
        return out


def head_scores(heads: Sequence[Head], embeddings: np.ndarray) -> np.ndarray:
    """Each head's score of its own column of ``embeddings`` [U, n_heads, D] -> float32 ``[U, n_heads]``.

    Scored where the head's tensors are (its prompt's device): a head loaded on the CPU scores a GPU model's
    embeddings without being moved, since the embeddings are host arrays already."""
    with torch.inference_mode():
        cols = [h.score(torch.from_numpy(embeddings[:, i]).to(h.prompt.device)).detach().float().cpu().numpy()
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


def _check_cache_encoder(cache: TextVectorCache, trained: TextEncoderConfig, trained_digest: str | None,
                         checkpoint: Path | None) -> None:
    """A text cache handed in must hold the vectors of the encoder the model was trained with: the same encoder and
    token limit (a cache built with ``max_length=5`` moved embeddings by 0.2 without a word). The encoder is compared by
    content (:attr:`SentenceEncoder.digest`: weights, tokenizer, settings), not by where it lies, so a checkpoint whose
    encoder folder has moved is served through a cache opened on the new place. A checkpoint from before the key was
    recorded is compared by path, and by the digest of the encoder at its recorded path (refused where that is gone). Its
    dimension is checked apart; an encoder object without a config (a stand-in) is taken as it is."""
    given = getattr(cache.encoder, "cfg", None)
    if given is None:
        return

    def where(cfg: TextEncoderConfig) -> Path:
        return Path(cfg.path or default_encoder_path()).expanduser().resolve()

    def refusal(why: str) -> CheckpointError:
        return CheckpointError(f"the text cache given holds vectors of encoder {given.path or 'all-MiniLM-L6-v2'} with "
                               f"max_length={given.max_length}, but {checkpoint or 'this model'} was trained with "
                               f"{trained.path or 'all-MiniLM-L6-v2'} and max_length={trained.max_length}{why}; open the "
                               "cache with the checkpoint's encoder (or pass none: the model opens its own)")

    if given.max_length != trained.max_length:
        raise refusal("")
    if trained_digest is not None:
        check_encoder_digest(cache.encoder, trained_digest, checkpoint, refusal)
        return
    if where(given) != where(trained):
        if not where(trained).exists():  # nothing left to compare with: another encoder of the same width would pass
            raise refusal(" (a checkpoint that did not record what its encoder computes, and whose encoder cannot be found "
                   "where it was recorded: put it back there)")
        if cache.encoder.digest != SentenceEncoder(trained, device=getattr(cache.encoder, "device", None)).digest:
            raise refusal(" (a checkpoint that did not record its encoder's digest: compared with the encoder at its recorded path)")


def events_before(events: Mapping[str, EventSeq], cutoff_us: int) -> dict[str, EventSeq]:
    """Each modality's events strictly before ``cutoff_us`` (modalities left empty are dropped)."""
    out = {}
    for m, seq in events.items():
        keep = seq.ts < cutoff_us
        if keep.any():
            out[m] = EventSeq(seq.ts[keep], [t for t, k in zip(seq.text, keep) if k], seq.value[keep], seq.extras[keep])
    return out


def _moved_before(record: UserRecord, cutoff_us: int) -> UserRecord:
    """``record`` with its events at or after ``cutoff_us`` moved to the microsecond before it: then events of one
    instant, in the order of their content, as the same events given at that instant are."""
    if not any(len(s.ts) and s.ts[-1] >= cutoff_us for s in record.events.values()):
        return record
    events = {m: s if not len(s.ts) or s.ts[-1] < cutoff_us else
              in_event_order(EventSeq(np.minimum(s.ts, cutoff_us - 1), s.text, s.value, s.extras))
              for m, s in record.events.items()}
    return UserRecord(record.user_id, events, record.tabular)
