"""Does a task's question say anything about a user beyond their counts? A model-free check of a dataset.

Two quality targets ask the question to matter (the task query beats the generic one by 0.01 AUC) and the embedding
to beat a logistic regression on counts (``rfm_lr``). Both need the user's events to hold something about the task
that the counts do not, and the question to find it. The model's query evidence (``model.query_evidence``) is the
look-up that finds it: each event's relevance to the question, from the frozen sentence vectors of both,
standardised per modality, summarised per modality (the strongest, the top five, the mean, the share of clearly
relevant events, a soft maximum; :mod:`qanchor.model.query_evidence`). This computes those summaries straight from
the data, no checkpoint, and asks the benchmark's own probe (the folds and logistic regression every LR row uses)
what they add to ``rfm_lr``'s features:

- ``rfm``: ``rfm_lr``'s input (signed-log RFM statistics and counts per modality, the tabular values);
- ``rfm_evidence_kept``: + the task question's evidence in each modality's most recent ``max_events`` events (the
  caps of ``--config``): what the model's query evidence reads;
- ``rfm_evidence_whole``: + the same over every event before the cutoff;
- ``rfm_evidence_generic``: + the generic question's evidence over every event (the control: a question that is
  not about the task; what a question-blind look-up would add);
- ``evidence_whole``: the task question's whole-history evidence alone.

If ``rfm_evidence_whole`` is not above ``rfm``, no look-up of the events by the task's question adds to the counts,
so no model that reads the question that way can make it matter or beat ``rfm_lr`` by it; if it is above
``rfm_evidence_generic``, the task's own words are what find the signal. Each modality's reference (the mean and
covariance of its unit text vectors) is fitted on the tasks' users' events of the same scope, no labels.

Example (about a minute on Complete Journey on 2 idle cores)::

    python benchmarks/evidence_check.py --data data/completejourney --config configs/pretrain/tiny-cj.yaml \\
        --generic-query "What kind of household is this?" --out results/evidence_check/cj.json
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from qanchor.bench.features import extract_features  # noqa: E402
from qanchor.bench.peers import Classifier, MethodInput, evaluate_folds, stratified_folds  # noqa: E402
from qanchor.bench.tasks import dataset_tasks, fold_count  # noqa: E402
from qanchor.config import PretrainConfig, load_config  # noqa: E402
from qanchor.data.dataset import load_dataset  # noqa: E402
from qanchor.data.history import events_before  # noqa: E402
from qanchor.data.io import write_json  # noqa: E402
from qanchor.data.labels import custom_task  # noqa: E402
from qanchor.data.pipeline import check_caps  # noqa: E402
from qanchor.data.text_cache import SentenceEncoder, TextVectorCache  # noqa: E402
from qanchor.errors import ConfigError, QAnchorError  # noqa: E402
from qanchor.logs import progress, quiet_third_party  # noqa: E402
from qanchor.model.query_evidence import EVIDENCE_FEATURES, QueryEvidence  # noqa: E402

ROWS = ("rfm", "rfm_evidence_kept", "rfm_evidence_whole", "rfm_evidence_generic", "evidence_whole")


def user_event_rows(ds, user_ids, cache: TextVectorCache) -> dict[str, dict[str, np.ndarray]]:
    """user -> sequence modality -> the cache rows of the user's events before the cutoff, oldest first (the
    order the model's caps count from: the last ``max_events`` are the kept ones). Texts not yet in the cache are
    encoded in one pass, not one per user."""
    cutoff_us = ds.manifest.cutoff_us
    names = [m.name for m in ds.manifest.sequence_modalities]
    texts: dict[str, dict[str, list[str]]] = {}
    for record in progress(ds.users(user_ids), total=len(user_ids), desc="events", unit="user"):
        seqs = {name: record.events.get(name) for name in names}
        texts[record.user_id] = {name: [] if seq is None else list(events_before(seq, cutoff_us).text)
                                 for name, seq in seqs.items()}
    cache.ensure(sorted({t for by_name in texts.values() for ts in by_name.values() for t in ts}), what="event texts")
    return {u: {name: cache.rows(ts) for name, ts in by_name.items()} for u, by_name in texts.items()}


def scoped(rows: np.ndarray, cap: int | None) -> np.ndarray:
    """The events a scope reads: the most recent ``cap`` (the model's kept events), or all of them (None)."""
    return rows if cap is None else rows[-cap:]


def fit_evidence(names: list[str], vectors: np.ndarray, events: dict[str, dict[str, np.ndarray]],
                 caps: dict[str, int] | None) -> QueryEvidence:
    """A :class:`QueryEvidence` whose per-modality reference is fitted on every listed user's events of the scope
    (``caps`` per modality, or None for the whole history); the feature standardisation stays the identity (the
    probe standardises)."""
    evidence = QueryEvidence(names, vectors.shape[1], embedding_dim=len(names) * len(EVIDENCE_FEATURES))
    for name in names:
        rows = [scoped(by_name[name], None if caps is None else caps[name]) for by_name in events.values()]
        rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        evidence.set_reference(name, torch.from_numpy(vectors[rows]))
    return evidence


@torch.inference_mode()
def evidence_table(evidence: QueryEvidence, vectors: np.ndarray, events: dict[str, dict[str, np.ndarray]],
                   user_ids: list[str], query_vectors: np.ndarray, caps: dict[str, int] | None) -> np.ndarray:
    """(U, Q, M x 7) each user's evidence of each query (``query_vectors`` (Q, T)) in the scope's events, the model's
    own summaries (:meth:`QueryEvidence.features_of`), rows in ``user_ids`` order."""
    queries = torch.from_numpy(query_vectors).float()
    out = np.zeros((len(user_ids), len(queries), evidence.width), np.float32)
    for i, u in enumerate(user_ids):
        per_modality = {}
        for name in evidence.names:
            rows = scoped(events[u][name], None if caps is None else caps[name])
            text = torch.from_numpy(vectors[rows] if len(rows) else np.zeros((1, vectors.shape[1]), np.float32))
            mask = torch.full((1, len(text)), bool(len(rows)))
            per_modality[name] = (text[None].expand(len(queries), -1, -1), mask.expand(len(queries), -1))
        out[i] = evidence.features_of(per_modality, queries).numpy()
    return out


def probe(features: np.ndarray, labels: np.ndarray, folds) -> tuple[float, float]:
    """Mean AUC and KS over the folds of the benchmark's LR probe (NaN read as 0, as ``rfm_lr`` reads them)."""
    r = evaluate_folds(MethodInput(features=features.astype(np.float32), classifier=Classifier.LR), labels, folds, seed=0)
    return float(np.mean(r.auc)), float(np.mean(r.ks))


def compare(rfm: np.ndarray, kept: np.ndarray, whole: np.ndarray, generic: np.ndarray, labels: np.ndarray,
            folds) -> dict[str, tuple[float, float]]:
    """The :data:`ROWS` for one task: (AUC, KS) of the probe on each feature set, rows aligned with ``labels``."""
    return {"rfm": probe(rfm, labels, folds),
            "rfm_evidence_kept": probe(np.hstack([rfm, kept]), labels, folds),
            "rfm_evidence_whole": probe(np.hstack([rfm, whole]), labels, folds),
            "rfm_evidence_generic": probe(np.hstack([rfm, generic]), labels, folds),
            "evidence_whole": probe(whole, labels, folds)}


def run(data: str, config: str | None, generic_query: str, folds: int = 5, seed: int = 0,
        encoder: SentenceEncoder | None = None, labels: str | None = None, query: str | None = None) -> dict:
    """Every task's :data:`ROWS` and their means over tasks; ``config``: the pretrain config whose caps define the
    kept events (None: the built-in data defaults); ``encoder``: the sentence encoder (default: the config's);
    ``labels`` and ``query``: a task of your own (a ``user_id,label`` file, as ``qanchor bench labels=``) instead of
    the dataset's."""
    if (labels is None) != (query is None):
        raise SystemExit("give --labels and --query together (a task of your own), or neither (the dataset's tasks)")
    ds = load_dataset(data)
    cfg = load_config(config, schema=PretrainConfig)
    try:
        check_caps(cfg.data, ds.manifest)  # a cap for a modality the data lacks: the kept scope would be wrong
    except ConfigError as err:
        raise SystemExit(f"{config}: {err}") from None
    chosen = [custom_task(ds, labels, query)] if labels is not None else dataset_tasks(ds, [], None, seed)
    tasks = [t for t in chosen if fold_count(t.labels, folds) >= 2]
    if not tasks:
        raise SystemExit(f"{data}: no task has enough positives and negatives for {folds}-fold CV")
    names = [m.name for m in ds.manifest.sequence_modalities]
    caps = {name: cfg.data.cap(name) for name in names}
    encoder = encoder or SentenceEncoder(cfg.data.text_encoder)
    cache = TextVectorCache(ds.text_cache_dir, encoder)
    user_ids = sorted({u for t in tasks for u in t.user_ids})
    events = user_event_rows(ds, user_ids, cache)
    vectors = cache.vectors
    queries = encoder.encode([t.query for t in tasks] + [generic_query], what="questions")
    row = {u: i for i, u in enumerate(user_ids)}
    kept = evidence_table(fit_evidence(names, vectors, events, caps), vectors, events, user_ids, queries, caps)
    whole = evidence_table(fit_evidence(names, vectors, events, None), vectors, events, user_ids, queries, None)
    peers = extract_features(ds, user_ids, None)
    rfm = peers.rfm_log[peers.rows(user_ids)]
    per = {}
    for i, t in enumerate(progress(tasks, desc="tasks", unit="task")):
        r = np.fromiter((row[u] for u in t.user_ids), np.int64)
        f = stratified_folds(t.labels, fold_count(t.labels, folds), seed)
        per[t.name] = compare(rfm[r], kept[r, i], whole[r, i], whole[r, -1], t.labels, f)
    out = {"data": data, "config": config, "caps": caps, "generic_query": generic_query,
           "queries": {t.name: t.query for t in tasks}, "per_task": per}
    for key in ROWS:
        out[key] = {"auc": float(np.mean([v[key][0] for v in per.values()])),
                    "ks": float(np.mean([v[key][1] for v in per.values()]))}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--config", help="pretrain config whose data.max_events / default_max_events give the kept "
                                     "events (default: the built-in data defaults)")
    ap.add_argument("--generic-query", default="What kind of user is this?")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--labels", help="a user_id,label file: a task of your own, as `qanchor bench labels=` (with --query)")
    ap.add_argument("--query", help="the question of the --labels task")
    ap.add_argument("--out", help="JSON with every task's rows")
    args = ap.parse_args(argv)
    quiet_third_party()
    try:
        result = run(args.data, args.config, args.generic_query, args.folds, args.seed, labels=args.labels,
                     query=args.query)
    except QAnchorError as err:  # bad data, labels or settings: one line, as the qanchor commands say it
        raise SystemExit(f"error: {err}") from None
    width = max(len(n) for n in result["per_task"])
    print(f"{'task':{width}}  " + "  ".join(f"{k:>21}" for k in ROWS))
    for name, rows in [*result["per_task"].items(), ("mean", {k: (result[k]["auc"], result[k]["ks"]) for k in ROWS})]:
        print(f"{name:{width}}  " + "  ".join(f"{rows[k][0]:>21.4f}" for k in ROWS))
    print("AUC per row; KS in --out. Evidence adds to the counts where rfm_evidence_* > rfm; the task's own words "
          "matter where rfm_evidence_whole > rfm_evidence_generic.")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json(result, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
