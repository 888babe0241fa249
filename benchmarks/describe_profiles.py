"""``QAnchor.describe`` on many users: how many statements survive verification, and the time per user.

For each user (held-out users of the checkpoint's recipe when it holds some out, else the first users), the
model answers the profile questions (``qanchor.data.profile``) from the user's cached prefix; a sentence is
kept only when every fact in it recomputes from the user's events. The script re-checks every kept sentence
with the verifier independently of ``describe`` (the count of unverifiable statements kept must be 0), reports
kept / dropped per aspect, the median seconds per user (one user at a time, as ``qanchor describe`` runs),
and writes the profiles with the most kept statements as examples. Example (about a minute on 2 CPU cores)::

    python benchmarks/describe_profiles.py --checkpoint runs/uqa/cj-pretrain --data data/completejourney \\
        --users 100 --out results/describe/cj.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

from qanchor.bench.uqa import held_out_users  # noqa: E402
from qanchor.data.dataset import load_dataset  # noqa: E402
from qanchor.data.profile import ASPECTS, check_sentence  # noqa: E402
from qanchor.data.userU_topics import History  # noqa: E402
from qanchor.infer.api import QAnchor, events_before  # noqa: E402
from qanchor.logs import quiet_third_party  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--users", type=int, default=100)
    p.add_argument("--examples", type=int, default=3)
    p.add_argument("--out", default=None, help="write the summary and the example profiles as JSON here")
    args = p.parse_args(argv)
    quiet_third_party()
    ds = load_dataset(args.data)
    model = QAnchor.from_pretrained(args.checkpoint, text_cache_dir=ds.text_cache_dir)
    fraction = model.run_cfg.train.holdout_users
    ids = held_out_users(ds, fraction, args.users, 0) if fraction > 0 else ds.user_ids[: args.users].tolist()
    cutoff = model.cutoff_us(None)
    extra = {m.name: m.numeric_columns for m in model.manifest.sequence_modalities}
    seconds, profiles, unverified_kept = [], [], 0
    kept_by = dict.fromkeys(ASPECTS, 0)
    model.describe(next(ds.users(ids[:1])))  # warm-up: the first call loads the text encoder and caches
    for record in ds.users(ids):
        start = time.perf_counter()
        profile = model.describe(record)
        seconds.append(time.perf_counter() - start)
        h = History(events_before(record.events, cutoff), cutoff, extra)
        for aspect, (text, ok) in profile.answers.items():
            kept_by[aspect] += ok
            unverified_kept += ok and not check_sentence(aspect, text, h)
        profiles.append(profile)
    statements = len(profiles) * len(ASPECTS)
    kept = sum(len(p.sentences) for p in profiles)
    summary = {
        "checkpoint": args.checkpoint, "data": args.data, "users": len(profiles), "held_out": fraction > 0,
        "statements": statements, "kept": kept, "dropped": statements - kept, "unverifiable_kept": unverified_kept,
        "kept_by_aspect": kept_by, "users_with_a_kept_statement": sum(bool(p.sentences) for p in profiles),
        "median_seconds_per_user": float(np.median(seconds)), "p90_seconds_per_user": float(np.percentile(seconds, 90)),
        "examples": [{"user_id": p.user_id, "profile": p.sentences, "dropped": p.dropped,
                      "answers": {a: {"text": t, "verified": ok} for a, (t, ok) in p.answers.items()}}
                     for p in sorted(profiles, key=lambda p: (-len(p.sentences), p.user_id))[: args.examples]],
    }
    print(f"describe: {summary['users']} users, {kept} of {statements} statements kept ({statements - kept} dropped as "
          f"unverifiable), unverifiable kept: {unverified_kept}; median {summary['median_seconds_per_user']:.3f} s per user")
    print("kept by aspect: " + ", ".join(f"{a} {k}" for a, k in kept_by.items()))
    for ex in summary["examples"]:
        print(f"  {ex['user_id']}: {' '.join(ex['profile']) or '(nothing verified)'} [{ex['dropped']} dropped]")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if unverified_kept == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
