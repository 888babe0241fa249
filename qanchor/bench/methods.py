"""The benchmark's methods: each turns one task into a :class:`MethodInput` from a shared context.

A method is a function ``(ctx, task) -> MethodInput`` registered in :data:`METHODS`; a method that
cannot run (no head for the task, CoLES not installed) raises :class:`Skip` with the reason, which
the report prints instead of a number. Expensive inputs (embeddings of every user under every query,
peer features, CoLES vectors) are computed once per run by :class:`BenchContext` and shared by tasks.

Example:
    >>> ctx = BenchContext(cfg, ds, tasks, embedder, heads={})  # doctest: +SKIP
    >>> METHODS["rfm_lgbm"](ctx, tasks[0]).classifier  # doctest: +SKIP
    <Classifier.LGBM: 'lgbm'>
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from functools import cached_property
from typing import Any

import numpy as np
import torch

from qanchor.bench.coles import coles_embeddings
from qanchor.bench.embedder import Embedder
from qanchor.bench.features import PeerFeatures, extract_features
from qanchor.bench.peers import Classifier, MethodInput, MethodResult, Skip, evaluate_folds
from qanchor.config import BenchConfig
from qanchor.data.dataset import Dataset, Task
from qanchor.data.pipeline import UserPipeline
from qanchor.data.text_cache import TextVectorCache
from qanchor.tune.head import HeadEntry

__all__ = ["BenchContext", "METHODS", "DEFAULT_METHODS", "head_eval_mask", "evaluate_task"]


class BenchContext:
    """Shared, lazily computed inputs of one benchmark run over every task's users (``user_ids``, sorted)."""

    def __init__(self, cfg: BenchConfig, ds: Dataset, tasks: list[Task], embedder: Embedder | None = None,
                 heads: dict[str, HeadEntry] | None = None, progress: bool = False):
        self.cfg, self.ds, self.tasks, self.embedder, self.progress = cfg, ds, tasks, embedder, progress
        self.user_ids = np.asarray(sorted({u for t in tasks for u in t.user_ids}), dtype=object)
        self.heads = heads or {}
        self._row = {u: i for i, u in enumerate(self.user_ids)}
        self.seconds: dict[str, float] = {}  # wall time of each shared input, for the report

    @contextmanager
    def _timed(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 2)

    def rows(self, user_ids: np.ndarray) -> np.ndarray:
        return np.fromiter((self._row[u] for u in user_ids), dtype=np.int64, count=len(user_ids))

    def _requests(self) -> tuple[list[tuple[str, str]], list[tuple[str, Any]]]:
        """Keys and (query, head) requests: every task query, the generic query, every loaded head."""
        keys: list[tuple[str, str]] = []
        requests: list[tuple[str, Any]] = []
        for task in self.tasks:
            keys.append(("query", task.query))
            requests.append((task.query, None))
        if "qanchor_generic" in self.cfg.methods:
            keys.append(("query", self.cfg.generic_query))
            requests.append((self.cfg.generic_query, None))
        for name, entry in self.heads.items():
            keys.append(("head", name))
            requests.append((entry.head.query, entry.head))
        unique = dict(zip(keys, requests))  # two tasks may share a query
        return list(unique), list(unique.values())

    @cached_property
    def _embedded(self) -> dict[tuple[str, str], np.ndarray]:
        """("query", q) / ("head", task) -> float32 [U, D]: every user under every request in one call.

        One call lets each user's prefix run once for all requests. (Embedding only the requests a
        user's own tasks need saves 28 % of suffixes on Complete Journey, but grouping users that way
        cost more in repeated partition reads and small batches than it saved: measured 2x slower.)
        """
        if self.embedder is None:
            raise Skip("no model given (set model=<checkpoint dir>)")
        keys, requests = self._requests()
        with self._timed(f"embed {len(self.user_ids)} users x {len(requests)} requests"):
            emb = self.embedder.embed_many(list(self.user_ids), requests)  # (U, R, D)
        return {k: emb[:, i] for i, k in enumerate(keys)}

    def embedding(self, query: str) -> np.ndarray:
        """float32 [U, D]: every user under ``query`` (no head)."""
        return self._embedded[("query", query)]

    def head_embedding(self, task: str) -> np.ndarray:
        """float32 [U, D]: every user under ``task``'s head (its query with its soft prompt)."""
        return self._embedded[("head", task)]

    @cached_property
    def text_cache(self) -> TextVectorCache:
        with self._timed("text cache"):
            pipe = UserPipeline.for_dataset(self.ds, self.cfg.data)
            # Encode every event text not yet cached once, in large batches, before the per-user pass.
            pipe.prime(self.ds.users(self.user_ids), progress=self.progress, all_events=True)
        return pipe.cache

    @cached_property
    def peer_features(self) -> PeerFeatures:
        cache = self.text_cache if "text_mean_lr" in self.cfg.methods else None
        with self._timed("peer features"):
            return extract_features(self.ds, self.user_ids, cache, self.progress)

    @cached_property
    def coles_vectors(self) -> np.ndarray:
        with self._timed("coles training + inference"):
            return coles_embeddings(self.ds, self.user_ids, self.cfg, progress=self.progress)  # may raise Skip


