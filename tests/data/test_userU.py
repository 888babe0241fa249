"""UserU pairs: sources, no look-ahead, future answers recomputed from the data, verification, determinism."""

from __future__ import annotations

import re
import shutil
from collections import Counter
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from qanchor.data.dataset import EventSeq, load_dataset
from qanchor.data.manifest import Manifest
from qanchor.data.schema import USERU_FILE, USERU_SCHEMA, events_table, write_dataset
from qanchor.data.userU import (
    MAX_PER_CATEGORY,
    UserUStats,
    build_userU,
    future_pairs,
    summarize_future,
    uqa_pairs,
)
from qanchor.data.userU_topics import DAY_US, TOPICS, Claim, History, category, verify
from qanchor.data.validate import validate_dataset

WINDOW = 30
_FUTURE_RE = re.compile(r"Next (\d+) days: (.*); (\d+) active days?\.")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".qanchor_cache", USERU_FILE))
    return dst


def _cutoff_us(ds) -> int:
    return int(np.datetime64(ds.manifest.cutoff.replace(tzinfo=None), "us").astype(np.int64))


def _parse_future(answer: str) -> tuple[int, list[tuple[str, str, int]], int]:
    """(window days, [(modality, item, count)], active days) from a future answer."""
    m = _FUTURE_RE.fullmatch(answer)
    assert m, answer
    items = []
    for group in m.group(2).split("; "):
        mod, _, rest = group.partition(": ")
        found = re.findall(r"(.+?) \(x(\d+)\)(?:, |$)", rest)
        assert found, group
        items += [(mod, text, int(k)) for text, k in found]
    return int(m.group(1)), items, int(m.group(3))


@pytest.fixture(scope="module")
def built(tiny_dataset, tmp_path_factory):
    root = _copy(tiny_dataset, tmp_path_factory.mktemp("userU") / "ds")
    stats = build_userU(root, seed=0, progress=False)
    return root, stats, pq.read_table(root / USERU_FILE)


def _rows(table, source: str) -> list[dict]:
    return [r for r in table.to_pylist() if r["source"] == source]


