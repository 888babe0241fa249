"""Validation AUC against tuning step, for several ``qanchor prompt-tune`` runs of the same tasks.

Each run directory is a prompt-tune ``output_dir``: one ``<task>/record.json`` per task, holding the run's
evaluation history (``step``, mean training loss since the last evaluation, ``val_auc``). The plot puts the
runs side by side, one panel per task, so a setting that makes tuning drift away from its step-0 head (or
climb above it) shows at a glance; the table gives, per run and task, the validation AUC at step 0, its lowest
and highest value after step 0, and the step kept.

Example (the README's comparison of a fixed and a learned head calibration on 20,000 synthetic users)::

    python benchmarks/head_curves.py --run fixed=results/select/big-lc-false/synth-s3-20000/ckpt0 \\
        --run learned=results/select/big-lc-true/synth-s3-20000/ckpt0 --out docs/head_curves.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["read_runs", "table", "plot"]


def read_runs(runs: dict[str, Path]) -> dict[str, dict[str, dict]]:
    """label -> task -> record, for the tasks that every run finished (an unfinished task has no record)."""
    out: dict[str, dict[str, dict]] = {}
    for label, directory in runs.items():
        records = {p.parent.name: json.loads(p.read_text()) for p in sorted(Path(directory).glob("*/record.json"))}
        if not records:
            raise SystemExit(f"error: {directory}: no <task>/record.json; is it a finished `qanchor prompt-tune` output_dir?")
        out[label] = records
    common = set.intersection(*(set(r) for r in out.values()))
    if not common:
        raise SystemExit("error: the runs share no finished task: " + "; ".join(f"{k}: {sorted(v)}" for k, v in out.items()))
    return {label: {t: recs[t] for t in sorted(common)} for label, recs in out.items()}


def table(runs: dict[str, dict[str, dict]]) -> str:
    lines = ["| run | task | val AUC at step 0 | lowest after step 0 | highest after step 0 | kept step | test AUC step 0 -> kept |",
             "|---|---|---|---|---|---|---|"]
    for label, records in runs.items():
        for task, rec in records.items():
            later = [h["val_auc"] for h in rec["history"] if h["step"] > 0]
            low, high = (f"{min(later):.3f}", f"{max(later):.3f}") if later else ("-", "-")
            lines.append(f"| {label} | {task} | {rec['history'][0]['val_auc']:.3f} | {low} | {high} | {rec['best_step']} | "
                         f"{rec['frozen_proto']['test']['auc']:.4f} -> {rec['tuned']['test']['auc']:.4f} |")
    return "\n".join(lines)


def plot(runs: dict[str, dict[str, dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qanchor.bench.plots import save_figure

    tasks = list(next(iter(runs.values())))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for label, records in runs.items():
            hist = records[task]["history"]
            ax.plot([h["step"] for h in hist], [h["val_auc"] for h in hist], marker=".", label=label)
        ax.set_title(task, fontsize=10)
        ax.set_xlabel("tuning step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation AUC")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="append", required=True, help="label=prompt-tune output_dir (repeatable)")
    ap.add_argument("--out", type=Path, required=True, help="PNG to write")
    args = ap.parse_args(argv)
    runs = {}
    for item in args.run:
        label, sep, directory = item.partition("=")
        if not sep or not label or not directory:
            ap.error(f"--run {item!r}: expected label=directory")
        runs[label] = Path(directory)
    records = read_runs(runs)
    plot(records, args.out)
    print(table(records))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
