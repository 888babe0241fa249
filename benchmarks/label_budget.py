"""Does the query matter when labels are few? Probe AUC of each query's embedding against the number of labelled users.

The bench fits every LR row on a fold's whole training split (1,600-2,000 users), where a linear probe finds a
task's direction in any embedding that holds it, whichever query made it. A query earns its place where a
scenario has few labels: an embedding that already points at the task needs fewer users to find it. For each
budget ``n`` this script draws ``n`` labelled users from each fold's training split (class ratio kept, at least 2
of each class; the same draw for every row, so rows compare paired), fits the bench's LR probe
(:func:`qanchor.bench.peers.fit_predict`, the same C grid for every row) and scores the fold's test users. Rows:

- ``task``, ``generic``, ``swapped``: the checkpoint's embedding under the task's own query, the generic query, and
  another task's query (the bench's ``qanchor_task`` / ``qanchor_generic`` / ``qanchor_swapped_query``);
- ``rfm_lr``, ``union_lr``: the bench's linear peers on the same users (signed-log RFM / counts + tabular; and with
  the mean event-text vector);
- ``rfm_lgbm``, ``union_lgbm``: the bench's LightGBM peers (raw RFM / counts + tabular; and with the mean event-text
  vector), with the bench's own settings, on the same draws.

Budget ``all`` is the whole training split: it reproduces the bench's rows (same folds, probe and seed). Means over
tasks, folds and draws per checkpoint; over checkpoints (pretraining seeds) the mean, the spread and the paired
difference task - generic / task - swapped. Without ``--checkpoint`` only the peers are fitted (they do not depend on a
checkpoint, and their draws are the same users as any checkpoint's run with the same ``--seed``).

Example::

    python benchmarks/label_budget.py --checkpoint results/pw/cj-probe-w10-ntp3/seed{0,1,2} \\
        --data data/completejourney --generic-query "What kind of household is this?" \\
        --budgets 50,100,200,all --out results/label_budget/cj.json --plot docs/label_budget_cj.png
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

from qanchor.bench.embedder import QAnchorEmbedder  # noqa: E402
from qanchor.bench.features import extract_features  # noqa: E402
from qanchor.bench.peers import Classifier, fit_predict, stratified_folds  # noqa: E402
from qanchor.bench.plots import _pyplot, save_figure  # noqa: E402
from qanchor.bench.tasks import dataset_tasks, fold_count  # noqa: E402
from qanchor.config import DataConfig  # noqa: E402
from qanchor.data.dataset import Dataset, load_dataset  # noqa: E402
from qanchor.data.io import write_json  # noqa: E402
from qanchor.data.pipeline import UserPipeline  # noqa: E402
from qanchor.errors import QAnchorError  # noqa: E402
from qanchor.infer.api import QAnchor  # noqa: E402
from qanchor.logs import log, quiet_third_party  # noqa: E402
from qanchor.metrics import auc_score  # noqa: E402
from qanchor.model.factory import resolve_checkpoint_dir  # noqa: E402

ROWS = ("task", "generic", "swapped", "rfm_lr", "union_lr", "rfm_lgbm", "union_lgbm")
PEER_ROWS = ROWS[3:]
QUERY_ROWS = ROWS[:3]


def draw(train: np.ndarray, labels: np.ndarray, n: int | None, rng: np.random.Generator) -> np.ndarray:
    """``n`` of the ``train`` indices with their class ratio (at least 2 of each class; all of them when ``n`` is None
    or covers them), sorted."""
    if n is None or n >= len(train):
        return train
    pos, neg = train[labels[train] == 1], train[labels[train] == 0]
    n_pos = min(len(pos), max(2, round(n * len(pos) / len(train))))
    n_neg = min(len(neg), max(2, n - n_pos))
    return np.sort(np.concatenate([rng.choice(pos, n_pos, replace=False), rng.choice(neg, n_neg, replace=False)]))


def peer_features(ds: Dataset, user_ids: list[str]) -> dict[str, np.ndarray]:
    """The bench's peers' inputs, rows in ``user_ids`` order (a ``_lgbm`` row is fitted with LightGBM, as in the bench)."""
    pipe = UserPipeline.for_dataset(ds, DataConfig())
    pipe.prime(ds.users(user_ids), progress=False, all_events=True)  # every event text, as the bench's text cache
    feats = extract_features(ds, user_ids, pipe.cache)
    return {"rfm_lr": feats.rfm_log, "union_lr": np.concatenate([feats.rfm_log, feats.text_mean], axis=1),
            "rfm_lgbm": feats.rfm, "union_lgbm": np.concatenate([feats.rfm, feats.text_mean], axis=1)}


def query_embeddings(model: QAnchor, ds: Dataset, user_ids: list[str], queries: list[str]) -> np.ndarray:
    """float32 ``[U, Q, D]``: every user under every query, at the dataset's cutoff (the bench's own path)."""
    return QAnchorEmbedder(model, ds).embed_many(user_ids, [(q, None) for q in queries])


def eligible_tasks(ds: Dataset, folds: int = 5, seed: int = 0) -> list:
    """The bench's tasks that have at least 2 folds (a class with one user cannot be split)."""
    return [t for t in dataset_tasks(ds, [], None, seed) if fold_count(t.labels, folds) >= 2]


