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

import math
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qanchor.bench.coles import coles_embeddings
from qanchor.bench.embedder import Embedder, QAnchorEmbedder
from qanchor.bench.features import PeerFeatures, extract_features
from qanchor.bench.peers import Classifier, MethodInput, MethodResult, Skip, evaluate_folds, fit_scores
from qanchor.bench.retrain import pretrain_ablation
from qanchor.config import BenchConfig, PromptTuneConfig, load_config
from qanchor.data.dataset import Dataset, Task, isin_ids
from qanchor.data.pipeline import UserPipeline
from qanchor.data.text_cache import SentenceEncoder, TextVectorCache
from qanchor.errors import ConfigError
from qanchor.infer.api import QAnchor
from qanchor.infer.user_input import record_adapter
from qanchor.model.layout import tokenize_query
from qanchor.model.prefix_cache import PrefixStore
from qanchor.tune.head import HeadEntry, ScenarioHead
from qanchor.tune.prompt_tune import encode_users
from qanchor.tune.trainer import Split, fold_split, head_scores, tune_task

__all__ = ["BenchContext", "METHODS", "DEFAULT_METHODS", "TEXT_PEERS", "head_eval_mask", "evaluate_task"]

# The peers that read the event texts' vectors, from the encoder of the bench's data.text_encoder
TEXT_PEERS = ("text_mean_lr", "union_lgbm", "union_lr")


