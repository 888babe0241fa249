"""A scenario head: soft prompt + class prototypes for one task, saved as a small file pair.

    <dir>/head.safetensors   prompt (k, H), prototypes (P, D) unit rows, prototype_labels (P,) int64,
                             log_scale and bias (scalars; absent in heads written before they existed = 0),
                             lookup (T,) on a model with query evidence (absent: the query text's own vector)
    <dir>/head.yaml          task, query, k, temperature, checkpoint hash, qanchor version, ...

The prompt is read by the frozen LLM at the start of the suffix (``model.suffix(query_ids, head.prompt)``);
the prototypes score the resulting embedding. A head only makes sense on the exact weights it was
tuned on, so it records the checkpoint's hash and refuses to load onto another.

Example:
    >>> head = ScenarioHead.load("runs/demo/heads/churn", checkpoint_hash(ckpt))  # doctest: +SKIP
    >>> suffix = model.suffix(query_ids, head.prompt)  # doctest: +SKIP
    >>> head.score(embeddings)  # (N,) log-odds, higher = positive  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

import qanchor
from qanchor.data.io import OutputKind, as_umask_allows, atomic_dir, is_temporary, to_plain
from qanchor.errors import CheckpointError
from qanchor.model.factory import first_nonfinite, head_label, same_model
from qanchor.probe import LR_CS, logistic_probe
from qanchor.tune.losses import prototype_loss, prototype_score

__all__ = ["ScenarioHead", "HeadEntry", "find_heads", "load_heads", "apply_whitening", "fit_whitening", "kmeans_prototypes",
           "LogisticStart", "logistic_prototypes", "query_prompt_init", "HEAD_WEIGHTS", "HEAD_META", "SPLIT_FILE", "HEAD_RECORD",
           "HEAD_FOLDER_FILES"]

HEAD_WEIGHTS, HEAD_META, SPLIT_FILE = "head.safetensors", "head.yaml", "split.json"
HEAD_RECORD = "record.json"  # `qanchor prompt-tune`'s record of how the head was tuned, and under which key
# what a head's folder holds: one that also holds anything else (a user's notes) is not replaced whole
HEAD_FOLDER_FILES = (HEAD_WEIGHTS, HEAD_META, SPLIT_FILE, HEAD_RECORD)


class ScenarioHead(nn.Module):
    """Trainable prompt (k, H) and prototypes (P, D) with class labels (P,) for one task's query.

    ``prototypes`` is always the unit-normalised view of the trainable ``prototype_weights``, so the
    loss reads cosine similarities and a saved head holds unit rows. ``extra`` is free-form metadata
    (best step, validation AUC, split) that travels in ``head.yaml``.

    The logits are ``cos / temperature`` (+ ``bias`` on the positive prototypes), with
    ``temperature = base_temperature * exp(-log_scale)``: ``log_scale`` and ``bias`` are scalars a tuning
    run may learn (see ``PromptTuneConfig.learn_calibration``); at 0 and 0 the head is the paper's form, and
    the temperature is exactly ``base_temperature``.

    ``lookup`` (T,), on a model with ``model.query_evidence``: the vector whose relevance to each of the user's events
    makes the embedding's query evidence, in place of the query text's sentence vector (where it starts). A head
    may learn it (``PromptTuneConfig.lookup_lr``): the soft prompt adapts what the backbone reads of the question,
    the look-up adapts which of the user's events count as evidence for the scenario. None: the query text's vector.
    """

    def __init__(self, task: str, query: str, prompt: torch.Tensor, prototypes: torch.Tensor,
                 prototype_labels: torch.Tensor, temperature: float, checkpoint_hash: str, extra: dict | None = None,
                 whitening: tuple[torch.Tensor, torch.Tensor] | None = None,
                 log_scale: float | torch.Tensor = 0.0, bias: float | torch.Tensor = 0.0,
                 lookup: torch.Tensor | None = None):
        super().__init__()
        if prototypes.shape[0] != prototype_labels.shape[0]:
            raise ValueError(f"{prototypes.shape[0]} prototypes but {prototype_labels.shape[0]} labels")
        # Fixed (never trained) affine map applied to embeddings before the cosine: mean (D,), matrix (D, D').
        self.register_buffer("whiten_mean", None if whitening is None else _own(whitening[0]))
        self.register_buffer("whiten_matrix", None if whitening is None else _own(whitening[1]))
        self.task, self.query, self.base_temperature, self.checkpoint_hash = task, query, float(temperature), checkpoint_hash
        self.extra = dict(extra or {})
        self.prompt = nn.Parameter(_own(prompt))  # (k, H)
        # Kept as given (unit rows after k-means or tuning): normalising again on every load would move
        # the last bit, and a saved head must score bit-identically after loading.
        self.prototype_weights = nn.Parameter(_own(prototypes))  # (P, D)
        self.register_buffer("prototype_labels", prototype_labels.detach().clone().long())  # (P,)
        self.log_scale = nn.Parameter(torch.as_tensor(log_scale, dtype=torch.float32).detach().clone().reshape(()))
        self.bias = nn.Parameter(torch.as_tensor(bias, dtype=torch.float32).detach().clone().reshape(()))
        self.lookup = None if lookup is None else nn.Parameter(_own(lookup).float().reshape(-1))  # (T,)
        # the folder it was read from (None: built in memory), not saved: messages about the head name it as the load
        # did, so a warning given when it was loaded is recognised when the model checks it again
        self.source: Path | None = None

    @property
    def prototypes(self) -> torch.Tensor:
        """Unit-norm prototypes (P, D)."""
        return F.normalize(self.prototype_weights, dim=-1)

    @property
    def temperature(self) -> torch.Tensor:
        """The effective temperature (a scalar tensor; gradients reach ``log_scale``)."""
        return self.base_temperature * torch.exp(-self.log_scale)

    @property
    def num_prompt_tokens(self) -> int:
        return int(self.prompt.shape[0])

    @property
    def prototypes_per_class(self) -> int:
        return int(torch.bincount(self.prototype_labels).max())

    def transform(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(N, D) embeddings -> (N, D') the vectors compared with the prototypes (whitened if the head whitens)."""
        return apply_whitening(embeddings, None if self.whiten_matrix is None else (self.whiten_mean, self.whiten_matrix))

    def score(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(N, D) user embeddings (made with this head's prompt) -> (N,) positive-vs-negative log-odds."""
        return prototype_score(self.transform(embeddings), self.prototypes, self.prototype_labels, self.temperature,
                               self.bias)

    def loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(N, D) embeddings (made with this head's prompt), (N,) class ids -> the prototypical loss (scalar)."""
        return prototype_loss(self.transform(embeddings), self.prototypes, self.prototype_labels, labels,
                              self.temperature, bias=self.bias)

    def _tuned(self) -> tuple[torch.Tensor, ...]:
        return (self.prompt, self.prototype_weights, self.log_scale, self.bias) + (() if self.lookup is None else (self.lookup,))

    def state(self) -> tuple[torch.Tensor, ...]:
        """Detached copies of (prompt, unit prototypes, log_scale, bias[, lookup]): what best-step selection keeps and
        restores."""
        return tuple(t.detach().clone() for t in (self.prompt, self.prototypes, *self._tuned()[2:]))

    @torch.no_grad()
    def load_state(self, state: tuple[torch.Tensor, ...]) -> None:
        for param, value in zip(self._tuned(), state, strict=True):
            param.copy_(value)

    # ------------------------------------------------------------------------------------------ files
    def metadata(self) -> dict[str, Any]:
        return {"task": self.task, "query": self.query, "num_prompt_tokens": self.num_prompt_tokens,
                "prototypes_per_class": self.prototypes_per_class, "temperature": self.base_temperature,
                "effective_temperature": float(self.temperature.detach()), "bias": float(self.bias.detach()),
                "hidden_size": int(self.prompt.shape[1]), "embedding_dim": int(self.prototype_weights.shape[1]),
                "checkpoint_hash": self.checkpoint_hash, "qanchor_version": qanchor.__version__, **self.extra}

    def save(self, directory: str | Path, beside: Mapping[str, str] | None = None) -> Path:
        """Write ``head.safetensors`` + ``head.yaml`` into ``directory`` (replaced atomically, and only if it holds
        nothing but a head's files); ``beside`` (file name -> text, names from :data:`HEAD_FOLDER_FILES`) is published
        with them in the same swap, so a killed run never leaves a new head beside an old split or record."""
        directory = Path(directory)
        if unknown := sorted(set(beside or {}) - set(HEAD_FOLDER_FILES)):
            raise ValueError(f"a head's folder holds only {', '.join(HEAD_FOLDER_FILES)}, not {', '.join(unknown)}")
        tensors = {"prompt": self.prompt.detach().contiguous(), "prototypes": self.prototype_weights.detach().contiguous(),
                   "prototype_labels": self.prototype_labels.contiguous(), "log_scale": self.log_scale.detach().contiguous(),
                   "bias": self.bias.detach().contiguous()}
        if self.whiten_matrix is not None:
            tensors.update(whiten_mean=self.whiten_mean.contiguous(), whiten_matrix=self.whiten_matrix.contiguous())
        if self.lookup is not None:
            tensors["lookup"] = self.lookup.detach().contiguous()
        with atomic_dir(directory, OutputKind.HEAD, HEAD_FOLDER_FILES, record_layout=True) as tmp:
            save_file(tensors, str(tmp / HEAD_WEIGHTS))
            as_umask_allows(tmp / HEAD_WEIGHTS)
            (tmp / HEAD_META).write_text(yaml.safe_dump(to_plain(self.metadata()), sort_keys=False))
            for name, text in (beside or {}).items():
                (tmp / name).write_text(text, encoding="utf-8")
        return directory

    @classmethod
    def load(cls, directory: str | Path, checkpoint_hash: str | None = None) -> ScenarioHead:
        """Read a head; with ``checkpoint_hash``, refuse (CheckpointError) one tuned on another checkpoint."""
        directory = Path(directory)
        if not (directory / HEAD_META).exists() or not (directory / HEAD_WEIGHTS).exists():
            raise CheckpointError(f"{directory}: not a scenario head ({HEAD_META} / {HEAD_WEIGHTS} missing); "
                                  "create one with `qanchor prompt-tune`")
        try:
            meta = yaml.safe_load((directory / HEAD_META).read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError):
            raise CheckpointError(f"{directory / HEAD_META}: not valid YAML; the head is damaged (re-run prompt-tune)") from None
        required = {"task", "query", "temperature", "checkpoint_hash"}
        if not isinstance(meta, dict) or not required <= set(meta):
            raise CheckpointError(f"{directory / HEAD_META}: not a head description (needs {sorted(required)}); "
                                  "re-run `qanchor prompt-tune`")
        check_tuned_on(directory, meta["task"], meta["checkpoint_hash"], checkpoint_hash)
        try:
            t = load_file(str(directory / HEAD_WEIGHTS))
        except Exception as exc:  # safetensors' own error types: damaged header or payload
            raise CheckpointError(f"{directory / HEAD_WEIGHTS}: not a safetensors file, or truncated / damaged "
                                  f"({str(exc).splitlines()[0]}); re-run `qanchor prompt-tune`") from None
        if not {"prompt", "prototypes", "prototype_labels"} <= set(t):
            raise CheckpointError(f"{directory / HEAD_WEIGHTS}: missing prompt / prototypes tensors")
        if (broken := first_nonfinite(t)) is not None:  # every embedding and score under it would be NaN, unsaid
            raise CheckpointError(f"{directory / HEAD_WEIGHTS}: the tensor {broken} holds NaN or infinite values; the "
                                  "head is damaged (re-run `qanchor prompt-tune`)")
        known = {"task", "query", "num_prompt_tokens", "prototypes_per_class", "temperature", "effective_temperature",
                 "bias", "hidden_size", "embedding_dim", "checkpoint_hash", "qanchor_version"}
        extra = {k: v for k, v in meta.items() if k not in known}
        try:
            temperature = float(meta["temperature"])
        except (TypeError, ValueError):
            temperature = math.nan
        if not (math.isfinite(temperature) and temperature > 0):  # NaN or zero: NaN scores; infinite: all 0, unsaid
            raise CheckpointError(f"{directory / HEAD_META}: temperature {meta['temperature']!r} is not a positive "
                                  "number; the head is damaged (re-run `qanchor prompt-tune`)")
        whitening = (t["whiten_mean"], t["whiten_matrix"]) if "whiten_matrix" in t else None
        # Heads saved before the scale and bias existed scored with exactly these values.
        log_scale, bias = t.get("log_scale", 0.0), t.get("bias", 0.0)
        if ("whiten_mean" in t) != ("whiten_matrix" in t):
            raise CheckpointError(f"{directory / HEAD_WEIGHTS}: holds one of whiten_mean / whiten_matrix without the "
                                  "other; the head is damaged (re-run `qanchor prompt-tune`)")
        try:
            head = cls(meta["task"], meta["query"], t["prompt"], t["prototypes"], t["prototype_labels"],
                       temperature, meta["checkpoint_hash"], extra, whitening, log_scale, bias, t.get("lookup"))
        except (ValueError, TypeError, RuntimeError) as exc:  # values of the wrong kind or shape
            raise CheckpointError(f"{directory}: damaged head ({str(exc).splitlines()[0][:160]}); re-run "
                                  "`qanchor prompt-tune`") from None
        if head.prompt.ndim != 2 or head.prototype_weights.ndim != 2:
            raise CheckpointError(f"{directory / HEAD_WEIGHTS}: prompt {tuple(head.prompt.shape)} and prototypes "
                                  f"{tuple(head.prototype_weights.shape)} must be matrices; the head is damaged "
                                  "(re-run `qanchor prompt-tune`)")
        head.source = directory
        return head


@dataclass
class HeadEntry:
    """A scenario head and the users it never saw while tuning (its own held-out test split)."""

    head: ScenarioHead
    test_users: np.ndarray | None = None  # object [n]; None = unknown, so any score on it is optimistic


def find_heads(directory: str | Path) -> dict[str, Path]:
    """Head folders under ``directory``: itself if it holds a head, else its ``<task>/`` subfolders.

    Example:
        >>> find_heads("runs/demo/heads")  # doctest: +SKIP
        {'churn': PosixPath('runs/demo/heads/churn'), 'coupon_redeem': ...}
    """
    directory = Path(directory)
    if (directory / HEAD_META).exists():
        return {directory.name: directory}
    # a write that a kill cut short leaves a hidden temporary beside the head, whole: it is not a second head
    return {p.parent.name: p.parent for p in sorted(directory.glob(f"*/{HEAD_META}")) if not is_temporary(p.parent)}


def _declared_task(folder: Path, fallback: str) -> str:
    """The task ``folder``'s description names, read without the weights (``fallback``, its folder's name, where the
    description cannot be read: :meth:`ScenarioHead.load` then says what is wrong if that task is asked for)."""
    try:
        meta = yaml.safe_load((folder / HEAD_META).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return fallback
    return str(meta["task"]) if isinstance(meta, dict) and "task" in meta else fallback


def _test_users(head_dir: Path) -> np.ndarray | None:
    path = head_dir / SPLIT_FILE  # written by `qanchor prompt-tune`: {"train": [...], "val": [...], "test": [...]}
    if not path.exists():
        return None
    try:
        test = json.loads(path.read_text()).get("test")
    except (ValueError, AttributeError):
        raise CheckpointError(f"{path}: not a head split file (JSON with train / val / test user lists)") from None
    return None if test is None else np.asarray(test, dtype=object)


def check_tuned_on(directory: Path, task: str, tuned_on: str, checkpoint_hash: str | None) -> None:
    """Refuse (CheckpointError) a head tuned on another checkpoint than ``checkpoint_hash`` (None: no check)."""
    if checkpoint_hash is not None and not same_model(tuned_on, checkpoint_hash, head_label(directory)):
        raise CheckpointError(f"{directory}: head for task '{task}' was tuned on checkpoint {str(tuned_on)[:12]}, not on "
                              f"this one ({checkpoint_hash[:12]}); re-run `qanchor prompt-tune` with this checkpoint")


def load_heads(directories: str | Path | Sequence[str | Path] | None, tasks: Sequence[str] | None = None,
               checkpoint_hash: str | None = None, require: bool = False) -> dict[str, HeadEntry]:
    """Heads found in ``directories`` (each a head folder or a ``qanchor prompt-tune`` output), by task.

    ``tasks`` keeps only those (tasks without a head are simply absent). With ``checkpoint_hash``, a head
    tuned on another checkpoint raises CheckpointError; with ``require``, finding none raises CheckpointError.
    """
    if directories is None:
        return {}
    dirs = [directories] if isinstance(directories, (str, Path)) else list(directories)
    out: dict[str, HeadEntry] = {}
    where: dict[str, Path] = {}
    for d in map(Path, dirs):
        found = find_heads(d)
        if require and not found:
            raise CheckpointError(f"{d}: no {HEAD_META} there or in its subfolders; point it at a `qanchor prompt-tune` "
                                  "output_dir or one task's folder")
        for name, folder in found.items():
            if tasks is not None and _declared_task(folder, name) not in tasks:
                continue  # a head nobody asked for is not read, so a damaged one cannot stop the load
            head = ScenarioHead.load(folder)
            if tasks is None or head.task in tasks:
                check_tuned_on(folder, head.task, head.checkpoint_hash, checkpoint_hash)
                if head.task in out:  # one would silently replace the other: rows are named head:<task>
                    raise CheckpointError(f"two heads for task '{head.task}': {where[head.task]} and {folder}; give one")
                out[head.task], where[head.task] = HeadEntry(head, _test_users(folder)), folder
    return out


def _own(t: torch.Tensor) -> torch.Tensor:
    """A float32 contiguous copy: matmul rounding depends on memory layout, and a loaded head (contiguous
    tensors from safetensors) must compute exactly what the in-memory one did."""
    return t.detach().float().clone(memory_format=torch.contiguous_format)


def apply_whitening(embeddings: torch.Tensor, whitening: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """(N, D) -> (N, D'): ``(x - mean) @ matrix``, or ``x`` itself (float32) when ``whitening`` is None."""
    if whitening is None:
        return embeddings.float()
    return (embeddings.float() - whitening[0]) @ whitening[1]


def fit_whitening(embeddings: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge-regularised PCA whitening of (N, D) embeddings -> mean (D,), matrix (D, D).

    ``x -> (x - mean) @ matrix`` gives every principal direction variance ``lam / (lam + eps * lam_max)``:
    about 1 for directions above ``eps * lam_max``, shrunk below it (so float noise is not blown up).
    Pretrained embeddings are anisotropic (tiny preset: the top direction holds most of the variance and
    task signal sits in directions 1e-5 times weaker), and a cosine can only see the dominant ones.
        >>> x = torch.randn(500, 3, generator=torch.Generator().manual_seed(0)) * torch.tensor([10.0, 1.0, 0.1])
        >>> mean, w = fit_whitening(x, eps=1e-12)
        >>> torch.cov(((x - mean) @ w).T).diagonal().round(decimals=2).tolist()
        [1.0, 1.0, 1.0]
    """
    x = embeddings.double()
    mean = x.mean(0)  # (D,)
    lam, vecs = torch.linalg.eigh(torch.cov((x - mean).T))  # (D,), (D, D)
    lam = lam.clamp_min(0.0)
    matrix = vecs / (lam + eps * lam.max()).sqrt()  # (D, D): column j scaled by 1 / sqrt(lam_j + eps * lam_max)
    return mean.float(), matrix.float()


def kmeans_prototypes(embeddings: np.ndarray, labels: np.ndarray, per_class: int, seed: int,
                      min_users: int = 1, niter: int = 25) -> tuple[torch.Tensor, torch.Tensor]:
    """Faiss k-means inside each class -> unit-norm centres (P, D) and their class labels (P,).

    Classes are taken in ascending order (negatives first). A class gets ``per_class`` prototypes, or
    fewer so that each has at least ``min_users`` users behind it (always at least one). Example:
        >>> protos, plabels = kmeans_prototypes(emb, y, per_class=4, seed=0)  # doctest: +SKIP
    """
    import faiss

    protos, plabels = [], []
    for cls_id in np.unique(labels):
        x = np.ascontiguousarray(embeddings[labels == cls_id], dtype=np.float32)  # (n_c, D)
        k = max(1, min(per_class, len(x) // max(min_users, 1)))
        km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, verbose=False)
        # Use every point (no subsampling) and stay quiet about small classes: a rare positive class
        # of a few dozen users is normal here, and faiss would warn below 39 points per centroid.
        km.cp.min_points_per_centroid, km.cp.max_points_per_centroid = 1, 1 << 30
        with _faiss_threads(1):
            km.train(x)
        protos.append(km.centroids.reshape(k, -1))
        plabels += [int(cls_id)] * k
    centres = torch.from_numpy(np.concatenate(protos)).float()
    return F.normalize(centres, dim=-1), torch.tensor(plabels, dtype=torch.long)


# The smallest scale of the regression's direction in the logistic prototypes: a float32 cosine resolves about 1e-7,
# so a score of 2 s (e . w_unit) with s >= 0.01 keeps users' order to about 1e-4 of its spread (tested).
MIN_PROTOTYPE_SPREAD = 0.01


class LogisticStart(NamedTuple):
    """Where :func:`logistic_prototypes` starts a head: prototypes (2, D), their labels [0, 1], and the
    ``log_scale`` and ``bias`` that make the head's logit equal the regression's decision function."""

    prototypes: torch.Tensor
    labels: torch.Tensor
    log_scale: float
    bias: float


def logistic_prototypes(points: np.ndarray, labels: np.ndarray, temperature: float, seed: int,
                        cs: Sequence[float] = LR_CS) -> LogisticStart:
    """One prototype per class placed so that the head's score ranks users as a logistic regression does.

    k-means centres summarise where each class *lies*, not what tells the classes apart: when positives
    and negatives overlap (the usual case for a 10% churn class), the centres of both classes sit almost
    on top of each other and the soft nearest-prototype score starts below a linear probe on the same
    embedding (measured at step 0 on the synthetic world, unwhitened: 0.698 vs 0.730 AUC). Here the benchmark's
    own probe (:func:`qanchor.probe.logistic_probe`: standardised L2 logistic regression, strength from ``cs``
    by inner 3-fold CV AUC on these users, or C = 0.1 when a class has fewer than 2 users) is fitted on the
    head's unit ``points`` (N, D), and its weight direction w is
    written into two unit prototypes ``p1/0 = c * u +/- s * w`` (u a unit vector orthogonal to w, c^2 + s^2 = 1).
    Then ``cos(e, p1) - cos(e, p0) = 2 s (e . w)``: the prototype score is the regression's decision function
    up to scale and offset (same AUC), and ``s`` is chosen so that ``2 s / temperature`` matches the
    regression's own logit scale (kept within [MIN_PROTOTYPE_SPREAD, 1]). Tuning then starts from the probe instead
    of below it. Where the clip binds (a regression weight norm above ``2 / temperature``, or one so small that
    float32 cosines could not resolve it), ``log_scale`` makes up the difference, and
    ``bias`` is the regression's offset: a head that uses both (``ScenarioHead(..., log_scale=, bias=)``) has
    exactly the regression's logits, so its loss starts at the regression's own optimum (up to the L2 penalty).

    Returns a :class:`LogisticStart` (unpacks as prototypes, labels, log_scale, bias). Example:
        >>> x = np.array([[1.0, 0.1], [1.0, -0.1], [0.9, 0.4], [0.9, -0.4]]); y = np.array([1, 0, 1, 0])
        >>> protos, plabels, _, _ = logistic_prototypes(x, y, temperature=0.1, seed=0)
        >>> plabels.tolist(), bool((torch.from_numpy(x).float() @ (protos[1] - protos[0]) > 0).eq(torch.tensor(y) == 1).all())
        ([0, 1], True)
    """
    x = np.asarray(points, dtype=np.float64)
    y = np.asarray(labels)
    if np.unique(y).size != 2:
        raise ValueError("logistic_prototypes needs users of both classes")
    # Not class-balanced, and the benchmark's grid: the step-0 head must rank users as the frozen probe it is
    # compared with does. Balanced weights multiply the minority class's weight (20x for a 5% class), which
    # acts like a weaker penalty on those few users: on a 58-positive task it overfitted them and started the
    # head 0.10 AUC below the probe (synthetic fund_purchase, 1,200 training users; 0.594 vs 0.694).
    probe = logistic_probe(y, seed, cs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lbfgs convergence chatter on nearly separable folds
        probe.fit(x, y)
    scaler, clf = probe[0], probe[-1]
    # Standardising is affine, so its decision function is (coef / scale) . x + const in the points' own space.
    w = clf.coef_[0] / scaler.scale_  # (D,)
    bias = float(clf.intercept_[0] - w @ scaler.mean_)  # decision(x) = w . x + bias
    norm = float(np.linalg.norm(w))
    regularised_away = norm == 0.0
    if regularised_away:  # no direction to encode, so start from the class means (and no scale to match)
        w = x[y == 1].mean(0) - x[y == 0].mean(0)
        norm = float(np.linalg.norm(w)) or 1.0
    w_unit = w / norm
    # u: the points' mean direction with w projected out (keeps the prototypes near the data; it cancels in
    # the score); any unit vector orthogonal to w when the mean is parallel to w.
    mean = x.mean(0)
    u = mean - (mean @ w_unit) * w_unit
    if np.linalg.norm(u) < 1e-8:
        u = np.eye(len(w_unit))[int(np.argmin(np.abs(w_unit)))]
        u = u - (u @ w_unit) * w_unit
    u = u / np.linalg.norm(u)
    # s is the regression's scale in the prototypes, kept within [MIN_PROTOTYPE_SPREAD, 1]: above 1 no unit
    # prototype can reach it; below the floor (a regression near its mean-difference limit, C ~ 1e-6, whose weight
    # norm is ~1e-4) the score is a difference of two nearly equal float32 cosines and loses its ranking to rounding.
    natural = norm * temperature / 2.0
    s = min(max(natural, MIN_PROTOTYPE_SPREAD), 1.0)
    # The logit is (2 s / temperature) * exp(log_scale) * (e . w_unit); it equals e . w when exp(log_scale) makes up
    # what the clip changed (exactly 0 in between, so such a head's temperature is exactly the configured one).
    log_scale = float(np.log(natural / s)) if s != natural and not regularised_away else 0.0
    c = float(np.sqrt(max(1.0 - s * s, 0.0)))
    protos = np.stack([c * u - s * w_unit, c * u + s * w_unit])  # (2, D): negatives first, as kmeans_prototypes
    return LogisticStart(F.normalize(torch.from_numpy(protos).float(), dim=-1), torch.tensor([0, 1], dtype=torch.long),
                         log_scale, bias)


@contextmanager
def _faiss_threads(n: int) -> Iterator[None]:
    """Run faiss single-threaded: its OpenMP pool keeps spinning after a call and then starves torch's
    own threads (measured: prompt-tuning steps 40x slower after one k-means on 2 cores)."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def query_prompt_init(token_embeddings: torch.Tensor, k: int) -> torch.Tensor:
    """Prompt (k, H) from the query's own token embeddings (Lq, H), cycled when the query is shorter.

    Starting inside the token-embedding distribution keeps the frozen LLM on familiar inputs, so the
    step-0 embedding stays close to the pretrained task-query embedding (random vectors do not).
        >>> query_prompt_init(torch.eye(2), 3).tolist()
        [[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]
    """
    if token_embeddings.shape[0] == 0:
        raise ValueError("the query has no tokens")
    reps = -(-k // token_embeddings.shape[0])
    return token_embeddings.detach().repeat(reps, 1)[:k].clone()
