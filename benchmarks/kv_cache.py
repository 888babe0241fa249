"""Prefix KV reuse vs full forwards, and batch-export throughput and memory.

Part 1 (``kv_cache``): for n = 1, 2, 5, 10, 20 queries per user, the same packed users are embedded
with prefix reuse (each prefix once, n suffixes on its cached keys/values) and without it (n full
sequences per user), alternating, ``--repeats`` times; the fastest run of each is kept (the machine
may be shared). Ideal ratio from the real token counts of the batch:
``(sum_u Lp_u + n sum_u Lq) / (n sum_u (Lp_u + Lq))``. Both timings are ``QAnchor.embed_packed``: the
user encoder, prefix, suffixes and projection (packing, identical for both, is outside).

Part 2 (``export``): ``qanchor embed`` over synthetic datasets of 20k and 100k users, each in a fresh
process that reports wall time, users/s and its RSS after every shard plus the high-water mark.
Bounded memory shows as the same RSS after the first and the last shard and at 20k and 100k users.

Without ``--model`` a randomly initialised ``tiny`` preset is used (timings do not depend on training).

Example (about 15 minutes on 2 CPU cores)::

    python benchmarks/kv_cache.py --out results/bench/kv_cache.json
    python benchmarks/kv_cache.py --model runs/synth --export-users 20000 --export-queries 10
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a benchmark must never reach a model hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from qanchor.data.io import write_text  # noqa: E402

EXTRA_QUERIES = [  # with the synthetic dataset's 10 task queries: 20 distinct questions
    "What does this user spend most on?", "How often does this user open the app?",
    "Is this user price sensitive?", "Does this user travel abroad?", "Is this user a student?",
    "Will this user apply for a loan?", "Does this user shop online at night?",
    "Is this user likely to invest in funds?", "Will this user use a coupon this week?",
    "How loyal is this user to the platform?",
]


def _rss_mb(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _synth(root: Path, users: int) -> Path:
    from data_tools.synth import build_synthetic

    out = root / f"synth-{users}"
    if not (out / "manifest.yaml").exists():
        tick = time.perf_counter()
        build_synthetic(out, n_users=users, seed=1)
        print(f"built {users} synthetic users in {time.perf_counter() - tick:.0f}s", file=sys.stderr)
    return out


def _checkpoint(model_dir: str | None, data: Path, work: Path) -> tuple[Path, str]:
    """The checkpoint to benchmark: ``--model``, or a random ``tiny`` preset saved under ``work``."""
    if model_dir:
        return Path(model_dir), f"checkpoint {model_dir}"
    from qanchor.config import PretrainConfig, load_config
    from qanchor.data.dataset import load_dataset
    from qanchor.model.factory import ModelMeta, build_model, save_checkpoint

    cfg = load_config(None, ["model.preset=tiny", "model.user_encoder.dropout=0.0", "data.max_events={bill: 32}",
                             "data.default_max_events=24"], schema=PretrainConfig)  # the synth-tiny run's caps
    ds = load_dataset(data)
    torch.manual_seed(0)
    model, tokenizer = build_model(cfg.model, ds.manifest, 384, ds.tabular_columns)
    meta = ModelMeta(ds.manifest.to_dict(), 384, {}, list(ds.tabular_columns))
    return save_checkpoint(work / "tiny-random", model, tokenizer, cfg, meta), "randomly initialised tiny preset (no checkpoint given)"


# --------------------------------------------------------------------------------------- part 1
def kv_cache(ckpt: Path, data: Path, users: int, ns: list[int], repeats: int) -> list[dict]:
    from qanchor.data.dataset import load_dataset
    from qanchor.infer.api import QAnchor

    ds = load_dataset(data)
    qa = QAnchor.from_pretrained(ckpt, text_cache_dir=ds.text_cache_dir, batch_size=users, max_rows=users * max(ns))
    records = [r for _, r in zip(range(users), ds.users())]
    packed = qa.pack(records, qa.cutoff_us(ds.manifest.cutoff.isoformat()))
    queries = [t.query for t in ds.manifest.tasks] + EXTRA_QUERIES
    asked = [queries[i % len(queries)] for i in range(max(ns))]
    suffixes = qa.suffixes([(q, None) for q in asked])
    vectors = qa.query_vectors(asked)  # None without model.query_evidence

    def first(n: int):
        return None if vectors is None else vectors[:n]
    with torch.inference_mode():
        batch = qa.pipeline.collate(packed)
        lp = np.array([p.shape[0] for p in qa.model.prefixes(batch)])  # real prefix tokens per user
    rows = []
    qa.embed_packed(packed[:4], suffixes[:2], True, first(2))  # warm-up: first-call allocations
    for n in ns:
        lq = np.array([s.shape[0] for s in suffixes[:n]])  # suffix tokens per query, <|user_emb|> included
        ideal = (lp.sum() + len(lp) * lq.sum()) / (n * lp.sum() + len(lp) * lq.sum())
        # Both paths pad: cached to the longest prefix and suffix, uncached to the longest prefix + suffix.
        padded = (lp.max() + n * lq.max()) / (n * (lp.max() + lq.max()))
        best = {True: float("inf"), False: float("inf")}
        cpu = {True: float("inf"), False: float("inf")}
        for _ in range(repeats):
            for cached in (True, False):
                tick, tock = time.perf_counter(), time.process_time()
                qa.embed_packed(packed, suffixes[:n], cached, first(n))
                best[cached] = min(best[cached], time.perf_counter() - tick)
                cpu[cached] = min(cpu[cached], time.process_time() - tock)
        ratio = best[True] / best[False]
        rows.append({"n": n, "users": len(lp), "Lp_mean": float(lp.mean()), "Lp_max": int(lp.max()), "Lq_mean": float(lq.mean()),
                     "cached_s": best[True], "uncached_s": best[False], "cached_cpu_s": cpu[True],
                     "uncached_cpu_s": cpu[False], "ratio": ratio, "cpu_ratio": cpu[True] / cpu[False], "ideal": float(ideal),
                     "ideal_padded": float(padded),
                     "ratio_over_ideal": ratio / float(ideal)})
        print(f"n={n:>2}  cached {best[True]:.3f}s  uncached {best[False]:.3f}s  ratio {ratio:.3f}  ideal {ideal:.3f}",
              file=sys.stderr)
    return rows


# --------------------------------------------------------------------------------------- part 2
def export_worker(ckpt: Path, data: Path, out: Path, n_queries: int, result: Path) -> None:
    """One export in this process; writes timings and RSS (after every shard, and the peak) to ``result``."""
    from qanchor.data.dataset import load_dataset
    from qanchor.infer.api import QAnchor
    from qanchor.infer.export import export_embeddings, task_queries

    ds = load_dataset(data)
    qa = QAnchor.from_pretrained(ckpt, text_cache_dir=ds.text_cache_dir)
    queries = task_queries(ds.manifest)[:n_queries]
    rss: list[float] = []
    report = export_embeddings(qa, ds, queries, out, rank=0, world=1, progress=False,
                               on_shard_done=lambda i: rss.append(_rss_mb()))
    write_text(json.dumps({"users": report.users, "queries": len(queries), "shards": report.shards_written,
                           "seconds": report.seconds, "users_per_s": report.users_per_s,
                           "rss_after_shard_mb": rss, "peak_rss_mb": _rss_mb("VmHWM")}), result)


def export_bench(ckpt: Path, data: Path, work: Path, n_queries: int) -> dict:
    from qanchor.data.dataset import load_dataset

    _ = load_dataset(data).partitions  # partition the events once, outside the timed export
    result = work / f"export-{data.name}.json"
    # a fresh folder of this run's own (an old export would be resumed, not timed; --work is the user's folder, and
    # whatever else it holds is theirs), removed after the timing
    out = Path(tempfile.mkdtemp(prefix=f"emb-{data.name}-", dir=work)) / "emb"
    cmd = [sys.executable, __file__, "--worker", str(ckpt), str(data), str(out),
           str(n_queries), str(result)]
    try:
        subprocess.run(cmd, check=True)
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
    row = json.loads(result.read_text())
    rss = row.pop("rss_after_shard_mb")
    row.update(rss_first_shard_mb=rss[0], rss_last_shard_mb=rss[-1], rss_max_after_shard_mb=max(rss))
    print(f"export {row['users']} users x {row['queries']} queries: {row['users_per_s']:.0f} users/s, "
          f"peak RSS {row['peak_rss_mb']:.0f} MiB", file=sys.stderr)
    return row


def markdown(report: dict) -> str:
    lines = [f"Model: {report['model']}. Machine: {report['machine']}.", "",
             "| n queries/user | Lp (mean) | Lq (mean) | cached s | uncached s | measured ratio | ideal ratio | measured / ideal "
             "| ideal, padded tokens | CPU-time ratio |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["kv_cache"]:
        lines.append(f"| {r['n']} | {r['Lp_mean']:.1f} | {r['Lq_mean']:.1f} | {r['cached_s']:.3f} | {r['uncached_s']:.3f} | "
                     f"{r['ratio']:.3f} | {r['ideal']:.3f} | {r['ratio_over_ideal']:.2f} | {r['ideal_padded']:.3f} | {r['cpu_ratio']:.3f} |")
    if report.get("export"):
        lines += ["", "| users | queries | shards | users/s | RSS after 1st shard MiB | after last shard MiB | peak RSS MiB |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        for r in report["export"]:
            lines.append(f"| {r['users']} | {r['queries']} | {r['shards']} | {r['users_per_s']:.0f} | "
                         f"{r['rss_first_shard_mb']:.0f} | {r['rss_last_shard_mb']:.0f} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint dir; default: a randomly initialised tiny preset")
    ap.add_argument("--data", type=Path, help="dataset for part 1 (default: 2,000 synthetic users)")
    ap.add_argument("--users", type=int, default=32, help="users per batch in part 1")
    ap.add_argument("--n", default="1,2,5,10,20", help="queries per user to measure")
    ap.add_argument("--repeats", type=int, default=5, help="runs per setting; the fastest counts (shared machines)")
    ap.add_argument("--export-users", default="20000,100000", help="synthetic dataset sizes for part 2 ('' skips it)")
    ap.add_argument("--export-queries", type=int, default=1, help="queries per user in the export")
    ap.add_argument("--work", type=Path, help="where datasets and exports go (default: a temp dir, kept)")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 avoids oversubscription on a shared machine)")
    ap.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)  # internal: one export in a fresh process
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["QANCHOR_BENCH_THREADS"] = str(args.threads)  # inherited by the export worker processes
    elif os.environ.get("QANCHOR_BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["QANCHOR_BENCH_THREADS"]))
    if args.worker:
        ckpt, data, out, n, result = args.worker
        export_worker(Path(ckpt), Path(data), Path(out), int(n), Path(result))
        return 0
    work = args.work or Path(tempfile.mkdtemp(prefix="qanchor-kv-"))
    load = os.getloadavg()[0]
    data = args.data or _synth(work, 2000)
    ckpt, model_desc = _checkpoint(args.model, data, work)
    print(f"model: {model_desc}", file=sys.stderr)
    report = {"model": model_desc, "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                                             f"torch {torch.__version__}, {torch.get_num_threads()} threads",
              "load_before": load, "kv_cache": kv_cache(ckpt, data, args.users, [int(x) for x in args.n.split(",")], args.repeats),
              "export": [export_bench(ckpt, _synth(work, int(u)), work, args.export_queries)
                         for u in filter(None, args.export_users.split(","))]}
    report["load_after"] = os.getloadavg()[0]
    print(markdown(report))
    print(f"\n1-min load average {load:.1f} before, {report['load_after']:.1f} after, on {os.cpu_count()} CPUs.")
    if args.out:
        write_text(json.dumps(report, indent=2), args.out)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
