"""Two gloo processes, each holding half a batch, must reproduce the single-process loss and gradients."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from qanchor.model.losses import masked_infonce, next_token_loss
from qanchor.train.distributed import all_reduce_sum, gather_with_grad, global_mean_loss, world

N, D_IN, D, VOCAB, T = 8, 6, 4, 11, 7
WORLD = 2


def _models():
    torch.manual_seed(0)  # same seed in every process: the "replicated" model
    return torch.nn.Linear(D_IN, D), torch.nn.Sequential(torch.nn.Embedding(VOCAB, 5), torch.nn.Linear(5, VOCAB))


def _inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, D_IN, generator=g)
    y = x + 0.5 * torch.randn(N, D_IN, generator=g)  # answers close to their anchors, so margin masking bites
    same = torch.zeros(N, N, dtype=torch.bool)
    same[1, 6] = same[6, 1] = True  # a cross-rank "identical answer" pair
    tokens = torch.randint(0, VOCAB, (2 * WORLD, T), generator=g)
    labels = torch.full_like(tokens, -100)
    labels[0, 4:] = tokens[0, 4:]  # rank 0: 3 + 1 answer tokens
    labels[1, 6:] = tokens[1, 6:]
    labels[2, 1:] = tokens[2, 1:]  # rank 1: 6 + 4 answer tokens -- deliberately unequal
    labels[3, 3:] = tokens[3, 3:]
    return x, y, same, tokens, labels


def _contrastive(lin, x, y, same, rows):
    a = F.normalize(lin(x), dim=-1)
    v = F.normalize(lin(y), dim=-1)
    return a, v, lambda a_all, v_all: masked_infonce(a_all, v_all, rows=rows, temperature=0.1, margin=0.1,
                                                     same_answer=same)


def _grads(*mods):
    return [p.grad.clone() for m in mods for p in m.parameters()]


def _single():
    lin, lm = _models()
    x, y, same, tokens, labels = _inputs()
    a, v, loss_fn = _contrastive(lin, x, y, same, slice(0, N))
    c = global_mean_loss(*loss_fn(a, v))
    t = global_mean_loss(*next_token_loss(lm(tokens), labels))
    (c + t).backward()
    return c.detach(), t.detach(), _grads(lin, lm)


def _worker(rank, init, out):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=30))
    lin, lm = _models()
    x, y, same, tokens, labels = _inputs()
    b, bt = N // WORLD, tokens.shape[0] // WORLD
    local = slice(rank * b, (rank + 1) * b)
    a, v, loss_fn = _contrastive(lin, x[local], y[local], same, local)
    c = global_mean_loss(*loss_fn(gather_with_grad(a), gather_with_grad(v)))
    t = global_mean_loss(*next_token_loss(lm(tokens[rank * bt:(rank + 1) * bt]), labels[rank * bt:(rank + 1) * bt]))
    (c + t).backward()
    grads = _grads(lin, lm)
    for g in grads:  # what DDP / DeepSpeed do: average gradients over ranks
        dist.all_reduce(g)
        g /= WORLD
    losses = [all_reduce_sum(c) / WORLD, all_reduce_sum(t) / WORLD]  # logged value = mean over ranks
    torch.save({"c": losses[0], "t": losses[1], "grads": grads, "world": world()}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_ranks_match_single_process(tmp_path):
    mp.spawn(_worker, args=(f"file://{tmp_path}/rendezvous", str(tmp_path)), nprocs=WORLD, join=True)
    c, t, grads = _single()
    # Guard: the example must exercise the margin mask, or the parity check proves less than it claims.
    lin, _ = _models()
    x, y, same, *_ = _inputs()
    a, v, loss_fn = _contrastive(lin, x, y, same, slice(0, N))
    assert abs(loss_fn(a, v)[0] - masked_infonce(a, v, temperature=0.1, margin=float("inf"),
                                                 same_answer=same)[0]) > 1e-3
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["world"] == (rank, WORLD)
        assert torch.allclose(got["c"], c, atol=1e-6) and torch.allclose(got["t"], t, atol=1e-6)
        for g_dist, g_ref in zip(got["grads"], grads):
            assert torch.allclose(g_dist, g_ref, atol=1e-6)


def test_single_process_helpers_are_identity():
    assert world() == (0, 1)
    x = torch.randn(3, 2, requires_grad=True)
    assert gather_with_grad(x) is x
    n = torch.tensor(4.0)
    assert all_reduce_sum(n).item() == 4.0 and not all_reduce_sum(x).requires_grad
    assert global_mean_loss(torch.tensor(10.0), n).item() == 2.5
    assert global_mean_loss(torch.tensor(0.0), torch.tensor(0.0)).item() == 0.0  # no items: no NaN


def test_a_killed_world_of_one_leaves_nothing_in_the_temp_dir(tmp_path):
    """A plain process is a world of one; a preempted job (SIGKILL, no atexit) must not leave a rendezvous file
    behind in $TMPDIR: a file store did, one per killed run."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    script = ("import os, signal, torch\n"
              "from qanchor.train.engine import init_distributed\n"
              "assert init_distributed() == (0, 1)\n"
              "torch.distributed.barrier()\n"
              "os.kill(os.getpid(), signal.SIGKILL)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    done = subprocess.run([sys.executable, "-c", script], env={**env, "TMPDIR": str(scratch)}, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == -9, done.stderr[-2000:]  # it got as far as the kill
    assert sorted(p.name for p in scratch.iterdir()) == []


def test_a_job_scripts_master_addr_alone_is_a_world_of_one_and_a_rankless_world_is_refused(tmp_path):
    """MASTER_ADDR exported by a SLURM script without RANK made a plain `qanchor pretrain` try env:// and die with a
    ValueError traceback; WORLD_SIZE > 1 without RANK now says what a launcher must set. The group gets the timeout."""
    script = ("import datetime, torch\n"
              "from qanchor.errors import ConfigError\n"
              "from qanchor.train.engine import init_distributed\n"
              "seen, init = {}, torch.distributed.init_process_group\n"
              "torch.distributed.init_process_group = lambda *a, **kw: (seen.update(kw), init(*a, **kw))[1]\n"
              "try:\n"
              "    print(init_distributed(0.5))\n"
              "except ConfigError as exc:\n"
              "    print('refused:', exc)\n"
              "else:\n"
              "    print(seen['timeout'] == datetime.timedelta(seconds=30))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    run = lambda extra: subprocess.run([sys.executable, "-c", script], env={**env, **extra}, capture_output=True,  # noqa: E731
                                       text=True, timeout=240)
    alone = run({"MASTER_ADDR": "127.0.0.1"})
    assert alone.returncode == 0 and alone.stdout.split() == ["(0,", "1)", "True"], alone.stderr[-2000:]
    rankless = run({"MASTER_ADDR": "127.0.0.1", "WORLD_SIZE": "2"})
    assert "refused: WORLD_SIZE=2 but RANK is not set" in rankless.stdout, rankless.stderr[-2000:]
