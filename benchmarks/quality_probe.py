"""Cheap diagnostics of what a checkpoint's embedding carries, on the benchmark's own folds and probe.

For every labelled user of a dataset, mean AUC / KS over the tasks (stratified 5-fold, standardise + LR with C
by inner CV: the same ``evaluate_folds`` as ``qanchor bench``) of:

- ``task``: the anchor embedding under each task's own query (``qanchor_task``);
- ``generic``: under one generic query (``qanchor_generic``);
- ``swapped``: each task scored with another task's query (``qanchor_swapped_query``: below ``task`` if the
  query matters);
- ``hidden``: the pre-projection hidden state at ``<|user_emb|>`` under the task query (does the projection
  lose what the LLM holds?);
- ``seen_text_mean``: the mean text vector of exactly the events the model saw (its raw input, no model);
- ``input_profile``: the statistics of the same input (each modality's window statistics: log count, newest and
  oldest age, mean numeric features; the tabular values and missing flags; with ``content_components`` as targets
  also each modality's content components), no model: what the embedding should at least keep.
- ``statistics`` (models with a statistics path): exactly what the wide path reads (each modality's window and
  whole-history statistics, with ``content_use="path"`` its content components, the tabular values), no model.
- ``all_inputs``: every input the embedding is built from side by side (what the wide path reads, the input profile,
  the task query's evidence), no model: a linear read of all the model is given. Wider than the embedding, so not a
  ceiling: the probe pays for its width (on the synthetic world the input profile alone reads more).
- ``peer_rfm``: the ``rfm_lr`` peer's own features (``qanchor bench``'s RFM / count features, signed logs) on the
  same probe: the bar the embedding is measured against.
- ``peer_rfm_widened``: the same features plus columns of pure noise (standard normal, fixed seeds; mean over three
  draws) up to the embedding's width, when the embedding is the wider: what width alone costs this probe at the dataset's label
  budget. If the embedding trails ``peer_rfm`` by about as much as ``peer_rfm_widened`` does, it holds what the
  peer holds and pays only for its extra columns.

Few directions (``top_directions``): the same probe on only the top-k principal directions (k = 1, 2, 4, 8) of
the embedding under each query, fitted on all of the task's users without labels. A full-rank linear probe reads
whatever is linearly there under any query; with k directions it reads only where the embedding puts its main
variation. If the query steers what the embedding emphasises, the task query's few directions score above the
generic and another task's query's.

Asked in other words (``--task-query TASK=QUESTION``): a task's row asks the given question instead of the manifest's,
e.g. the pretraining question closest to the task, to see whether a question the model was trained on steers the
embedding where the task's own wording does not. ``--device cuda`` embeds on a GPU (the probes stay on the CPU).

Geometry: the share of variance on the embedding's top principal component, its correlation with
log(1 + events kept), and the effective rank (a collapsed embedding is one number: the user's activity).
Use of the user: the contrastive loss on pretraining batches as they are, and with the user prefixes
shuffled within each batch (if it barely moves, the model ignores the user). Cosines: one user under two
queries vs two users under one query.

Example::

    python benchmarks/quality_probe.py --checkpoint runs/demo/pretrain --data data/completejourney \\
        --generic-query "What kind of household is this?" --out results/probe/demo.json
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
import torch  # noqa: E402

from qanchor.bench.features import extract_features  # noqa: E402
from qanchor.bench.peers import Classifier, MethodInput, evaluate_folds, stratified_folds  # noqa: E402
from qanchor.bench.tasks import dataset_tasks, fold_count  # noqa: E402
from qanchor.config import LossConfig  # noqa: E402
from qanchor.data.dataset import load_dataset  # noqa: E402
from qanchor.data.io import write_json  # noqa: E402
from qanchor.data.pipeline import batched  # noqa: E402
from qanchor.errors import QAnchorError  # noqa: E402
from qanchor.infer.api import QAnchor  # noqa: E402
from qanchor.logs import quiet_third_party  # noqa: E402
from qanchor.model.prefix_cache import anchor_hidden, encode_prefixes  # noqa: E402
from qanchor.train.pairs import PretrainStream  # noqa: E402
from qanchor.train.pretrain import answer_cache  # noqa: E402

KEYS = ("task", "generic", "swapped", "hidden", "seen_text_mean", "input_profile", "all_inputs", "peer_rfm",
        "peer_rfm_widened")
# With a statistics path (model.statistics_path): the task query's embedding split into its two summands, each
# normalised and probed alone: the projection of the anchor's hidden state, and the path's map of the statistics.
PATH_KEYS = ("deep_part", "path_part")
# ``peer_rfm_widened``: the mean over WIDENING_DRAWS draws of noise columns (one draw moves a small task by +-0.02),
# drawn from WIDENING_SEED, the draw and the task's index.
WIDENING_SEED, WIDENING_DRAWS = 0, 3
TOP_DIRECTIONS = (1, 2, 4, 8)


def _mean(xs) -> float:
    xs = [x for x in xs if x is not None and np.isfinite(x)]
    return float(np.mean(xs)) if xs else float("nan")


@torch.inference_mode()
def embed_all(q: QAnchor, ds, user_ids, queries: list[str], chunk: int = 128):
    """(U, Q, H) hidden, (U, Q, D) embeddings, (U, T) seen-text mean, (U, P) input profile, (U,) events kept, and
    with a statistics path (U, Q, 2, D) the embeddings' two summands before normalisation (projection of the hidden
    state, the path's map of the statistics; None without a path); rows in ``user_ids`` order."""
    suffixes = q.suffixes([(x, None) for x in queries])
    query_vectors = q.query_vectors(queries)  # None without model.query_evidence
    cutoff_us = q.cutoff_us(ds.manifest.cutoff)
    model = q.model
    hid, emb, seen, profile, kept, ids, parts = [], [], [], [], [], [], []
    for records in batched(ds.users(user_ids), chunk):
        packed = q.pack(records, cutoff_us)
        users = q.pipeline.collate(packed).to(q.device)
        profile.append(q.model.user_encoder.profile(users).float().cpu().numpy())
        prefix = encode_prefixes(q.model, users)
        b, r = len(records), len(suffixes)
        h = anchor_hidden(q.model, prefix, torch.arange(b, device=q.device).repeat_interleave(r),
                          [s for _ in range(b) for s in suffixes])
        hid.append(h.view(b, r, -1).float().cpu().numpy())
        stats = q.model.user_statistics(users)
        user_index = torch.arange(b, device=q.device).repeat_interleave(r)
        evidence = model.evidence(users, user_index, None if query_vectors is None else query_vectors.repeat(b, 1))
        deep, wide = model.embedding_parts(h, None if stats is None else stats[user_index], evidence)
        emb.append(torch.nn.functional.normalize((deep if wide is None else deep + wide).float(), dim=-1)
                   .view(b, r, -1).cpu().numpy())
        if wide is not None:
            parts.append(torch.stack([deep.float(), wide.float()], 1).view(b, r, 2, -1).cpu().numpy())
        seen += [q.pipeline.seen_text_mean(p) for p in packed]
        kept += [sum(len(m.text_rows) for m in p.modalities.values()) for p in packed]
        ids += [r.user_id for r in records]
    order = {u: i for i, u in enumerate(ids)}
    idx = [order[u] for u in user_ids]
    return (np.concatenate(hid)[idx], np.concatenate(emb)[idx], np.stack(seen)[idx], np.concatenate(profile)[idx],
            np.asarray(kept)[idx], np.concatenate(parts)[idx] if parts else None)


