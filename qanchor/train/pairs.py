"""UserU pairs -> PretrainBatch stream: deterministic per (seed, step), resumable, partition-local.

Each epoch shuffles the order of user partitions and the pairs inside each partition, so a batch's
users come from one or two partitions and only those are held in memory. With ``group_size`` g > 1 a
partition's pairs are cut into groups of g pairs that share one query (then the groups are shuffled): in
a group only the users tell the answers apart, so the contrastive task cannot be solved from the question. The pairs of step ``s`` are
a pure function of (seed, s): resuming at step ``s`` needs no replay, and rank ``r`` of ``W`` takes
rows ``[r*B, (r+1)*B)`` of the global batch.

Example:
    >>> stream = PretrainStream(ds, pipe, tokenizer, model.token_ids, cfg.model, seed=0, uqa_fraction=0.5)  # doctest: +SKIP
    >>> batch = stream.batch(step=0, batch_size=16)  # doctest: +SKIP
"""

from __future__ import annotations

import zlib
from dataclasses import replace
from functools import lru_cache

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from qanchor.config import ModelConfig, PretrainConfig
from qanchor.data.batch import pad_token_ids
from qanchor.data.dataset import Dataset, UserRecord
from qanchor.data.history import WINDOW_STATS, window_stats
from qanchor.data.packing import PackedUser
from qanchor.data.pipeline import UserPipeline
from qanchor.data.schema import USERU_FILE
from qanchor.data.text_cache import TextVectorCache
from qanchor.errors import ConfigError
from qanchor.model.layout import TokenIds, tokenize_answer, tokenize_query
from qanchor.model.qanchor_model import PretrainBatch

__all__ = ["PretrainStream", "check_profile_sources", "is_held_out"]

_HOLDOUT_BUCKETS = 1_000_000
_US_PER_DAY = 86_400 * 1_000_000


def is_held_out(user_id: str, fraction: float) -> bool:
    """Whether ``user_id`` is among the ``fraction`` of users kept out of pretraining (a fixed hash of the id, so
    the same users on every machine and in every run with the same fraction)."""
    return fraction > 0 and zlib.crc32(user_id.encode()) % _HOLDOUT_BUCKETS < fraction * _HOLDOUT_BUCKETS


def check_profile_sources(pairs: pa.Table, sources: list[str], path) -> None:
    """ConfigError unless every source ``loss.profile_sources`` names is in the ``pairs`` table read from ``path``."""
    present = set(pc.unique(pairs.column("source")).to_pylist())
    if missing := sorted(set(sources) - present):
        raise ConfigError(f"loss.profile_sources names {missing}, which {path} does not hold (its sources: "
                          f"{sorted(present)}); name sources it holds, or null for every pair")


