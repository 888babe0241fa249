"""Prototypical contrastive loss and prototype score: pure functions of tensors (DESIGN section 5).

A scenario head keeps ``P`` unit-norm prototypes, each labelled with a class (0 or 1). With
``s[n, p] = cos(e_n, proto_p)`` and temperature ``t``:

    loss_n  = -log( sum_{p in class(y_n)} exp(l[n,p]) / sum_p exp(l[n,p]) ),  l[n,p] = s[n,p]/t (+ b if label_p = 1)
    score_n = logsumexp_{p: label 1} l[n,p]  -  logsumexp_{p: label 0} l[n,p]

The score is the log-odds the loss trains (a soft nearest-prototype classifier), so it is what AUC reads; for
two classes the loss is exactly the logistic loss of the score. ``b`` is a class bias (default 0, the paper's
form): cosines of unit vectors have no offset of their own, so without it the loss can only match a base rate
by tilting the prototypes, which moves them off the direction that separates the classes.

Example:
    >>> import torch
    >>> emb = torch.tensor([[1.0, 0.0]])
    >>> protos = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> labels = torch.tensor([1, 0])
    >>> round(float(prototype_score(emb, protos, labels, 1.0)[0]), 4)  # cos 1 vs cos 0
    1.0
    >>> round(float(prototype_loss(emb, protos, labels, torch.tensor([1]), 1.0)), 4)  # -log(e / (e + 1))
    0.3133
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["prototype_logits", "prototype_loss", "prototype_score", "balanced_weights"]


def prototype_logits(embeddings: torch.Tensor, prototypes: torch.Tensor, temperature: float | torch.Tensor) -> torch.Tensor:
    """Cosine similarity over temperature: (N, D), (P, D) -> (N, P). Both sides are normalised here."""
    return F.normalize(embeddings, dim=-1) @ F.normalize(prototypes, dim=-1).T / temperature


def _class_logits(embeddings: torch.Tensor, prototypes: torch.Tensor, prototype_labels: torch.Tensor,
                  temperature: float | torch.Tensor, bias: float | torch.Tensor) -> torch.Tensor:
    """Prototype logits with the class bias added to the positive prototypes' columns: (N, P)."""
    logits = prototype_logits(embeddings, prototypes, temperature)  # (N, P)
    if isinstance(bias, torch.Tensor) or bias != 0.0:
        logits = logits + (prototype_labels == 1).to(logits.dtype) * bias  # (N, P)
    return logits


def prototype_loss(embeddings: torch.Tensor, prototypes: torch.Tensor, prototype_labels: torch.Tensor,
                   labels: torch.Tensor, temperature: float | torch.Tensor, weights: torch.Tensor | None = None,
                   bias: float | torch.Tensor = 0.0) -> torch.Tensor:
    """Prototypical contrastive loss, averaged over users (weighted mean when ``weights`` (N,) is given).

    ``prototype_labels`` (P,) and ``labels`` (N,) hold class ids; every user's class needs a prototype.
    ``temperature`` and ``bias`` may be (scalar) tensors, so a head can learn them.
    """
    logits = _class_logits(embeddings, prototypes, prototype_labels, temperature, bias)  # (N, P)
    own = labels[:, None] == prototype_labels[None, :]  # (N, P)
    if not bool(own.any(dim=1).all()):
        raise ValueError("every class in `labels` needs at least one prototype")
    log_own = torch.logsumexp(logits.masked_fill(~own, float("-inf")), dim=1)  # (N,)
    per_user = torch.logsumexp(logits, dim=1) - log_own  # (N,)
    if weights is None:
        return per_user.mean()
    return (per_user * weights).sum() / weights.sum()


def prototype_score(embeddings: torch.Tensor, prototypes: torch.Tensor, prototype_labels: torch.Tensor,
                    temperature: float | torch.Tensor, bias: float | torch.Tensor = 0.0) -> torch.Tensor:
    """Positive-vs-negative log-odds per user: (N, D) -> (N,). Higher = more like the positive class."""
    logits = _class_logits(embeddings, prototypes, prototype_labels, temperature, bias)  # (N, P)
    pos = prototype_labels == 1  # (P,)
    neg_inf = float("-inf")
    return torch.logsumexp(logits.masked_fill(~pos, neg_inf), dim=1) - torch.logsumexp(logits.masked_fill(pos, neg_inf), dim=1)


def balanced_weights(labels: torch.Tensor) -> torch.Tensor:
    """Per-user weights giving each class the same total weight (rare positives are not drowned): (N,)."""
    counts = torch.bincount(labels, minlength=int(labels.max()) + 1).float()  # (n_classes,)
    return (1.0 / counts.clamp_min(1.0))[labels]
