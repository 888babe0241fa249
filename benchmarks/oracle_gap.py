"""What the synthetic world's gap to the oracle is made of: the label budget, what the data hold, the representation.

The quality issue's target for the synthetic world is a task-query embedding within 0.05 AUC of the oracle (the
generator's true probability). Every user there has eight latent traits (``data_tools.synth``) from which both their
events and every task's probability are drawn, so the gap can be taken apart with the traits themselves. On the
bench's users, folds and logistic-regression probe (the one every LR row uses), mean AUC / KS over the tasks:

- ``oracle``: the true probability;
- ``true_traits``: the probe on the eight true traits. No representation can beat it with the bench's labels, so
  ``oracle - true_traits`` is what the label budget costs even a perfect representation;
- ``observed_traits_linear`` / ``observed_traits_lgbm``: the probe on the traits as read from the observable data by
  ridge regression / LightGBM fitted to the true traits, cross-fitted over 5 folds of users (no task label is used).
  The data read: ``rfm_lr``'s features (RFM statistics and counts per modality, the tabular values, a missing flag
  where a value can be missing), when in the day and week each modality's events fall (the model's timing shares and
  the mean hour as sine and cosine), the mean event-text vector, and log(1 + count) of every distinct event text, all
  over the whole history before the cutoff. It is what a representation that recovered the traits from the data as
  well as a regression supervised by the truth could reach: ``true_traits - observed`` is what the data do not hold;
- per checkpoint: ``embedding``, the probe on the task query's embedding (the bench's ``qanchor_task``), and
  ``embedding_traits``, the probe on the traits read linearly (cross-fitted ridge) from the generic query's
  embedding, with that read's R^2 per trait: which traits the embedding holds. ``observed - embedding`` is what the
  representation leaves of what the data hold.

So ``oracle - embedding`` = labels + data + representation, each with its number. Example (about 3 minutes for the
data rows on 2 cores, half of it LightGBM, plus about a minute per checkpoint)::

    python benchmarks/oracle_gap.py --data data/synth --checkpoint runs/synth/pretrain --out results/oracle_gap/synth.json
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
from sklearn.linear_model import RidgeCV  # noqa: E402
from sklearn.model_selection import KFold, cross_val_predict  # noqa: E402

from data_tools.synth import TRAITS, traits_of  # noqa: E402
from qanchor.bench.features import extract_features  # noqa: E402
from qanchor.bench.peers import Classifier, MethodInput, evaluate_folds, stratified_folds  # noqa: E402
from qanchor.bench.tasks import dataset_tasks, fold_count  # noqa: E402
from qanchor.data.dataset import load_dataset  # noqa: E402
from qanchor.data.history import TIMING_STATS, events_before, timing_features  # noqa: E402
from qanchor.data.io import write_json  # noqa: E402
from qanchor.data.text_cache import SentenceEncoder, TextVectorCache  # noqa: E402
from qanchor.errors import QAnchorError  # noqa: E402
from qanchor.logs import progress, quiet_third_party  # noqa: E402
from qanchor.model.factory import resolve_checkpoint_dir  # noqa: E402

DAY_US = 86_400 * 1_000_000
RIDGE_ALPHAS = np.logspace(-2, 4, 13)  # one for all eight traits, by leave-one-out inside each training fold
TRAIT_FOLDS = 5


def standardise(x: np.ndarray) -> np.ndarray:
    """Columns centred and scaled to unit variance; a constant column stays 0."""
    std = x.std(0)
    return (x - x.mean(0)) / np.where(std > 1e-9, std, 1.0)


def observables(ds, user_ids: list[str], cache: TextVectorCache) -> np.ndarray:
    """(U, F) what the data show of each user before the cutoff, standardised: ``rfm_lr``'s features (NaN -> 0, plus a
    missing flag for each column that has any), each modality's :func:`when`, the mean event-text vector, and
    log(1 + count) of each distinct event text."""
    cutoff_us = ds.manifest.cutoff_us
    names = [m.name for m in ds.manifest.sequence_modalities]
    row = {u: i for i, u in enumerate(user_ids)}
    texts: list[list[str]] = [[] for _ in user_ids]
    timing = np.zeros((len(user_ids), len(names), TIMING_STATS + 2))
    for record in progress(ds.users(user_ids), total=len(user_ids), desc="bags of events", unit="user"):
        i = row[record.user_id]  # records come in sorted id order, whatever the order of user_ids
        seqs = {name: events_before(seq, cutoff_us) for name, seq in record.events.items()}
        texts[i] = [t for seq in seqs.values() for t in seq.text]
        for j, name in enumerate(names):
            timing[i, j] = when(seqs.get(name))
    vocabulary = {t: j for j, t in enumerate(sorted({t for ts in texts for t in ts}))}
    cache.ensure(list(vocabulary), what="event texts")  # the mean text vector reads every text's vector
    peers = extract_features(ds, user_ids, cache)
    rows = peers.rows(user_ids)
    rfm = peers.rfm_log[rows].astype(np.float64)
    missing = np.isnan(rfm)
    rfm = np.hstack([np.nan_to_num(rfm), missing[:, missing.any(0)]])
    bag = np.zeros((len(user_ids), len(vocabulary)))
    for i, ts in enumerate(texts):
        np.add.at(bag[i], [vocabulary[t] for t in ts], 1.0)
    return standardise(np.hstack([rfm, timing.reshape(len(user_ids), -1), peers.text_mean[rows].astype(np.float64),
                                  np.log1p(bag)]))


def when(seq) -> np.ndarray:
    """(7,) when in the day and week a modality's events fall: the model's whole-history timing shares
    (:func:`qanchor.data.history.timing_features`), then the mean of the hour's sine and cosine; zeros without events."""
    if seq is None or not len(seq):
        return np.zeros(TIMING_STATS + 2)
    angle = 2 * np.pi * (seq.ts % DAY_US) / DAY_US
    return np.concatenate([timing_features(seq), [np.sin(angle).mean(), np.cos(angle).mean()]])


