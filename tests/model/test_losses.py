"""Losses against hand computation (explicit loops in numpy) and against torch's cross_entropy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qanchor.model.losses import combine, masked_infonce, next_token_loss

# Unit vectors chosen so that some negatives beat the positive by more than 0.1 (masked at margin 0.1)
# but none by more than 0.25: row 0's <v0, a2> = 0.96 vs s_pos = 0.8, row 1's <v1, a2> = 1.0 vs 0.8.
A = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
V = np.array([[0.8, 0.6], [0.6, 0.8], [0.0, 1.0]])


def reference(a, v, t, margin, same=None, bank=(), same_bank=None):
    """Per-row losses with explicit loops: the definition, written out."""
    n = len(a)
    out = []
    for i in range(n):
        pos = a[i] @ v[i]
        terms = [math.exp(pos / t)]
        for j in range(n):
            if j == i or (same is not None and same[i][j]):
                continue
            for s in (a[i] @ v[j], a[i] @ a[j], v[i] @ a[j]):
                if s <= pos + margin:
                    terms.append(math.exp(s / t))
        for k, b in enumerate(bank):  # answers of earlier batches: anchor -> answer only
            if (same_bank is None or not same_bank[i][k]) and a[i] @ b <= pos + margin:
                terms.append(math.exp(a[i] @ b / t))
        out.append(-math.log(terms[0] / sum(terms)))
    return np.array(out)


def run(t=1.0, margin=0.1, same=None, rows=None):
    s, n = masked_infonce(torch.tensor(A), torch.tensor(V), rows=rows, temperature=t, margin=margin,
                          same_answer=same)
    return s.item(), n.item()


def test_row0_by_hand():
    # t=1, margin=0.1: negatives of row 0 are a0.v1=.6, a0.v2=0, a0.a1=0, a0.a2=.6, v0.a1=.6; v0.a2=.96 masked.
    expected = -math.log(math.exp(0.8) / (math.exp(0.8) + 3 * math.exp(0.6) + 2))
    assert run(rows=slice(0, 1)) == pytest.approx((expected, 1.0), abs=1e-12)


@pytest.mark.parametrize("t", [1.0, 0.5, 0.07])
@pytest.mark.parametrize("margin", [0.1, 0.25, math.inf])
def test_matches_reference(t, margin):
    s, n = run(t, margin)
    assert n == 3
    assert s == pytest.approx(reference(A, V, t, margin).sum(), rel=1e-10)


def test_margin_mask_changes_value_only_when_it_removes_a_negative():
    assert run(margin=0.1)[0] < run(margin=math.inf)[0] - 1e-3  # masks two negatives: strictly easier
    assert run(margin=0.25)[0] == pytest.approx(run(margin=math.inf)[0], abs=1e-12)  # masks none
    assert run(margin=None)[0] == run(margin=math.inf)[0]  # None: no false-negative masking at all


def test_rows_split_sums_to_whole():
    whole = run(t=0.5)[0]
    assert run(t=0.5, rows=slice(0, 1))[0] + run(t=0.5, rows=slice(1, 3))[0] == pytest.approx(whole, abs=1e-12)


def test_same_answer_mask():
    same = np.zeros((3, 3), dtype=bool)
    same[0, 2] = same[2, 0] = True
    got = run(t=0.5, margin=math.inf, same=torch.tensor(same))[0]
    assert got == pytest.approx(reference(A, V, 0.5, math.inf, same).sum(), rel=1e-10)
    assert got < run(t=0.5, margin=math.inf)[0]


def test_temperature_sharpens():
    # Orthonormal anchors = answers: per row -log(e^{1/t} / (e^{1/t} + 6)), which falls to 0 as t -> 0.
    a = torch.eye(3, dtype=torch.float64)  # float64: float32 logsumexp(10, 0...) - 10 cancels to ~1e-6
    losses = [masked_infonce(a, a, temperature=t)[0].item() for t in (1.0, 0.1, 0.01)]
    assert losses == pytest.approx([3 * math.log1p(6 * math.exp(-1 / t)) for t in (1.0, 0.1, 0.01)], abs=1e-12)
    assert losses[0] > losses[1] > losses[2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradient_finite(dtype):
    torch.manual_seed(0)
    x = torch.randn(6, 16, requires_grad=True)
    a = F.normalize(x, dim=-1).to(dtype)
    v = F.normalize(x + 0.01 * torch.randn(6, 16), dim=-1).to(dtype)
    s, n = masked_infonce(a, v, margin=0.0, same_answer=torch.eye(6, dtype=torch.bool))
    (s / n).backward()
    assert s.dtype == torch.float32 and torch.isfinite(s)
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_next_token_loss_matches_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, dtype=torch.bfloat16)
    labels = torch.full((2, 5), -100)
    labels[0, 3:] = torch.tensor([1, 4])  # answer tokens only; the query part stays -100
    labels[1, 2] = 6
    s, n = next_token_loss(logits, labels)
    # logits[b, t] predicts labels[b, t + 1]: targets at (0, 2)->1, (0, 3)->4, (1, 1)->6.
    picked = logits.float()[[0, 0, 1], [2, 3, 1]]
    expected = F.cross_entropy(picked, torch.tensor([1, 4, 6]), reduction="sum")
    assert s.dtype == torch.float32 and n.item() == 3
    assert torch.allclose(s, expected, atol=1e-6)
    full = F.cross_entropy(logits.float()[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1), reduction="mean")
    assert torch.allclose(s / n, full, atol=1e-6)


def test_next_token_loss_no_targets_is_zero_and_connected():
    logits = torch.randn(1, 4, 3, requires_grad=True)
    s, n = next_token_loss(logits, torch.full((1, 4), -100))
    s.backward()
    assert s.item() == 0 and n.item() == 0 and logits.grad.abs().sum() == 0


def test_combine_modes():
    c, t = torch.tensor(1.5), torch.tensor(2.0)
    both = combine(c, t, ntp_weight=0.5)
    assert (both.total.item(), both.contrastive.item(), both.ntp.item()) == (2.5, 1.5, 2.0)
    only_c = combine(c, None)
    assert (only_c.total.item(), only_c.ntp.item()) == (1.5, 0.0)
    only_t = combine(None, t, ntp_weight=3.0)
    assert (only_t.total.item(), only_t.contrastive.item()) == (6.0, 0.0)
    with pytest.raises(ValueError):
        combine(None, None)


# Two earlier answers: one close to row 0's anchor (0.96 > its positive 0.8 + 0.1), one orthogonal-ish.
BANK = np.array([[0.96, 0.28], [-0.6, 0.8]])


@pytest.mark.parametrize("margin", [0.1, math.inf])
def test_answer_bank_negatives_match_reference(margin):
    same_bank = np.zeros((3, 2), dtype=bool)
    same_bank[1, 1] = True  # row 1's answer text equals bank answer 1: not a negative for it
    s, n = masked_infonce(torch.tensor(A), torch.tensor(V), temperature=0.5, margin=margin,
                          bank=torch.tensor(BANK), same_bank=torch.tensor(same_bank))
    assert n.item() == 3
    assert s.item() == pytest.approx(reference(A, V, 0.5, margin, bank=BANK, same_bank=same_bank).sum(), rel=1e-10)
    without = masked_infonce(torch.tensor(A), torch.tensor(V), temperature=0.5, margin=margin)[0].item()
    assert s.item() > without + 1e-3  # more negatives: a harder task
    masked_all = masked_infonce(torch.tensor(A), torch.tensor(V), temperature=0.5, margin=margin,
                                bank=torch.tensor(BANK), same_bank=torch.ones(3, 2, dtype=torch.bool))[0].item()
    assert masked_all == pytest.approx(without, abs=1e-12)
