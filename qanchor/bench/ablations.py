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
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from qanchor.bench.embedder import QAnchorEmbedder
from qanchor.bench.methods import BenchContext, evaluate_task
from qanchor.config import BenchConfig
from qanchor.data.dataset import Dataset, Task
from qanchor.errors import ConfigError
from qanchor.model.factory import resolve_checkpoint_dir
from qanchor.train.pretrain import run_pretrain
from qanchor.tune.head import load_heads
from qanchor.tune.prompt_tune import run_prompt_tune

__all__ = ["PRETRAIN_ABLATIONS", "pretrain_ablation", "prompt_ablation", "run_ablations"]

PRETRAIN_ABLATIONS: dict[str, list[str]] = {
    "no_contrastive": ["loss.mode=ntp"],
    "no_ntp": ["loss.mode=contrastive"],
    "no_summary_tokens": ["model.user_encoder.summary_tokens=false"],
    # One optimiser step at lr 0: the checkpoint is the initialised model, built and saved by the same code.
    "no_pretraining": ["train.max_steps=1", "train.lr=0.0", "train.save_every=1"],
}


def _checkpoint_config(model: str) -> Path:
    path = resolve_checkpoint_dir(model) / "config.yaml"
    if not path.exists():
        raise ConfigError(f"ablations need the main checkpoint's config.yaml; {path} not found")
    return path


def pretrain_ablation(cfg: BenchConfig, name: str, out: Path, progress: bool) -> Path:
    """Pretrain (or reuse) the ``name`` ablation of ``cfg.model`` into ``out``; return its checkpoint dir."""
    if (out / "checkpoint" / "qanchor.json").exists():
        return out / "checkpoint"
    overrides = [f"data.path={cfg.data.path}", f"output_dir={out}", "resume=false",
                 *cfg.ablation_pretrain_overrides, *PRETRAIN_ABLATIONS[name]]
    run_pretrain(_checkpoint_config(cfg.model), overrides, progress=progress)
    return out / "checkpoint"


def prompt_ablation(cfg: BenchConfig, k: int, tasks: list[str], out: Path, progress: bool) -> Path:
    """Tune (or reuse) heads with ``k`` prompt tokens on the main checkpoint into ``out``; return it."""
    if not (out / "summary.json").exists():
        overrides = [f"model={cfg.model}", f"data.path={cfg.data.path}", f"task={','.join(tasks)}",
                     f"output_dir={out}", f"num_prompt_tokens={k}", f"seed={cfg.seed}"]
        run_prompt_tune(cfg.prompt_tune_config, overrides, progress=progress)
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
    if not cfg.model:
        raise ConfigError("ablations=true needs model=<checkpoint dir>: ablations retrain that model's recipe")
    root = Path(cfg.output_dir) / "ablations"
    dataset_tasks = [t.name for t in tasks if t.name in ds.tasks]
    runs = [*PRETRAIN_ABLATIONS, *(f"prompt_tokens_{k}" for k in cfg.ablation_prompt_tokens)]
    for name in tqdm(runs, desc="ablations", unit="run", disable=not progress or None):
        if name in PRETRAIN_ABLATIONS:
            ckpt = pretrain_ablation(cfg, name, root / name, progress)
            _judge(cfg, ds, tasks, folds_by_task, result, name, "qanchor_task", QAnchorEmbedder.open(ckpt, ds), {})
        elif dataset_tasks:  # prompt tuning needs the dataset's own task files
            k = int(name.rsplit("_", 1)[1])
            heads_dir = prompt_ablation(cfg, k, dataset_tasks, root / name, progress)
            embedder = QAnchorEmbedder.open(cfg.model, ds)
            heads = load_heads(heads_dir, dataset_tasks, embedder.checkpoint_hash)
            _judge(cfg, ds, tasks, folds_by_task, result, name, "qanchor_head", embedder, heads)