def head_eval_mask(entry: HeadEntry, user_ids: np.ndarray) -> tuple[np.ndarray, str]:
    """Users a head may honestly be scored on, and a note saying which rule was used.

    Heads are tuned once on their own train / val / test split, not per fold; only the users of its
    ``test`` split were never seen while tuning, so only they count. Without split information every
    user counts and the note says the score is optimistic.

    Example:
        >>> head_eval_mask(HeadEntry(None, np.array(["b"], object)), np.array(["a", "b"], object))[0].tolist()
        [False, True]
    """
    if entry.test_users is None:
        return np.ones(len(user_ids), bool), "head split unknown: scored on all fold-test users (optimistic)"
    return np.isin(user_ids, entry.test_users), "scored only on users in the head's own held-out test split"


def _qanchor_task(ctx: BenchContext, task: Task) -> MethodInput:
    return MethodInput(features=ctx.embedding(task.query)[ctx.rows(task.user_ids)], classifier=Classifier.LR)


def _qanchor_generic(ctx: BenchContext, task: Task) -> MethodInput:
    return MethodInput(features=ctx.embedding(ctx.cfg.generic_query)[ctx.rows(task.user_ids)], classifier=Classifier.LR)


def _qanchor_head(ctx: BenchContext, task: Task) -> MethodInput:
    entry = ctx.heads.get(task.name)
    if entry is None:
        raise Skip("no prompt-tuned head for this task" + ("" if ctx.cfg.heads_dir else " (heads_dir not set)"))
    emb = torch.from_numpy(ctx.head_embedding(task.name)[ctx.rows(task.user_ids)])  # (n, D)
    with torch.inference_mode():
        scores = entry.head.score(emb).detach().double().cpu().numpy()
    mask, note = head_eval_mask(entry, task.user_ids)
    return MethodInput(scores=scores, eval_mask=mask, note=note)


def _rfm_lgbm(ctx: BenchContext, task: Task) -> MethodInput:
    feats = ctx.peer_features
    return MethodInput(features=feats.rfm[feats.rows(task.user_ids)], classifier=Classifier.LGBM)


def _text_mean_lr(ctx: BenchContext, task: Task) -> MethodInput:
    feats = ctx.peer_features
    return MethodInput(features=feats.text_mean[feats.rows(task.user_ids)], classifier=Classifier.LR)


def _coles(ctx: BenchContext, task: Task) -> MethodInput:
    return MethodInput(features=ctx.coles_vectors[ctx.rows(task.user_ids)], classifier=Classifier.LR,
                       note="self-supervised on every user's events before the cutoff (no labels)")


METHODS: dict[str, Callable[[BenchContext, Task], MethodInput]] = {
    "qanchor_task": _qanchor_task,
    "qanchor_generic": _qanchor_generic,
    "qanchor_head": _qanchor_head,
    "rfm_lgbm": _rfm_lgbm,
    "text_mean_lr": _text_mean_lr,
    "coles": _coles,
}
DEFAULT_METHODS = list(METHODS)


def evaluate_task(ctx: BenchContext, task: Task, method: str, folds: list) -> MethodResult:
    """One method on one task over ``folds``; a :class:`Skip` becomes a skipped result."""
    start = time.perf_counter()
    try:
        inp = METHODS[method](ctx, task)
    except Skip as exc:
        return MethodResult(skipped=str(exc))
    result = evaluate_folds(inp, task.labels, folds, ctx.cfg.seed, ctx.cfg.n_jobs)
    result.seconds = round(time.perf_counter() - start, 3)
    return result
