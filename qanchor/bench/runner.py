"""``run_bench``: every method on every task over the same users, folds and cutoff -> AUC / KS results.

Per task: stratified k-fold over users with a fixed seed; for each method, fit on the training folds
(or use a head's own score) and measure AUC and KS on the test fold; report mean and std over folds.
On synthetic data the task file's true probability gives an oracle row on the same folds.

Example:
    >>> cfg = load_config("configs/bench/tiny-synth.yaml", ["checkpoint=/tmp/ckpt"])  # doctest: +SKIP
    >>> result = run_bench(cfg)  # doctest: +SKIP
    >>> result.tasks["churn"].methods["rfm_lgbm"].auc_mean  # doctest: +SKIP
    0.71
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_limits

import qanchor
from qanchor.bench.ablations import run_ablations
from qanchor.bench.embedder import Embedder, QAnchorEmbedder
from qanchor.bench.journal import BenchJournal, journal_key, text_encoder_digests
from qanchor.bench.methods import METHODS, BenchContext, evaluate_task
from qanchor.bench.peers import MethodInput, MethodResult, evaluate_folds, stratified_folds
from qanchor.bench.retrain import checkpoint_run_config
from qanchor.bench.tasks import custom_task, dataset_tasks, fold_count, subsample
from qanchor.config import (
    BenchConfig,
    PromptTuneConfig,
    load_config,
    require,
    require_file,
    to_yaml,
    with_overrides,
)
from qanchor.data.dataset import Dataset, Task, load_dataset, warn_tasks_without_data
from qanchor.data.io import OutputKind, claim_output_dir, hold_output, releasing_outputs
from qanchor.errors import CheckpointError, ConfigError, DataValidationError
from qanchor.logs import Progress, log
from qanchor.metrics import auc_score
from qanchor.tune.head import HEAD_META, HeadEntry, find_heads, load_heads

__all__ = ["TaskResult", "BenchResult", "run_bench", "prepare"]

_QANCHOR_METHODS = ("qanchor_task", "qanchor_generic", "qanchor_swapped_query", "qanchor_head", "qanchor_head_lr", "qanchor_random_init")


@dataclass
class TaskResult:
    name: str
    query: str
    n_users: int
    positive_rate: float
    folds: int
    methods: dict[str, MethodResult] = field(default_factory=dict)
    oracle: MethodResult | None = None  # the true probability on the same folds (synthetic data only)
    oracle_auc: float | None = None  # roc_auc_score(label, prob) over every user of the task
    ablations: dict[str, MethodResult] = field(default_factory=dict)
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k not in ("methods", "oracle", "ablations")}
        out["methods"] = {m: r.to_dict() for m, r in self.methods.items()}
        out["oracle"] = self.oracle.to_dict() if self.oracle else None
        out["ablations"] = {m: r.to_dict() for m, r in self.ablations.items()}
        return out


@dataclass
class BenchResult:
    run: dict[str, Any]
    tasks: dict[str, TaskResult]
    extras: dict[str, Any] = field(default_factory=dict)  # not serialised: arrays for the plots

    def average(self, ablations: bool = False) -> dict[str, dict[str, float]]:
        """Per method: AUC / KS averaged over the tasks it ran on (means of fold means and of fold stds)."""
        out: dict[str, dict[str, float]] = {}
        names = dict.fromkeys(m for t in self.tasks.values() for m in (t.ablations if ablations else t.methods))
        for m in names:
            rows = [(t.ablations if ablations else t.methods).get(m) for t in self.tasks.values()]
            rows = [r for r in rows if r is not None and r.ok]
            if not rows:
                continue
            stats = np.array([[*r.auc_mean_std, *r.ks_mean_std] for r in rows])  # (n_tasks, 4)
            am, asd, km, ksd = stats.mean(axis=0).tolist()
            out[m] = {"auc_mean": am, "auc_std": asd, "ks_mean": km, "ks_std": ksd, "n_tasks": len(rows)}
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"run": self.run, "tasks": {n: t.to_dict() for n, t in self.tasks.items()},
                "average": self.average(), "average_ablations": self.average(ablations=True)}


def _check_methods(methods: list[str]) -> None:
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"methods: unknown {unknown}; choose from {list(METHODS)}")


def prepare(cfg: BenchConfig) -> tuple[Dataset, list[Task]]:
    """Open the dataset and pick the tasks (the custom one if ``cfg.labels`` is set)."""
    _check_methods(cfg.methods)  # first: a mistyped method is the mistake to report, whatever else is missing
    require(cfg.data.path, "data.path", "<dataset dir>")
    require(cfg.output_dir, "output_dir", "results/bench")  # empty (an unset $OUT): the report went into the working folder
    if {"qanchor_head", "qanchor_head_lr"} & set(cfg.methods) or (cfg.ablations and cfg.ablation_prompt_tokens):
        require_file(cfg.prompt_tune_config, "prompt_tune_config")  # before any embedding: the heads read it last
        if cfg.prompt_tune_config:  # and its settings, which were read (and a mistyped key said) after the other rows
            tune = load_config(cfg.prompt_tune_config, schema=PromptTuneConfig)
            packing = [k for k in ("max_events", "default_max_events") if getattr(tune.data, k) is not None]
            if packing:  # `qanchor prompt-tune` honours them; the bench's heads would be tuned without them, unsaid
                raise ConfigError(f"{cfg.prompt_tune_config}: data.{packing[0]} is set, but the bench's per-fold heads "
                                  "pack users as the checkpoint was pretrained (its own caps), as every other row "
                                  "does; the setting would be ignored: drop it from that file (or give the bench a "
                                  "copy without it)")
    if cfg.checkpoint and any(m in _QANCHOR_METHODS for m in cfg.methods) and not Path(cfg.checkpoint).is_dir():
        raise CheckpointError(f"{cfg.checkpoint}: no such checkpoint directory")  # before output_dir is claimed
    if cfg.heads_dir is not None and not find_heads(cfg.heads_dir):  # a mistyped path, not "no heads"
        raise ConfigError(f"heads_dir={cfg.heads_dir}: no prompt-tuned heads there (no {HEAD_META} in it or its "
                          "subfolders); point it at a `qanchor prompt-tune` output_dir, or pass heads_dir=null (saved "
                          "heads only add the before / after tuning PCA plot)")
    retrains = cfg.ablations or "qanchor_random_init" in cfg.methods
    if cfg.checkpoint and (retrains or cfg.ablation_pretrain_overrides) and Path(cfg.checkpoint).is_dir():
        # before any embedding: the retrained rows pretrain the checkpoint's recipe only after the main rows (README:
        # mistakes fail first), and a recipe a new run may not train with (a model saved before a check was added)
        # would be said only then, as if the user had given it
        try:
            with_overrides(checkpoint_run_config(cfg.checkpoint), cfg.ablation_pretrain_overrides)
        except ConfigError as exc:
            if cfg.ablation_pretrain_overrides:
                raise ConfigError(f"ablation_pretrain_overrides: {exc}") from None
            raise ConfigError(f"the checkpoint's recipe ({cfg.checkpoint}, which the retrained rows pretrain again): "
                              f"{exc}; pass ablation_pretrain_overrides=[key=value] to change it, or leave "
                              "qanchor_random_init and the ablations out") from None
    ds = load_dataset(cfg.data.path, cfg.data.cache_dir)
    if cfg.labels is not None:
        return ds, subsample([custom_task(ds, cfg.labels, cfg.query or "")], cfg.max_users, cfg.seed)
    tasks = dataset_tasks(ds, list(cfg.tasks), cfg.max_users, cfg.seed)
    warn_tasks_without_data(ds, [t.name for t in tasks])
    return ds, tasks


def _oracle(task: Task, folds: list) -> tuple[MethodResult | None, float | None]:
    if task.prob is None:
        return None, None
    result = evaluate_folds(MethodInput(scores=task.prob, note="true P(label = 1) from the generator"), task.labels, folds, seed=0)
    return result, auc_score(task.labels, task.prob)


def _run_info(cfg: BenchConfig, ds: Dataset) -> dict[str, Any]:
    return {"dataset": ds.manifest.name, "data_path": str(cfg.data.path), "cutoff": ds.manifest.cutoff.isoformat(),
            "labels": str(Path(cfg.labels).resolve()) if cfg.labels else None,
            "checkpoint": cfg.checkpoint, "heads_dir": cfg.heads_dir, "folds": cfg.folds, "seed": cfg.seed,
            "methods": list(cfg.methods), "generic_query": cfg.generic_query, "qanchor_version": qanchor.__version__,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "config_yaml": to_yaml(cfg)}


def _make_context(cfg: BenchConfig, ds: Dataset, tasks: list[Task], embedder: Embedder | None,
                  heads: dict[str, Any] | None, progress: bool) -> BenchContext:
    wants_model = any(m in _QANCHOR_METHODS for m in cfg.methods)
    if embedder is None and cfg.checkpoint and wants_model:
        embedder = QAnchorEmbedder.open(cfg.checkpoint, ds, progress)
    if heads is None:
        ckpt_hash = getattr(embedder, "checkpoint_hash", None)
        heads = load_heads(cfg.heads_dir, [t.name for t in tasks], ckpt_hash)  # saved heads: the PCA plot
    heads = {t: h if isinstance(h, HeadEntry) else HeadEntry(h) for t, h in heads.items()}
    return BenchContext(cfg, ds, tasks, embedder, heads, progress)


def run_bench(cfg: BenchConfig, embedder: Embedder | None = None, heads: dict[str, Any] | None = None,
              progress: bool = True) -> BenchResult:
    """Run every configured method on every task; ``embedder`` / ``heads`` default to ``cfg.checkpoint`` / ``cfg.heads_dir``.

    Torch and BLAS use ``cfg.n_jobs`` threads for the run: on shared cores, two threads per process
    made this bench 2-3x slower than one (spin-waiting), while on 2 idle cores two threads are ~1.5x faster
    (per-fold heads, LightGBM); the numbers did not change in the measured runs.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, cfg.n_jobs))
    try:
        with threadpool_limits(max(1, cfg.n_jobs)):
            return _run(cfg, embedder, heads, progress)
    finally:
        torch.set_num_threads(threads)


