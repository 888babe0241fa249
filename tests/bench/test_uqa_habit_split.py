"""benchmarks/uqa_habit_split.py: reads the habit from every interest answer the topics write, and splits questions."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pytest

from qanchor.bench.uqa import Question
from qanchor.data.dataset import load_dataset
from qanchor.data.userU_topics import TOPICS, History
from tests.helpers import load_benchmark


@pytest.fixture(scope="module")
def hs():
    return load_benchmark("uqa_habit_split")


def test_habit_is_read_from_every_generated_interest_answer(hs, tiny_dataset):
    ds = load_dataset(tiny_dataset)
    cutoff = (ds.manifest.cutoff - ds.manifest.cutoff.replace(year=1970, month=1, day=1)) // timedelta(microseconds=1)
    extras = {m.name: m.numeric_columns for m in ds.manifest.sequence_modalities}
    seen: dict[str, set[str]] = {t: set() for t in ("time_of_day", "weekend", "trend", "categories")}
    for user in ds.user_ids.tolist():
        h = History(ds.user(user).events, cutoff, extras)
        if not len(h.all):
            continue  # `qanchor uqa` asks nothing about a user without events
        for topic in seen:
            qa = TOPICS[topic](h, np.random.default_rng(0))
            if qa is not None:
                seen[topic].add(hs.habit(topic, qa.answer))
    assert all(seen.values()), seen  # every topic answered for some user, each answer parsed
    assert seen["trend"] <= {"rising", "falling", "steady"}
    assert seen["time_of_day"] <= {"night", "morning", "afternoon", "evening"}
    with pytest.raises(ValueError, match="template"):
        hs.habit("trend", "Activity went up.")


def _q(topic: str, options: list[str], answer: int = 0) -> Question:
    return Question("u", "interest", topic, "?", tuple(options), answer, 0)


def test_split_by_whether_a_distractor_names_the_right_habit(hs):
    rising, falling, steady = ("Activity is rising: 2 events in the first half of the history, 5 in the second half.",
                               "Activity is falling: 6 events in the first half of the history, 2 in the second half.",
                               "Activity is steady: 3 events in the first half of the history, 3 in the second half.")
    rising2 = rising.replace("5 in", "9 in")
    questions = [_q("trend", [rising, falling, steady, falling]), _q("trend", [falling, rising, rising2, steady], 1)]
    assert hs.habit_only(questions[0]) and not hs.habit_only(questions[1])
    asked = [{"user_id": "u", "family": "interest", "topic": "trend"}] * 2
    results = [{"asked": asked, "rows": {"qanchor": {"correct": [True, False]}, "random": {"correct": None}}},
               {"asked": asked, "rows": {"qanchor": {"correct": [False, False]}, "random": {"correct": None}}}]
    out = hs.split(questions, results)
    assert out["trend"]["habit_only"] == 1 and out["trend"]["distractors_sharing_habit"] == 0.5
    assert out["trend"]["rows"] == {"qanchor": {"habit_only": 0.5, "rest": 0.0}}  # pooled over the two runs
    assert "| trend | 2 | 1 | 0.50 | 0.500 / 0.000 |" in hs.table(out)
    with pytest.raises(SystemExit, match="other questions"):
        hs.split(questions[:1], results)
