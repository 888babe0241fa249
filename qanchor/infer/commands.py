"""CLI subcommands of inference: ``embed`` (batch export), ``update`` (daily state), ``index`` (faiss).

    qanchor embed  --model CKPT --data DIR [--queries FILE|tasks] [--heads DIR ...] --out DIR [--shard-users N]
    torchrun --nproc_per_node 2 -m qanchor.cli embed ...            (rank r takes shards r, r+2, ...)
    qanchor update --model CKPT --data DIR --queries FILE --out STATE0       (first state from a dataset)
    qanchor update --model CKPT --state STATE0 --events day1.parquet --out STATE1 [--as-of ISO] [--full]
    qanchor index build  --embeddings DIR --query-id churn --out churn.faiss
    qanchor index search --index churn.faiss --user u000042 -k 10
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from qanchor.errors import ModelInputError

__all__ = ["register"]


def _load(args: argparse.Namespace, text_cache_dir: Path | None):
    from qanchor.infer.api import QAnchor

    kwargs = {"batch_size": args.batch_size, "text_cache_dir": args.cache_dir or text_cache_dir}
    return QAnchor.from_pretrained(args.model, device=args.device, **kwargs)


def _queries(arg: str | None, ds=None):
    from qanchor.infer.export import read_queries, task_queries

    if arg is None:
        return None
    if arg == "tasks" and not Path(arg).exists():
        if ds is None:
            raise ModelInputError("--queries tasks needs --data (the dataset's task queries)")
        return task_queries(ds.manifest)
    return read_queries(arg)


def _heads(dirs: list[str] | None, checkpoint_hash: str | None) -> list:
    """Each DIR is one head (holds head.yaml) or a prompt-tune output (``<task>/head.yaml`` per task)."""
    from qanchor.tune.head import load_heads

    return [e.head for e in load_heads(dirs or [], checkpoint_hash=checkpoint_hash, require=True).values()]


def _cmd_embed(args: argparse.Namespace) -> None:
    from qanchor.data.dataset import load_dataset
    from qanchor.infer.export import export_embeddings, report_json

    ds = load_dataset(args.data)
    model = _load(args, ds.text_cache_dir)
    queries = _queries(args.queries, ds) or []
    heads = _heads(args.heads, model.checkpoint_hash)
    if not queries and not heads:
        raise ModelInputError("qanchor embed needs --queries FILE|tasks and/or --heads DIR")
    report = export_embeddings(model, ds, queries, args.out, shard_users=args.shard_users,
                               use_cache=not args.no_prefix_cache, cutoff=args.cutoff, progress=not args.quiet,
                               heads=heads)
    print(report_json(report))


def _cmd_update(args: argparse.Namespace) -> None:
    from qanchor.infer.update import init_state, update_state

    if (args.data is None) == (args.state is None):
        raise ModelInputError("give either --data DATASET (build the first state) or --state DIR --events FILE...")
    if args.data is not None:
        from qanchor.data.dataset import load_dataset

        ds = load_dataset(args.data)
        queries = _queries(args.queries, ds)
        if queries is None:
            raise ModelInputError("building a first state needs --queries FILE (or 'tasks')")
        report = init_state(_load(args, ds.text_cache_dir), ds, queries, args.out, as_of=args.as_of, progress=not args.quiet)
    else:
        report = update_state(_load(args, None), args.state, args.events, args.out, queries=_queries(args.queries),
                              as_of=args.as_of, full=args.full, progress=not args.quiet)
    print(report.to_json())


def _vector(arg: str) -> np.ndarray:
    path = Path(arg)
    if path.suffix == ".npy" and path.is_file():
        return np.load(path).astype(np.float32)
    try:
        return np.array([float(x) for x in arg.replace(",", " ").split()], np.float32)
    except ValueError:
        raise ModelInputError("--vector takes comma-separated numbers or a .npy file") from None


def _cmd_index_build(args: argparse.Namespace) -> None:
    from qanchor.infer.index import LookalikeIndex

    index = LookalikeIndex.from_embeddings(args.embeddings, args.query_id, ivf_min_size=args.ivf_min_size, nprobe=args.nprobe)
    index.save(args.out)
    print(json.dumps({"out": str(args.out), **index.meta}))


def _cmd_index_search(args: argparse.Namespace) -> None:
    from qanchor.infer.index import LookalikeIndex

    if (args.user is None) == (args.vector is None):
        raise ModelInputError("give exactly one of --user ID or --vector V")
    index = LookalikeIndex.load(args.index)
    hits = index.search_user(args.user, args.k) if args.user is not None else index.search(_vector(args.vector), args.k)[0]
    if args.json:
        print(json.dumps([{"user_id": u, "score": s} for u, s in hits]))
        return
    for rank, (user, score) in enumerate(hits, 1):
        print(f"{rank:>3}  {user}  {score:.4f}")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint dir (or a pretraining output_dir)")
    p.add_argument("--batch-size", type=int, default=32, help="users per prefix pass")
    p.add_argument("--device", default="cpu")
    p.add_argument("--cache-dir", default=None, help="event-text vector cache (default: the dataset's, else ~/.cache/qanchor/text)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def register(subparsers) -> None:
    """Add ``embed``, ``update`` and ``index`` to the ``qanchor`` command line."""
    p = subparsers.add_parser("embed", help="export embeddings of every user x query to Parquet shards")
    _model_args(p)
    p.add_argument("--data", required=True, help="dataset directory")
    p.add_argument("--queries", default=None, help="YAML / text / Parquet file of queries, or 'tasks'")
    p.add_argument("--heads", nargs="*", default=None,
                   help="scenario heads (a prompt-tune output_dir or task folders): rows head:<task> with a score")
    p.add_argument("--out", required=True, help="output directory (resumes if it holds a partial export)")
    p.add_argument("--shard-users", type=int, default=None, help="users per shard (default: one dataset partition)")
    p.add_argument("--cutoff", default=None, help="ISO time event ages count from (default: the dataset cutoff)")
    p.add_argument("--no-prefix-cache", action="store_true", help="reference path: one full forward per user x query")
    p.set_defaults(func=_cmd_embed)

    p = subparsers.add_parser("update", help="daily incremental update of a state (or build the first one)")
    _model_args(p)
    p.add_argument("--data", default=None, help="build the first state from this dataset")
    p.add_argument("--state", default=None, help="yesterday's state directory")
    p.add_argument("--events", nargs="*", default=[], help="Parquet file(s) of new events (dataset event format)")
    p.add_argument("--out", required=True, help="today's state directory (never the same as --state)")
    p.add_argument("--queries", default=None, help="queries file (default: the state's); new queries re-embed everyone")
    p.add_argument("--as-of", default=None, help="ISO time of the new state (default: midnight after the newest event)")
    p.add_argument("--full", action="store_true", help="re-encode every modality of every user at the new as_of")
    p.set_defaults(func=_cmd_update)

    index = subparsers.add_parser("index", help="faiss look-alike search over exported embeddings")
    sub = index.add_subparsers(dest="index_command", required=True)
    p = sub.add_parser("build", help="build an index over one query's embeddings")
    p.add_argument("--embeddings", required=True, help="an export directory (qanchor embed) or an update state")
    p.add_argument("--query-id", required=True)
    p.add_argument("--out", required=True, help="index file (with FILE.users.parquet and FILE.json beside it)")
    p.add_argument("--ivf-min-size", type=int, default=50_000, help="from this many users on, an IVF index")
    p.add_argument("--nprobe", type=int, default=None, help="IVF cells searched (default nlist / 8)")
    p.set_defaults(func=_cmd_index_build)
    p = sub.add_parser("search", help="the k users most like a user or a vector")
    p.add_argument("--index", required=True)
    p.add_argument("--user", default=None)
    p.add_argument("--vector", default=None, help="comma-separated numbers or a .npy file")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_index_search)