@releasing_outputs
def _run(cfg: BenchConfig, embedder: Embedder | None, heads: dict[str, Any] | None, progress: bool) -> BenchResult:
    start = time.perf_counter()
    ds, tasks = prepare(cfg)
    if not any(fold_count(t.labels, cfg.folds) >= 2 for t in tasks):
        worst = min(tasks, key=lambda t: min(t.labels.sum(), len(t.labels) - t.labels.sum()))
        raise DataValidationError(f"task {worst.name}", f"every task has fewer than 2 users in its minority class "
                                  f"({int(worst.labels.sum())} positive of {len(worst.labels)}): AUC and KS need at "
                                  "least 2 users of each class; give more labelled users")
    inputs = {"data.path": cfg.data.path, "checkpoint": cfg.checkpoint, "heads_dir": cfg.heads_dir, "labels": cfg.labels}
    claim_output_dir(cfg.output_dir, OutputKind.RESULTS, inputs, key="output_dir")
    hold_output(cfg.output_dir, "benchmark")  # a second bench there would resume, and report, the first one's rows
    ctx = _make_context(cfg, ds, tasks, embedder, heads, progress)
    checkpoint_hash = getattr(ctx.embedder, "checkpoint_hash", None)
    if ctx.embedder is not None and checkpoint_hash is None:  # an embedder handed in code: no key names its model
        journal = BenchJournal.disabled()
    else:
        key = journal_key(cfg, ds, tasks, checkpoint_hash, ctx.heads, text_encoder_digests(ctx))
        journal = BenchJournal.open(cfg.output_dir, key, labels=str(Path(cfg.labels).resolve()) if cfg.labels else None)
    result = BenchResult(_run_info(cfg, ds), {})
    folds_by_task: dict[str, list] = {}
    bar = Progress(len(tasks) * len(cfg.methods), "bench", "run", enabled=progress)
    if len(journal) and progress:
        main = journal.finished(cfg.methods)
        sub = f" and {len(journal) - main} ablation rows" if len(journal) > main else ""
        log(f"bench: resuming: {main} of {len(tasks) * len(cfg.methods)} (task, method) rows{sub} were finished by an "
            f"earlier run of the same settings ({journal.directory})")
    for index, task in enumerate(tasks):
        k = fold_count(task.labels, cfg.folds)
        tr = TaskResult(task.name, task.query, len(task.labels), float(task.labels.mean()), k)
        if k < 2:
            tr.note = "skipped: fewer than 2 users in the minority class"
            result.tasks[task.name] = tr
            bar.update(len(cfg.methods))
            continue
        if k < cfg.folds:
            tr.note = f"{k} folds instead of {cfg.folds}: the minority class has only {k} users"
        folds = folds_by_task[task.name] = stratified_folds(task.labels, k, cfg.seed)
        tr.oracle, tr.oracle_auc = _oracle(task, folds)
        for method in cfg.methods:
            bar.set_postfix(f"{task.name}/{method}")
            done = journal.get(index, task.name, method)
            tr.methods[method] = (done if done is not None else
                                  journal.put(index, task.name, method, evaluate_task(ctx, task, method, folds)))
            bar.update(1)
        result.tasks[task.name] = tr
    bar.close()
    if cfg.ablations:
        run_ablations(cfg, ds, tasks, folds_by_task, result, progress, journal)
    result.extras["pca"] = _pca_inputs(ctx, tasks, cfg)
    result.run["model_content"] = content_reading(ctx.embedder)
    result.run["seconds"] = round(time.perf_counter() - start, 1)
    result.run["shared_seconds"] = dict(ctx.seconds)
    result.run["method_seconds"] = {m: round(sum(t.methods[m].seconds for t in result.tasks.values() if m in t.methods), 2)
                                    for m in cfg.methods}
    return result