def _check_future_against_data(root: Path, rows: list[dict]) -> None:
    ds = load_dataset(root)
    cutoff_us = _cutoff_us(ds)
    for r in rows:
        c = int(np.datetime64(r["cutoff"].replace(tzinfo=None), "us").astype(np.int64))
        window, items, active = _parse_future(r["answer"])
        assert window == WINDOW and c + WINDOW * DAY_US <= cutoff_us
        events = ds.user(r["user_id"]).events
        in_window = {m: (s.ts >= c) & (s.ts < c + WINDOW * DAY_US) for m, s in events.items()}
        truth = Counter((m, t) for m, s in events.items() for t, keep in zip(s.text, in_window[m]) if keep)
        for mod, text, k in items:
            assert truth[(mod, text)] == k, (r["answer"], mod, text)
        assert max(k for *_, k in items) == max(truth.values())  # the top item is always named
        days = {int(d) for m, s in events.items() for d in s.ts[in_window[m]] // DAY_US}
        assert active == len(days)
        cats = Counter(category(mod, text) for mod, text, _ in items)
        assert max(cats.values()) <= MAX_PER_CATEGORY, r["answer"]


# ------------------------------------------------------------------------------------ tiny dataset
def test_both_sources_written_and_valid(built):
    root, stats, table = built
    assert table.schema.equals(USERU_SCHEMA)
    counts = Counter(table.column("source").to_pylist())
    assert counts["future"] > 0 and counts["uqa"] > 0 and counts["forecast"] > 0
    assert stats.pairs == dict(counts) and stats.total == table.num_rows
    assert stats.users == 40 and stats.users_with_pairs == 39 and stats.dropped_unverified == 0
    assert validate_dataset(root).n_userU_pairs == table.num_rows


def test_no_pair_looks_past_the_cutoff(built):
    root, _, table = built
    cutoff = load_dataset(root).manifest.cutoff
    for r in table.to_pylist():
        assert r["cutoff"] <= cutoff
        assert (r["cutoff"] == cutoff) == (r["source"] == "uqa")
        if r["source"] != "uqa":  # the answered window [c, c + 30 days) ends by the dataset cutoff
            assert r["cutoff"] + timedelta(days=30) <= cutoff


def test_forecast_answers_match_the_events(built):
    """Every activity / modality forecast recounts from the raw events of its window."""
    root, _, table = built
    ds = load_dataset(root)
    checked = 0
    for r in _rows(table, "forecast"):
        events = ds.user(r["user_id"]).events
        lo = int(np.datetime64(r["cutoff"].replace(tzinfo=None), "us").astype(np.int64))
        hi = lo + 30 * DAY_US
        in_window = {m: int(((s.ts >= lo) & (s.ts < hi)).sum()) for m, s in events.items()}
        if r["query"].startswith("Will this user be active"):
            n = sum(in_window.values())
            assert r["answer"].startswith(f"Yes: {n} events on ") if n else r["answer"] == "No: no activity."
            checked += 1
        elif r["query"].startswith("Will this user have ") and r["query"].endswith(" events in the next 30 days?") \
                and " again " not in r["query"] and "first time" not in r["query"]:
            m = r["query"][len("Will this user have "):].split(" events")[0]
            n = in_window.get(m, 0)
            assert r["answer"] == (f"Yes: {n} {m} events." if n else f"No {m} events.")
            checked += 1
    assert checked > 20
    answers = [r["answer"] for r in _rows(table, "forecast")]
    assert 0.2 < np.mean([a.startswith("Yes") for a in answers]) < 0.9  # both answers occur


def test_future_answers_match_the_events(built):
    root, _, table = built
    rows = _rows(table, "future")
    assert len({r["query"] for r in rows}) == 1
    _check_future_against_data(root, rows)


def test_uqa_answers_are_short_varied_and_true(built):
    root, _, table = built
    rows = _rows(table, "uqa")
    assert max(len(r["answer"].split()) for r in rows) < 60
    assert len({r["query"] for r in rows}) > len(TOPICS)  # phrasing varies
    ds = load_dataset(root)
    for r in rows:  # recompute one topic independently of the claims machinery
        m = re.fullmatch(r"(\d+) events? on (\d+) active days? across .*", r["answer"])
        if m:
            events = ds.user(r["user_id"]).events
            ts = np.concatenate([s.ts for s in events.values()])
            assert int(m.group(1)) == len(ts) and int(m.group(2)) == len(np.unique(ts // DAY_US))


def test_user_without_events_gets_no_pairs(built):
    _, _, table = built
    assert "u000" not in set(table.column("user_id").to_pylist())
    h = History({}, 10 * DAY_US)
    assert future_pairs(h, np.random.default_rng(0), 3, WINDOW, 14) == []
    stats = UserUStats()
    assert uqa_pairs(h, np.random.default_rng(0), None, stats) == [] and stats.dropped_unverified == 0


def test_deterministic_for_a_seed(built, tmp_path):
    root, _, table = built
    first = (root / USERU_FILE).read_bytes()
    build_userU(root, seed=0, progress=False)
    assert (root / USERU_FILE).read_bytes() == first
    other = _copy(root, tmp_path / "other")
    build_userU(other, seed=1, progress=False)
    assert not pq.read_table(other / USERU_FILE).equals(table)


# ------------------------------------------------------------------------------------ verification
def _history(root: Path, user_id: str) -> History:
    ds = load_dataset(root)
    extras = {m.name: m.numeric_columns for m in ds.manifest.sequence_modalities}
    return History(ds.user(user_id).events, _cutoff_us(ds), extras)


def test_verify_rejects_wrong_claims(built):
    root, _, _ = built
    h = _history(root, "u002")
    rng = np.random.default_rng(0)
    for name, topic in TOPICS.items():
        qa = topic(h, rng)
        if qa is None:
            continue
        assert verify(qa.claims, h, qa.answer), name
        for i, c in enumerate(qa.claims):
            wrong = replace(c, value=c.value + "x" if isinstance(c.value, str) else c.value + 7)
            assert not verify([*qa.claims[:i], wrong, *qa.claims[i + 1:]], h), (name, wrong)
    assert not verify([], h)
    assert not verify([Claim("no_such_metric", 1)], h)
    assert not verify([Claim("count", 1, "no_such_modality")], h)
    top = TOPICS["favourites"](h, rng).claims[0]
    assert verify([top], h, f"likes {top.value}") and not verify([top], h, "names something else")


class _Generator:
    """A fake LLM: parses the event count from the summary, then tells the truth or lies about it."""

    def __init__(self, lie: int):
        self.lie, self.calls = lie, 0

    def generate(self, user_summary: str, topic: str):
        self.calls += 1
        n = int(re.search(r": (\d+) events?", user_summary).group(1))
        return f"About {topic.split(':')[0]}?", f"{n + self.lie} events.", [Claim("count", n + self.lie)]


@pytest.mark.parametrize("lie", [0, 3])
def test_generator_pairs_are_verified(built, tmp_path, lie):
    root = _copy(built[0], tmp_path / "ds")
    gen = _Generator(lie)
    stats = build_userU(root, seed=0, generator=gen, progress=False)
    assert gen.calls == stats.pairs["uqa"] + stats.dropped_unverified > 0
    if lie:
        assert stats.pairs["uqa"] == 0 and stats.dropped_unverified == gen.calls
        assert set(pq.read_table(root / USERU_FILE).column("source").to_pylist()) == {"future", "forecast"}
    else:
        assert stats.dropped_unverified == 0


# ------------------------------------------------------------------------- diversity, other manifests
def test_diversity_caps_one_category():
    text = ["Opened A"] * 5 + ["Opened B"] * 4 + ["Opened C"] * 3 + ["Installed D"]
    ts = np.arange(len(text), dtype=np.int64) * DAY_US
    h = History({"app": EventSeq(ts, text, np.full(len(text), np.nan, np.float32), np.zeros((len(text), 0)))},
                100 * DAY_US)
    answer = summarize_future(h, 0, 30)
    assert answer == "Next 30 days: app: Opened A (x5), Opened B (x4), Installed D (x1); 13 active days."
    with pytest.raises(AssertionError):
        summarize_future(h, 80 * DAY_US, 30)  # the window would run past the cutoff


def test_any_manifest_path_categories(tmp_path):
    manifest = Manifest.from_dict({"name": "cj", "cutoff": "2020-01-01T00:00:00+00:00", "modalities": [
        {"name": "purchase", "kind": "sequence", "numeric_columns": ["quantity"]}, {"name": "visit"}]})
    rng = np.random.default_rng(0)
    cut = int(np.datetime64("2020-01-01", "us").astype(np.int64))
    products = ["GROCERY / SOFT DRINKS / COLA", "GROCERY / BREAD / RYE", "GROCERY / MILK / WHOLE", "DRUG GM / CANDY / MINTS"]
    cols = {k: [] for k in ("user_id", "modality", "ts", "text", "value", "quantity")}
    for u in range(5):
        for _ in range(60):
            mod = "purchase" if rng.random() < 0.8 else "visit"
            cols["user_id"].append(f"h{u}")
            cols["modality"].append(mod)
            cols["ts"].append(cut - int(rng.integers(1, 120 * 86400)) * 1_000_000)
            cols["text"].append(products[int(rng.integers(4))] if mod == "purchase" else "Store visit")
            cols["value"].append(float(rng.uniform(1, 9)) if mod == "purchase" else None)
            cols["quantity"].append(float(rng.integers(1, 4)) if mod == "purchase" else None)
    root = write_dataset(tmp_path / "cj", manifest, [events_table(manifest, cols)])
    stats = build_userU(root, progress=False)
    assert stats.pairs["future"] > 0 and stats.pairs["uqa"] > 0 and stats.dropped_unverified == 0
    table = pq.read_table(root / USERU_FILE)
    _check_future_against_data(root, _rows(table, "future"))
    answers = " ".join(table.column("answer").to_pylist())
    assert "purchase/grocery" in answers and "quantity appears" in answers


def test_synthetic_users(tmp_path):
    synth = pytest.importorskip("data_tools.synth")
    root = synth.build_synthetic(tmp_path / "syn", n_users=100, seed=3)
    stats = build_userU(root, seed=0, progress=False)
    assert stats.users == 100 and stats.dropped_unverified == 0
    assert stats.pairs["future"] > 100 and stats.pairs["uqa"] > 500
    table = pq.read_table(root / USERU_FILE)
    _check_future_against_data(root, _rows(table, "future")[:150])
    assert validate_dataset(root).n_userU_pairs == table.num_rows
