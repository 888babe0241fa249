"""Cross-rank helpers for the loss: the only place the training loss touches ``torch.distributed``.

Every function degrades to the identity in a single process (torch.distributed not initialised), so
the same trainer code runs under ``python``, ``torchrun`` and ``deepspeed``. Only ``all_gather`` and
``all_reduce`` are used, which every backend (gloo included) implements for CPU and CUDA tensors.

Example (per rank, inside the training step):
    >>> a_all, v_all = gather_with_grad(a_local), gather_with_grad(v_local)  # doctest: +SKIP
    >>> rank, _ = world(); b = a_local.shape[0]  # doctest: +SKIP
    >>> s, n = masked_infonce(a_all, v_all, rows=slice(rank * b, (rank + 1) * b))  # doctest: +SKIP
    >>> global_mean_loss(s, n).backward()  # doctest: +SKIP
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["world", "gather_with_grad", "all_reduce_sum", "global_mean_loss"]


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        rank, size = world()
        ctx.rank, ctx.rows = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        # Every rank's loss may use every row, so the gradient of the summed objective w.r.t. this
        # rank's rows is the sum over ranks of their incoming gradients, restricted to our slice.
        # (all_reduce + slice instead of reduce_scatter: gloo has no reduce_scatter.)
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: Tensor) -> Tensor:
    """All-gather ``x`` along dim 0 (same shape on every rank), keeping gradients to every owner.

        >>> gather_with_grad(torch.ones(2, 3)).shape   # single process: identity
        torch.Size([2, 3])
    """
    if world()[1] == 1:
        return x
    return _GatherWithGrad.apply(x)


def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum of ``x`` over ranks, detached (for counts and logging); a detached copy in one process."""
    out = x.detach().clone()
    if world()[1] > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def global_mean_loss(local_sum: Tensor, local_count: Tensor) -> Tensor:
    """This rank's loss such that *averaging gradients over ranks* gives the global-mean gradient.

    DDP/DeepSpeed average gradients: g = (1/W) * sum_r d(loss_r). With loss_r = W * sum_r / count_all
    that is d(sum over all ranks' items) / count_all, i.e. the gradient of the single-process mean over
    the combined batch, however unevenly items (rows, answer tokens) fall across ranks. The plain
    ``sum_r / count_r`` would instead weigh each rank equally. The value averaged over ranks is the
    global mean. ``count_all`` is detached (a constant); zero items anywhere gives a zero loss.

        >>> global_mean_loss(torch.tensor(6.0), torch.tensor(3.0)).item()   # single process: mean
        2.0
    """
    _, size = world()
    count_all = all_reduce_sum(local_count).to(local_sum.dtype).clamp_min(1)
    return size * local_sum / count_all