def parse_budgets(text: str) -> list[int | None]:
    """``"50,100,all"`` -> ``[50, 100, None]``; ValueError naming the bad entry otherwise."""
    budgets: list[int | None] = []
    for entry in (e.strip() for e in text.split(",")):
        if entry == "all":
            budgets.append(None)
            continue
        try:
            n = int(entry)
        except ValueError:
            raise ValueError(f"--budgets: {entry!r} is neither 'all' nor a whole number of users") from None
        if n < 4:
            raise ValueError(f"--budgets: {n} users is too few; each budget must be 'all' or at least 4 users "
                             "(2 of each class)")
        budgets.append(n)
    if len(set(budgets)) != len(budgets):
        raise ValueError(f"--budgets: {text!r} names a budget twice")
    return budgets


def parse_peers(text: str) -> list[str]:
    """``--peers``: 'none', or peer row names -> names (ValueError naming an unknown one)."""
    if text.strip() == "none":
        return []
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in PEER_ROWS]
    if unknown or not names:
        raise ValueError(f"--peers: unknown row(s) {unknown or [text]}; choose from {', '.join(PEER_ROWS)}, or none")
    return names


def budget_curve(tasks: list, emb: np.ndarray | None, peers: dict[str, np.ndarray], user_ids: list[str],
                 budgets: list[int | None], draws: int, folds: int = 5, seed: int = 0) -> dict:
    """Mean AUC per budget and row over ``tasks`` (from :func:`eligible_tasks`): each task's mean over its folds and
    draws, then the mean over tasks, as the bench averages (a task with fewer folds weighs as much as any other);
    ``emb`` from :func:`query_embeddings` with the tasks' queries then the generic query last (None: the peers only;
    they do not depend on the checkpoint, so they are fitted once). A row without features is None."""
    row_of = {u: i for i, u in enumerate(user_ids)}
    queries = list(dict.fromkeys(t.query for t in tasks))
    col = {q: i for i, q in enumerate(queries)}
    aucs: dict[str, dict[str, list[float]]] = {_name(b): {r: [] for r in ROWS} for b in budgets}  # per task: its mean
    for k, task in enumerate(tasks):
        per_task: dict[str, dict[str, list[float]]] = {_name(b): {r: [] for r in ROWS} for b in budgets}
        log(f"label_budget: task {k + 1}/{len(tasks)} {task.name} ({'query rows' if emb is not None else 'peers'})")
        rows = np.fromiter((row_of[u] for u in task.user_ids), np.int64)
        other = next((t.query for t in tasks[k + 1:] + tasks if t.query != task.query), None)
        features = {} if emb is None else {"task": emb[rows, col[task.query]], "generic": emb[rows, -1],
                                           "swapped": emb[rows, col[other]] if other is not None else None}
        features.update({name: x[rows] for name, x in peers.items()})
        labels = task.labels.astype(np.int64)
        for f, (train, test) in enumerate(stratified_folds(labels, fold_count(labels, folds), seed)):
            for b in budgets:
                for d in range(draws if b is not None else 1):
                    rng = np.random.default_rng([seed, k, f, d, b or 0])
                    fit = draw(train, labels, b, rng)
                    for name, x in features.items():
                        if x is not None:
                            kind = Classifier.LGBM if name.endswith("_lgbm") else Classifier.LR
                            scores = fit_predict(kind, x[fit], labels[fit], x[test], seed)  # as the bench
                            per_task[_name(b)][name].append(auc_score(labels[test], scores))
        for b, rows_ in per_task.items():
            for name, values in rows_.items():
                if values:
                    aucs[b][name].append(float(np.mean(values)))
    return {"tasks": [t.name for t in tasks],
            "auc": {b: {r: float(np.mean(v)) if v else None for r, v in rows_.items()} for b, rows_ in aucs.items()}}


def _name(budget: int | None) -> str:
    return "all" if budget is None else str(budget)


def summarise(curves: list[dict]) -> dict:
    """Over checkpoints: mean and std of each row per budget, and the paired query differences."""
    out: dict = {}
    for b in curves[0]["auc"]:
        rows = {r: [c["auc"][b][r] for c in curves] for r in ROWS if curves[0]["auc"][b].get(r) is not None}
        entry = {r: [float(np.mean(v)), float(np.std(v))] for r, v in rows.items()}
        for other in ("generic", "swapped"):
            if other in rows and "task" in rows:
                diff = np.subtract(rows["task"], rows[other])
                entry[f"task-{other}"] = [float(diff.mean()), float(diff.std()), [round(float(x), 4) for x in diff]]
        out[b] = entry
    return out


