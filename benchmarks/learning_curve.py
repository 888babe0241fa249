"""Learning curve: is the gap to the peers a matter of budget or of recipe?

Pretrains the recipe for several step budgets (each its own run: the cosine schedule depends on the
budget) and probes every checkpoint with ``benchmarks/quality_probe.py`` (task / generic / swapped query
AUC on the benchmark's folds and probe). Writes ``<root>/curve.json``, a Markdown table and a PNG of mean
task-query AUC against pretraining samples, with the peers' AUC as horizontal lines when given.

Example (about an hour on 2 CPU cores for both datasets)::

    python benchmarks/learning_curve.py --pretrain configs/pretrain/tiny-cj.yaml --data data/completejourney \\
        --steps 300,1000,3000 --root results/curve/cj --peer rfm_lgbm=0.692 --peer union_lgbm=0.700
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from qanchor.data.dataset import load_dataset
from qanchor.data.io import file_sha256, write_json, write_text
from qanchor.logs import format_seconds, log
from qanchor.train.pretrain import legacy_trained_data_id, trained_data_id

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_seeds import _probe, _qanchor, absolute_paths, check_reusable  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pretrain", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--steps", default="300,1000,3000")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--generic-query", default="What kind of user is this?")
    ap.add_argument("--peer", action="append", default=[], help="name=AUC drawn as a reference line (repeatable)")
    ap.add_argument("--set", action="append", default=[], help="key=value pretraining setting (repeatable)")
    args = absolute_paths(ap.parse_args(argv), "pretrain", "data", "root")
    # before any run: a mistyped --peer or --steps was read only after every budget had been pretrained (an hour)
    peers = _peers(ap, args.peer)
    budgets = _budgets(ap, args.steps)
    rows = []
    started = time.perf_counter()
    # the children run quietly (pretraining prints its result line, the probe's report is left out): without lines of
    # its own the script was silent for the whole run, an hour in the example
    log(f"learning_curve: start, budgets {', '.join(map(str, budgets))} steps, seed {args.seed}, root {args.root}")
    dataset = load_dataset(args.data)
    data_id, older = trained_data_id(dataset), {"data": legacy_trained_data_id(dataset)}
    for k, steps in enumerate(budgets, 1):
        run = args.root / f"steps{steps}"
        probe = run / "probe.json"
        # a finished budget is reused only if the same settings made it (see quality_seeds.py)
        wanted = {"steps": steps, "seed": args.seed, "pretrain_config": file_sha256(args.pretrain), "set": list(args.set),
                  "data": data_id, "generic_query": args.generic_query}
        if probe.exists():
            check_reusable(probe, wanted, also=older)
            log(f"learning_curve: steps {steps} ({k}/{len(budgets)}): reusing {probe}")
        else:
            log(f"learning_curve: steps {steps} ({k}/{len(budgets)}): pretraining -> {run}")
            _qanchor("pretrain", "--config", args.pretrain, "--quiet", f"data.path={args.data}", f"output_dir={run}",
                     f"train.max_steps={steps}", f"train.save_every={steps}", f"train.seed={args.seed}", "resume=true",
                     *args.set)
            log(f"learning_curve: steps {steps}: probing")
            _probe("--checkpoint", str(run), "--data", args.data, "--generic-query", args.generic_query, "--out",
                   str(probe), stdout=subprocess.DEVNULL)
            write_json(wanted, probe.with_name(probe.name + ".settings.json"))
        p = json.loads(probe.read_text())
        log(f"learning_curve: steps {steps}: probe AUC task {p['task']['auc']:.4f}, generic {p['generic']['auc']:.4f}, "
            f"swapped {_shown(_number(p['swapped']['auc']))}")
        metrics = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
        rows.append({"steps": steps, "task_auc": p["task"]["auc"], "generic_auc": p["generic"]["auc"],
                     # null where no other task asks another question (a one-task dataset): nothing to swap in
                     "swapped_auc": _number(p["swapped"]["auc"]), "hidden_auc": p["hidden"]["auc"], "task_ks": p["task"]["ks"],
                     "top_pc_share": p["geometry_generic"]["top_pc_share"], "final_loss": metrics[-1]["loss"],
                     "final_contrastive": metrics[-1]["loss_contrastive"]})
    write_text(json.dumps({"rows": rows, "peers": peers, "set": args.set}, indent=1), args.root / "curve.json")
    lines = ["| steps | task AUC | generic AUC | swapped AUC | task KS | top-PC share | final contrastive |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['steps']:,} | {r['task_auc']:.4f} | {r['generic_auc']:.4f} | {_shown(r['swapped_auc'])} | "
              f"{r['task_ks']:.4f} | {r['top_pc_share']:.2f} | {r['final_contrastive']:.3f} |" for r in rows]
    write_text("\n".join(lines) + "\n", args.root / "curve.md")
    print("\n".join(lines))
    _plot(rows, peers, args.root / "curve.png", Path(args.data).name)
    log(f"learning_curve: done, {len(budgets)} budget(s) in {format_seconds(time.perf_counter() - started)}; wrote "
        f"{args.root / 'curve.json'}, curve.md and curve.png")
    return 0


def _peers(ap: argparse.ArgumentParser, given: list[str]) -> dict[str, float]:
    peers = {}
    for item in given:
        name, _, value = item.partition("=")
        try:
            peers[name.strip()] = float(value)
        except ValueError:
            ap.error(f"--peer {item!r}: give name=AUC, e.g. --peer rfm_lgbm=0.7308")
        if not name.strip():
            ap.error(f"--peer {item!r}: give name=AUC, e.g. --peer rfm_lgbm=0.7308")
    return peers


def _budgets(ap: argparse.ArgumentParser, steps: str) -> list[int]:
    try:
        budgets = [int(s) for s in steps.split(",")]
    except ValueError:
        ap.error(f"--steps {steps!r}: give step budgets separated by commas, e.g. 300,1000,3000")
    if not budgets or min(budgets) < 1:
        ap.error(f"--steps {steps!r}: every budget must be at least one step")
    return budgets


def _number(value: float | None) -> float:
    return float("nan") if value is None else float(value)


def _shown(value: float) -> str:
    return "-" if value != value else f"{value:.4f}"


def _plot(rows: list[dict], peers: dict[str, float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qanchor.bench.plots import save_figure

    fig, ax = plt.subplots(figsize=(6, 4))
    steps = [r["steps"] for r in rows]
    for key, label in (("task_auc", "task query"), ("generic_auc", "generic query"), ("swapped_auc", "swapped query")):
        ax.plot(steps, [r[key] for r in rows], marker="o", label=label)
    for name, auc in peers.items():
        ax.axhline(auc, linestyle="--", linewidth=1, color="grey")
        ax.text(steps[0], auc, f" {name}", va="bottom", fontsize=8, color="grey")
    ax.set_xscale("log")
    ax.set_xticks(steps, [f"{s:,}" for s in steps])  # the budgets themselves, not log-scale minor labels
    ax.minorticks_off()
    ax.set_xlabel("pretraining steps")
    ax.set_ylabel("mean AUC (5-fold, LR probe)")
    ax.set_title(f"Learning curve: {title}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