@torch.inference_mode()
def path_statistics(q: QAnchor, ds, user_ids, chunk: int = 256) -> np.ndarray | None:
    """(U, S) what the statistics path reads of each user (``model.user_statistics``), rows in ``user_ids`` order;
    None without a statistics path."""
    if q.model.statistics_path is None:
        return None
    cutoff_us = q.cutoff_us(ds.manifest.cutoff)
    rows, ids = [], []
    for records in batched(ds.users(user_ids), chunk):
        users = q.pipeline.collate(q.pack(records, cutoff_us)).to(q.device)
        rows.append(q.model.user_statistics(users).float().cpu().numpy())
        ids += [r.user_id for r in records]
    order = {u: i for i, u in enumerate(ids)}
    return np.concatenate(rows)[[order[u] for u in user_ids]]


@torch.inference_mode()
def evidence_rows(q: QAnchor, ds, user_ids, queries: list[str], chunk: int = 128) -> np.ndarray | None:
    """(U, Q, F) the query evidence of each query in each user's kept events (``model.query_evidence``), rows in
    ``user_ids`` order; None for a model without it."""
    query_vectors = q.query_vectors(queries)
    if query_vectors is None:
        return None
    cutoff_us = q.cutoff_us(ds.manifest.cutoff)
    rows, ids = [], []
    for records in batched(ds.users(user_ids), chunk):
        users = q.pipeline.collate(q.pack(records, cutoff_us)).to(q.device)
        b, r = len(records), len(queries)
        index = torch.arange(b, device=q.device).repeat_interleave(r)
        rows.append(q.model.evidence(users, index, query_vectors.repeat(b, 1)).view(b, r, -1).float().cpu().numpy())
        ids += [x.user_id for x in records]
    order = {u: i for i, u in enumerate(ids)}
    return np.concatenate(rows)[[order[u] for u in user_ids]]


