"""Does a checkpoint forecast better than a linear read of the statistics it is given?

The quality targets a linear probe cannot reach (beat ``rfm_lr`` on Complete Journey, make the query matter) need an
embedding that holds something about a user's future that a linear read of their counts does not. This measures it
directly, on pretraining pairs the checkpoint never trained on, whose window of ``--days`` after the pair's cutoff
is complete: the target is what the user does in that window (per modality: events, active days, distinct texts,
value sum; ``qanchor.data.history.window_stats``, the ``loss.future_weight`` target).

Rows (R^2 on held-out users, 5 folds grouped by user, mean over the targets, each standardised on the fold's
training pairs):

- ``stats_ridge``: ridge regression on the statistics the model reads (each modality token's window and
  whole-history statistics, the tabular values): the linear read;
- ``stats_lgbm``: LightGBM on the same statistics: how much a nonlinear read of the same counts can forecast;
- ``embedding_ridge``: ridge on the anchor embedding under the pair's own question;
- ``stats_embedding_ridge``: ridge on both: what the embedding adds to the linear read (the gap to ``stats_ridge``);
- ``decoder``: the checkpoint's own future decoder (only when it was pretrained with ``loss.future_weight``).

Example (under a minute per checkpoint on 2 idle cores)::

    python benchmarks/forecast_check.py --checkpoint results/future/cj-w1/seed0 --data data/completejourney
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

from qanchor.data.dataset import load_dataset  # noqa: E402
from qanchor.data.io import write_json  # noqa: E402
from qanchor.infer.api import QAnchor  # noqa: E402
from qanchor.logs import quiet_third_party  # noqa: E402
from qanchor.model.prefix_cache import anchor_hidden, encode_prefixes  # noqa: E402
from qanchor.train.pairs import PretrainStream  # noqa: E402

ROWS = ("stats_ridge", "stats_lgbm", "embedding_ridge", "stats_embedding_ridge", "decoder")
_ALPHAS = np.logspace(-2, 4, 13)


def held_out_pairs(stream: PretrainStream, cfg, n: int, seed: int, world: int = 1) -> np.ndarray:
    """Up to ``n`` pair ids with a complete future window that the checkpoint's run (on ``world`` ranks) never
    trained on, ascending (so the stream reads each partition once)."""
    tc = cfg.train
    trained = stream.pair_ids_for_steps(tc.max_steps * tc.grad_accum_steps, tc.batch_size * world)
    free = np.ones(len(stream.user_ids), bool)
    free[trained] = False
    candidates = np.flatnonzero(free & stream.future_complete)
    if not len(candidates):
        raise SystemExit(f"no untrained pair has {stream.future_days} days of data after its cutoff")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(candidates, size=min(n, len(candidates)), replace=False))


@torch.inference_mode()
def pair_features(q: QAnchor, stream: PretrainStream, ids: np.ndarray, chunk: int = 128):
    """(n, S) statistics the model reads, (n, D) embedding under each pair's question, (n, F) future targets and
    (n, F) the future decoder's output in target units (None without a decoder)."""
    enc, model = q.model.user_encoder, q.model
    stats, emb, targets, decoded = [], [], [], []
    for start in range(0, len(ids), chunk):
        part = ids[start : start + chunk]
        users = q.pipeline.collate(stream.pack_pairs(part)).to(q.device)
        parts = [enc.summary_inputs(n, users)[1] for n in enc.sequence_names]
        tabular_from = len(enc.sequence_names) * enc.profile_stats_width
        content = enc.content_components if enc.content_target else 0  # content targets come last
        tabular_to = enc.profile_width() - len(enc.sequence_names) * content
        parts.append(enc.profile(users)[:, tabular_from:tabular_to])  # the tabular values and missing flags, if any
        stats.append(torch.cat(parts, -1).float().cpu().numpy())
        texts = [stream.queries[i] for i in part]
        every = torch.arange(len(part), device=q.device)
        h = anchor_hidden(model, encode_prefixes(model, users), every, q.suffixes([(t, None) for t in texts]))
        e = model.project(h, model.user_statistics(users), model.evidence(users, every, q.query_vectors(texts))).float()
        emb.append(e.cpu().numpy())
        targets.append(stream.future_targets(part)[0].numpy())
        if model.future_decoder is not None:
            d = model.future_decoder
            out = d.linear(e * e.shape[-1] ** 0.5).float() * d.std.float() + d.mean.float()  # back to target units
            decoded.append(out.cpu().numpy())
    return (np.concatenate(stats), np.concatenate(emb), np.concatenate(targets),
            np.concatenate(decoded) if decoded else None)


