"""Tune one scenario head on cached prefixes: k-means prototypes, then prompt + prototypes by Adam.

Only the suffix ``[prompt x k] query <|user_emb|>`` runs per step, on keys/values from a
:class:`~qanchor.tune.prefix_store.PrefixStore`; every pretrained weight stays frozen (and is never
handed to the optimiser). Validation AUC is measured every ``eval_every`` steps and the best step's
prompt and prototypes are kept. Everything random is drawn from ``seed``.

Example:
    >>> result = tune_task(model, store, query_ids, split, cfg, task="churn", query=q, checkpoint_hash=h)  # doctest: +SKIP
    >>> result.head.save("runs/heads/churn"); result.metrics["tuned"]["test"]["auc"]  # doctest: +SKIP
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from qanchor.config import PromptTuneConfig
from qanchor.errors import ConfigError
from qanchor.logs import Progress
from qanchor.metrics import auc_ks
from qanchor.model.prefix_cache import PrefixStore
from qanchor.model.qanchor_model import QAnchorModel
from qanchor.probe import LR_CS
from qanchor.tune.head import (
    ScenarioHead,
    apply_whitening,
    fit_whitening,
    kmeans_prototypes,
    logistic_prototypes,
    query_prompt_init,
)

__all__ = ["Split", "split_users", "fold_split", "tune_task", "frozen_logistic", "TuneResult", "head_scores"]

SPLITS = ("train", "val", "test")


@dataclass
class Split:
    """Store rows (long (n,)) and 0/1 labels (long (n,)) of the train / val / test users of one task."""

    rows: dict[str, torch.Tensor]
    labels: dict[str, torch.Tensor]


def split_users(rows: np.ndarray, labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int) -> Split:
    """Stratified train / val / test split of a task's users (rows of the store), fixed by ``seed``.

        >>> s = split_users(np.arange(10), np.array([0, 1] * 5), 0.2, 0.2, seed=0)
        >>> [len(s.rows[k]) for k in ("train", "val", "test")]
        [6, 2, 2]
    """
    idx = np.arange(len(rows))
    rest, test = train_test_split(idx, test_size=test_fraction, stratify=labels, random_state=seed)
    train, val = train_test_split(rest, test_size=val_fraction / (1 - test_fraction), stratify=labels[rest],
                                  random_state=seed)
    parts = {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}
    return Split({k: torch.as_tensor(rows[v], dtype=torch.long) for k, v in parts.items()},
                 {k: torch.as_tensor(labels[v], dtype=torch.long) for k, v in parts.items()})


def fold_split(rows: np.ndarray, labels: np.ndarray, train: np.ndarray, test: np.ndarray, val_fraction: float,
               seed: int) -> Split:
    """A :class:`Split` whose test users are a benchmark fold's (``test`` indices) and whose train / val users
    split that fold's training users (``train`` indices), stratified: tuning never sees the fold's test users."""
    idx_train, idx_val = train_test_split(train, test_size=val_fraction, stratify=labels[train], random_state=seed)
    parts = {"train": np.sort(idx_train), "val": np.sort(idx_val), "test": np.sort(test)}
    return Split({k: torch.as_tensor(rows[v], dtype=torch.long) for k, v in parts.items()},
                 {k: torch.as_tensor(labels[v], dtype=torch.long) for k, v in parts.items()})


@dataclass
class TuneResult:
    head: ScenarioHead
    metrics: dict[str, dict] = field(default_factory=dict)  # method -> split -> {auc, ks}
    best_step: int = 0
    seconds: float = 0.0
    history: list[dict] = field(default_factory=list)  # {step, loss (mean since last eval), val_auc} per evaluation


def _batch(rng: np.random.Generator, labels: np.ndarray, size: int, balanced: bool) -> np.ndarray:
    """Indices into the training users; balanced = half from each class (with replacement if small)."""
    if not balanced:
        return rng.choice(len(labels), size=min(size, len(labels)), replace=False)
    out = []
    for cls_id, n in zip((0, 1), (size - size // 2, size // 2)):
        pool = np.flatnonzero(labels == cls_id)
        out.append(rng.choice(pool, size=n, replace=n > len(pool)))
    return np.concatenate(out)


def _initial_prompt(model: QAnchorModel, query_ids: torch.Tensor, cfg: PromptTuneConfig) -> torch.Tensor:
    with torch.no_grad():
        tokens = model.embed_tokens(query_ids).float()  # (Lq, H)
    if cfg.prompt_init == "query":
        return query_prompt_init(tokens, cfg.num_prompt_tokens)
    # Small random vectors at the token-embedding scale: a control for the query initialisation.
    gen = torch.Generator().manual_seed(cfg.seed)
    return torch.randn(cfg.num_prompt_tokens, tokens.shape[1], generator=gen).to(tokens.device) * tokens.std()


def _evaluate(model, store, query_ids, head: ScenarioHead, split: Split, names, chunk: int,
              lookup: torch.Tensor | None, diverged: Callable[[str], ConfigError]) -> dict[str, dict]:
    """AUC / KS of the head on each split of ``names``; a score that is not finite is refused by ``diverged``."""
    suffix = model.suffix(query_ids, head.prompt.detach())
    metrics = {}
    with torch.no_grad():
        for k in names:
            scores = head.score(store.embed(model, suffix, split.rows[k], chunk, lookup)).float().cpu().numpy()
            if not np.isfinite(scores).all():
                raise diverged(f"the {k} users' scores are")
            metrics[k] = auc_ks(split.labels[k].numpy(), scores)
    return metrics


def _divergence(task: str, where: str, cfg: PromptTuneConfig, learn_lookup: bool) -> Callable[[str], ConfigError]:
    """The refusal of a head whose loss or scores are no longer finite: settings that step too far (lr,
    prototype_lr) or divide by too little (temperature) overflow its weights, and every later number is NaN. It names
    the task (and ``where``: the bench's fold) and the settings that drive the head, not the AUC that met the NaN."""
    rates = "lr, prototype_lr and lookup_lr" if learn_lookup else "lr and prototype_lr"
    settings = f"lr={cfg.lr}, prototype_lr={cfg.prototype_lr}, temperature={cfg.temperature}"
    if learn_lookup:
        settings += f", lookup_lr={cfg.lookup_lr}"

    def diverged(what: str) -> ConfigError:
        return ConfigError(f"task {task}{f', {where}' if where else ''}: tuning the head diverged ({what} not finite) "
                           f"under {settings}; lower {rates}, or raise temperature")
    return diverged


@contextmanager
def frozen(model: torch.nn.Module) -> Iterator[None]:
    """No parameter of ``model`` requires a gradient inside the block; each one's flag is restored after it.

    A head's backward pass must reach only its prompt and prototypes. With the model's weights still trainable
    (a model opened for inference, as the benchmark's is) every step would also compute and accumulate gradients
    for the whole backbone, the 30k-row token embedding included: wasted time and memory, same result.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def tune_task(model: QAnchorModel, store: PrefixStore, query_ids: torch.Tensor, split: Split, cfg: PromptTuneConfig,
              task: str, query: str, checkpoint_hash: str, progress: bool = False, where: str = "") -> TuneResult:
    """Initialise a head (query-token prompt; k-means or logistic prototypes) and tune it; keep the best-val step.

    Only the head trains: the model is frozen for the call (see :func:`frozen`) whatever its flags were. A loss or
    score that is not finite (settings under which the head diverges) is a ConfigError naming the task, ``where``
    (e.g. ``"fold 2 of 5"``) and the settings.
    """
    with frozen(model):
        return _tune_task(model, store, query_ids, split, cfg, task, query, checkpoint_hash, progress, where)


def _tune_task(model: QAnchorModel, store: PrefixStore, query_ids: torch.Tensor, split: Split, cfg: PromptTuneConfig,
               task: str, query: str, checkpoint_hash: str, progress: bool, where: str) -> TuneResult:
    start = time.perf_counter()
    y_train = split.labels["train"].numpy()
    if np.unique(y_train).size < 2:
        raise ValueError(f"task {task}: the training split holds one class only")
    prompt = _initial_prompt(model, query_ids, cfg)
    # A model with query evidence: the head's look-up starts at the query text's vector (the evidence the frozen
    # embedding has); with lookup_lr > 0 it learns which of the users' events count as evidence for this task.
    lookup = store.query_vector(query).float().clone() if store.event_rows is not None else None
    learn_lookup = lookup is not None and cfg.lookup_lr > 0
    diverged = _divergence(task, where, cfg, learn_lookup)
    if lookup is not None and not learn_lookup:
        # The same evidence at every step: computed once for every user, and the store embeds with it.
        store = store.with_lookup(model, lookup)
    with torch.no_grad():
        emb0 = store.embed(model, model.suffix(query_ids, prompt), split.rows["train"], cfg.prefix_chunk,
                           lookup if learn_lookup else None)  # (n, D)
    whitening = None if cfg.whitening_eps is None else fit_whitening(emb0, cfg.whitening_eps)
    points = F.normalize(apply_whitening(emb0, whitening), dim=-1).float().cpu()  # what the cosine compares, (n, D)
    log_scale, bias = 0.0, 0.0
    if cfg.prototype_init == "logistic":
        # Balanced batches train at 50/50, so the step-0 head starts at their prior (see _logistic_readout).
        protos, plabels, log_scale, bias = _logistic_readout(points.numpy(), y_train, cfg, prior_shift=cfg.balanced)
    else:
        protos, plabels = kmeans_prototypes(points.numpy(), y_train, cfg.prototypes_per_class, cfg.seed,
                                            min_users=cfg.min_users_per_prototype)
    # On the model's device (prototypes and calibration are made on the host), before the optimiser sees them.
    head = ScenarioHead(task, query, prompt, protos, plabels, cfg.temperature, checkpoint_hash, whitening=whitening,
                        log_scale=log_scale, bias=bias, lookup=lookup).to(prompt.device)
    if head.lookup is not None:
        head.lookup.requires_grad_(learn_lookup)
    step_lookup = head.lookup if learn_lookup else None  # None: the store's fixed look-up evidence
    frozen = _evaluate(model, store, query_ids, head, split, SPLITS[1:], cfg.prefix_chunk, step_lookup, diverged)
    groups = [{"params": [head.prompt], "lr": cfg.lr}, {"params": [head.prototype_weights], "lr": cfg.prototype_lr}]
    if cfg.learn_calibration:  # two scalars, moved at the prototypes' pace
        groups.append({"params": [head.log_scale, head.bias], "lr": cfg.prototype_lr})
    if learn_lookup:
        groups.append({"params": [head.lookup], "lr": cfg.lookup_lr})
    opt = torch.optim.Adam(groups)
    rng = np.random.default_rng(cfg.seed)
    best = (frozen["val"]["auc"], 0, head.state())
    history = [{"step": 0, "loss": None, "val_auc": frozen["val"]["auc"]}]
    bar = Progress(cfg.steps, f"tune {task}", "step", enabled=progress)
    window: list[float] = []  # batch losses since the last evaluation: one batch's loss is too noisy to read
    for step in range(1, cfg.steps + 1):
        idx = _batch(rng, y_train, cfg.batch_size, cfg.balanced)
        rows, labels = split.rows["train"][idx], split.labels["train"][idx].to(prompt.device)
        suffix = model.suffix(query_ids, head.prompt)  # (k + Lq + 1, H): gradients reach the prompt
        emb = store.anchor_embedding(model, [suffix] * len(idx), rows, step_lookup)  # (B, D); gradients reach a learned look-up
        loss = head.loss(emb, labels)
        window.append(float(loss.detach()))
        if not math.isfinite(window[-1]):  # stepping on would only spread the NaN; the scores would say it later
            raise diverged(f"the training loss at step {step} is")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.update(1)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            val_auc = _evaluate(model, store, query_ids, head, split, ("val",), cfg.prefix_chunk, step_lookup,
                                diverged)["val"]["auc"]
            history.append({"step": step, "loss": float(np.mean(window)), "val_auc": val_auc})
            window = []
            if val_auc > best[0]:  # strictly better: ties keep the earlier (less tuned) step
                best = (val_auc, step, head.state())
            bar.set_postfix(f"loss {history[-1]['loss']:.3f} val_auc {val_auc:.3f} best {best[0]:.3f}@{best[1]}")
    bar.close()
    head.load_state(best[2])
    tuned = _evaluate(model, store, query_ids, head, split, SPLITS[1:], cfg.prefix_chunk, step_lookup, diverged)
    metrics = {"frozen_proto": frozen, "tuned": tuned}
    if cfg.refit_readout:
        # The validation users only chose the step; the readout the head keeps is fitted on them too. "tuned" keeps
        # the chosen step's held-out validation AUC (after the refit they are training users) and the refit's test.
        metrics["before_refit"] = tuned
        _refit_readout(model, store, query_ids, head, split, cfg, step_lookup)
        tuned = {"val": tuned["val"], **_evaluate(model, store, query_ids, head, split, ("test",), cfg.prefix_chunk,
                                                  step_lookup, diverged)}
        metrics["tuned"] = tuned
    head.extra.update(best_step=best[1], steps=cfg.steps, seed=cfg.seed, prompt_init=cfg.prompt_init,
                      val_auc=tuned["val"]["auc"], val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction,
                      whitening_eps=cfg.whitening_eps, prototype_init=cfg.prototype_init,
                      learn_calibration=cfg.learn_calibration, refit_readout=cfg.refit_readout)
    if lookup is not None:  # how far the look-up moved from the query text's vector (1 = not at all)
        head.extra.update(lookup_lr=cfg.lookup_lr, lookup_cosine=float(F.cosine_similarity(head.lookup.detach(), lookup, dim=0)))
    return TuneResult(head, metrics, best[1], time.perf_counter() - start, history)


@torch.no_grad()
def _refit_readout(model: QAnchorModel, store: PrefixStore, query_ids: torch.Tensor, head: ScenarioHead, split: Split,
                   cfg: PromptTuneConfig, lookup: torch.Tensor | None) -> None:
    """Re-place the head's logistic prototypes (and calibration) by the regression on the train + val users' embeddings
    under its chosen prompt.

    Validation picks the step; it need not also cost the readout a fifth of the labelled users. Fitted on the
    training users only, the readout is a probe on 80% of them, which scored 0.0006-0.013 AUC below the same
    regression on all of them (docs/quality.md, "The head's readout on every labelled user"). The prompt (and
    look-up) stay as chosen; the prototypes become the regression's, at the users' own base rate (no more
    class-balanced steps follow, so no prior-shift correction).
    """
    rows = torch.cat([split.rows["train"], split.rows["val"]])
    labels = torch.cat([split.labels["train"], split.labels["val"]]).numpy()
    emb = store.embed(model, model.suffix(query_ids, head.prompt.detach()), rows, cfg.prefix_chunk, lookup)
    points = F.normalize(head.transform(emb), dim=-1).float().cpu().numpy()
    protos, _, log_scale, bias = _logistic_readout(points, labels, cfg, prior_shift=False)
    head.prototype_weights.copy_(protos.to(head.prototype_weights))
    head.log_scale.fill_(log_scale)
    head.bias.fill_(bias)


def _logistic_readout(points: np.ndarray, labels: np.ndarray, cfg: PromptTuneConfig,
                      prior_shift: bool) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Logistic prototypes of unit ``points`` (N, D) with 0/1 ``labels``, and the head's log_scale and bias: the
    regression's own with ``learn_calibration``, else 0 (the paper's fixed temperature and no offset).

    The regression's offset is for these users' base rate. ``prior_shift`` is for a head that class-balanced batches
    will train next: they train at 50/50, whose optimal log-odds are higher by log(n0 / n1), so it starts there.
    """
    protos, plabels, log_scale, bias = logistic_prototypes(points, labels, cfg.temperature, cfg.seed)
    if not cfg.learn_calibration:
        return protos, plabels, 0.0, 0.0
    if prior_shift:
        n_neg, n_pos = int((labels == 0).sum()), int((labels == 1).sum())
        bias += float(np.log(n_neg / n_pos))
    return protos, plabels, log_scale, bias


def frozen_logistic(model: QAnchorModel, store: PrefixStore, query_ids: torch.Tensor, split: Split, seed: int,
                    chunk: int = 256, grid: tuple[float, ...] = LR_CS) -> dict[str, dict]:
    """Baseline: logistic regression on frozen task-query embeddings (no prompt), C picked by val AUC from the
    benchmark probe's grid, then fitted again at that C on the train + val users (as a head's readout is,
    ``refit_readout``) before the test."""
    suffix = model.suffix(query_ids, None)
    x = {k: store.embed(model, suffix, split.rows[k], chunk).float().cpu().numpy() for k in SPLITS}  # (n_k, D)
    y = {k: split.labels[k].numpy() for k in SPLITS}
    best = None
    for c in grid:
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000, random_state=seed))
        clf.fit(x["train"], y["train"])
        val = auc_ks(y["val"], clf.decision_function(x["val"]))
        if best is None or val["auc"] > best[0]["auc"]:
            best = (val, clf)
    val, clf = best
    clf.fit(np.concatenate([x["train"], x["val"]]), np.concatenate([y["train"], y["val"]]))
    return {"val": val, "test": auc_ks(y["test"], clf.decision_function(x["test"])), "C": float(clf[-1].C)}


@torch.no_grad()
def head_scores(model: QAnchorModel, store: PrefixStore, query_ids: torch.Tensor, head: ScenarioHead, rows: torch.Tensor,
                chunk: int = 256) -> np.ndarray:
    """The head's scores (float64 [n]) of store rows ``rows``: its prompt + query on their cached prefixes."""
    emb = store.embed(model, model.suffix(query_ids, head.prompt.detach()), rows, chunk, head.lookup)
    return head.score(emb).double().cpu().numpy()