class PretrainStream:
    def __init__(self, ds: Dataset, pipe: UserPipeline, tokenizer, token_ids: TokenIds, model_cfg: ModelConfig,
                 seed: int, uqa_fraction: float = 0.5, group_size: int = 1, answer_cache: TextVectorCache | None = None,
                 holdout_users: float = 0.0, profile_sources: list[str] | None = None, future_days: int | None = None):
        self.ds, self.pipe, self.tokenizer, self.token_ids, self.model_cfg = ds, pipe, tokenizer, token_ids, model_cfg
        self.seed, self.group_size, self.answer_cache = seed, group_size, answer_cache
        table = ds.userU().sort_by([("user_id", "ascending"), ("cutoff", "ascending"), ("source", "ascending"), ("query", "ascending")])
        if holdout_users > 0:  # held-out users' pairs never enter pretraining (qanchor uqa asks about them)
            users = table.column("user_id").to_pylist()
            table = table.filter(pa.array([not is_held_out(u, holdout_users) for u in users]))
        self.user_ids = table.column("user_id").to_numpy(zero_copy_only=False).astype(object)
        self.cutoff_us = table.column("cutoff").cast("int64").to_numpy()
        self.queries = table.column("query").to_pylist()
        self.answers = table.column("answer").to_pylist()
        is_uqa = pc.equal(table.column("source"), "uqa").to_numpy(zero_copy_only=False)
        self.profile_rows = None  # bool per pair: does the profile loss apply (loss.profile_sources)?
        if profile_sources is not None:
            check_profile_sources(table, profile_sources, ds.root / USERU_FILE)
            self.profile_rows = pc.is_in(table.column("source"), pa.array(sorted(profile_sources))).to_numpy(zero_copy_only=False)
        parts = ds.partitions
        # Future targets (loss.future_weight): the pairs whose window of future_days after their cutoff ends by the
        # dataset's cutoff, so every event of it is in the dataset (forecast / future pairs; uqa pairs sit at the cutoff)
        self.future_days = future_days
        self.future_complete = None
        if future_days is not None:
            self.future_complete = self.cutoff_us + future_days * _US_PER_DAY <= pipe.packer.cutoff_us
        self.partition_of = np.searchsorted(parts.bounds, np.searchsorted(parts.user_ids, self.user_ids), side="right") - 1
        self._epoch_plan = self._plan(is_uqa, uqa_fraction)
        self._epoch_cache: tuple[int, np.ndarray] | None = None
        self._records: dict[int, dict[str, UserRecord]] = {}
        self._tok_query = lru_cache(maxsize=65536)(lambda q: tokenize_query(tokenizer, q, model_cfg.max_query_tokens))
        self._tok_answer = lru_cache(maxsize=65536)(
            lambda a: tokenize_answer(tokenizer, a, model_cfg.max_answer_tokens, token_ids.end))

    def future_targets(self, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Pairs ``ids`` -> float32 [n, F] window statistics of the ``future_days`` after each pair's cutoff
        (:func:`window_stats` per sequence modality, manifest order; zeros where the window is incomplete) and bool
        [n]: whether the window is complete (a target)."""
        if self.future_days is None:
            raise ValueError("this stream was built without future_days (loss.future_weight is 0)")
        names = [m.name for m in self.ds.manifest.sequence_modalities]
        out = np.zeros((len(ids), len(names) * len(WINDOW_STATS)), np.float32)
        complete = self.future_complete[ids]
        for row, i in enumerate(ids):
            if complete[row]:
                events = self._record(self.user_ids[i], int(self.partition_of[i])).events
                out[row] = np.concatenate([window_stats(events.get(n), int(self.cutoff_us[i]), self.future_days)
                                           for n in names])
        return torch.from_numpy(out), torch.from_numpy(complete.copy())

    @classmethod
    def for_run(cls, ds: Dataset, pipe: UserPipeline, tokenizer, token_ids: TokenIds, cfg: PretrainConfig,
                seed: int | None = None, future_days: int | None = None) -> PretrainStream:
        """The stream a pretraining run with ``cfg`` reads (``seed`` defaults to ``train.seed``). ``future_days``
        adds future targets of that window whatever the run's ``loss.future_weight`` (a diagnostic's)."""
        tc, loss = cfg.train, cfg.loss
        if future_days is None and loss.future_weight > 0:
            future_days = loss.future_days
        return cls(ds, pipe, tokenizer, token_ids, cfg.model, tc.seed if seed is None else seed, tc.uqa_fraction,
                   tc.query_group_size, holdout_users=tc.holdout_users,
                   profile_sources=loss.profile_sources if loss.profile_weight > 0 else None, future_days=future_days)

    def __len__(self) -> int:
        """Pairs per epoch (after balancing the two sources)."""
        return sum(len(f) + k for f, _, k in self._epoch_plan.values())

    def _plan(self, is_uqa: np.ndarray, uqa_fraction: float) -> dict[int, tuple[np.ndarray, np.ndarray, int]]:
        """Per partition: (future pair ids, uqa pair ids, how many uqa pairs an epoch samples)."""
        plan = {}
        for part in np.unique(self.partition_of):
            idx = np.flatnonzero(self.partition_of == part)
            fut, uqa = idx[~is_uqa[idx]], idx[is_uqa[idx]]
            if uqa_fraction == 1:  # uqa pairs only (0: future and forecast pairs only)
                fut = fut[:0]
            if 0 < uqa_fraction < 1 and len(fut):
                k = min(len(uqa), int(round(len(fut) * uqa_fraction / (1 - uqa_fraction))))
            else:
                k = len(uqa) if uqa_fraction > 0 else 0
            plan[int(part)] = (fut, uqa, k)
        return plan

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Pair ids of one epoch: partitions in shuffled order, pairs shuffled within each."""
        if self._epoch_cache is not None and self._epoch_cache[0] == epoch:
            return self._epoch_cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        chunks, remainders = [], []
        for part in rng.permutation(sorted(self._epoch_plan)):
            fut, uqa, k = self._epoch_plan[int(part)]
            chosen = np.concatenate([fut, rng.choice(uqa, size=k, replace=False) if k < len(uqa) else uqa])
            if self.group_size > 1:
                groups, rest = self._grouped(chosen, rng)
                chunks.append(groups)
                remainders.append(rest)
            else:
                chunks.append(rng.permutation(chosen))
        # fewer than group_size pairs per partition are left over: last in the epoch, so groups stay batch-aligned
        order = np.concatenate(chunks + remainders) if chunks else np.zeros(0, np.int64)
        self._epoch_cache = (epoch, order)
        return order

    def _grouped(self, ids: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """``ids`` as shuffled groups of ``group_size`` pairs sharing a query (pairs of queries too rare to fill a
        group form mixed groups), and the fewer than ``group_size`` pairs left over."""
        g = self.group_size
        by_query: dict[str, list[int]] = {}  # in ids' order, as a mask per query kept them; one pass, where a mask per
        for i in ids:  # distinct query cost pairs x queries (forecast questions name categories: thousands of them)
            by_query.setdefault(self.queries[i], []).append(i)
        groups, rest = [], []
        for q in sorted(by_query):
            members = rng.permutation(np.asarray(by_query[q], dtype=ids.dtype))
            full = len(members) // g * g
            groups += [members[i : i + g] for i in range(0, full, g)]
            rest.append(members[full:])
        rest = rng.permutation(np.concatenate(rest)) if rest else np.zeros(0, np.int64)
        full = len(rest) // g * g
        groups += [rest[i : i + g] for i in range(0, full, g)]
        order = np.concatenate([groups[i] for i in rng.permutation(len(groups))]) if groups else rest[:0]
        return order, rest[full:]

    def pair_ids(self, step: int, batch_size: int, rank: int = 0, world: int = 1) -> np.ndarray:
        n = len(self)
        if n < batch_size * world:
            raise ValueError(f"only {n} pretraining pairs per epoch, fewer than one global batch ({batch_size * world})")
        per_epoch = n // (batch_size * world)  # the epoch's ragged tail is dropped: batches stay full
        epoch, within = divmod(step, per_epoch)
        start = within * batch_size * world + rank * batch_size
        return self.epoch_order(epoch)[start : start + batch_size]

    def pair_ids_for_steps(self, steps: int, global_batch: int) -> np.ndarray:
        """Every pair id that global batches ``0 .. steps - 1`` of ``global_batch`` pairs use, over all ranks (the
        union of :meth:`pair_ids` over ranks, epoch by epoch)."""
        per_epoch = len(self) // global_batch
        if per_epoch == 0 or steps <= 0:
            return np.zeros(0, np.int64)
        chunks = []
        for epoch in range(-(-steps // per_epoch)):
            n = min(per_epoch, steps - epoch * per_epoch)
            chunks.append(self.epoch_order(epoch)[: n * global_batch])
        return np.concatenate(chunks)

    def answers_for_steps(self, steps: int, global_batch: int) -> list[str]:
        """The distinct answer texts of :meth:`pair_ids_for_steps`, sorted. A run of an epoch or more meets (nearly)
        every pair, so it gets every distinct answer without enumerating its pair ids (102M at paper scale)."""
        if steps * global_batch >= len(self):
            return sorted(set(self.answers))
        return sorted({self.answers[i] for i in self.pair_ids_for_steps(steps, global_batch)})

    def encode_queries(self, queries: list[str], progress: bool = False) -> np.ndarray:
        """float32 [n, T]: the sentence vectors of ``queries`` (``model.query_evidence``), from the event texts'
        encoder so that the questions and the events share one space. They are stored in the dataset's text cache
        like the event texts: a question is encoded once, and every later run (a resumed one, another budget)
        reads the very same vector, whichever other questions it was encoded beside."""
        if not queries:
            return np.zeros((0, self.pipe.cache.dim), np.float32)
        rows = self.pipe.cache.ensure(queries, progress=progress, what="queries")  # first: it may add rows
        return self.pipe.cache.vectors[rows]

    def queries_for_steps(self, steps: int, global_batch: int) -> list[str]:
        """The distinct query texts of :meth:`pair_ids_for_steps`, sorted (as :meth:`answers_for_steps`)."""
        if steps * global_batch >= len(self):
            return sorted(set(self.queries))
        return sorted({self.queries[i] for i in self.pair_ids_for_steps(steps, global_batch)})

    def _record(self, user_id: str, part: int) -> UserRecord:
        if part not in self._records:
            if len(self._records) >= 2:  # a batch spans at most two partitions
                self._records.pop(next(iter(self._records)))
            ids = self.ds.partitions.ids_of(part)
            self._records[part] = {r.user_id: r for r in self.ds.read_partition(part, ids)}
        return self._records[part][user_id]

    def pack_pairs(self, ids: np.ndarray, packed: dict[tuple[str, int], PackedUser] | None = None) -> list[PackedUser]:
        """Pairs ``ids`` -> each pair's user packed at the pair's cutoff. A ``time_varying`` tabular snapshot (taken at
        the dataset's cutoff) is withheld from pairs cut earlier: it would describe the window their answers ask about.

        A user is packed once per cutoff: pairs that ask one user several questions at one cutoff share the packed
        user (packing depends on nothing else). ``packed``: users packed by an earlier call, by (user, cutoff), read
        and added to (a caller packing many chunks of pairs keeps one; each pack is a few hundred microseconds)."""
        packed = {} if packed is None else packed
        out = []
        for i in ids:
            key = (self.user_ids[i], int(self.cutoff_us[i]))
            if key not in packed:
                record, cutoff_us = self._record(key[0], int(self.partition_of[i])), key[1]
                if record.tabular is not None and not self.ds.manifest.tabular_readable_at(cutoff_us):
                    record = replace(record, tabular=None)
                packed[key] = self.pipe.packer.pack(record, cutoff_us)
            out.append(packed[key])
        return out

    def batch(self, step: int, batch_size: int, rank: int = 0, world: int = 1) -> PretrainBatch:
        ids = self.pair_ids(step, batch_size, rank, world)
        users = self.pipe.collate(self.pack_pairs(ids))
        queries = pad_token_ids([self._tok_query(self.queries[i]) for i in ids], self.token_ids.pad)
        answers = pad_token_ids([self._tok_answer(self.answers[i]) for i in ids], self.token_ids.pad, [self.answers[i] for i in ids])
        hashes = torch.tensor([zlib.crc32(self.answers[i].encode()) for i in ids], dtype=torch.long)
        vec = None
        if self.answer_cache is not None:  # frozen sentence vectors of the answers: the text tower's targets
            rows = self.answer_cache.ensure([self.answers[i] for i in ids])  # first: it may add rows to the matrix
            vec = torch.from_numpy(self.answer_cache.vectors[rows])
        query_hashes = torch.tensor([zlib.crc32(self.queries[i].encode()) for i in ids], dtype=torch.long)
        rows = None if self.profile_rows is None else torch.from_numpy(self.profile_rows[ids].copy())
        future, future_rows = self.future_targets(ids) if self.future_days is not None else (None, None)
        query_vec = None
        if self.model_cfg.query_evidence:
            query_vec = torch.from_numpy(self.encode_queries([self.queries[i] for i in ids]))
        return PretrainBatch(users, queries, answers, hashes, vec, query_hashes, rows, future, future_rows, query_vec)