class BenchContext:
    """Shared, lazily computed inputs of one benchmark run over every task's users (``user_ids``, sorted)."""

    def __init__(self, cfg: BenchConfig, ds: Dataset, tasks: list[Task], embedder: Embedder | None = None,
                 heads: dict[str, HeadEntry] | None = None, progress: bool = False, tune_overrides: dict | None = None):
        self.cfg, self.ds, self.tasks, self.embedder, self.progress = cfg, ds, tasks, embedder, progress
        self.tune_overrides = dict(tune_overrides or {})
        self.user_ids = np.asarray(sorted({u for t in tasks for u in t.user_ids}), dtype=object)
        self.heads = heads or {}
        self._row = {u: i for i, u in enumerate(self.user_ids)}
        self.fold_heads: dict[tuple[str, int], list] = {}  # (task, n folds) -> [(split, head)] per fold
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
        # qanchor_swapped_query reads other tasks' queries: already among the task queries
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
            raise Skip("no model given (set checkpoint=<checkpoint dir>)")
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
    def text_encoder(self) -> SentenceEncoder:
        """The sentence encoder of ``data.text_encoder``, which the text peers' vectors come from: loaded once, for the
        journal's key (what it computes) and for the text cache."""
        return SentenceEncoder(self.cfg.data.text_encoder)

    @cached_property
    def text_cache(self) -> TextVectorCache:
        with self._timed("text cache"):
            pipe = UserPipeline.for_dataset(self.ds, self.cfg.data, self.text_encoder)
            # Encode every event text not yet cached once, in large batches, before the per-user pass.
            pipe.prime(self.ds.users(self.user_ids), progress=self.progress, all_events=True)
        return pipe.cache

    def store_rows(self, user_ids: np.ndarray) -> np.ndarray:
        row = {u: i for i, u in enumerate(self.prefix_store.user_ids)}
        return np.fromiter((row[u] for u in user_ids), dtype=np.int64, count=len(user_ids))

    @cached_property
    def peer_features(self) -> PeerFeatures:
        cache = self.text_cache if set(TEXT_PEERS) & set(self.cfg.methods) else None
        with self._timed("peer features"):
            return extract_features(self.ds, self.user_ids, cache, self.progress)

    @cached_property
    def prefix_store(self) -> PrefixStore:
        """Every benchmarked user's prefix keys / values under the checkpoint (for per-fold head tuning)."""
        model = getattr(self.embedder, "model", None)
        if not isinstance(model, QAnchor):
            raise Skip("per-fold heads need a real checkpoint (checkpoint=<dir>)")
        with self._timed("prefix store"):
            adapt = record_adapter(self.ds.manifest, self.ds.tabular_columns, model.manifest, model.tabular_columns)
            return encode_users(model.model, self.ds, model.pipeline, list(self.user_ids), 256, self.progress,
                                [t.query for t in self.tasks], adapt)

    @cached_property
    def tune_config(self) -> PromptTuneConfig:
        """Settings of the per-fold heads: the prompt-tune config (or defaults) with ``head_steps`` steps."""
        base = load_config(self.cfg.prompt_tune_config, schema=PromptTuneConfig) if self.cfg.prompt_tune_config \
            else PromptTuneConfig()
        steps = base.steps if self.cfg.head_steps is None else self.cfg.head_steps
        return replace(base, steps=steps, seed=self.cfg.seed, eval_every=min(base.eval_every, max(steps // 6, 1)),
                       **self.tune_overrides)

    @cached_property
    def random_init(self) -> Embedder:
        """The checkpoint's architecture and recipe with its initial weights (pretraining skipped): the floor."""
        if not self.cfg.checkpoint:
            raise Skip("no checkpoint given (checkpoint=<dir>): nothing to re-initialise")
        with self._timed("random-init model"):
            ckpt = pretrain_ablation(self.cfg, "no_pretraining", Path(self.cfg.output_dir) / "random_init", self.progress)
            return QAnchorEmbedder.open(ckpt, self.ds)

    @cached_property
    def random_init_embedded(self) -> dict[str, np.ndarray]:
        queries = list(dict.fromkeys(t.query for t in self.tasks))
        emb = self.random_init.embed_many(list(self.user_ids), [(q, None) for q in queries])  # (U, Q, D)
        return {q: emb[:, i] for i, q in enumerate(queries)}

    def swapped_query(self, task: Task) -> str:
        """Another task's query (the next task in the run whose query differs): does the query matter?"""
        others = [t.query for t in self.tasks[self.tasks.index(task) + 1:] + self.tasks if t.query != task.query]
        if not others:
            raise Skip("needs a second task with another query")
        return others[0]

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
    return isin_ids(user_ids, entry.test_users), "scored only on users in the head's own held-out test split"


def _qanchor_task(ctx: BenchContext, task: Task) -> MethodInput:
    return MethodInput(features=ctx.embedding(task.query)[ctx.rows(task.user_ids)], classifier=Classifier.LR)


def _qanchor_generic(ctx: BenchContext, task: Task) -> MethodInput:
    return MethodInput(features=ctx.embedding(ctx.cfg.generic_query)[ctx.rows(task.user_ids)], classifier=Classifier.LR)


def _fold_heads(ctx: BenchContext, task: Task, folds: list) -> list[tuple[Split, ScenarioHead]]:
    """One scenario head per fold, tuned on that fold's training users only (best step by a validation split of
    them); computed once per task and shared by ``qanchor_head`` and ``qanchor_head_lr``."""
    key = (task.name, len(folds))
    if key not in ctx.fold_heads:
        labels = task.labels.astype(np.int64)
        # a head's validation split is stratified over the fold's training users: each class needs two of them there
        fewest = min(int(min(labels[train].sum(), len(train) - labels[train].sum())) for train, _ in folds)
        if fewest < 2:
            raise Skip(f"per-fold heads need at least 2 users of each class among every fold's training users (one to "
                       f"tune on, one to pick the step by); a fold of task {task.name} has {fewest}")
        # the validation split (val_fraction of the training users, rounded up) and what is left must each hold both classes
        smallest = min(len(train) for train, _ in folds)
        n_val = math.ceil(ctx.tune_config.val_fraction * smallest)
        if n_val < 2 or smallest - n_val < 2:
            raise Skip(f"per-fold heads split each fold's training users into tuning and validation users "
                       f"(val_fraction={ctx.tune_config.val_fraction}), each holding both classes; a fold of task "
                       f"{task.name} trains on {smallest} users, too few for that")
        cfg = ctx.tune_config
        rows = ctx.store_rows(task.user_ids)
        splits = [fold_split(rows, labels, train, test, cfg.val_fraction, cfg.seed + i) for i, (train, test) in enumerate(folds)]
        for i, split in enumerate(splits):  # before any tuning: a stratified share of 2-3 users of a class can round to none
            for part in ("train", "val"):
                if len(split.labels[part].unique()) < 2:
                    raise Skip(f"fold {i + 1}'s {part} users ({len(split.labels[part])}, val_fraction={cfg.val_fraction}) "
                               f"hold one class of task {task.name}: a head could not pick its step there")
        store = ctx.prefix_store.at_query(task.query)  # Skip without a real checkpoint
        model = ctx.embedder.model
        query_ids = _query_ids(model, task.query)
        heads = []
        for i, split in enumerate(splits):
            try:
                result = tune_task(model.model, store, query_ids, split, cfg, task.name, task.query,
                                   model.checkpoint_hash or "", where=f"fold {i + 1} of {len(splits)}")
            except ConfigError as exc:  # the heads' settings are the prompt-tune file's: say which file
                if not ctx.cfg.prompt_tune_config:
                    raise
                raise ConfigError(f"prompt_tune_config={ctx.cfg.prompt_tune_config}: {exc}") from None
            heads.append((split, result.head))
        ctx.fold_heads[key] = heads
    return ctx.fold_heads[key]


def _query_ids(model: QAnchor, query: str) -> torch.Tensor:
    return torch.tensor(tokenize_query(model.tokenizer, query, model.run_cfg.model.max_query_tokens))


def _qanchor_head(ctx: BenchContext, task: Task, folds: list) -> MethodInput:
    """The per-fold head's own score (prototypes) on the fold's test users: the same users and folds as every row."""
    heads = _fold_heads(ctx, task, folds)  # Skip without a real checkpoint
    model, cfg = ctx.embedder.model, ctx.tune_config
    query_ids = _query_ids(model, task.query)
    scores = np.full(len(task.labels), np.nan)
    for (split, head), (_, test) in zip(heads, folds):
        scores[test] = head_scores(model.model, ctx.prefix_store.at_query(task.query), query_ids, head, split.rows["test"],
                                   cfg.prefix_chunk)
    kept = ", ".join(str(head.extra.get("best_step", "?")) for _, head in heads)
    readout = ", its readout then fitted on all of them" if cfg.refit_readout else ""
    return MethodInput(scores=scores, note=f"head tuned per fold on its training users ({cfg.steps} steps, best "
                                            f"step by a validation split of them; kept steps {kept}){readout}, scored "
                                            "on the fold's test users")


def _qanchor_head_lr(ctx: BenchContext, task: Task, folds: list) -> MethodInput:
    """The per-fold head's embedding (its soft prompt + the task query) with the same LR probe as every LR row,
    fitted on the fold's training users: does prompt tuning improve the representation, whatever the scorer?"""
    heads = _fold_heads(ctx, task, folds)  # Skip without a real checkpoint
    model, cfg = ctx.embedder.model, ctx.tune_config
    rows, labels = ctx.store_rows(task.user_ids), task.labels.astype(np.int64)
    index, query_ids = torch.as_tensor(rows, dtype=torch.long), _query_ids(model, task.query)
    scores, picks = np.full(len(labels), np.nan), []
    for i, ((_, head), (train, test)) in enumerate(zip(heads, folds)):
        suffix = model.model.suffix(query_ids, head.prompt.detach())
        with torch.no_grad():
            emb = ctx.prefix_store.at_query(task.query).embed(model.model, suffix, index, cfg.prefix_chunk, head.lookup)
            emb = emb.float().cpu().numpy()
        scores[test], c = fit_scores(Classifier.LR, emb[train], labels[train], emb[test], ctx.cfg.seed + i, ctx.cfg.n_jobs)
        picks.append(c)
    return MethodInput(scores=scores, probe_c=picks, note="per-fold head's embedding (soft prompt + task query) + LR on "
                                                          "the fold's training users")


def _qanchor_swapped_query(ctx: BenchContext, task: Task) -> MethodInput:
    return MethodInput(features=ctx.embedding(ctx.swapped_query(task))[ctx.rows(task.user_ids)], classifier=Classifier.LR,
                       note=f"embedding under another task's query: {ctx.swapped_query(task)!r}")


def _qanchor_random_init(ctx: BenchContext, task: Task) -> MethodInput:
    return MethodInput(features=ctx.random_init_embedded[task.query][ctx.rows(task.user_ids)], classifier=Classifier.LR,
                       note="same architecture and recipe, initial weights (no pretraining), task query")


def _union_lgbm(ctx: BenchContext, task: Task) -> MethodInput:
    feats = ctx.peer_features
    rows = feats.rows(task.user_ids)
    return MethodInput(features=np.concatenate([feats.rfm[rows], feats.text_mean[rows]], axis=1), classifier=Classifier.LGBM,
                       note="RFM / counts + tabular + mean event-text vector, LightGBM")


def _union_lr(ctx: BenchContext, task: Task) -> MethodInput:
    feats = ctx.peer_features
    rows = feats.rows(task.user_ids)
    return MethodInput(features=np.concatenate([feats.rfm_log[rows], feats.text_mean[rows]], axis=1), classifier=Classifier.LR,
                       note="signed-log RFM / counts + tabular and the mean event-text vector, the LR probe")


def _rfm_lr(ctx: BenchContext, task: Task) -> MethodInput:
    feats = ctx.peer_features
    return MethodInput(features=feats.rfm_log[feats.rows(task.user_ids)], classifier=Classifier.LR,
                       note="signed-log RFM / counts + tabular, the LR probe")


def _rfm_lgbm(ctx: BenchContext, task: Task) -> MethodInput:
    feats = ctx.peer_features
    return MethodInput(features=feats.rfm[feats.rows(task.user_ids)], classifier=Classifier.LGBM)


def _text_mean_lr(ctx: BenchContext, task: Task) -> MethodInput:
    feats = ctx.peer_features
    x = feats.text_mean[feats.rows(task.user_ids)]
    if not np.any(x):  # every vector is the no-events zero: a score of 0.5 would read as a result
        raise Skip("no user of this task has an event text before the cutoff")
    return MethodInput(features=x, classifier=Classifier.LR)


def _coles(ctx: BenchContext, task: Task) -> MethodInput:
    return MethodInput(features=ctx.coles_vectors[ctx.rows(task.user_ids)], classifier=Classifier.LR,
                       note="self-supervised on every user's events before the cutoff (no labels)")


METHODS: dict[str, Callable[..., MethodInput]] = {
    "qanchor_task": _qanchor_task,
    "qanchor_generic": _qanchor_generic,
    "qanchor_swapped_query": _qanchor_swapped_query,
    "qanchor_random_init": _qanchor_random_init,
    "qanchor_head": _qanchor_head,
    "qanchor_head_lr": _qanchor_head_lr,
    "union_lgbm": _union_lgbm,
    "rfm_lgbm": _rfm_lgbm,
    "union_lr": _union_lr,
    "rfm_lr": _rfm_lr,
    "text_mean_lr": _text_mean_lr,
    "coles": _coles,
}
FOLD_METHODS = {"qanchor_head", "qanchor_head_lr"}  # methods that fit something per fold themselves (their scores are out-of-fold)
DEFAULT_METHODS = list(METHODS)


def evaluate_task(ctx: BenchContext, task: Task, method: str, folds: list) -> MethodResult:
    """One method on one task over ``folds``; a :class:`Skip` becomes a skipped result."""
    start = time.perf_counter()
    try:
        inp = METHODS[method](ctx, task, folds) if method in FOLD_METHODS else METHODS[method](ctx, task)
    except Skip as exc:
        return MethodResult(skipped=str(exc))
    result = evaluate_folds(inp, task.labels, folds, ctx.cfg.seed, ctx.cfg.n_jobs)
    result.seconds = round(time.perf_counter() - start, 3)
    return result
