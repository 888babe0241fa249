"""``QAnchor.describe`` on many users: how many statements survive verification, and the time per user.

For each user (held-out users of the checkpoint's recipe when it holds some out, else the first users), the
model answers the profile questions (``qanchor.data.profile``) from the user's cached prefix and ``describe``
keeps the facts that recompute from the user's events. The script re-checks every kept fact by recomputing its
metrics here (``METRICS``, compared to the shown precision), outside ``verify``: the count of unverifiable facts
kept must be 0 (exit 1 otherwise). It reports kept / dropped facts per aspect, the median seconds per user (one
user at a time, as ``qanchor describe`` runs), and the profiles with the most kept facts as examples.
Example (about two minutes on 2 CPU cores)::

    python benchmarks/describe_profiles.py --checkpoint runs/uqa/cj-pretrain --data data/completejourney \\
        --users 100 --out results/describe/cj.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

from qanchor.bench.uqa import held_out_users  # noqa: E402
from qanchor.data.dataset import load_dataset  # noqa: E402
from qanchor.data.io import write_text  # noqa: E402
from qanchor.data.profile import ASPECTS, Fact, facts_of, kept_slots  # noqa: E402
from qanchor.data.userU_topics import METRICS, History  # noqa: E402
from qanchor.infer.api import QAnchor, events_before  # noqa: E402
from qanchor.logs import quiet_third_party  # noqa: E402


def recheck(fact: Fact, h: History) -> bool:
    """Recompute each claim of a kept fact from the events and compare it as it is shown (whole counts exactly,
    percentages to the whole percent, amounts to the last shown digit, names by membership)."""
    for c in fact.claims:
        fn, how = METRICS[c.metric]
        true = fn(h, c.modality, c.arg)
        if how == "member":
            ok = c.value in true
        elif how == "exact":
            ok = float(c.value) == float(true)
        else:
            tol = 0.5 if how == "percent" or abs(true) >= 999.5 else 0.05
            ok = abs(float(c.value) - float(true)) <= tol + 1e-6
        if not ok:
            return False
    return fact.check is None or fact.check(h)


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
    dropped_by = dict.fromkeys(ASPECTS, 0)
    model.describe(next(ds.users(ids[:1])))  # warm-up: the first call loads the text encoder and caches
    for record in ds.users(ids):
        start = time.perf_counter()
        profile = model.describe(record)
        seconds.append(time.perf_counter() - start)
        h = History(events_before(record.events, cutoff), cutoff, extra)
        for aspect, (text, _) in profile.answers.items():
            slots = facts_of(aspect, text, h)
            status = kept_slots(slots, h)  # as describe counts them: a repeated fact is neither kept again nor dropped
            kept = [f for f, held in zip(slots, status) if held]
            kept_by[aspect] += len(kept)
            dropped_by[aspect] += status.count(False)
            unverified_kept += sum(not recheck(f, h) for f in kept)
        profiles.append(profile)
    kept, dropped = sum(p.kept for p in profiles), sum(p.dropped for p in profiles)
    summary = {
        "checkpoint": args.checkpoint, "data": args.data, "users": len(profiles), "held_out": fraction > 0,
        "facts_read": kept + dropped, "kept": kept, "dropped": dropped, "unverifiable_kept": unverified_kept,
        "kept_by_aspect": kept_by, "dropped_by_aspect": dropped_by,
        "users_with_a_kept_fact": sum(bool(p.sentences) for p in profiles),
        "median_seconds_per_user": float(np.median(seconds)), "p90_seconds_per_user": float(np.percentile(seconds, 90)),
        "examples": [{"user_id": p.user_id, "profile": p.sentences, "kept": p.kept, "dropped": p.dropped,
                      "answers": {a: {"generated": t, "kept": k} for a, (t, k) in p.answers.items()}}
                     for p in sorted(profiles, key=lambda p: (-p.kept, p.user_id))[: args.examples]],
    }
    print(f"describe: {summary['users']} users, {kept} facts kept, {dropped} dropped (wrong or unreadable); "
          f"unverifiable kept: {unverified_kept}; users with a kept fact: {summary['users_with_a_kept_fact']}; "
          f"median {summary['median_seconds_per_user']:.3f} s per user")
    print("kept / dropped by aspect: " + ", ".join(f"{a} {kept_by[a]}/{dropped_by[a]}" for a in ASPECTS))
    for ex in summary["examples"]:
        print(f"  {ex['user_id']}: {' '.join(ex['profile']) or '(nothing verified)'} [{ex['kept']} kept, {ex['dropped']} dropped]")
    if args.out:
        write_text(json.dumps(summary, indent=2) + "\n", args.out)
    return 0 if unverified_kept == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
