"""Does prompt tuning help once a scenario has enough labelled users?

The bench's per-fold heads tie the frozen task-query probe on Complete Journey and the 2,000-user synthetic
world, where a fold trains on 1,000-1,600 users. The paper tunes its heads on industrial scenarios with far
more. This script runs ``qanchor prompt-tune`` (its config unchanged: the same steps, learning rates and
validation-picked step) with several pretraining seeds' checkpoints on datasets of different sizes, and compares
on each run's own held-out test split (``test_fraction`` of the users, never used to fit or pick anything):

- ``frozen_lr``: logistic regression on the frozen task-query embeddings (C picked on the validation split, then
  fitted on the train + val users);
- ``frozen_proto``: the head at step 0 (logistic prototypes on the training users, no tuning);
- ``tuned``: the head after tuning (soft prompt + prototypes, best validation step; with ``refit_readout``, the
  default, its readout fitted again on the train + val users under the chosen prompt).

It writes ``<root>/scale.json``, ``scale.md`` (mean over tasks per run, then mean ± std over seeds, and the
paired tuned - frozen_lr difference) and ``scale.png``. Runs are resumable: prompt-tune reuses finished heads.

Example (the synthetic world is one generator, so worlds of any size share it; seed 2 draws users that no
checkpoint was pretrained on)::

    qanchor data synth out=data/synth-s2-2000 users=2000 seed=2
    qanchor data synth out=data/synth-s2-20000 users=20000 seed=2
    python benchmarks/prompt_tune_scale.py --config configs/prompt_tune/tiny-synth.yaml \\
        --data data/synth-s2-2000 --data data/synth-s2-20000 \\
        --checkpoint runs/synth-s0/pretrain --checkpoint runs/synth-s1/pretrain --checkpoint runs/synth-s2/pretrain \\
        --root results/prompt_scale
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from qanchor.data.io import write_json, write_text

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_seeds import absolute_paths  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ROWS = ("frozen_lr", "frozen_proto", "tuned")


def run_mean(summary: dict) -> dict:
    """Mean over the run's tasks of each row's test AUC / KS (and the oracle's where the data knows it)."""
    tasks = summary["tasks"].values()
    out = {f"{row}_{m}": float(np.mean([t[row]["test"][m] for t in tasks])) for row in ROWS for m in ("auc", "ks")}
    if all("oracle" in t for t in tasks):
        out["oracle_auc"] = float(np.mean([t["oracle"]["test"]["auc"] for t in tasks]))
    out["tuned_wins"] = int(sum(t["tuned"]["test"]["auc"] > t["frozen_lr"]["test"]["auc"] for t in tasks))
    out["n_tasks"] = len(summary["tasks"])
    out["best_step_zero"] = int(sum(t["best_step"] == 0 for t in tasks))
    out["n_train"] = float(np.mean([t["n"]["train"] for t in tasks]))
    out["n_test"] = float(np.mean([t["n"]["test"] for t in tasks]))
    return out


def aggregate(per_seed: list[dict]) -> dict:
    """Mean and std over seeds of every run mean, plus the paired tuned - frozen_lr differences."""
    keys = [k for k in per_seed[0] if isinstance(per_seed[0][k], float)]
    agg = {k: (float(np.mean([r[k] for r in per_seed])), float(np.std([r[k] for r in per_seed]))) for k in keys}
    for m in ("auc", "ks"):
        diff = [r[f"tuned_{m}"] - r[f"frozen_lr_{m}"] for r in per_seed]
        agg[f"gain_{m}"] = (float(np.mean(diff)), float(np.std(diff)))
        agg[f"gain_{m}_per_seed"] = diff
        # Tuning's own effect: the step-0 head is the same probe, fitted on the same training users.
        diff = [r[f"tuned_{m}"] - r[f"frozen_proto_{m}"] for r in per_seed]
        agg[f"gain_over_step0_{m}"] = (float(np.mean(diff)), float(np.std(diff)))
    agg["tuned_wins"] = [r["tuned_wins"] for r in per_seed]
    agg["best_step_zero"] = [r["best_step_zero"] for r in per_seed]
    agg["n_tasks"] = per_seed[0]["n_tasks"]
    return agg


def _pm(agg: dict, key: str) -> str:
    return f"{agg[key][0]:.4f} ± {agg[key][1]:.4f}"


def table(results: dict[str, dict]) -> str:
    lines = ["| dataset | train / test users per task | frozen LR AUC | step-0 head AUC | tuned head AUC | tuned - frozen LR AUC "
             "(per seed) | tuned - step-0 head AUC | frozen LR KS | tuned KS | tuned - frozen LR KS | tasks tuned > LR "
             "| oracle AUC |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, a in results.items():
        seeds = " / ".join(f"{d:+.4f}" for d in a["gain_auc_per_seed"])
        oracle = f"{a['oracle_auc'][0]:.4f}" if "oracle_auc" in a else "-"
        wins = " / ".join(f"{w}/{a['n_tasks']}" for w in a["tuned_wins"])
        lines.append(f"| {name} | {a['n_train'][0]:,.0f} / {a['n_test'][0]:,.0f} | {_pm(a, 'frozen_lr_auc')} | "
                     f"{_pm(a, 'frozen_proto_auc')} | {_pm(a, 'tuned_auc')} | {_pm(a, 'gain_auc')} ({seeds}) | {_pm(a, 'gain_over_step0_auc')} | "
                     f"{_pm(a, 'frozen_lr_ks')} | "
                     f"{_pm(a, 'tuned_ks')} | {_pm(a, 'gain_ks')} | {wins} | "
                     f"{oracle} |")
    return "\n".join(lines)


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qanchor.bench.plots import save_figure

    fig, ax = plt.subplots(figsize=(6, 4))
    n = [a["n_train"][0] for a in results.values()]
    for m, label in (("auc", "AUC"), ("ks", "KS")):
        mean = [a[f"gain_{m}"][0] for a in results.values()]
        std = [a[f"gain_{m}"][1] for a in results.values()]
        ax.errorbar(n, mean, yerr=std, marker="o", capsize=4, label=f"tuned head - frozen LR, {label}")
    ax.axhline(0, color="grey", linewidth=1, linestyle="--")
    ax.set_xscale("log")
    ax.set_xlabel("labelled training users per task")
    ax.set_ylabel("mean over tasks (± std over pretraining seeds)")
    ax.set_title("Prompt tuning vs the frozen probe, by scenario size")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="prompt-tune config (used unchanged)")
    ap.add_argument("--data", action="append", required=True, help="dataset directory (repeatable)")
    ap.add_argument("--checkpoint", action="append", required=True, help="pretrained checkpoint, one per seed (repeatable)")
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--set", action="append", default=[], help="key=value prompt-tune setting (repeatable)")
    args = absolute_paths(ap.parse_args(argv), "config", "data", "checkpoint", "root")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    results = {}
    for data in args.data:
        per_seed = []
        for i, ckpt in enumerate(args.checkpoint):
            out = args.root / Path(data).name / f"ckpt{i}"
            started = time.perf_counter()
            print(f"prompt-tune {data} with {ckpt}: start -> {out}", flush=True)
            subprocess.run([sys.executable, "-m", "qanchor.cli", "prompt-tune", "--config", args.config, "--quiet",
                            f"checkpoint={ckpt}", f"data.path={data}", f"output_dir={out}", "task=all", *args.set],
                           check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
            per_seed.append(run_mean(json.loads((out / "summary.json").read_text())))
            print(f"prompt-tune {data} with {ckpt}: done in {time.perf_counter() - started:.0f} s, mean tuned AUC "
                  f"{per_seed[-1]['tuned_auc']:.4f} (frozen LR {per_seed[-1]['frozen_lr_auc']:.4f})", flush=True)
        results[Path(data).name] = aggregate(per_seed)
    write_json({"checkpoints": args.checkpoint, "config": args.config, "set": args.set, "results": results},
               args.root / "scale.json", indent=1)
    md = table(results)
    write_text(md + "\n", args.root / "scale.md")
    print(md)
    plot(results, args.root / "scale.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
