"""Retrained sub-runs of a benchmark: a checkpoint's recipe pretrained again with one change, or heads tuned with
other settings. Used by the ablations and by the ``qanchor_random_init`` control (the recipe with pretraining
skipped). A sub-run finished with the same recipe on the same data is reused, a killed one resumes, and one trained with
another recipe (say, for a checkpoint with a shorter budget) or on data changed since is retrained.

Example:
    >>> ckpt = pretrain_ablation(cfg, "no_pretraining", Path("results/cj/random_init"), progress=False)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from qanchor.config import BenchConfig, PretrainConfig, load_run_config, with_overrides
from qanchor.data.dataset import load_dataset
from qanchor.errors import ConfigError
from qanchor.logs import log
from qanchor.model.factory import resolve_checkpoint_dir
from qanchor.train.pretrain import (
    checkpoint_data_id,
    checkpoint_step,
    recipe_differences,
    run_pretrain,
    same_trained_data,
    with_files_compared,
)

__all__ = ["PRETRAIN_ABLATIONS", "checkpoint_run_config", "pretrain_ablation", "pretrain_variant"]


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
        raise ConfigError(f"checkpoint {checkpoint}: no pretraining config at {path} (not a qanchor checkpoint, or not "
                          "pretrained yet); retrained rows copy its recipe from there")
    return load_run_config(path)


def pretrain_ablation(cfg: BenchConfig, name: str, out: Path, progress: bool) -> Path:
    """Pretrain (or reuse) the ``name`` ablation of ``cfg.checkpoint`` into ``out``; return its checkpoint dir."""
    return pretrain_variant(cfg.checkpoint, cfg.data.path, PRETRAIN_ABLATIONS[name], out, progress,
                            cfg.ablation_pretrain_overrides)


def pretrain_variant(checkpoint: str, data_path: str, change: Callable[[PretrainConfig], PretrainConfig], out: Path,
                     progress: bool, overrides: list[str] | tuple[str, ...] = ()) -> Path:
    """Pretrain (or reuse) ``checkpoint``'s own recipe with ``change`` applied, on ``data_path``, into ``out``:
    the same pairs, budget and seed, one difference. Returns the checkpoint dir; a killed sub-run continues."""
    base = with_overrides(checkpoint_run_config(checkpoint), overrides)
    run = replace(change(base), data=replace(change(base).data, path=data_path), output_dir=str(out),
                  resume=True, overwrite=False)
    ckpt = out / "checkpoint"
    if (ckpt / "config.yaml").exists():
        diffs = with_files_compared(recipe_differences(load_run_config(ckpt / "config.yaml"), run), ckpt, run)
        saved_on = checkpoint_data_id(ckpt)  # None: saved before qanchor recorded it, so not compared
        if saved_on is not None and not same_trained_data(saved_on, load_dataset(data_path, run.data.cache_dir)):
            diffs.append(f"the data at {data_path} (its files or UserU pairs changed since)")
        reached = checkpoint_step(ckpt)
        if reached is not None and reached > run.train.max_steps:  # under a constant schedule not a recipe difference,
            # but a run past its budget cannot resume (and the user has no setting of the sub-run's to raise)
            diffs.append(f"train.max_steps: trained to step {reached}, the recipe now stops at {run.train.max_steps}")
        if not diffs and checkpoint_step(ckpt) == run.train.max_steps:
            return ckpt  # finished with this very recipe: reuse it
        if diffs:  # trained for another checkpoint's recipe (say a shorter budget): stale, so retrain it
            log(f"{out}: trained with other settings ({'; '.join(diffs)}); retraining it")
            run = replace(run, resume=False, overwrite=True)
    run_pretrain(run, progress=progress)  # else a killed sub-run continues where it stopped
    return ckpt
