"""`qanchor uqa` over pretraining seeds: mean and spread per row and family, and each gap with a user bootstrap.

One `qanchor uqa` run is one pretraining seed, and the run-to-run noise of a few-thousand-step CPU pretraining is as
large as the gaps the issue asks for. For each seed this script pretrains the recipe (resumed if the run exists) into
``<root>/seed<k>`` with ``train.seed=<k>``, then runs ``qanchor uqa`` on it into ``<root>/uqa-seed<k>`` (the prior
and TextN rows are retrained there with the same seed). Every seed is asked the same questions (same held-out users,
same question seed), so the summary can pair them:

- per row and family: accuracy per seed, its mean and standard deviation over seeds;
- per row against Q-Anchor: the gap (Q-Anchor minus the row) per family, mean and spread over seeds, and a 95%
  interval for the seed-averaged gap from resampling held-out users (each user's questions move together);
- per row and question topic: the mean and spread over seeds, and the gap to Q-Anchor (a family's accuracy can hide
  a topic at chance behind others far above it);

printed as Markdown and written to ``<root>/summary.md`` and ``<root>/summary.json``. ``--results DIR ...``
summarises finished ``qanchor uqa`` output directories instead of running anything.

Example (Complete Journey, Q-Anchor and the prior, 3 seeds: about 1 h 40 min on 2 idle CPU cores at 6,000 steps)::

    python benchmarks/uqa_seeds.py --data data/completejourney --seeds 0,1,2 --root results/uqa-seeds/cj \\
        --uqa-set "text_events=[]" --uqa-set prior=true
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qanchor.bench.uqa import FAMILIES, same_questions  # noqa: E402
from qanchor.data.dataset import load_dataset  # noqa: E402
from qanchor.data.io import file_sha256, write_json, write_text  # noqa: E402
from qanchor.train.pretrain import legacy_trained_data_id, trained_data_id  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from quality_seeds import _qanchor, absolute_paths, check_reusable  # noqa: E402

# The `make uqa` recipe: users held out of pretraining and a budget at which the next-token tower reads the user.
# `make uqa`'s pretraining (6,000 steps since 2026-12-04; `--set train.max_steps=3000` for the earlier runs).
UQA_PRETRAIN = ["train.holdout_users=0.1", "train.max_steps=6000", "train.log_every=500", "train.save_every=500"]


def _same_questions(results: list[dict], names: list[str]) -> list[dict]:
    try:
        return same_questions(results, names)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None


def summarise(results: list[dict], names: list[str], bootstrap: int = 2000, seed: int = 0) -> dict:
    """Per row x family: accuracy per seed, mean, std; per row: the Q-Anchor gap with a user-bootstrap 95% interval.

    A row missing from some runs (say the prior, retrained for one seed only) is summarised over the runs that have
    it, and its gap to Q-Anchor over the runs that have both.
    """
    asked = _same_questions(results, names)
    family = np.array([a["family"] for a in asked])
    users, user_index = np.unique([a["user_id"] for a in asked], return_inverse=True)
    masks = {f: family == f for f in FAMILIES if (family == f).any()} | {"all": np.ones(len(asked), bool)}
    topic = np.array([a["topic"] for a in asked])
    topic_masks = {t: topic == t for ts in FAMILIES.values() for t in ts if (topic == t).any()}
    rows = list(dict.fromkeys(r for res in results for r, v in res["rows"].items() if v["correct"] is not None))
    have = {r: [i for i, res in enumerate(results) if res["rows"].get(r, {}).get("correct") is not None] for r in rows}
    correct = {r: np.array([results[i]["rows"][r]["correct"] for i in have[r]], dtype=float) for r in rows}  # (S_r, Q)
    out: dict = {"seeds": len(results), "questions": len(asked), "users": len(users),
                 "by_family": {f: int(m.sum()) for f, m in masks.items()},
                 "by_topic": {t: int(m.sum()) for t, m in topic_masks.items()}, "rows": {}, "gaps": {}, "topics": {}}
    for r in rows:
        per_seed = {f: [float(c[m].mean()) for c in correct[r]] for f, m in masks.items()}
        out["rows"][r] = {"seeds": len(have[r]), "runs": [names[i] for i in have[r]],
                          "prompt_tokens": float(np.mean([results[i]["rows"][r]["prompt_tokens"] for i in have[r]])),
                          **{f: {"mean": float(np.mean(v)), "std": float(np.std(v)), "per_seed": v}
                             for f, v in per_seed.items()}}
        by_topic = {t: [float(c[m].mean()) for c in correct[r]] for t, m in topic_masks.items()}
        out["topics"][r] = {t: {"mean": float(np.mean(v)), "std": float(np.std(v)), "per_seed": v}
                            for t, v in by_topic.items()}
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(users), size=(bootstrap, len(users)))  # resampled users, shared by every gap
    weights = np.stack([np.bincount(d, minlength=len(users)) for d in draws])[:, user_index]  # (B, Q)
    for r in rows:
        both = [i for i in have[r] if i in have.get("qanchor", [])]
        if r == "qanchor" or not both:
            continue
        ours = np.array([results[i]["rows"]["qanchor"]["correct"] for i in both], dtype=float)  # (S, Q)
        theirs = np.array([results[i]["rows"][r]["correct"] for i in both], dtype=float)
        diff = (ours - theirs).mean(axis=0)  # (Q,) seed-averaged, paired question by question
        gaps = {"seeds": len(both)}
        for f, m in masks.items():
            per_seed = [float(a[m].mean() - b[m].mean()) for a, b in zip(ours, theirs)]
            w = weights[:, m]
            boot = (w * diff[m]).sum(axis=1) / np.maximum(w.sum(axis=1), 1)
            lo, hi = np.quantile(boot, [0.025, 0.975])
            gaps[f] = {"mean": float(diff[m].mean()), "std_over_seeds": float(np.std(per_seed)),
                       "per_seed": per_seed, "ci95_users": [float(lo), float(hi)]}
        gaps["topics"] = {t: {"mean": float(diff[m].mean()),
                              "per_seed": [float(a[m].mean() - b[m].mean()) for a, b in zip(ours, theirs)]}
                          for t, m in topic_masks.items()}
        out["gaps"][r] = gaps
    return out


def table(summary: dict) -> str:
    fams = list(summary["by_family"])  # the families asked, then "all"
    head = "| row | " + " | ".join(f"{f} (n={summary['by_family'][f]})" for f in fams) + " | prompt tokens |"
    lines = [f"Accuracy, mean ± std over pretraining seeds ({summary['questions']} questions about "
             f"{summary['users']} held-out users):", "", head.replace("| row |", "| row (seeds) |"),
             "|---" * (len(fams) + 2) + "|"]
    for r, v in summary["rows"].items():
        lines.append(f"| {r} ({v['seeds']}) | " + " | ".join(f"{v[f]['mean']:.3f} ± {v[f]['std']:.3f}" for f in fams)
                     + f" | {v['prompt_tokens']:.0f} |")
    if summary["gaps"]:
        lines += ["", "Q-Anchor minus each row, accuracy points: seed-averaged gap [95% interval, users resampled] "
                  "(min .. max over seeds):", "", "| row (seeds) | " + " | ".join(fams) + " |", "|---" * (len(fams) + 1) + "|"]
        for r, g in summary["gaps"].items():
            cells = [f"{100 * g[f]['mean']:+.1f} [{100 * g[f]['ci95_users'][0]:+.1f}, {100 * g[f]['ci95_users'][1]:+.1f}] "
                     f"({100 * min(g[f]['per_seed']):+.1f} .. {100 * max(g[f]['per_seed']):+.1f})" for f in fams]
            lines.append(f"| {r} ({g['seeds']}) | " + " | ".join(cells) + " |")
    if summary.get("topics"):
        family_of = {t: f for f, ts in FAMILIES.items() for t in ts}
        topics = list(summary["by_topic"])
        lines += ["", "Per question topic, accuracy mean ± std over seeds; the last lines: Q-Anchor minus the row, points "
                  "(min .. max over seeds):", "", "| row (seeds) | " + " | ".join(
                      f"{family_of[t]}: {t} (n={summary['by_topic'][t]})" for t in topics) + " |",
                  "|---" * (len(topics) + 1) + "|"]
        for r, v in summary["topics"].items():
            lines.append(f"| {r} ({summary['rows'][r]['seeds']}) | "
                         + " | ".join(f"{v[t]['mean']:.3f} ± {v[t]['std']:.3f}" for t in topics) + " |")
        for r, g in summary["gaps"].items():
            lines.append(f"| Q-Anchor - {r} ({g['seeds']}) | " + " | ".join(
                f"{100 * g['topics'][t]['mean']:+.1f} ({100 * min(g['topics'][t]['per_seed']):+.1f} .. "
                f"{100 * max(g['topics'][t]['per_seed']):+.1f})" for t in topics) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pretrain", default="configs/pretrain/tiny-cj.yaml", help="configs/pretrain/*.yaml")
    ap.add_argument("--uqa", default="configs/uqa/tiny-cj.yaml", help="configs/uqa/*.yaml")
    ap.add_argument("--data", default="data/completejourney")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--root", type=Path, help="where the runs and the summary go")
    ap.add_argument("--set", action="append", default=[], help="key=value pretraining setting (repeatable; after "
                    f"the uqa recipe: {' '.join(UQA_PRETRAIN)})")
    ap.add_argument("--uqa-set", action="append", default=[], help="key=value `qanchor uqa` setting (repeatable)")
    ap.add_argument("--results", nargs="+", type=Path, help="summarise these finished `qanchor uqa` outputs only")
    args = absolute_paths(ap.parse_args(argv), "pretrain", "uqa", "data", "root", "results")
    if args.results:
        dirs = args.results
    else:
        if args.root is None:
            ap.error("give --root (to run the seeds) or --results (to summarise finished runs)")
        dirs = []
        dataset = load_dataset(args.data)
        data_id, older = trained_data_id(dataset), {"data": legacy_trained_data_id(dataset)}
        for seed in [int(s) for s in args.seeds.split(",")]:
            run, out = args.root / f"seed{seed}", args.root / f"uqa-seed{seed}"  # beside the run, not inside it
            # what the seed's result depends on: a result made under other settings is refused, not summarised
            wanted = {"seed": seed, "pretrain_config": file_sha256(args.pretrain), "uqa_config": file_sha256(args.uqa),
                      "set": list(args.set), "uqa_set": list(args.uqa_set), "data": data_id}
            record = out / "results.json.settings.json"
            if (out / "results.json").exists():
                check_reusable(out / "results.json", wanted, also=older)
            else:
                _qanchor("pretrain", "--config", args.pretrain, f"data.path={args.data}", f"output_dir={run}",
                         f"train.seed={seed}", "resume=true", *UQA_PRETRAIN, *args.set)
                _qanchor("uqa", "--config", args.uqa, f"checkpoint={run}", f"data.path={args.data}",
                         f"output_dir={out}", *args.uqa_set)
                write_json(wanted, record)
            dirs.append(out)
    missing = [str(d) for d in dirs if not (d / "results.json").exists()]
    if missing:
        raise SystemExit(f"error: no results.json in {', '.join(missing)}: run `qanchor uqa` there first")
    results = [json.loads((d / "results.json").read_text()) for d in dirs]
    summary = summarise(results, [str(d) for d in dirs])
    text = table(summary)
    print(text)
    if args.root is not None:
        write_json({"results": [str(d) for d in dirs], **summary}, args.root / "summary.json")
        write_text(text + "\n", args.root / "summary.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