# content_reading's phrase for tiny-ratings.yaml's recipe, which the report's data-kind note compares against
HISTORY_IN_PATH = "the whole history's content in the wide path"


def content_reading(embedder: Embedder | None) -> str | None:
    """How the checkpoint behind ``embedder`` reads what the events are (its ``model.user_encoder`` content settings),
    in words for the report; None without a real checkpoint.

    Example:
        >>> content_reading(None) is None
        True
    """
    run_cfg = getattr(getattr(embedder, "model", None), "run_cfg", None)
    if run_cfg is None:
        return None
    enc = run_cfg.model.user_encoder
    if not enc.content_components:
        return "no content components"
    if enc.summary_text == "history" and enc.content_use == "path":
        return HISTORY_IN_PATH
    scope = "the whole history's" if enc.summary_text == "history" else "the kept events'"
    return f"{scope} content {'in the wide path' if enc.content_use == 'path' else 'as profile targets'}"


def _pca_inputs(ctx: BenchContext, tasks: list[Task], cfg: BenchConfig) -> list[dict[str, Any]]:
    """Embeddings of a task's users before (task query) and after prompt tuning (query + head prompt)."""
    if ctx.embedder is None or not ctx.heads:
        return []
    names = [n for n in (cfg.pca_tasks or list(ctx.heads)[:1]) if n in ctx.heads]
    out = []
    for task in (t for t in tasks if t.name in names):
        rows = ctx.rows(task.user_ids)
        out.append({"task": task.name, "labels": task.labels, "before": ctx.embedding(task.query)[rows],
                    "after": ctx.head_embedding(task.name)[rows]})
    return out
