"""Inference commands: ``embed`` (batch export), ``update`` (daily state), ``index`` (faiss look-alikes).

    qanchor embed checkpoint=CKPT data.path=DIR queries=FILE|tasks [heads=HEADS_DIR] out=DIR [shard_users=N]
    torchrun --nproc_per_node 2 -m qanchor.cli embed ...            (rank r takes shards r, r+2, ...)
    qanchor update checkpoint=CKPT data.path=DIR queries=FILE out=STATE0       (first state from a dataset)
    qanchor update checkpoint=CKPT state=STATE0 events=[day1.parquet] out=STATE1 [as_of=ISO] [full=true]
    qanchor index build embeddings=DIR query_id=churn out=churn.faiss
    qanchor index search index=churn.faiss user=u000042 k=10
    qanchor ask checkpoint=CKPT data.path=DIR user=ID "How recently was this user active?" [options=[a,b,c]]
    qanchor describe checkpoint=CKPT data.path=DIR user=ID [aspects=[recency,trend]]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from qanchor.cli.common import add_command, add_settings, print_record, settings
from qanchor.config import (
    AskConfig,
    DescribeConfig,
    EmbedConfig,
    IndexBuildConfig,
    IndexSearchConfig,
    InferConfig,
    UpdateConfig,
    require,
)
from qanchor.data.dataset import Dataset, load_dataset
from qanchor.data.io import OutputKind, check_not_inside, check_output_dir, check_replaceable
from qanchor.errors import ModelInputError
from qanchor.infer.api import QAnchor
from qanchor.infer.export import export_embeddings, read_queries, report_json, task_queries
from qanchor.infer.index import LookalikeIndex, check_index_target
from qanchor.infer.state import StateMeta
from qanchor.infer.update import init_state, update_state
from qanchor.logs import format_seconds, log, results_on_stdout
from qanchor.model.backbone import check_device
from qanchor.model.factory import checkpoint_hash
from qanchor.tune.head import load_heads

__all__ = ["register"]


def _model(cfg: InferConfig, ds: Dataset | None) -> QAnchor:
    default = ds.text_cache_dir if ds is not None else None
    return QAnchor.from_config(cfg, text_cache_dir=cfg.text_cache_dir or default)


def _queries(arg: str | None, ds: Dataset | None):
    if arg is None:
        return None
    if arg == "tasks" and not Path(arg).exists():
        if ds is None:  # an update (state=), which takes no data.path=
            raise ModelInputError("queries=tasks: task queries come from a dataset's manifest, so they exist only when "
                                  "building a first state (data.path=...); give an update a queries file (queries=FILE), "
                                  "or leave queries= out to keep the state's")
        return task_queries(ds.manifest)
    return read_queries(arg)


@results_on_stdout  # stdout is the result (JSON a script reads); log lines go to stderr
def _cmd_embed(args: argparse.Namespace) -> None:
    cfg: EmbedConfig = settings(args)
    require(cfg.checkpoint, "checkpoint", "<checkpoint dir>")
    require(cfg.data.path, "data.path", "<dataset dir>")
    require(cfg.out, "out", "<output dir>")
    check_device(cfg.device)
    # the heads are inputs too: an export inside a head folder would go with it when the head is tuned again
    inputs = {"data.path": cfg.data.path, "checkpoint": cfg.checkpoint,
              **{f"heads[{i}]": h for i, h in enumerate(cfg.heads)},
              **({"queries": cfg.queries} if cfg.queries not in (None, "tasks") else {})}
    check_output_dir(cfg.out, OutputKind.EXPORT, inputs, key="out")
    ds = load_dataset(cfg.data.path, cfg.data.cache_dir)
    queries = _queries(cfg.queries, ds) or []
    if not queries and not cfg.heads:
        raise ModelInputError("qanchor embed needs queries=FILE|tasks and/or heads=DIR")
    model = _model(cfg, ds)
    heads = [e.head for e in load_heads(cfg.heads, checkpoint_hash=model.checkpoint_hash, require=True).values()]
    report = export_embeddings(model, ds, queries, cfg.out, shard_users=cfg.shard_users, use_cache=cfg.use_prefix_cache,
                               cutoff=cfg.cutoff, progress=not args.quiet, heads=heads, overwrite=cfg.overwrite)
    print_record(report_json(report))  # one line per rank, and ranks share stdout


@results_on_stdout
def _cmd_update(args: argparse.Namespace) -> None:
    cfg: UpdateConfig = settings(args)
    require(cfg.checkpoint, "checkpoint", "<checkpoint dir>")
    require(cfg.out, "out", "<state dir>")
    if bool(cfg.data.path) == bool(cfg.state):
        raise ModelInputError("give either data.path=DATASET (build the first state) or state=DIR events=[FILE, ...]")
    if cfg.data.path and cfg.tabular:
        raise ModelInputError("tabular= is for an update (state=...): a first state reads the dataset's own tabular.parquet")
    # a first state reads every event of the dataset before as_of: events= or full=true there were dropped without a word
    if cfg.data.path and (cfg.events or cfg.full):
        given = "events=" if cfg.events else "full=true"
        raise ModelInputError(f"{given} applies to an update (state=...): build the first state from data.path=, then "
                              f"run `qanchor update state=... {given}{'...' if cfg.events else ''} out=...`")
    check_device(cfg.device)
    check_not_inside(cfg.out, {"state": cfg.state, "data.path": cfg.data.path or None, "checkpoint": cfg.checkpoint,
                               "tabular": cfg.tabular, **{f"events[{i}]": e for i, e in enumerate(cfg.events)}}, key="out")
    check_replaceable(cfg.out, OutputKind.STATE)
    if cfg.data.path:
        ds = load_dataset(cfg.data.path, cfg.data.cache_dir)
        queries = _queries(cfg.queries, ds)
        if queries is None:
            raise ModelInputError("building a first state needs queries=FILE (or queries=tasks)")
        report = init_state(_model(cfg, ds), ds, queries, cfg.out, as_of=cfg.as_of, progress=not args.quiet)
    else:
        if cfg.data.max_events is None and cfg.data.default_max_events is None:  # the caps the state was built with
            cfg.data.max_events = StateMeta.load(cfg.state).caps
        queries = _queries(cfg.queries, None)  # a bad queries file is refused before the model loads
        report = update_state(_model(cfg, None), cfg.state, cfg.events, cfg.out, queries=queries, as_of=cfg.as_of,
                              full=cfg.full, tabular=cfg.tabular, progress=not args.quiet)
    print(report.to_json())


def _vector(arg: str) -> np.ndarray:
    path = Path(arg)
    if path.suffix == ".npy":
        if not path.is_file():
            raise ModelInputError(f"vector file {path} not found")
        try:
            vec = np.load(path, allow_pickle=False).astype(np.float32)
        except (ValueError, OSError) as exc:
            raise ModelInputError(f"{path}: not a numeric .npy array ({exc})") from None
        if vec.ndim == 2 and vec.shape[0] == 1:  # one embedding kept as a row, [1, D] (not [1, Q, D]: several)
            vec = vec.reshape(-1)
        if vec.ndim != 1:  # several rows: the first alone was searched, without a word about the others
            raise ModelInputError(f"{path}: holds an array of shape {vec.shape}; give one vector (a 1-d array or one "
                                  "row)")
    else:
        try:
            vec = np.array([float(x) for x in arg.replace(",", " ").split()], np.float32)
        except ValueError:
            raise ModelInputError("vector= takes comma-separated numbers or a .npy file") from None
    if vec.size == 0 or not np.isfinite(vec).all():
        raise ModelInputError("vector= must hold finite numbers (no NaN or inf), at least one")
    return vec


@results_on_stdout
def _cmd_index_build(args: argparse.Namespace) -> None:
    cfg: IndexBuildConfig = settings(args)
    require(cfg.embeddings, "embeddings", "<export dir>")
    require(cfg.query_id, "query_id", "<a query id of the export>")
    require(cfg.out, "out", "<index file>")
    check_index_target(cfg.out, cfg.embeddings)
    start = time.perf_counter()
    if not args.quiet:  # training an IVF index over millions of users takes minutes
        log(f"index build: start; query {cfg.query_id} of {cfg.embeddings}")
    index = LookalikeIndex.from_embeddings(cfg.embeddings, cfg.query_id, ivf_min_size=cfg.ivf_min_size, nprobe=cfg.nprobe)
    index.save(cfg.out)
    if not args.quiet:
        log(f"index build: done, {index.meta['kind']} index of {index.meta['n']:,} vectors in "
            f"{format_seconds(time.perf_counter() - start)}; {cfg.out}")
    print(json.dumps({"out": str(cfg.out), **index.meta}))


@results_on_stdout
def _cmd_index_search(args: argparse.Namespace) -> None:
    cfg: IndexSearchConfig = settings(args)
    require(cfg.index, "index", "<index file>")
    if (cfg.user == "") == (cfg.vector is None):
        raise ModelInputError("give exactly one of user=ID or vector=V")
    if cfg.checkpoint is not None and cfg.user:
        raise ModelInputError("checkpoint= names the model that embedded vector=; a user= search reads the index's own "
                              "vector: drop checkpoint=")
    index = LookalikeIndex.load(cfg.index)
    made_by = checkpoint_hash(cfg.checkpoint) if cfg.checkpoint is not None else None
    hits = index.search_user(cfg.user, cfg.k) if cfg.user else index.search(_vector(cfg.vector), cfg.k, made_by)[0]
    if cfg.json:
        print(json.dumps([{"user_id": u, "score": s} for u, s in hits]))
        return
    for rank, (user, score) in enumerate(hits, 1):
        print(f"{rank:>3}  {user}  {score:.4f}")


def _user(cfg: AskConfig | DescribeConfig):
    """The dataset and the one user a question is about (an unknown id is one clear error)."""
    require(cfg.checkpoint, "checkpoint", "<checkpoint dir>")
    require(cfg.data.path, "data.path", "<dataset dir>")
    require(cfg.user, "user", "<user id>")
    check_device(cfg.device)
    ds = load_dataset(cfg.data.path, cfg.data.cache_dir)
    if cfg.user not in set(ds.user_ids.tolist()):
        raise ModelInputError(f"user {cfg.user!r} is not in dataset {cfg.data.path} ({ds.num_users} users); "
                              f"e.g. user={ds.user_ids[0]}")
    model = _model(cfg, ds)
    model.check_language_head()  # before any work: a checkpoint that cannot answer is refused first
    if cfg.cutoff is None:  # event ages count from the dataset's cutoff, as `qanchor embed`'s do
        cfg.cutoff = ds.manifest.cutoff.isoformat()
    return ds, next(model.dataset_records(ds, [cfg.user])), model  # in the model's column layout, matched by name


@results_on_stdout
def _cmd_ask(args: argparse.Namespace) -> None:
    cfg: AskConfig = settings(args)
    question = cfg.question or args.question or ""
    if args.question and cfg.question:
        raise ModelInputError("give the question once: as the positional argument or as question=...")
    if not question.strip():
        raise ModelInputError('no question given; e.g. qanchor ask ... user=ID "How recently was this user active?"')
    _, user, model = _user(cfg)
    if cfg.options is not None:  # options=[] is refused by choose (fewer than 2), not taken as no options
        choice = model.choose(user, question, cfg.options, cutoff=cfg.cutoff)[0]
        if cfg.json:
            print(json.dumps({"user_id": cfg.user, "question": question, "choice": choice.option, "scores": choice.scores}))
            return
        for option, score in sorted(choice.scores.items(), key=lambda kv: -kv[1]):
            print(f"{'*' if option == choice.option else ' '} {score:9.4f}  {option}")
        return
    text = model.answer(user, [question], max_new_tokens=cfg.max_new_tokens, cutoff=cfg.cutoff)[0][0]
    print(json.dumps({"user_id": cfg.user, "question": question, "answer": text}) if cfg.json else text)


@results_on_stdout
def _cmd_describe(args: argparse.Namespace) -> None:
    cfg: DescribeConfig = settings(args)
    _, user, model = _user(cfg)
    profile = model.describe(user, cfg.aspects or None, cutoff=cfg.cutoff)
    if cfg.json:
        print(json.dumps({"user_id": profile.user_id, "profile": profile.sentences, "kept": profile.kept,
                          "dropped": profile.dropped,
                          "answers": {a: {"generated": t, "kept": k} for a, (t, k) in profile.answers.items()}}))
        return
    print(profile.text or "(no fact the model stated could be verified against this user's events)")
    print(f"[{profile.kept} verified facts kept, {profile.dropped} dropped as wrong or unreadable]")


def register(subparsers) -> None:
    """Add ``embed``, ``update``, ``ask``, ``describe`` and ``index`` to the ``qanchor`` command line."""
    p = add_command(subparsers, "embed")
    add_settings(p, EmbedConfig, "checkpoint=runs/cj data.path=data/cj queries=tasks out=emb/cj")
    p.set_defaults(func=_cmd_embed)
    p = add_command(subparsers, "update")
    add_settings(p, UpdateConfig, "checkpoint=runs/cj state=state/d0 events=[day1.parquet] out=state/d1")
    p.set_defaults(func=_cmd_update)
    p = add_command(subparsers, "ask")
    p.set_defaults(positional="question", question=None)  # the one free-text word: the question (or question=...)
    add_settings(p, AskConfig, 'checkpoint=runs/cj data.path=data/cj user=hh_0001 "How recently was this user active?"')
    p.set_defaults(func=_cmd_ask)
    p = add_command(subparsers, "describe")
    add_settings(p, DescribeConfig, "checkpoint=runs/cj data.path=data/cj user=hh_0001")
    p.set_defaults(func=_cmd_describe)
    index = add_command(subparsers, "index")
    sub = index.add_subparsers(dest="index_command", required=True, parser_class=type(index))
    p = sub.add_parser("build", help="build an index over one query's embeddings")
    add_settings(p, IndexBuildConfig, "embeddings=emb/cj query_id=churn out=churn.faiss")
    p.set_defaults(func=_cmd_index_build)
    p = sub.add_parser("search", help="the k users most like a user or a vector")
    add_settings(p, IndexSearchConfig, "index=churn.faiss user=u000042 k=10")
    p.set_defaults(func=_cmd_index_search)
