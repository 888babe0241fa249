"""``qanchor bench``: AUC / KS of Q-Anchor against peers, k-fold over users; ``qanchor uqa``: multiple choice.

    qanchor bench --config configs/bench/tiny-cj.yaml checkpoint=runs/demo/pretrain heads_dir=runs/demo/heads
    qanchor bench checkpoint=runs/demo/pretrain data.path=data/completejourney labels=my_labels.parquet \\
        query="Will this household buy wine next month?"
    qanchor uqa checkpoint=runs/uqa/pretrain data.path=data/completejourney output_dir=results/uqa
"""

from __future__ import annotations

import argparse
import itertools
from dataclasses import replace
from pathlib import Path

import yaml

from qanchor.bench.report import average_table, bench_and_report, data_kind_note, labels_of_report
from qanchor.bench.uqa import run_uqa, uqa_table, write_uqa
from qanchor.cli.common import add_command, add_settings, settings
from qanchor.config import BenchConfig, UqaConfig

__all__ = ["register"]


def _file_sets(config: str | None, *keys: str) -> bool:
    """Whether the ``--config`` file itself sets every one of ``keys`` (top level)."""
    if not config:
        return False
    # settings() has read it already: it parses (not through OmegaConf, which failed on a "${" in a text)
    raw = yaml.safe_load(Path(config).read_text(encoding="utf-8"))
    return isinstance(raw, dict) and all(raw.get(k) is not None for k in keys)


def _custom_output_dir(labels: str) -> str:
    """``results/custom-<stem>``, or ``custom-<stem>-2``, ... where that folder holds the report of another labels
    file of the same name (``wine.csv`` and ``alt/wine.csv``), which it would otherwise replace without a word."""
    mine = str(Path(labels).resolve())
    stem = Path(labels).stem
    for n in itertools.count(1):
        out = Path("results") / (f"custom-{stem}" if n == 1 else f"custom-{stem}-{n}")
        if labels_of_report(out) in (None, mine):
            return str(out)
    raise AssertionError("unreachable")


def _cmd_bench(args: argparse.Namespace) -> None:
    cfg: BenchConfig = settings(args)
    # A custom task gets its own folder unless output_dir= is chosen for it, here or beside labels in the config file:
    # a config file's output_dir is otherwise its own tasks' (`--config configs/bench/tiny-cj.yaml labels=wine.csv`
    # would replace the demo's report with the wine task's).
    given = [s.split("=", 1)[0] for s in args.settings]
    chose_out = "output_dir" in given or ("labels" not in given and _file_sets(args.config, "labels", "output_dir"))
    if cfg.labels is not None and not chose_out:
        cfg = replace(cfg, output_dir=_custom_output_dir(cfg.labels))
    result, out = bench_and_report(cfg, progress=not args.quiet)
    ran = [t for t in result.tasks.values() if t.methods]
    folds = sorted({t.folds for t in ran})  # a task with few positives gets fewer folds than cfg.folds
    cv = f"{folds[0]}-fold CV" if len(folds) == 1 else f"{'/'.join(map(str, folds))}-fold CV (by task)"
    print(f"\nAverage over {len(ran)} task(s), {cv} ({result.run['seconds']:.0f}s):\n")
    print(average_table(result))
    for task in result.tasks.values():
        if not task.methods:
            print(f"  task {task.name}: {task.note or 'skipped: no method ran'}")
    skipped: dict[tuple[str, str], int] = {}
    for task in result.tasks.values():
        for m, r in task.methods.items():
            if r.skipped:
                skipped[(m, r.skipped)] = skipped.get((m, r.skipped), 0) + 1
    for (m, why), n in skipped.items():
        print(f"  {m}: skipped on {n} task(s): {why}")
    if (kind := data_kind_note(result)) is not None:
        print(f"\ndata kind: {kind}")
    print(f"\nreport: {out / 'report.md'}\nresults: {out / 'results.json'}")


def _cmd_uqa(args: argparse.Namespace) -> None:
    cfg: UqaConfig = settings(args)
    result = run_uqa(cfg, progress=not args.quiet)
    report = write_uqa(result, cfg.output_dir)
    print(f"\n{result.questions} questions about {result.run['held_out_users']} held-out users "
          f"({result.run['seconds']:.0f}s):\n")
    print(uqa_table(result))
    print(f"\nreport: {report}\nresults: {Path(cfg.output_dir) / 'results.json'}")


def register(subparsers) -> None:
    p = add_command(subparsers, "uqa")
    add_settings(p, UqaConfig, "checkpoint=runs/uqa/pretrain data.path=data/completejourney output_dir=results/uqa")
    p.set_defaults(func=_cmd_uqa)
    p = add_command(subparsers, "bench")
    add_settings(p, BenchConfig, "checkpoint=runs/cj data.path=data/cj heads_dir=runs/cj-heads output_dir=results/cj")
    p.set_defaults(func=_cmd_bench)
