"""The ``qanchor bench`` subcommand (registered by ``qanchor.cli``).

    qanchor bench --config configs/bench/tiny-cj.yaml model=runs/demo/pretrain heads_dir=runs/demo/heads
    qanchor bench --model runs/demo/pretrain --data data/completejourney \\
                  --labels my_labels.parquet --query "Will this household buy wine next month?"

Flags (``--model``, ``--data``, ``--labels``, ``--query``, ``--heads``, ``--out``) win over the config
file and ``key=value`` overrides; they are applied verbatim, so a query may hold any characters.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from qanchor.config import BenchConfig, load_config

__all__ = ["register", "config_from_args", "run_and_report"]


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="AUC / KS benchmark of Q-Anchor against peers (k-fold over users)",
                              description="Benchmark Q-Anchor embeddings, heads and peers on binary user tasks.")
    p.add_argument("--config", default=None, help="a configs/bench/*.yaml (optional with --model/--data)")
    p.add_argument("--model", default=None, help="checkpoint directory (or pretraining output_dir)")
    p.add_argument("--data", default=None, help="dataset directory")
    p.add_argument("--labels", default=None, help="custom task: Parquet with columns user_id, label (0/1)")
    p.add_argument("--query", default=None, help="custom task: the question that anchors it")
    p.add_argument("--heads", default=None, help="prompt-tune output_dir holding <task>/head.yaml")
    p.add_argument("--out", default=None, help="output directory for report.md, results.json and plots")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. folds=3 methods=[rfm_lgbm]")
    p.set_defaults(func=_cmd_bench)


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The config file plus overrides, then the flags applied on top (re-validated)."""
    cfg = load_config(args.config, list(args.overrides), schema=BenchConfig)
    flags = {"model": args.model, "labels": args.labels, "query": args.query, "heads_dir": args.heads,
             "output_dir": args.out}
    changes = {k: v for k, v in flags.items() if v is not None}
    if args.data is not None:
        changes["data"] = dataclasses.replace(cfg.data, path=args.data)
    chose_out = args.out is not None or args.config is not None or any(o.startswith("output_dir=") for o in args.overrides)
    if args.labels is not None and not chose_out:  # a custom task gets its own folder, not results/bench
        changes["output_dir"] = str(Path("results") / f"custom-{Path(args.labels).stem}")
    return dataclasses.replace(cfg, **changes)  # runs __post_init__ again


def run_and_report(cfg: BenchConfig, progress: bool = True) -> Path:
    """Run the benchmark, write report.md, results.json and plots into ``cfg.output_dir``; return it."""
    from qanchor.bench.plots import write_plots
    from qanchor.bench.report import average_table, write_report, write_results
    from qanchor.bench.runner import run_bench

    start = time.perf_counter()
    result = run_bench(cfg, progress=progress)
    out = Path(cfg.output_dir)
    plots = write_plots(result, out)
    write_results(result, out)
    report = write_report(result, out, [str(p) for p in plots])
    print(f"\nAverage over {len(result.tasks)} task(s), {cfg.folds}-fold CV ({time.perf_counter() - start:.0f}s):\n")
    print(average_table(result))
    skipped: dict[tuple[str, str], int] = {}
    for task in result.tasks.values():
        for m, r in task.methods.items():
            if r.skipped:
                skipped[(m, r.skipped)] = skipped.get((m, r.skipped), 0) + 1
    for (m, why), n in skipped.items():
        print(f"  {m}: skipped on {n} task(s): {why}")
    print(f"\nreport: {report}\nresults: {out / 'results.json'}\nplots: {', '.join(str(p) for p in plots) or '(none)'}")
    return out


def _cmd_bench(args: argparse.Namespace) -> None:
    cfg = config_from_args(args)
    run_and_report(cfg, progress=True)