def markdown(summary: dict, n_checkpoints: int) -> str:
    head = "| labelled users per fold | " + " | ".join(ROWS) + " | task - generic | task - swapped |"
    lines = [head, "|" + "---|" * (len(ROWS) + 3)]
    for b, e in summary.items():
        cells = [f"{e[r][0]:.4f} ± {e[r][1]:.4f}" if r in e else "-" for r in ROWS]
        diffs = [f"{e[k][0]:+.4f} ± {e[k][1]:.4f}" if k in e else "-" for k in ("task-generic", "task-swapped")]
        lines.append(f"| {b} | " + " | ".join(cells + diffs) + " |")
    over = f"mean ± std over {n_checkpoints} checkpoint(s)" if n_checkpoints else "peers only (no checkpoint)"
    return "\n".join(lines) + f"\n\n{over}; AUC averaged over tasks, folds and draws"


def plot(summary: dict, path: Path, title: str) -> None:
    plt = _pyplot()
    budgets = list(summary)
    xs = np.arange(len(budgets))
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for r in ROWS:
        if all(r in summary[b] for b in budgets):
            ax.errorbar(xs, [summary[b][r][0] for b in budgets], yerr=[summary[b][r][1] for b in budgets], marker="o",
                        capsize=3, label=r, linestyle="-" if r in QUERY_ROWS else "--")
    ax.set_xticks(xs, budgets)
    ax.set_xlabel("labelled users per fold (training)")
    ax.set_ylabel("mean AUC (test users of each fold)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", nargs="*", default=[], help="pretraining output dirs (seeds); none: the peers only")
    ap.add_argument("--data", required=True)
    ap.add_argument("--generic-query", default="What kind of user is this?")
    ap.add_argument("--budgets", default="50,100,200,all", help="labelled training users per fold; 'all' = the fold's")
    ap.add_argument("--draws", type=int, default=3, help="random draws per budget and fold")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--peers", default=",".join(PEER_ROWS),
                    help="peer rows to fit, comma-separated, or 'none' (LightGBM on 16,000 users per fold is slow: "
                         "--peers rfm_lr,union_lr keeps the linear ones)")
    ap.add_argument("--out", type=Path, default=None, help="JSON of every checkpoint's curve and the summary")
    ap.add_argument("--plot", type=Path, default=None, help="PNG of AUC against the budget")
    args = ap.parse_args(argv)
    quiet_third_party()
    try:
        budgets = parse_budgets(args.budgets)
        peer_rows = parse_peers(args.peers)
    except ValueError as e:
        ap.error(str(e))
    if not peer_rows and not args.checkpoint:
        ap.error("--peers none without --checkpoint leaves nothing to fit")
    for ckpt in args.checkpoint:  # before the peers' curves: a mistyped one ended the run after them, saving nothing
        if not (resolve_checkpoint_dir(ckpt) / "qanchor.json").is_file():
            ap.error(f"--checkpoint {ckpt}: no checkpoint there (no qanchor.json in it or in its checkpoint/)")
    try:
        ds = load_dataset(args.data)
    except QAnchorError as err:  # one line, as the qanchor commands say it
        raise SystemExit(f"error: {err}") from None
    tasks = eligible_tasks(ds, seed=args.seed)
    user_ids = sorted({u for t in tasks for u in t.user_ids})
    queries = [*dict.fromkeys(t.query for t in tasks), args.generic_query]
    start = time.perf_counter()
    features = {name: x for name, x in peer_features(ds, user_ids).items() if name in peer_rows} if peer_rows else {}
    peers = budget_curve(tasks, None, features, user_ids, budgets, args.draws, seed=args.seed)
    curves = []
    for ckpt in args.checkpoint:
        model = QAnchor.from_pretrained(ckpt, text_cache_dir=ds.text_cache_dir)
        curve = budget_curve(tasks, query_embeddings(model, ds, user_ids, queries), {}, user_ids, budgets, args.draws,
                             seed=args.seed)
        for b, rows in curve["auc"].items():  # the peers' draws are the same users as every checkpoint's
            rows.update({r: v for r, v in peers["auc"][b].items() if v is not None})
        curves.append({"checkpoint": ckpt, **curve})
        log(f"label_budget: {ckpt}: " + ", ".join(f"{b} task {v['task']:.4f} generic {v['generic']:.4f}"
                                                  for b, v in curve["auc"].items()))
    if not curves:  # peers only
        curves.append({"checkpoint": None, **peers})
    summary = summarise(curves)
    print(markdown(summary, len(args.checkpoint)))
    if args.out is not None:
        write_json({"data": args.data, "generic_query": args.generic_query, "draws": args.draws, "seed": args.seed,
                    "users": len(user_ids), "seconds": round(time.perf_counter() - start, 1), "curves": curves,
                    "summary": summary}, args.out)
    if args.plot is not None:
        n = len(args.checkpoint)
        plot(summary, args.plot, f"{ds.manifest.name}: AUC vs labelled users ({n} checkpoint(s))" if n else
             f"{ds.manifest.name}: peers' AUC vs labelled users")
    return 0


if __name__ == "__main__":
    sys.exit(main())
