"""Do the user tokens carry a habit that the tower does not put into words? Probe it from the model's own states.

`qanchor uqa` finds topics where the generative tower answers no better than the same recipe with no user (on
Complete Journey the time-of-day habit). Either the user encoder never passes the habit to the backbone, or the
backbone holds it and the answer loss has not taught the tower to say it. This script tells the two apart: for each
interest habit it labels every user of the dataset at its cutoff with the habit the topic's verified answer names
(the top time of day; the weekend lean; the trend's direction), and fits a multinomial logistic regression
(standardised features, stratified k-fold, the same folds for every row) from

- ``hidden``: the backbone's hidden state at ``<|user_emb|>`` after the topic's own question (what the LLM holds
  about the user when it starts to answer);
- ``embedding``: the 128-d embedding under the same question;
- ``input_profile``: the statistics the user encoder reads (window statistics, whole-history ones where the config
  packs them, tabular values), no model;
- ``history_timing``: each modality's whole-history timing shares (6-hour UTC blocks, weekend), no model: the
  input a habit is computed from, so the row is the ceiling;
- ``majority``: the most frequent habit of each fold's training users.

Rows report accuracy and balanced accuracy (the mean recall over habits: on Complete Journey two thirds of the
households are most active in the evening, so plain accuracy flatters a model that always says "evening"). Pretrain
users are included: the question is what the representation holds, not whether it generalises to new users.

Example (the README's table, the three Complete Journey seeds of the held-out multiple-choice runs, ~30 s each on 2 cores)::

    python benchmarks/uqa_habit_probe.py --data data/completejourney \\
        --checkpoints results/uqa-seeds/cj-history/seed0 results/uqa-seeds/cj-history/seed1 \\
        results/uqa-seeds/cj-history/seed2 --out results/uqa-seeds/cj-history/habit_probe.json
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.metrics import balanced_accuracy_score  # noqa: E402
from sklearn.model_selection import StratifiedKFold  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from quality_probe import embed_all  # noqa: E402
from uqa_habit_split import habit  # noqa: E402

from qanchor.bench.report import markdown_table  # noqa: E402
from qanchor.data.dataset import load_dataset  # noqa: E402
from qanchor.data.history import timing_features  # noqa: E402
from qanchor.data.io import write_json, write_text  # noqa: E402
from qanchor.data.userU_topics import TOPICS, History, verify  # noqa: E402
from qanchor.infer.api import QAnchor, events_before  # noqa: E402
from qanchor.infer.user_input import to_microseconds  # noqa: E402
from qanchor.logs import quiet_third_party  # noqa: E402

HABIT_TOPICS = ("time_of_day", "weekend", "trend")
# One fixed wording per topic (the first of the topic's templates in qanchor.data.userU_topics).
QUESTIONS = {"time_of_day": "At what time of day is this user most active?",
             "weekend": "Is this user more active on weekends or weekdays?",
             "trend": "Is this user becoming more or less active?"}
ROWS = ("hidden", "embedding", "input_profile", "history_timing", "majority")


def habit_labels(ds, cutoff_us: int) -> tuple[dict[str, dict[str, str]], dict[str, np.ndarray]]:
    """Per topic, user -> the habit its verified answer names; per user, the concatenated whole-history timing
    shares of every sequence modality (zeros for a modality the user lacks)."""
    extra = {m.name: m.numeric_columns for m in ds.manifest.sequence_modalities}
    modalities = [m.name for m in ds.manifest.sequence_modalities]
    labels: dict[str, dict[str, str]] = {t: {} for t in HABIT_TOPICS}
    timing: dict[str, np.ndarray] = {}
    for record in ds.users(ds.user_ids.tolist()):
        before = events_before(record.events, cutoff_us)
        h = History(before, cutoff_us, extra)
        timing[record.user_id] = np.concatenate([timing_features(before.get(m)) for m in modalities])
        if not len(h.all):
            continue
        for topic in HABIT_TOPICS:
            qa = TOPICS[topic](h, np.random.default_rng(0))
            if qa is not None and verify(qa.claims, h, qa.answer):
                labels[topic][record.user_id] = habit(topic, qa.answer)
    return labels, timing


def probe_accuracy(features: np.ndarray | None, labels: np.ndarray, folds: list) -> tuple[float, float]:
    """Out-of-fold (accuracy, balanced accuracy) of a multinomial LR; ``features=None`` predicts each fold's
    majority habit."""
    pred = np.empty(len(labels), dtype=object)
    for train, test in folds:
        if features is None:
            values, counts = np.unique(labels[train], return_counts=True)
            pred[test] = values[np.argmax(counts)]
        else:
            model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
            pred[test] = model.fit(features[train], labels[train]).predict(features[test])
    return float(np.mean(pred == labels)), float(balanced_accuracy_score(labels, pred))


def usable(labels: dict[str, str], n_folds: int) -> dict[str, str]:
    """Drop habits held by fewer users than folds (stratification needs one per fold)."""
    values, counts = np.unique(list(labels.values()), return_counts=True)
    keep = set(values[counts >= n_folds].tolist())
    return {u: v for u, v in labels.items() if v in keep}


def run(checkpoints: list[str], data: str, n_folds: int = 5, seed: int = 0) -> dict:
    ds = load_dataset(data)
    cutoff_us = to_microseconds(ds.manifest.cutoff)
    labels, timing = habit_labels(ds, cutoff_us)
    labels = {t: usable(v, n_folds) for t, v in labels.items()}
    topics = [t for t in HABIT_TOPICS if len(set(labels[t].values())) >= 2]
    if not topics:
        raise SystemExit(f"error: {data}: no interest habit takes two values over the dataset's users")
    user_ids = sorted({u for t in topics for u in labels[t]})
    row = {u: i for i, u in enumerate(user_ids)}
    out: dict = {"data": data, "folds": n_folds, "checkpoints": checkpoints,
                 "habits": {t: dict(sorted(Counter(labels[t].values()).items())) for t in topics}, "per_checkpoint": []}
    for ckpt in checkpoints:
        q = QAnchor.from_pretrained(ckpt, text_cache_dir=ds.text_cache_dir)
        q.model.eval()
        hid, emb, _, profile, _, _ = embed_all(q, ds, user_ids, [QUESTIONS[t] for t in topics])
        result = {}
        for i, t in enumerate(topics):
            users = sorted(labels[t])
            r = np.fromiter((row[u] for u in users), np.int64)
            y = np.asarray([labels[t][u] for u in users], dtype=object)
            folds = list(StratifiedKFold(n_folds, shuffle=True, random_state=seed).split(r, y.astype(str)))
            feats = {"hidden": hid[r, i], "embedding": emb[r, i], "input_profile": profile[r],
                     "history_timing": np.stack([timing[u] for u in users]), "majority": None}
            result[t] = {k: probe_accuracy(f, y, folds) for k, f in feats.items()}
        out["per_checkpoint"].append(result)
    out["mean"] = {t: {k: [float(np.mean([c[t][k][j] for c in out["per_checkpoint"]])) for j in (0, 1)]
                       for k in ROWS} for t in topics}
    return out


def report(result: dict) -> str:
    topics = list(result["mean"])
    header = ["features"] + [f"{t} (n={sum(result['habits'][t].values())})" for t in topics]
    rows = [[k] + [f"{result['mean'][t][k][0]:.3f} / {result['mean'][t][k][1]:.3f}" for t in topics] for k in ROWS]
    habits = "; ".join(f"{t}: " + ", ".join(f"{k} {v}" for k, v in c.items()) for t, c in result["habits"].items())
    return (f"Accuracy / balanced accuracy, {result['folds']}-fold, mean over {len(result['checkpoints'])} "
            f"checkpoint(s). Habits: {habits}.\n\n" + markdown_table(header, rows))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoints", nargs="+", required=True, help="checkpoint dirs (or pretraining output_dirs)")
    ap.add_argument("--data", required=True)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="write the result as JSON (and the table beside it)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet_third_party()
    result = run(args.checkpoints, args.data, args.folds)
    table = report(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json(result, args.out, indent=1)  # atomic: a temp file, then a rename
        write_text(table + "\n", args.out.with_suffix(".md"))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
