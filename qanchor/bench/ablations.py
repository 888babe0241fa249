"""Ablations as sub-runs under ``<output_dir>/ablations/``: retrain, then judge on the benchmark's folds.

Pretraining ablations retrain the model from the main checkpoint's own resolved config with one change
and judge it as ``qanchor_task`` (task query + logistic regression):

- ``no_contrastive`` (``loss.mode=ntp``), ``no_ntp`` (``loss.mode=contrastive``),
- ``no_summary_tokens`` (``model.user_encoder.summary_tokens=false``: no user / modality tokens),
- ``no_pretraining``: the same pipeline with a learning rate of 0 (weights stay at initialisation).

Prompt-token ablations tune heads on the main checkpoint with ``num_prompt_tokens=k`` and judge them as
``qanchor_head``. A sub-run whose output already exists is reused, so an interrupted bench resumes.

Example:
    >>> run_ablations(cfg, ds, tasks, folds_by_task, result, progress=True)  # doctest: +SKIP
    >>> result.tasks["churn"].ablations["no_contrastive"].auc_mean_std  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from qanchor.bench.embedder import QAnchorEmbedder
from qanchor.bench.methods import BenchContext, evaluate_task
from qanchor.config import BenchConfig, PretrainConfig, PromptTuneConfig, load_config, with_overrides
from qanchor.data.dataset import Dataset, Task
from qanchor.errors import ConfigError
from qanchor.logs import progress as progress_iter
from qanchor.model.factory import resolve_checkpoint_dir
from qanchor.train.pretrain import run_pretrain
from qanchor.tune.head import load_heads
from qanchor.tune.prompt_tune import run_prompt_tune

__all__ = ["PRETRAIN_ABLATIONS", "checkpoint_run_config", "pretrain_ablation", "prompt_ablation", "run_ablations"]

def _loss_mode(mode: str) -> Callable[[PretrainConfig], PretrainConfig]:
    return lambda c: replace(c, loss=replace(c.loss, mode=mode))


PRETRAIN_ABLATIONS: dict[str, Callable[[PretrainConfig], PretrainConfig]] = {
    "no_contrastive": _loss_mode("ntp"),
    "no_ntp": _loss_mode("contrastive"),
    "no_summary_tokens": lambda c: replace(c, model=replace(c.model, user_encoder=replace(c.model.user_encoder,
                                                                                         summary_tokens=False))),
    # One optimiser step at lr 0: the checkpoint is the initialised model, built and saved by the same code.
    "no_pretraining": lambda c: replace(c, train=replace(c.train, max_steps=1, lr=0.0, save_every=1)),
}


def checkpoint_run_config(checkpoint: str) -> PretrainConfig:
    """The resolved pretraining config a checkpoint was trained with (its ``config.yaml``)."""
    path = resolve_checkpoint_dir(checkpoint) / "config.yaml"
    if not path.exists():
        raise ConfigError(f"ablations need the main checkpoint's config.yaml; {path} not found")
    return load_config(path, schema=PretrainConfig)


def pretrain_ablation(cfg: BenchConfig, name: str, out: Path, progress: bool) -> Path:
    """Pretrain (or reuse) the ``name`` ablation of ``cfg.checkpoint`` into ``out``; return its checkpoint dir."""
    if (out / "checkpoint" / "qanchor.json").exists():
        return out / "checkpoint"
    base = with_overrides(checkpoint_run_config(cfg.checkpoint), cfg.ablation_pretrain_overrides)
    run = replace(PRETRAIN_ABLATIONS[name](base), data=replace(base.data, path=cfg.data.path), output_dir=str(out),
                  resume=True, overwrite=False)  # a killed sub-run continues
    run_pretrain(run, progress=progress)
    return out / "checkpoint"


def prompt_ablation(cfg: BenchConfig, k: int, tasks: list[str], out: Path, progress: bool) -> Path:
    """Tune (or reuse) heads with ``k`` prompt tokens on the main checkpoint into ``out``; return it."""
    if not (out / "summary.json").exists():
        base = load_config(cfg.prompt_tune_config, schema=PromptTuneConfig) if cfg.prompt_tune_config else PromptTuneConfig()
        run = replace(base, checkpoint=cfg.checkpoint, data=replace(base.data, path=cfg.data.path), task=",".join(tasks),
                      output_dir=str(out), num_prompt_tokens=k, seed=cfg.seed)
        run_prompt_tune(run, progress=progress)
    return out


def _judge(cfg: BenchConfig, ds: Dataset, tasks: list[Task], folds_by_task: dict, result: Any, name: str,
           method: str, embedder: Any, heads: dict) -> None:
    """Evaluate ``method`` of one sub-run on every task over the main run's folds."""
    ctx = BenchContext(dataclasses.replace(cfg, methods=[method]), ds, tasks, embedder, heads)
    for task in tasks:
        if task.name in folds_by_task:
            result.tasks[task.name].ablations[name] = evaluate_task(ctx, task, method, folds_by_task[task.name])


def run_ablations(cfg: BenchConfig, ds: Dataset, tasks: list[Task], folds_by_task: dict, result: Any,
                  progress: bool = True) -> None:
    """Run every ablation sub-run and add its rows to ``result.tasks[*].ablations``."""
    if not cfg.checkpoint:
        raise ConfigError("ablations=true needs checkpoint=<dir>: ablations retrain that checkpoint's recipe")
    root = Path(cfg.output_dir) / "ablations"
    dataset_tasks = [t.name for t in tasks if t.name in ds.tasks]
    runs = [*PRETRAIN_ABLATIONS, *(f"prompt_tokens_{k}" for k in cfg.ablation_prompt_tokens)]
    for name in progress_iter(runs, desc="ablations", unit="run", enabled=progress):
        if name in PRETRAIN_ABLATIONS:
            ckpt = pretrain_ablation(cfg, name, root / name, progress)
            _judge(cfg, ds, tasks, folds_by_task, result, name, "qanchor_task", QAnchorEmbedder.open(ckpt, ds), {})
        elif dataset_tasks:  # prompt tuning needs the dataset's own task files
            k = int(name.rsplit("_", 1)[1])
            heads_dir = prompt_ablation(cfg, k, dataset_tasks, root / name, progress)
            embedder = QAnchorEmbedder.open(cfg.checkpoint, ds)
            heads = load_heads(heads_dir, dataset_tasks, embedder.checkpoint_hash)
            _judge(cfg, ds, tasks, folds_by_task, result, name, "qanchor_head", embedder, heads)