def widened(features: np.ndarray, width: int, seed: int) -> np.ndarray:
    """``features`` (n, F) with ``width - F`` columns of standard normal noise appended (none if F >= width)."""
    extra = width - features.shape[1]
    if extra <= 0:
        return features
    noise = np.random.default_rng(seed).standard_normal((len(features), extra)).astype(features.dtype)
    return np.concatenate([features, noise], axis=1)


def widening_seed(task_index: int, draw: int) -> int:
    return WIDENING_SEED + 1000 * draw + task_index


def widened_probe(features: np.ndarray, width: int, labels: np.ndarray, folds, task_index: int) -> tuple[float, float]:
    """Mean AUC and KS of :func:`probe` on ``features`` widened to ``width`` by :data:`WIDENING_DRAWS` noise draws."""
    scores = [probe(widened(features, width, widening_seed(task_index, d)), labels, folds) for d in range(WIDENING_DRAWS)]
    return _mean(a for a, _ in scores), _mean(k for _, k in scores)


def probe(features: np.ndarray, labels: np.ndarray, folds) -> tuple[float, float]:
    r = evaluate_folds(MethodInput(features=features, classifier=Classifier.LR), labels, folds, seed=0)
    return _mean(r.auc), _mean(r.ks)


def top_directions(features: np.ndarray, k: int) -> np.ndarray:
    """``features`` (n, D) projected on their top-``k`` principal directions (centred; no labels involved)."""
    x = features - features.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    return x @ vt[:k].T


def geometry(emb: np.ndarray, kept: np.ndarray) -> dict:
    x = emb - emb.mean(0)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    p = s**2 / (s**2).sum()
    return {"top_pc_share": float(p[0]), "pc1_corr_log_events": float(np.corrcoef(x @ vt[0], np.log1p(kept))[0, 1]),
            "effective_rank": float(np.exp(-(p @ np.log(p + 1e-12))))}


@torch.no_grad()
def use_of_user(q: QAnchor, ds, n_batches: int, batch_size: int = 32, seed: int = 0) -> dict:
    """Contrastive loss on pretraining batches as they are vs with user prefixes permuted within each batch."""
    cfg = q.run_cfg
    stream = PretrainStream(ds, q.pipeline, q.tokenizer, q.model.token_ids, cfg.model, seed=1234 + seed,
                            uqa_fraction=cfg.train.uqa_fraction)
    stream.answer_cache = answer_cache(cfg, ds, 0, False, stream.answers_for_steps(n_batches, batch_size))
    loss_cfg = LossConfig(mode="contrastive", temperature=cfg.loss.temperature, margin=cfg.loss.margin)
    rng = np.random.default_rng(seed)
    real, shuffled = [], []
    for step in range(n_batches):
        batch = stream.batch(step, batch_size).to(q.device)
        real.append(float(q.model(batch, loss_cfg).loss_contrastive))
        ids = stream.pair_ids(step, batch_size)
        packed = stream.pack_pairs(ids)
        batch.users = q.pipeline.collate([packed[j] for j in rng.permutation(batch_size)]).to(q.device)
        shuffled.append(float(q.model(batch, loss_cfg).loss_contrastive))
    return {"contrastive": _mean(real), "contrastive_users_shuffled": _mean(shuffled)}


