"""Ablations as sub-runs under ``<output_dir>/ablations/``: retrain, then judge on the benchmark's folds.

Pretraining ablations retrain the model from the main checkpoint's own resolved config with one change
and judge it as ``qanchor_task`` (task query + logistic regression):

- ``no_contrastive`` (``loss.mode=ntp``), ``no_ntp`` (``loss.mode=contrastive``),
- ``no_summary_tokens`` (``model.user_encoder.summary_tokens=false``: no user / modality tokens),
- ``no_pretraining``: the same pipeline with a learning rate of 0 (weights stay at initialisation).

Prompt-token ablations tune per-fold heads on the main checkpoint with ``num_prompt_tokens=k`` and judge them as
``qanchor_head``. A pretraining sub-run whose output already exists is reused, and each judged (task, sub-run) row is
kept in the main run's journal (``<output_dir>/partial/``, as ``ablation-<name>``) the moment it is finished, so an
interrupted bench resumes where it stopped: a sub-run whose rows are all kept is not opened again.

Example:
    >>> run_ablations(cfg, ds, tasks, folds_by_task, result, progress=True)  # doctest: +SKIP
    >>> result.tasks["churn"].ablations["no_contrastive"].auc_mean_std  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from qanchor.bench.embedder import QAnchorEmbedder
from qanchor.bench.journal import BenchJournal
from qanchor.bench.methods import BenchContext, evaluate_task
from qanchor.bench.retrain import PRETRAIN_ABLATIONS, pretrain_ablation
from qanchor.config import BenchConfig
from qanchor.data.dataset import Dataset, Task
from qanchor.errors import ConfigError
from qanchor.logs import progress as progress_iter

__all__ = ["run_ablations"]

def _row(name: str) -> str:
    """The journal's method name of sub-run ``name``'s rows."""
    return f"ablation-{name}"


def _judge(ctx: BenchContext, pending: list[tuple[int, Task]], folds_by_task: dict, result: Any, name: str, method: str,
           journal: BenchJournal) -> None:
    """Evaluate ``method`` of one sub-run on each pending task over the main run's folds, journalling each row."""
    for index, task in pending:
        row = evaluate_task(ctx, task, method, folds_by_task[task.name])
        result.tasks[task.name].ablations[name] = journal.put(index, task.name, _row(name), row)


def run_ablations(cfg: BenchConfig, ds: Dataset, tasks: list[Task], folds_by_task: dict, result: Any,
                  progress: bool = True, journal: BenchJournal | None = None) -> None:
    """Run every ablation sub-run and add its rows to ``result.tasks[*].ablations``; rows already in ``journal``
    (the main run's, whose key covers every setting a sub-run depends on) are taken from it."""
    if not cfg.checkpoint:
        raise ConfigError("ablations=true needs checkpoint=<dir>: ablations retrain that checkpoint's recipe")
    journal = BenchJournal.disabled() if journal is None else journal  # not `or`: an empty journal has len 0
    root = Path(cfg.output_dir) / "ablations"
    runs = [*PRETRAIN_ABLATIONS, *(f"prompt_tokens_{k}" for k in cfg.ablation_prompt_tokens)]
    main_model = None
    for name in progress_iter(runs, desc="ablations", unit="run", enabled=progress):
        pending = []
        for index, task in enumerate(tasks):  # the index is the main loop's: rows are keyed as its rows are
            if task.name not in folds_by_task:
                continue
            done = journal.get(index, task.name, _row(name))
            if done is None:
                pending.append((index, task))
            else:
                result.tasks[task.name].ablations[name] = done
        if not pending:
            continue
        if name in PRETRAIN_ABLATIONS:
            ckpt = pretrain_ablation(cfg, name, root / name, progress)
            ctx = BenchContext(dataclasses.replace(cfg, methods=["qanchor_task"]), ds, tasks, QAnchorEmbedder.open(ckpt, ds))
            _judge(ctx, pending, folds_by_task, result, name, "qanchor_task", journal)
        else:  # per-fold heads on the main checkpoint with k prompt tokens
            main_model = main_model or QAnchorEmbedder.open(cfg.checkpoint, ds)
            ctx = BenchContext(dataclasses.replace(cfg, methods=["qanchor_head"]), ds, tasks, main_model,
                               tune_overrides={"num_prompt_tokens": int(name.rsplit("_", 1)[1])})
            _judge(ctx, pending, folds_by_task, result, name, "qanchor_head", journal)
