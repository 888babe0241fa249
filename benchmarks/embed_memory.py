"""Peak memory of ``QAnchor`` embedding a stream of users: flat in the number of users.

A generator yields N synthetic users as plain dicts (a few events in each of the synthetic world's
modalities, drawn from its vocabularies), never holding them all; ``QAnchor.iter_embed`` embeds them
under Q queries and the script keeps only a running checksum of the output. The resident set size is
sampled after every 1,000 users; the table shows it at 1k, 10k, 50k and 100k users. ``--collect`` also
keeps every embedding (``QAnchor.embed``'s output, 512 bytes per user and query) to show that only the
output grows.

The model is a randomly initialised tiny preset saved as a checkpoint (memory does not depend on the
weights' values). Example (about 6 minutes on 2 CPU cores)::

    python benchmarks/embed_memory.py --users 100000 --queries 2 --out results/bench/embed_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from data_tools.synth import build_synthetic  # noqa: E402
from qanchor.config import PretrainConfig, load_config  # noqa: E402
from qanchor.data.dataset import load_dataset  # noqa: E402
from qanchor.data.io import write_text  # noqa: E402
from qanchor.data.pipeline import UserPipeline  # noqa: E402
from qanchor.infer.api import QAnchor  # noqa: E402
from qanchor.logs import quiet_third_party  # noqa: E402
from qanchor.model.factory import ModelMeta, build_model, save_checkpoint  # noqa: E402

QUERIES = ["Will this user stop using the app?", "Will this user redeem a coupon?", "Will this user default?"]


def rss_mb() -> float:
    """Current resident set size in MiB (Linux /proc; falls back to the high-water mark)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def synthetic_users(n: int, vocab: dict[str, list[str]], seed: int = 0) -> Iterator[dict]:
    """``n`` users as dicts, generated one at a time (a few events per modality, 1-60 days before 2024-06-30)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        events = {}
        for modality, texts in vocab.items():
            k = int(rng.integers(0, 6))
            days = rng.uniform(1, 60, size=k)
            events[modality] = [{"ts": (np.datetime64("2024-06-30") - np.timedelta64(int(d * 86400), "s")).astype(object),
                                 "text": texts[int(rng.integers(len(texts)))], "value": float(rng.gamma(2.0, 20.0))}
                                for d in days]
        yield {"user_id": f"s{i:07d}", "events": events}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--collect", action="store_true", help="keep every embedding (QAnchor.embed) instead of streaming")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet_third_party()
    work = Path(tempfile.mkdtemp(prefix="qanchor-embed-memory-"))
    ds = load_dataset(build_synthetic(work / "ds", n_users=200, seed=0, progress=False))
    cfg = load_config(None, [f"data.path={ds.root}", "model.preset=tiny"], schema=PretrainConfig)
    pipe = UserPipeline.for_dataset(ds, cfg.data)
    torch.manual_seed(0)
    model, tokenizer = build_model(cfg.model, ds.manifest, pipe.cache.dim, ds.tabular_columns)
    meta = ModelMeta(ds.manifest.to_dict(), pipe.cache.dim, cfg.data.text_encoder.__dict__, list(ds.tabular_columns))
    ckpt = save_checkpoint(work / "ckpt", model, tokenizer, cfg, meta)
    del model
    vocab: dict[str, list[str]] = {}
    for record in ds.users():  # the synthetic world's own event texts
        for m, seq in record.events.items():
            vocab.setdefault(m, [])
            vocab[m] = sorted(set(vocab[m]) | set(seq.text))[:500]
    qa = QAnchor.from_pretrained(ckpt, text_cache_dir=ds.text_cache_dir, batch_size=args.batch_size)
    pipe.cache.ensure(sorted({t for v in vocab.values() for t in v}))  # every text encoded once, up front
    queries = QUERIES[: args.queries]
    marks = {1_000, 10_000, 50_000, 100_000, args.users}
    samples, start, checksum, done = [], time.perf_counter(), 0.0, 0
    base = rss_mb()
    users = synthetic_users(args.users, vocab)
    if args.collect:
        emb = qa.embed(users, queries, cutoff="2024-06-30T00:00:00+00:00")
        checksum, done = float(emb.sum()), len(emb)
        samples.append({"users": done, "rss_mb": rss_mb(), "seconds": time.perf_counter() - start})
    else:
        for ids, emb in qa.iter_embed(users, [(q, None) for q in queries], cutoff="2024-06-30T00:00:00+00:00"):
            checksum += float(emb.sum())
            before, done = done, done + len(ids)
            if done // 1000 > before // 1000 or done in marks:
                samples.append({"users": done, "rss_mb": rss_mb(), "seconds": time.perf_counter() - start})
    report = {"users": done, "queries": len(queries), "mode": "embed (collect)" if args.collect else "iter_embed (stream)",
              "rss_before_mb": base, "samples": samples, "checksum": checksum,
              "users_per_s": done / (time.perf_counter() - start)}
    print(f"{report['mode']}: {done:,} users x {len(queries)} queries, {report['users_per_s']:.0f} users/s; "
          f"RSS before {base:.0f} MiB")
    print("| users | RSS (MiB) | s |\n|---|---|---|")
    for mark in sorted(marks):
        s = next((x for x in samples if x["users"] >= mark), None)  # the first sample at or past the mark
        if s is not None:
            print(f"| {s['users']:,} | {s['rss_mb']:.0f} | {s['seconds']:.0f} |")
    if args.out:
        write_text(json.dumps(report, indent=1), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