def run_probe(checkpoint: str, data: str, generic_query: str, folds: int = 5, seed: int = 0, batches: int = 8,
              device: str = "cpu", task_queries: dict[str, str] | None = None) -> dict:
    """``task_queries``: task name -> the question its ``task`` row asks instead of the manifest's (the other rows
    follow: ``swapped`` asks another task's replacement)."""
    ds = load_dataset(data)
    tasks = [t for t in dataset_tasks(ds, [], None, seed) if fold_count(t.labels, folds) >= 2]
    if not tasks:  # (it ended in numpy's "need at least one array to concatenate")
        raise SystemExit(f"{data}: no task has enough positives and negatives for {folds}-fold CV")
    task_queries = task_queries or {}
    unknown = sorted(set(task_queries) - {t.name for t in tasks})
    if unknown:
        raise SystemExit(f"--task-query: unknown task(s) {unknown}; {data} has {[t.name for t in tasks]}")
    asked = [task_queries.get(t.name, t.query) for t in tasks]
    fold_of = {t.name: stratified_folds(t.labels, fold_count(t.labels, folds), seed) for t in tasks}
    user_ids = sorted({u for t in tasks for u in t.user_ids})
    row = {u: i for i, u in enumerate(user_ids)}
    q = QAnchor.from_pretrained(checkpoint, device=device, text_cache_dir=ds.text_cache_dir)
    q.model.eval()
    queries = asked + [generic_query]
    hid, emb, seen, profile, kept, parts = embed_all(q, ds, user_ids, queries)
    statistics = path_statistics(q, ds, user_ids)
    evidence = evidence_rows(q, ds, user_ids, queries)
    peers = extract_features(ds, user_ids, None)
    rfm = peers.rfm_log[peers.rows(user_ids)]
    part_norms = None if parts is None else np.linalg.norm(parts, axis=-1)  # (U, Q, 2)
    unit_parts = None if parts is None else parts / part_norms[..., None].clip(1e-12)
    per = {}
    for i, t in enumerate(tasks):
        r = np.fromiter((row[u] for u in t.user_ids), np.int64)
        # another task's question; none where every task asks the same one (the generic query's column is not one)
        other = next((j for j in [*range(i + 1, len(tasks)), *range(i)] if asked[j] != asked[i]), None)
        f = fold_of[t.name]
        per[t.name] = {"task": probe(emb[r, i], t.labels, f), "generic": probe(emb[r, -1], t.labels, f),
                       "swapped": (float("nan"),) * 2 if other is None else probe(emb[r, other], t.labels, f),
                       "hidden": probe(hid[r, i], t.labels, f),
                       "seen_text_mean": probe(seen[r], t.labels, f), "input_profile": probe(profile[r], t.labels, f),
                       "peer_rfm": probe(rfm[r], t.labels, f),
                       "peer_rfm_widened": widened_probe(rfm[r], emb.shape[-1], t.labels, f, i),
                       "top_directions": {}}
        if unit_parts is not None:
            per[t.name]["deep_part"] = probe(unit_parts[r, i, 0], t.labels, f)
            per[t.name]["path_part"] = probe(unit_parts[r, i, 1], t.labels, f)
        if statistics is not None:  # a statistics path (query evidence alone also makes a wide summand: no statistics)
            per[t.name]["statistics"] = probe(statistics[r], t.labels, f)
        # every input the embedding is built from, read linearly: what the wide path reads, the input profile (the
        # profile loss's targets) and the task query's evidence; an embedding below it loses some of what it is given
        inputs = [x for x in (None if statistics is None else statistics[r], profile[r],
                              None if evidence is None else evidence[r, i]) if x is not None]
        per[t.name]["all_inputs"] = probe(np.concatenate(inputs, axis=1), t.labels, f)
        for name, col in (("task", i), ("generic", -1), *(() if other is None else (("swapped", other),))):
            leading = top_directions(emb[r, col], max(TOP_DIRECTIONS))  # one SVD per query; each k is a prefix
            for k in TOP_DIRECTIONS:
                per[t.name]["top_directions"].setdefault(k, {})[name] = probe(leading[:, :k], t.labels, f)[0]
    out: dict = {"checkpoint": checkpoint, "data": data, "tasks": [t.name for t in tasks],
                 "queries": dict(zip((t.name for t in tasks), asked)),
                 "widths": {"embedding": int(emb.shape[-1]), "peer_rfm": int(rfm.shape[1]),
                            "noise_columns": max(0, int(emb.shape[-1] - rfm.shape[1])),
                            **({} if statistics is None else {"statistics": int(statistics.shape[1])})}}
    for key in KEYS + (PATH_KEYS if parts is not None else ()) + (("statistics",) if statistics is not None else ()):
        out[key] = {"auc": _mean(v[key][0] for v in per.values()), "ks": _mean(v[key][1] for v in per.values())}
    out["top_directions"] = {str(k): {name: _mean(v["top_directions"][k].get(name) for v in per.values())
                                      for name in ("task", "generic", "swapped")} for k in TOP_DIRECTIONS}
    e = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
    out.update(per_task=per, geometry_generic=geometry(emb[:, -1], kept), geometry_task=geometry(emb[:, 0], kept),
               cos_same_user_other_query=float(np.mean(np.sum(e[:, 0] * e[:, -1], -1))),
               cos_other_user_same_query=float(np.mean(np.sum(e[:, 0] * e[np.random.default_rng(0).permutation(len(e)), 0], -1))))
    if part_norms is not None:  # before normalisation: how much of the embedding each summand is
        out["path_to_deep_norm_ratio"] = float(np.mean(part_norms[..., 1] / part_norms[..., 0].clip(1e-12)))
    if batches and (ds.root / "userU.parquet").exists():
        out["use_of_user"] = use_of_user(q, ds, batches)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="checkpoint dir (or pretraining output_dir)")
    ap.add_argument("--data", required=True)
    ap.add_argument("--generic-query", default="What kind of user is this?")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--shuffle-batches", type=int, default=8, help="batches for the shuffled-user contrastive test")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--task-query", action="append", default=[], metavar="TASK=QUESTION",
                    help="ask TASK's row this question instead of the manifest's (repeatable): e.g. the pretraining "
                         "question closest to the task, to see whether a question the model was trained on steers it")
    ap.add_argument("--device", default="cpu", help="where the model embeds (cpu, cuda, cuda:1); the probes run on CPU")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet_third_party()
    start = time.perf_counter()
    task_queries = {}
    for item in args.task_query:
        name, sep, question = item.partition("=")
        if not sep or not name.strip() or not question.strip():
            raise SystemExit(f"--task-query {item!r}: expected TASK=QUESTION")
        task_queries[name.strip()] = question.strip()
    if args.folds < 2:
        ap.error(f"--folds {args.folds}: cross-validation needs at least 2 folds")
    try:
        result = run_probe(args.checkpoint, args.data, args.generic_query, args.folds, batches=args.shuffle_batches,
                           device=args.device, task_queries=task_queries)
    except QAnchorError as err:  # a missing dataset or checkpoint, bad data: one line, as the qanchor commands say it
        raise SystemExit(f"error: {err}") from None
    result["seconds"] = round(time.perf_counter() - start, 1)
    if args.out:  # atomic: quality_seeds.py takes an existing file as a finished probe
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json(result, args.out)
    print(" ".join(f"{k}={result[k]['auc']:.4f}" for k in KEYS) + f"  ks_task={result['task']['ks']:.4f}")
    w = result["widths"]
    print(f"the rfm_lr peer's {w['peer_rfm']} features on this probe {result['peer_rfm']['auc']:.4f}; with "
          f"{w['noise_columns']} noise columns (the embedding's width, {w['embedding']}) {result['peer_rfm_widened']['auc']:.4f}")
    if "path_part" in result:
        print(f"statistics path: task query's projection of the hidden state alone {result['deep_part']['auc']:.4f}, "
              f"the path's part alone {result['path_part']['auc']:.4f}; |path| / |projection| "
              f"{result['path_to_deep_norm_ratio']:.2f}")
    if "statistics" in result:
        print(f"the {w['statistics']} statistics the wide path reads: {result['statistics']['auc']:.4f}")
    print("few directions (task / generic / swapped AUC): " + ", ".join(
        f"k={k} {v['task']:.4f} / {v['generic']:.4f} / {v['swapped']:.4f}" for k, v in result["top_directions"].items()))
    g = result["geometry_generic"]
    print(f"top-PC share {g['top_pc_share']:.3f}, corr(PC1, log events) {g['pc1_corr_log_events']:.2f}, "
          f"effective rank {g['effective_rank']:.2f}; cos(same user, other query) {result['cos_same_user_other_query']:.3f}, "
          f"cos(other user, same query) {result['cos_other_user_same_query']:.3f}")
    if "use_of_user" in result:
        u = result["use_of_user"]
        print(f"contrastive loss {u['contrastive']:.3f}, users shuffled within the batch {u['contrastive_users_shuffled']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