def read_traits(features: np.ndarray, traits: np.ndarray, how: str, seed: int = 0) -> np.ndarray:
    """(U, 8) the traits as read from ``features`` by ``how`` ("ridge" or "lgbm"), each user's from a regressor fitted
    on the other folds' users (cross-fitted: no user's own traits are used for its reading)."""
    if how == "ridge":
        model = RidgeCV(alphas=RIDGE_ALPHAS)
    elif how == "lgbm":
        import lightgbm as lgb
        from sklearn.multioutput import MultiOutputRegressor
        model = MultiOutputRegressor(lgb.LGBMRegressor(n_estimators=300, learning_rate=0.03, num_leaves=15, subsample=0.8,
                                                       subsample_freq=1, colsample_bytree=0.5, random_state=seed,
                                                       verbose=-1, n_jobs=2))
    else:
        raise ValueError(f"read_traits: how must be 'ridge' or 'lgbm', not {how!r}")
    return cross_val_predict(model, features, traits, cv=KFold(TRAIT_FOLDS, shuffle=True, random_state=seed))


def r_squared(predicted: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Per trait, the share of its variance over users that ``predicted`` explains."""
    r2 = 1 - ((predicted - truth) ** 2).sum(0) / ((truth - truth.mean(0)) ** 2).sum(0)
    return {name: float(v) for name, v in zip(TRAITS, r2)}


def lr(features: np.ndarray) -> MethodInput:
    """``features`` through the bench's LR probe (standardised, C by inner CV), as every LR row reads them."""
    return MethodInput(features=features.astype(np.float32), classifier=Classifier.LR)


def score(method: MethodInput, labels: np.ndarray, folds, seed: int) -> tuple[float, float]:
    """Mean AUC and KS of ``method`` over the bench's folds."""
    out = evaluate_folds(method, labels, folds, seed=seed)
    return float(np.mean(out.auc)), float(np.mean(out.ks))


def task_means(per_task: dict[str, dict[str, tuple[float, float]]], key: str) -> dict[str, float]:
    return {"auc": float(np.mean([v[key][0] for v in per_task.values()])),
            "ks": float(np.mean([v[key][1] for v in per_task.values()]))}


def embeddings(checkpoint: str, ds, user_ids: list[str], queries: list[str]) -> np.ndarray:
    """(U, Q, D) each user's embedding under each query, as the bench embeds them."""
    from quality_probe import embed_all

    from qanchor import QAnchor
    model = QAnchor.from_pretrained(checkpoint, text_cache_dir=ds.text_cache_dir)
    model.model.eval()
    return embed_all(model, ds, user_ids, queries)[1]


def run(data: str, checkpoints: list[str], generic_query: str, lgbm: bool = True, folds: int = 5,
        seed: int = 0) -> dict:
    ds = load_dataset(data)
    try:
        truth = traits_of(data)
    except ValueError as err:
        raise SystemExit(f"oracle_gap: {err}") from None
    tasks = [t for t in dataset_tasks(ds, [], None, seed) if fold_count(t.labels, folds) >= 2]
    if not tasks:
        raise SystemExit(f"{data}: no task has enough positives and negatives for {folds}-fold CV")
    user_ids = sorted({u for t in tasks for u in t.user_ids})
    row = {u: i for i, u in enumerate(user_ids)}
    traits = np.stack([truth[u] for u in user_ids])
    cache = TextVectorCache(ds.text_cache_dir, SentenceEncoder())
    observed = observables(ds, user_ids, cache)
    readings = {"observed_traits_linear": read_traits(observed, traits, "ridge", seed)}
    if lgbm:
        readings["observed_traits_lgbm"] = read_traits(observed, traits, "lgbm", seed)
    embedded = {c: embeddings(c, ds, user_ids, [t.query for t in tasks] + [generic_query]) for c in checkpoints}
    embedding_traits = {c: read_traits(standardise(e[:, -1].astype(np.float64)), traits, "ridge", seed)
                        for c, e in embedded.items()}
    per_task: dict[str, dict[str, tuple[float, float]]] = {}
    for i, t in enumerate(progress(tasks, desc="tasks", unit="task")):
        r = np.fromiter((row[u] for u in t.user_ids), np.int64)
        f = stratified_folds(t.labels, fold_count(t.labels, folds), seed)
        per = {"oracle": score(MethodInput(scores=t.prob), t.labels, f, seed),
               "true_traits": score(lr(traits[r]), t.labels, f, seed)}
        per.update({key: score(lr(x[r]), t.labels, f, seed) for key, x in readings.items()})
        for c in checkpoints:
            per[f"embedding:{c}"] = score(lr(embedded[c][r, i]), t.labels, f, seed)
            per[f"embedding_traits:{c}"] = score(lr(embedding_traits[c][r]), t.labels, f, seed)
        per_task[t.name] = per
    rows = list(next(iter(per_task.values())))
    out = {"data": data, "generic_query": generic_query, "checkpoints": checkpoints, "per_task": per_task,
           "rows": {key: task_means(per_task, key) for key in rows},
           "trait_r2": {key: r_squared(x, traits) for key, x in readings.items()}
           | {f"embedding_traits:{c}": r_squared(x, traits) for c, x in embedding_traits.items()}}
    out["decomposition"] = decompose(out["rows"], checkpoints)
    return out


def decompose(rows: dict[str, dict[str, float]], checkpoints: list[str]) -> dict[str, float]:
    """The oracle gap in AUC, taken apart: labels (oracle - true traits), data (true traits - the best reading of the
    observables) and, averaged over the checkpoints, representation (that reading - the embedding)."""
    ceiling = max(v["auc"] for k, v in rows.items() if k.startswith("observed_traits"))
    out = {"labels": rows["oracle"]["auc"] - rows["true_traits"]["auc"], "data": rows["true_traits"]["auc"] - ceiling,
           "observed_ceiling": ceiling}
    if checkpoints:
        embedding = float(np.mean([rows[f"embedding:{c}"]["auc"] for c in checkpoints]))
        out |= {"embedding": embedding, "representation": ceiling - embedding,
                "oracle_gap": rows["oracle"]["auc"] - embedding}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="a synthetic world (`qanchor data synth`)")
    ap.add_argument("--checkpoint", nargs="*", default=[], help="pretrained runs to place in the decomposition")
    ap.add_argument("--generic-query", default="What kind of user is this?")
    ap.add_argument("--no-lgbm", action="store_true", help="skip the LightGBM reading of the traits (half the time)")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="JSON with every task's rows and the traits' R^2")
    args = ap.parse_args(argv)
    quiet_third_party()
    for ckpt in args.checkpoint:  # before the traits' readings: a mistyped one ended the run after them
        if not (resolve_checkpoint_dir(ckpt) / "qanchor.json").is_file():
            ap.error(f"--checkpoint {ckpt}: no checkpoint there (no qanchor.json in it or in its checkpoint/)")
    try:
        result = run(args.data, args.checkpoint, args.generic_query, not args.no_lgbm, args.folds, args.seed)
    except QAnchorError as err:  # a missing dataset, bad data: one line, as the qanchor commands say it
        raise SystemExit(f"error: {err}") from None
    width = max(len(k) for k in result["rows"])
    print(f"{'row':{width}}  {'AUC':>7}  {'KS':>7}  trait R^2 ({' '.join(TRAITS)})")
    for key, v in result["rows"].items():
        r2 = result["trait_r2"].get(key)
        print(f"{key:{width}}  {v['auc']:7.4f}  {v['ks']:7.4f}  " + (" ".join(f"{x:.2f}" for x in r2.values()) if r2 else ""))
    d = result["decomposition"]
    line = f"oracle gap, in AUC: labels {d['labels']:.4f} + data {d['data']:.4f}"
    if "representation" in d:
        line += f" + representation {d['representation']:.4f} = {d['oracle_gap']:.4f} (embedding {d['embedding']:.4f})"
    print(line)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json(result, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
