"""Prototypical loss and score against a hand-computed example; AUC/KS against scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from qanchor.metrics import auc_ks
from qanchor.tune.losses import balanced_weights, prototype_loss, prototype_score

# Two users, three prototypes, temperature 0.5 (cosines: e1 = (1,0), e2 = (0,1)).
EMB = torch.tensor([[3.0, 0.0], [0.0, 0.5]])  # not unit: the functions normalise
PROTOS = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
PROTO_LABELS = torch.tensor([1, 0, 0])
LABELS = torch.tensor([1, 0])
T = 0.5
# By hand: e1 logits (2, 0, -2), own = {p0}:     -log(e^2 / (e^2 + 1 + e^-2))       = log(1 + e^-2 + e^-4)
#          e2 logits (0, 2, 0),  own = {p1, p2}: -log((e^2 + 1) / (1 + e^2 + 1))      = log((e^2 + 2) / (e^2 + 1))
LOSS_1 = math.log(1 + math.exp(-2) + math.exp(-4))  # 0.142932
LOSS_2 = math.log((math.exp(2) + 2) / (math.exp(2) + 1))  # 0.112617
# Scores: positive logsumexp minus negative logsumexp.
SCORE_1 = 2.0 - math.log(1 + math.exp(-2))  # 1.873072
SCORE_2 = 0.0 - math.log(math.exp(2) + 1)  # -2.126928


def test_loss_matches_hand_computation():
    assert LOSS_1 == pytest.approx(0.142932, abs=1e-6) and LOSS_2 == pytest.approx(0.112617, abs=1e-6)
    loss = prototype_loss(EMB, PROTOS, PROTO_LABELS, LABELS, T)
    assert float(loss) == pytest.approx((LOSS_1 + LOSS_2) / 2, abs=1e-6)
    weighted = prototype_loss(EMB, PROTOS, PROTO_LABELS, LABELS, T, weights=torch.tensor([1.0, 3.0]))
    assert float(weighted) == pytest.approx((LOSS_1 + 3 * LOSS_2) / 4, abs=1e-6)


def test_score_matches_hand_computation():
    score = prototype_score(EMB, PROTOS, PROTO_LABELS, T)
    assert score.tolist() == pytest.approx([SCORE_1, SCORE_2], abs=1e-6)


def test_loss_is_softplus_of_score_with_one_prototype_per_class():
    """With one prototype per class the loss is the logistic loss of the score: a consistency check."""
    gen = torch.Generator().manual_seed(0)
    emb, protos = torch.randn(16, 8, generator=gen), torch.randn(2, 8, generator=gen)
    plabels, labels = torch.tensor([0, 1]), torch.randint(0, 2, (16,), generator=gen)
    score = prototype_score(emb, protos, plabels, 0.1)
    expected = torch.nn.functional.softplus(torch.where(labels == 1, -score, score)).mean()
    assert torch.allclose(prototype_loss(emb, protos, plabels, labels, 0.1), expected, atol=1e-5)


def test_bias_shifts_the_score_and_the_loss_stays_its_logistic_loss():
    gen = torch.Generator().manual_seed(1)
    emb, protos = torch.randn(16, 8, generator=gen), torch.randn(4, 8, generator=gen)
    plabels, labels = torch.tensor([0, 0, 1, 1]), torch.randint(0, 2, (16,), generator=gen)
    score = prototype_score(emb, protos, plabels, 0.1, bias=0.7)
    assert torch.allclose(score, prototype_score(emb, protos, plabels, 0.1) + 0.7, atol=1e-5)
    expected = torch.nn.functional.softplus(torch.where(labels == 1, -score, score)).mean()
    assert torch.allclose(prototype_loss(emb, protos, plabels, labels, 0.1, bias=0.7), expected, atol=1e-5)
    # Learnable: a tensor temperature and bias get gradients.
    t, b = torch.tensor(0.1, requires_grad=True), torch.tensor(0.0, requires_grad=True)
    prototype_loss(emb, protos, plabels, labels, t, bias=b).backward()
    assert t.grad.abs() > 0 and b.grad.abs() > 0


def test_loss_gradients_reach_embeddings_and_prototypes():
    emb, protos = EMB.clone().requires_grad_(True), PROTOS.clone().requires_grad_(True)
    prototype_loss(emb, protos, PROTO_LABELS, LABELS, T).backward()
    assert torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0 and protos.grad.abs().sum() > 0


def test_class_without_prototype_is_refused():
    with pytest.raises(ValueError, match="prototype"):
        prototype_loss(EMB, PROTOS[1:], PROTO_LABELS[1:] * 0, LABELS, T)


def test_balanced_weights_give_each_class_equal_mass():
    w = balanced_weights(torch.tensor([0, 0, 0, 1]))
    assert w.tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 1.0])


def test_auc_ks_against_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = y + rng.normal(0, 1.5, 300)
    out = auc_ks(y, s)
    assert out["auc"] == pytest.approx(roc_auc_score(y, s))
    # KS = largest gap between the two classes' empirical score CDFs.
    grid = np.sort(s)
    cdf = [np.searchsorted(np.sort(s[y == c]), grid, side="right") / (y == c).sum() for c in (0, 1)]
    assert out["ks"] == pytest.approx(np.max(np.abs(cdf[0] - cdf[1])))
    assert np.isnan(auc_ks([1, 1], [0.2, 0.3])["auc"])
