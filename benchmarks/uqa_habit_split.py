"""Is an interest question testing the habit or the exact numbers? Split `qanchor uqa` answers by their distractors.

An interest-perception option states a habit (the top time of day, the weekend lean, the trend's direction, the top
category) and numbers (shares, counts). A distractor is another user's answer verified *wrong* for this user, which
it can be by its numbers alone while it names the same habit. This script rebuilds the questions of finished
`qanchor uqa` runs (same dataset, held-out share and question seed; every run must have asked the same questions),
and for each interest topic splits them into those whose three distractors all name *another* habit ("habit only")
and the rest, with each row's accuracy on both, pooled over the runs (pretraining seeds).

Example (the README's split, Complete Journey, 3 seeds, about a minute)::

    python benchmarks/uqa_habit_split.py --data data/completejourney \\
        --results results/uqa-seeds/cj-ntp3-prior/uqa-seed0 results/uqa-seeds/cj-ntp3-prior/uqa-seed1 \\
        results/uqa-seeds/cj-ntp3-prior/uqa-seed2
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qanchor.bench.report import markdown_table  # noqa: E402
from qanchor.bench.uqa import Question, asked_record, build_questions, held_out_users, same_asked  # noqa: E402
from qanchor.data.dataset import load_dataset  # noqa: E402
from qanchor.infer.api import QAnchor  # noqa: E402
from qanchor.logs import quiet_third_party  # noqa: E402

# The habit each interest answer states, read from the answer templates of `qanchor.data.userU_topics`
# (tests/bench/test_uqa_habit_split.py checks these against answers the topics generate).
_HABIT = {
    "time_of_day": re.compile(r"^Most active in the (\w+) "),
    "weekend": re.compile(r"(leans towards \w+|spread evenly over the week)"),
    "trend": re.compile(r"^Activity is (\w+):"),
    "categories": re.compile(r"^Top categories: (.+?) \(\d"),
}


def habit(topic: str, answer: str) -> str:
    """The habit an interest answer names (ValueError if the answer is not in the topic's template)."""
    found = _HABIT[topic].search(answer)
    if found is None:
        raise ValueError(f"{topic}: no habit in {answer!r} (the answer template changed?)")
    return found.group(1)


def distractors_sharing_habit(question: Question) -> int:
    """How many distractors name the same habit as the right answer."""
    truth = habit(question.topic, question.options[question.answer])
    return sum(habit(question.topic, o) == truth for i, o in enumerate(question.options) if i != question.answer)


def habit_only(question: Question) -> bool:
    """True when every distractor names another habit than the right answer."""
    return distractors_sharing_habit(question) == 0


def split(questions: list[Question], results: list[dict]) -> dict:
    """Per interest topic: question counts, mean distractors sharing the habit, and each row's accuracy on the
    habit-only questions and the rest (pooled over ``results``, which must have asked ``questions``)."""
    asked = asked_record(questions)
    for k, r in enumerate(results):
        if not same_asked(asked, r.get("asked")):
            raise SystemExit(f"error: results #{k + 1} asked other questions than the rebuilt ones (another dataset, "
                             "holdout share or question seed)")
    rows = [r for r in results[0]["rows"] if all(res["rows"].get(r, {}).get("correct") is not None for res in results)]
    out = {}
    for topic in _HABIT:
        idx = [i for i, q in enumerate(questions) if q.topic == topic]
        if not idx:
            continue
        sharing = np.array([distractors_sharing_habit(questions[i]) for i in idx])
        only = sharing == 0
        entry = {"questions": len(idx), "habit_only": int(only.sum()), "distractors_sharing_habit": float(np.mean(sharing)),
                 "rows": {}}
        for row in rows:
            c = np.array([[res["rows"][row]["correct"][i] for i in idx] for res in results], dtype=float)  # (S, n)
            entry["rows"][row] = {"habit_only": float(c[:, only].mean()) if only.any() else None,
                                  "rest": float(c[:, ~only].mean()) if (~only).any() else None}
        out[topic] = entry
    return out


def table(summary: dict) -> str:
    rows = list(next(iter(summary.values()))["rows"]) if summary else []
    header = ["topic", "questions", "habit only", "distractors naming the right habit (of 3)",
              *[f"{r}: habit only / rest" for r in rows]]
    lines = []
    for topic, e in summary.items():
        cells = [f"{_f(e['rows'][r]['habit_only'])} / {_f(e['rows'][r]['rest'])}" for r in rows]
        lines.append([topic, str(e["questions"]), str(e["habit_only"]), f"{e['distractors_sharing_habit']:.2f}", *cells])
    return markdown_table(header, lines)


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--results", nargs="+", type=Path, required=True, help="finished `qanchor uqa` output dirs")
    args = ap.parse_args(argv)
    quiet_third_party()
    results = [json.loads((d / "results.json").read_text()) for d in args.results]
    run = results[0]["run"]
    ds = load_dataset(args.data)
    cfg = yaml.safe_load(run["config_yaml"])  # the run's resolved UqaConfig: every key is there
    users = held_out_users(ds, run["holdout_fraction"], cfg["max_users"], run["seed"])
    reference = QAnchor.from_pretrained(run["checkpoint"], text_cache_dir=ds.text_cache_dir)  # as `qanchor uqa` does
    questions = build_questions(ds, users, run["seed"], cfg["window_days"],
                                scored_as=lambda text: tuple(reference.option_ids(text, truncate=True)))
    print(table(split(questions, results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
