"""Does the answering tower read the task's question? Zero-shot yes/no scores under each task's query and the others'.

For every labelled user and every task query, the checkpoint answers the query by multiple choice between "Yes" and
"No" (:meth:`QAnchor.choose_many`, the same reader `qanchor uqa` uses) and the user's score is ``log p(Yes) - log p(No)``
(length-normalised, end token included). No label is used: the AUC of that score on a task's labels says how much of
the task the model's own answer carries, and the matrix (rows: the task whose labels judge, columns: the query
asked) says whether that depends on *which* question was asked:

- ``own``: the score under the task's own query (AUC < 0.5 means the model answers the opposite way: e.g. it reads a
  negated question such as "make no purchase" as its positive form);
- ``|own - 0.5|`` against the mean ``|swapped - 0.5|`` under the other tasks' queries: a score that only tracks
  activity is as predictive (up to its sign) under any query; a model that reads the question does better under
  its own;
- the mean correlation between the scores of different queries (near 1 when every query gets the same answer).

Example (Complete Journey, 600 labelled households, about 20 s per checkpoint on 2 CPU cores)::

    python benchmarks/zero_shot.py --checkpoint results/uqa-seeds/cj-profile-ntp3/seed0 \\
        --data data/completejourney --users 600 --out results/zero-shot/cj-seed0.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from qanchor.data.dataset import Dataset, load_dataset  # noqa: E402
from qanchor.data.io import write_json  # noqa: E402
from qanchor.infer.api import QAnchor  # noqa: E402
from qanchor.logs import quiet_third_party  # noqa: E402

OPTIONS = ("Yes", "No")


def labelled_users(ds: Dataset, max_users: int | None, seed: int) -> list[str]:
    """Every user some task labels, sorted; a seeded random subset of ``max_users`` of them when given."""
    everyone = np.unique(np.concatenate([t.user_ids for t in ds.tasks.values()]).astype(str))
    if max_users is not None and max_users < len(everyone):
        everyone = np.sort(np.random.default_rng(seed).choice(everyone, size=max_users, replace=False))
    return everyone.tolist()


def yes_no_scores(model: QAnchor, ds: Dataset, user_ids: list[str], queries: list[str]) -> np.ndarray:
    """``[len(queries), len(user_ids)]`` of log p(Yes) - log p(No) for each user under each query (each user's
    prefix runs once for all the queries)."""
    choices = model.choose_many(list(ds.users(user_ids)), [(query, list(OPTIONS)) for query in queries])  # [U][Q]
    return np.array([[c.scores[OPTIONS[0]] - c.scores[OPTIONS[1]] for c in row] for row in choices]).T.reshape(
        len(queries), len(user_ids))


def auc_matrix(ds: Dataset, user_ids: list[str], scores: np.ndarray) -> dict:
    """AUC of each query's score (columns) on each task's labelled users among ``user_ids`` (rows), and summaries."""
    names = list(ds.tasks)
    row = {u: i for i, u in enumerate(user_ids)}
    per_task = {}
    for name, task in ds.tasks.items():
        ids = task.user_ids.astype(str)
        keep = np.array([u in row for u in ids])
        labels, rows = task.labels[keep], [row[u] for u in ids[keep]]
        if len(np.unique(labels)) < 2:
            continue
        aucs = {q: float(roc_auc_score(labels, scores[j][rows])) for j, q in enumerate(names)}
        others = [aucs[q] for q in names if q != name]
        per_task[name] = {"n": int(len(labels)), "positive_rate": float(labels.mean()), "auc": aucs,
                          "own": aucs[name], "own_strength": abs(aucs[name] - 0.5),
                          "swapped_strength": float(np.mean([abs(a - 0.5) for a in others])) if others else None}
    corr = np.corrcoef(scores) if len(names) > 1 else np.ones((1, 1))
    off = corr[~np.eye(len(names), dtype=bool)]
    strengths = [t["own_strength"] for t in per_task.values()]
    swapped = [t["swapped_strength"] for t in per_task.values() if t["swapped_strength"] is not None]
    return {"tasks": per_task, "mean_own_auc": float(np.mean([t["own"] for t in per_task.values()])),
            "mean_own_strength": float(np.mean(strengths)),
            "mean_swapped_strength": float(np.mean(swapped)) if swapped else None,
            "negated_tasks": [n for n, t in per_task.items() if t["own"] < 0.5],
            "mean_query_correlation": float(off.mean()) if off.size else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", nargs="+", required=True, help="one or more pretraining output dirs")
    ap.add_argument("--data", required=True)
    ap.add_argument("--users", type=int, default=None, help="a seeded random subset of the labelled users")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="JSON of every checkpoint's matrix")
    args = ap.parse_args(argv)
    quiet_third_party()
    ds = load_dataset(args.data)
    user_ids = labelled_users(ds, args.users, args.seed)
    queries = [t.query for t in ds.tasks.values()]
    results = {}
    for ckpt in args.checkpoint:
        start = time.perf_counter()
        model = QAnchor.from_pretrained(ckpt, text_cache_dir=ds.text_cache_dir)
        summary = auc_matrix(ds, user_ids, yes_no_scores(model, ds, user_ids, queries))
        summary["seconds"] = round(time.perf_counter() - start, 1)
        results[ckpt] = summary
        print(f"\n{ckpt}: {len(user_ids)} users x {len(queries)} queries in {summary['seconds']:.0f}s")
        print("| task (labels) | n | own-query AUC | |own - 0.5| | mean |swapped - 0.5| |")
        print("|---|---|---|---|---|")
        for name, t in summary["tasks"].items():
            swapped = "-" if t["swapped_strength"] is None else f"{t['swapped_strength']:.3f}"
            print(f"| {name} | {t['n']} | {t['own']:.3f} | {t['own_strength']:.3f} | {swapped} |")
        print(f"mean own AUC {summary['mean_own_auc']:.4f}; strength own {summary['mean_own_strength']:.4f} vs swapped "
              f"{summary['mean_swapped_strength']}; answered the opposite way (AUC < 0.5): {summary['negated_tasks']}; "
              f"mean correlation between queries' scores {summary['mean_query_correlation']}")
    if args.out is not None:
        write_json({"data": args.data, "users": len(user_ids), "options": list(OPTIONS), "results": results}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