def _standardise(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, std = train.mean(0), train.std(0)
    std = np.where(std > 1e-9, std, 1.0)
    return (train - mean) / std, (test - mean) / std


def r2(pred: np.ndarray, truth: np.ndarray) -> float:
    """Mean over targets of 1 - SSE / SST (targets without variance on the test users are left out)."""
    pred = np.asarray(pred).reshape(truth.shape)  # a one-target regression predicts a vector
    sst = ((truth - truth.mean(0)) ** 2).sum(0)
    keep = sst > 1e-12
    return float(np.mean(1 - ((pred - truth) ** 2).sum(0)[keep] / sst[keep]))


def evaluate(stats: np.ndarray, emb: np.ndarray, y: np.ndarray, decoded: np.ndarray | None, groups: np.ndarray,
             folds: int = 5, seed: int = 0) -> dict[str, float]:
    from lightgbm import LGBMRegressor
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import GroupKFold

    scores: dict[str, list[float]] = {k: [] for k in ROWS}
    splitter = GroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for train, test in splitter.split(stats, y, groups):
        y_train, y_test = _standardise(y[train], y[test])
        for name, x in (("stats_ridge", stats), ("embedding_ridge", emb), ("stats_embedding_ridge", np.hstack([stats, emb]))):
            x_train, x_test = _standardise(x[train], x[test])
            scores[name].append(r2(RidgeCV(alphas=_ALPHAS).fit(x_train, y_train).predict(x_test), y_test))
        pred = np.column_stack([
            LGBMRegressor(n_estimators=200, learning_rate=0.05, num_leaves=15, min_child_samples=20, random_state=seed,
                          n_jobs=2, deterministic=True, force_col_wise=True,  # as the bench's peers: see lgbm_params
                          verbose=-1).fit(stats[train], y_train[:, j]).predict(stats[test])
            for j in range(y.shape[1])])
        scores["stats_lgbm"].append(r2(pred, y_test))
        if decoded is not None:
            scores["decoder"].append(r2(_standardise(y[train], decoded[test])[1], y_test))
    return {k: float(np.mean(v)) for k, v in scores.items() if v}


def run(checkpoint: str, data: str, days: int, pairs: int, seed: int = 0, world: int = 1) -> dict:
    ds = load_dataset(data)
    q = QAnchor.from_pretrained(checkpoint, text_cache_dir=ds.text_cache_dir)
    q.model.eval()
    cfg = q.run_cfg
    stream = PretrainStream.for_run(ds, q.pipeline, q.tokenizer, q.model.token_ids, cfg, future_days=days)
    ids = held_out_pairs(stream, cfg, pairs, seed, world)
    stats, emb, y, decoded = pair_features(q, stream, ids)
    if decoded is not None and cfg.loss.future_days != days:
        decoded = None  # the decoder forecasts another window
    out = {"checkpoint": checkpoint, "data": data, "days": days, "pairs": int(len(ids)),
           "users": int(len(set(stream.user_ids[ids]))), "targets": int(y.shape[1]), "stats_width": int(stats.shape[1])}
    out.update(evaluate(stats, emb, y, decoded, stream.user_ids[ids].astype(str), seed=seed))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, nargs="+", help="one or more checkpoints (e.g. one per seed)")
    ap.add_argument("--data", required=True)
    ap.add_argument("--days", type=int, default=30, help="the future window (UserU's forecast pairs: 30)")
    ap.add_argument("--pairs", type=int, default=3000, help="held-out pairs to score")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--world", type=int, default=1,
                    help="ranks the checkpoints were pretrained on (their global batches' pairs are left out)")
    ap.add_argument("--out", help="JSON with every checkpoint's rows")
    args = ap.parse_args(argv)
    quiet_third_party()
    torch.manual_seed(0)
    results = [run(c, args.data, args.days, args.pairs, args.seed, args.world) for c in args.checkpoint]
    print(f"R^2 of the next {args.days} days' statistics on held-out users ({results[0]['pairs']} pairs, "
          f"{results[0]['targets']} targets), mean over targets")
    print("| checkpoint | " + " | ".join(ROWS) + " |")
    print("|---" * (len(ROWS) + 1) + "|")
    names = [Path(r["checkpoint"]).name for r in results]
    if len(set(names)) < len(names):  # e.g. .../seed1/steps1500: the parent tells them apart
        names = [f"{Path(r['checkpoint']).parent.name}/{n}" for r, n in zip(results, names)]
    for name, r in zip(names, results):
        print(f"| {name} | " + " | ".join(f"{r[k]:.3f}" if k in r else "-" for k in ROWS) + " |")
    if len(results) > 1:
        cells = []
        for k in ROWS:
            v = [r[k] for r in results if k in r]
            cells.append(f"{np.mean(v):.3f} ± {np.std(v):.3f}" if v else "-")
        print("| mean ± std | " + " | ".join(cells) + " |")
    if args.out:
        write_json({"runs": results}, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
