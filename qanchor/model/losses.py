"""Training losses as pure tensor functions: masked InfoNCE, next-token prediction, their sum.

Both losses return ``(sum over this rank's items, item count)`` rather than a mean: the trainer turns
them into the mean over the *global* batch with :func:`qanchor.train.distributed.global_mean_loss`, so
ranks holding more answer tokens (or rows) weigh more, exactly as in a single-process run.

Example:
    >>> import torch, torch.nn.functional as F
    >>> a = F.normalize(torch.randn(4, 8), dim=-1); v = F.normalize(a + 0.1 * torch.randn(4, 8), dim=-1)
    >>> s, n = masked_infonce(a, v, rows=slice(0, 2))
    >>> n.item()
    2.0
    >>> combine(s / n, None).ntp.item()
    0.0
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["masked_infonce", "next_token_loss", "token_cross_entropy", "LossTerms", "combine"]


def _float32_at_least(x: Tensor) -> Tensor:
    # bf16/fp16 exp/logsumexp at t=0.07 loses the small terms; fp64 inputs (tests) keep their precision.
    return x.to(torch.promote_types(x.dtype, torch.float32))


def masked_infonce(anchors: Tensor, answers: Tensor, rows: slice | None = None, temperature: float = 0.07,
                   margin: float | None = 0.1, same_answer: Tensor | None = None, bank: Tensor | None = None,
                   same_bank: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Improved (GTE-style) contrastive loss with false-negative masking, summed over ``rows``.

    ``anchors`` and ``answers`` are the L2-normalised embeddings of the whole (gathered) batch, [N, D];
    row i's positive is ``answers[i]``. Its negatives are <a_i, v_j>, <a_i, a_j> and <v_i, a_j> for j != i,
    minus those more similar than ``s_pos + margin`` (likely false negatives) and those with
    ``same_answer[i, j]`` set (optional bool [N, N]). ``margin=None`` (or ``inf``) disables the margin mask.
    ``bank`` (optional [K, D] unit vectors: answers of earlier batches) adds <a_i, bank_k> negatives, minus
    those with ``same_bank[i, k]`` set (bool [rows, K]: the same answer text as row i's positive) and, with a
    margin, those above it.

    Returns ``(sum of -log softmax(pos) over rows, number of rows)``, both float tensors.

        >>> a = torch.eye(3); s, n = masked_infonce(a, a, temperature=1.0)
        >>> round(s.item() / n.item(), 4)   # -log(e / (e + 6 * e^0)) per row
        1.1654
    """
    n_all = anchors.shape[0]
    rows = slice(0, n_all) if rows is None else rows
    a, v = _float32_at_least(anchors), _float32_at_least(answers)
    a_loc, v_loc = a[rows], v[rows]
    idx = torch.arange(n_all, device=a.device)[rows]  # global indices of the local rows
    pos = (a_loc * v_loc).sum(-1)  # [B]
    # Three blocks of negatives per row, [B, 3N]: anchor->answer, anchor->anchor, answer->anchor (+ the bank, [B, K]).
    blocks = [a_loc @ v.T, a_loc @ a.T, v_loc @ a.T]
    if bank is not None:
        blocks.append(a_loc @ _float32_at_least(bank).T)  # [B, K]
    neg = torch.cat(blocks, dim=1)
    with torch.no_grad():  # masking is a discrete choice: no gradient through the decision itself
        drop = idx[:, None] == torch.arange(n_all, device=a.device)[None, :]  # j == i
        if same_answer is not None:
            drop = drop | same_answer.to(device=a.device, dtype=torch.bool)[rows]
        drop = drop.repeat(1, 3)
        if bank is not None:
            bank_drop = (torch.zeros((drop.shape[0], bank.shape[0]), dtype=torch.bool, device=a.device)
                         if same_bank is None else same_bank.to(device=a.device, dtype=torch.bool))
            drop = torch.cat([drop, bank_drop], dim=1)
        if margin is not None:
            drop = drop | (neg > pos[:, None] + margin)
    logits = torch.cat([pos[:, None], neg.masked_fill(drop, float("-inf"))], dim=1) / temperature
    # -log(e^{p/t} / (e^{p/t} + sum e^{s/t})) = logsumexp(all/t) - p/t; the positive keeps it finite.
    loss = torch.logsumexp(logits, dim=1) - logits[:, 0]
    return loss.sum(), torch.tensor(float(loss.shape[0]), device=a.device)


def next_token_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """Causal LM loss summed over target tokens: ``logits[:, t]`` predicts ``labels[:, t + 1]``.

    ``logits`` [B, T, V] (any float dtype, computed in >= float32), ``labels`` [B, T] with
    ``ignore_index`` everywhere but the answer tokens. Returns ``(sum of token losses, token count)``.

        >>> lg = torch.zeros(1, 3, 5); lb = torch.tensor([[-100, 2, -100]])
        >>> s, n = next_token_loss(lg, lb); (round(s.item(), 4), n.item())   # log(5), one target
        (1.6094, 1.0)
    """
    tgt = labels[:, 1:]
    keep = tgt != ignore_index
    # Select the target positions *before* upcasting: [B, T, V] in fp32 would be huge for a real vocab.
    return token_cross_entropy(logits[:, :-1][keep], tgt[keep])


def token_cross_entropy(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy of already selected target positions: ``logits`` [N, V], ``targets`` [N].

    Returns ``(sum of token losses, N)``; the model selects the answer positions before its LM head.

        >>> s, n = token_cross_entropy(torch.zeros(2, 4), torch.tensor([1, 3])); (round(s.item(), 4), n.item())
        (2.7726, 2.0)
    """
    total = F.cross_entropy(_float32_at_least(logits), targets, reduction="sum")
    return total, torch.tensor(float(targets.shape[0]), dtype=total.dtype, device=total.device)


@dataclass
class LossTerms:
    """``total`` is what to backpropagate; the parts are for logging (zero tensors when disabled)."""

    total: Tensor
    contrastive: Tensor
    ntp: Tensor


def combine(contrastive: Tensor | None, ntp: Tensor | None, ntp_weight: float = 1.0) -> LossTerms:
    """``total = contrastive + ntp_weight * ntp``; pass None for the term a mode turns off.

        >>> combine(torch.tensor(1.0), torch.tensor(2.0), ntp_weight=0.5).total.item()
        2.0
    """
    if contrastive is None and ntp is None:
        raise ValueError("combine: at least one of contrastive / ntp must be given")
    ref = contrastive if contrastive is not None else ntp
    zero = torch.zeros((), dtype=ref.dtype, device=ref.device)
    c = contrastive if contrastive is not None else zero
    t = ntp if ntp is not None else zero
    return LossTerms(total=c + ntp_weight * t, contrastive=c, ntp=t)
