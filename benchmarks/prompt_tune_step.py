"""Prompt-tuning step time against user-prefix length, with and without the prefix KV cache.

A prompt-tuning step trains only the soft prompt and prototypes, so the user prefix (summary and event
tokens) is the same at every step. ``qanchor prompt-tune`` encodes each user's prefix once
(:class:`qanchor.tune.prefix_store.PrefixStore`) and runs only the suffix ``[prompt x k] query
<|user_emb|>`` per step; the uncached reference runs the whole sequence (user encoder + prefix + suffix)
every step, as ``anchor_hidden_uncached`` does.

For each ``--max-events`` value N, every user's events of every sequence modality are tiled to exactly N
(events of real synthetic users, repeated), so all prefixes have one known length and the table reads
as cost against length. Each timed step is the full training step: gather or collate the batch, forward,
prototypical loss, backward into the prompt, Adam step. The cached column leaves out the one-off prefix
encoding, reported separately per user.

Example (a few minutes on 2 CPU cores)::

    python benchmarks/prompt_tune_step.py --max-events 8,32,128,256 --out results/benchmarks/prompt_tune_step.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a benchmark must never reach a model hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from qanchor.config import PretrainConfig, load_config  # noqa: E402
from qanchor.data.batch import collate_users  # noqa: E402
from qanchor.data.io import write_text  # noqa: E402
from qanchor.data.packing import PackedModality, PackedUser  # noqa: E402
from qanchor.model.prefix_cache import (
    PrefixStore,  # noqa: E402
    anchor_hidden_uncached,  # noqa: E402
)
from qanchor.tune.head import query_prompt_init  # noqa: E402
from qanchor.tune.losses import prototype_loss  # noqa: E402

QUERY = "Will this user default on a loan repayment in the next 90 days?"


def _tile(user: PackedUser, n: int) -> PackedUser:
    """Every modality with exactly ``n`` events: the user's own events repeated (or a default row)."""
    mods = {}
    for name, m in user.modalities.items():
        rows = m.text_rows if len(m.text_rows) else np.zeros(1, np.int64)
        num = m.numeric if len(m.numeric) else np.zeros((1, m.numeric.shape[1]), np.float32)
        idx = np.arange(n) % len(rows)
        mods[name] = PackedModality(rows[idx], num[idx], m.history)
    return PackedUser(user.user_id, mods, user.tabular)


def _setup(data: Path, ckpt: str | None, users: int, seed: int):
    """Model (checkpoint or fresh tiny), tokenizer, the ``users`` most active users packed, the text cache."""
    from qanchor.data.dataset import load_dataset
    from qanchor.data.pipeline import UserPipeline
    from qanchor.model.factory import build_model, load_checkpoint

    ds = load_dataset(data)
    cfg = load_config(None, [f"data.path={data}", "model.preset=tiny", "data.default_max_events=100000"],
                      schema=PretrainConfig)
    pipe = UserPipeline.for_dataset(ds, cfg.data)
    cache = pipe.cache
    if ckpt:
        model, tokenizer, _, _ = load_checkpoint(ckpt)
    else:  # step time does not depend on the weights' values
        torch.manual_seed(seed)
        model, tokenizer = build_model(cfg.model, ds.manifest, cache.dim, ds.tabular_columns, load_weights=False)
    model.eval().requires_grad_(False)
    records = list(ds.users())
    active = sorted(records, key=lambda r: -sum(len(s) for s in r.events.values()))[:users]
    packed = pipe.pack_many(active)  # every event kept; _tile cuts or repeats to N
    return model, tokenizer, packed, cache, len(ds.tabular_columns)


