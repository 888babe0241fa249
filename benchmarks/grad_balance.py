"""How the pretraining losses share one gradient step: per-term gradient norms and the angles between them.

The total loss is ``contrastive + ntp_weight * ntp + profile_weight * profile + future_weight * future +
path_free_weight * path_free`` (the last two only where the recipe sets their weights) and the step clips the *total*
gradient to ``train.grad_clip``. When one term's gradient is much larger than the others', clipping shrinks
every term by the same factor and that term sets the direction: the others learn at a fraction of the
learning rate. When two terms' gradients point against each other (negative cosine) on the shared backbone,
one undoes the other. This script measures both on a checkpoint, on pretraining batches drawn as training
draws them (the same pair mix; a fixed seed of its own), for each parameter group:

- ``backbone`` (the LLM's layers and token embeddings, shared by every term), ``user_encoder``, ``heads``
  (the embedding projection, the answer projection and the profile decoder), and ``all``;
- per term: gradient norm (weights applied, as in the step);
- the total's norm and the clip factor ``min(1, grad_clip / norm)``;
- cosines between the terms' gradients.

Example (about a minute on 2 CPU cores)::

    python benchmarks/grad_balance.py --checkpoint results/uqa-seeds/cj-profile/seed0 \\
        --data data/completejourney --out results/grad/cj-seed0.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from qanchor.data.dataset import load_dataset  # noqa: E402
from qanchor.data.io import atomic_path  # noqa: E402
from qanchor.infer.api import QAnchor  # noqa: E402
from qanchor.logs import quiet_third_party  # noqa: E402
from qanchor.train.pairs import PretrainStream  # noqa: E402
from qanchor.train.pretrain import answer_cache  # noqa: E402

TERMS = ("contrastive", "ntp", "profile", "future", "path_free")
GROUPS = ("backbone", "user_encoder", "heads", "all")


def parameter_groups(model) -> dict[str, list[torch.nn.Parameter]]:
    groups = {"backbone": [], "user_encoder": [], "heads": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        top = name.split(".")[0]
        groups["backbone" if top == "backbone" else "user_encoder" if top == "user_encoder" else "heads"].append(p)
    groups["all"] = [p for ps in groups.values() for p in ps]
    return groups


def gradient_balance(q: QAnchor, ds, batches: int, batch_size: int, seed: int = 0,
                     profile_weight: float | None = None) -> dict:
    """Per batch, the weighted gradient of each loss term per parameter group; means over batches.

    ``profile_weight`` overrides the checkpoint's (to see what another weight would do to the same state)."""
    cfg = q.run_cfg
    model = q.model
    torch.manual_seed(seed)  # the pair stream draws from torch's RNG: each checkpoint sees the same batches
    model.train()  # as in pretraining (the tiny preset has no dropout; a preset with dropout gets its noise)
    weights = {"contrastive": 1.0, "ntp": cfg.loss.ntp_weight,
               "profile": cfg.loss.profile_weight if profile_weight is None else profile_weight,
               "future": cfg.loss.future_weight, "path_free": cfg.loss.path_free_weight}  # every term of the step's total
    if weights["profile"] > 0 and model.profile_decoder is None:
        raise SystemExit("error: this checkpoint has no profile decoder (it was pretrained with loss.profile_weight 0)")
    stream = PretrainStream.for_run(ds, q.pipeline, q.tokenizer, model.token_ids, cfg, seed=4321 + seed)
    stream.answer_cache = answer_cache(cfg, ds, 0, False, stream.answers_for_steps(batches, batch_size))
    groups = parameter_groups(model)
    params = groups["all"]
    index = {id(p): i for i, p in enumerate(params)}
    members = {g: [index[id(p)] for p in ps] for g, ps in groups.items()}
    rows = []
    for step in range(batches):
        out = model(stream.batch(step, batch_size), cfg.loss)
        values = {"contrastive": out.loss_contrastive, "ntp": out.loss_ntp, "profile": out.loss_profile,
                  "future": out.loss_future, "path_free": out.loss_path_free}
        grads = {}  # term -> per-parameter weighted gradient, float64: float32 sums over millions of entries drift
        for term in TERMS:
            if weights[term] == 0 or not values[term].requires_grad:
                continue
            g = torch.autograd.grad(weights[term] * values[term], params, retain_graph=True, allow_unused=True)
            grads[term] = [torch.zeros((), dtype=torch.float64) if x is None else x.double() for x in g]
        names = list(grads)
        row = {"loss_" + t: float(values[t].detach()) for t in TERMS}
        for g, idx in members.items():
            # every norm and cosine of the group from the terms' inner products: ||sum_t g_t||^2 = sum_ab <g_a, g_b>
            dot = {(a, b): sum(float((grads[a][i] * grads[b][i]).sum()) for i in idx) for a in names for b in names}
            for t in names:
                row[f"{g}/{t}"] = dot[t, t] ** 0.5
            row[f"{g}/total"] = max(sum(dot.values()), 0.0) ** 0.5
            for i, a in enumerate(names):
                for b in names[i + 1:]:
                    row[f"{g}/cos({a},{b})"] = dot[a, b] / max(row[f"{g}/{a}"] * row[f"{g}/{b}"], 1e-30)
        clip = cfg.train.grad_clip
        row["clip_factor"] = min(1.0, clip / max(row["all/total"], 1e-12)) if clip > 0 else 1.0
        rows.append(row)
    return {"profile_weight": weights["profile"], "grad_clip": cfg.train.grad_clip, "batches": batches,
            "batch_size": batch_size, "mean": {k: float(np.mean([r[k] for r in rows])) for k in rows[0]},
            "per_batch": rows}


def markdown(results: dict[str, dict]) -> str:
    lines = ["| checkpoint | group | " + " | ".join(f"‖∇ {t}‖" for t in TERMS) + " | ‖∇ total‖ | cos(ntp, profile) "
             "| cos(contrastive, profile) | cos(contrastive, ntp) |", "|---|---|" + "---|" * (len(TERMS) + 4)]
    for name, r in results.items():
        m = r["mean"]
        for g in GROUPS:
            cells = [f"{m[f'{g}/{t}']:.3f}" if f"{g}/{t}" in m else "-" for t in TERMS]
            cos = [f"{m[k]:+.3f}" if k in m else "-" for k in
                   (f"{g}/cos(ntp,profile)", f"{g}/cos(contrastive,profile)", f"{g}/cos(contrastive,ntp)")]
            lines.append(f"| {name} | {g} | " + " | ".join(cells) + f" | {m[f'{g}/total']:.3f} | " + " | ".join(cos) + " |")
    lines.append("")
    lines.append("Clip factor (the share of the step every term keeps): " + ", ".join(
        f"{name} {r['mean']['clip_factor']:.3f}" for name, r in results.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", nargs="+", required=True, help="one or more checkpoints (runs or checkpoint dirs)")
    ap.add_argument("--data", required=True)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--profile-weight", type=float, default=None, help="override the checkpoint's loss.profile_weight")
    ap.add_argument("--out", help="write the results here (JSON)")
    args = ap.parse_args(argv)
    quiet_third_party()
    ds = load_dataset(args.data)
    results = {}
    for ckpt in args.checkpoint:
        q = QAnchor.from_pretrained(ckpt)
        results[ckpt] = gradient_balance(q, ds, args.batches, args.batch_size, profile_weight=args.profile_weight)
    print(markdown(results))
    if args.out:
        with atomic_path(args.out) as tmp:
            tmp.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