def _step_fn(model, query_ids, prompt, opt, labels, protos, plabels):
    def step(embed_fn) -> None:
        suffix = model.suffix(query_ids, prompt)
        emb = embed_fn(suffix)  # (B, D)
        loss = prototype_loss(emb, protos, plabels, labels, 0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def _time(fn, steps: int, warmup: int) -> list[float]:
    out = []
    for i in range(warmup + steps):
        tick = time.perf_counter()
        fn(i)
        if i >= warmup:
            out.append(time.perf_counter() - tick)
    return out


def bench_one(model, tokenizer, packed, cache, n_tab: int, n: int, batch: int, steps: int, warmup: int, seed: int) -> dict:
    users = [_tile(u, n) for u in packed]
    from qanchor.model.layout import tokenize_query

    query_ids = torch.tensor(tokenize_query(tokenizer, QUERY, model.cfg.max_query_tokens))
    prompt = query_prompt_init(model.embed_tokens(query_ids), 6).requires_grad_(True)
    protos = torch.nn.functional.normalize(torch.randn(8, model.cfg.embedding_dim, generator=torch.Generator().manual_seed(seed)), dim=-1)
    protos.requires_grad_(True)
    plabels, labels = torch.tensor([0] * 4 + [1] * 4), torch.arange(batch) % 2
    opt = torch.optim.Adam([prompt, protos], lr=1e-3)
    step = _step_fn(model, query_ids, prompt, opt, labels, protos, plabels)
    rng = np.random.default_rng(seed)
    batches = [rng.choice(len(users), batch, replace=False) for _ in range(warmup + steps)]

    def collate(idx):
        return collate_users([users[i] for i in idx], model.manifest, cache.vectors, n_tab)

    # A checkpoint with query evidence (model.query_evidence) weighs the events by the query: its sentence vector.
    vector = torch.from_numpy(cache.encoder.encode([QUERY]))[0] if model.query_evidence is not None else None
    tick = time.perf_counter()
    store = PrefixStore.encode(model, (collate(range(s, min(s + 64, len(users)))) for s in range(0, len(users), 64)),
                               queries=None if vector is None else {QUERY: vector}).at_query(QUERY)
    encode_s = time.perf_counter() - tick
    cached = _time(lambda i: step(lambda s: store.anchor_embedding(model, [s] * batch, torch.as_tensor(batches[i]))),
                   steps, warmup)

    def uncached_embedding(i: int, suffix: torch.Tensor) -> torch.Tensor:
        users = collate(batches[i])
        every = torch.arange(batch)
        evidence = model.evidence(users, every, None if vector is None else vector.expand(batch, -1))
        return model.project(anchor_hidden_uncached(model, users, every, [suffix] * batch), model.user_statistics(users),
                             evidence)

    uncached = _time(lambda i: step(lambda s: uncached_embedding(i, s)), steps, warmup)
    lp = int(store.lengths.float().mean())
    return {"max_events": n, "prefix_tokens": lp, "suffix_tokens": int(model.suffix(query_ids, prompt).shape[0]),
            "cached_ms": 1e3 * float(np.mean(cached)), "cached_ms_std": 1e3 * float(np.std(cached)),
            "uncached_ms": 1e3 * float(np.mean(uncached)), "uncached_ms_std": 1e3 * float(np.std(uncached)),
            "speedup": float(np.mean(uncached) / np.mean(cached)), "encode_ms_per_user": 1e3 * encode_s / len(users),
            "prefix_kb_per_user": store.nbytes / len(users) / 1024}


def table(rows: list[dict]) -> str:
    lines = ["| max_events / modality | prefix tokens | cached ms/step | uncached ms/step | speed-up | prefix encode ms/user (once) | KV KB/user |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['max_events']} | {r['prefix_tokens']} | {r['cached_ms']:.1f} ± {r['cached_ms_std']:.1f} | "
                     f"{r['uncached_ms']:.1f} ± {r['uncached_ms_std']:.1f} | {r['speedup']:.1f}x | "
                     f"{r['encode_ms_per_user']:.2f} | {r['prefix_kb_per_user']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=None, help="a synthetic dataset dir (default: build --users-data users)")
    p.add_argument("--users-data", type=int, default=300, help="users of the synthetic dataset built when --data is not given")
    p.add_argument("--ckpt", default=None, help="a checkpoint (default: a fresh tiny model; weights do not change timing)")
    p.add_argument("--max-events", default="8,32,128,256", help="comma-separated events per modality")
    p.add_argument("--users", type=int, default=128, help="users in the training pool")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            from data_tools.synth import build_synthetic

            data = build_synthetic(Path(tmp) / "synth", n_users=args.users_data, seed=1)
        model, tokenizer, packed, cache, n_tab = _setup(data, args.ckpt, args.users, args.seed)
        if len(packed) < args.batch_size:  # each batch draws distinct users from the pool
            p.error(f"--batch-size {args.batch_size} is more than the {len(packed)} users in the pool (--users "
                    f"{args.users}, the dataset's users); lower it or give more users")
        rows = []
        for n in [int(x) for x in args.max_events.split(",")]:
            rows.append(bench_one(model, tokenizer, packed, cache, n_tab, n, args.batch_size, args.steps, args.warmup, args.seed))
            print(json.dumps(rows[-1]), flush=True)
    print(table(rows))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                "threads": torch.get_num_threads(), "args": {k: str(v) for k, v in vars(args).items()}}
        write_text(json.dumps({"meta": meta, "rows": rows}, indent=2), args.out)


if __name__ == "__main__":
    main()
