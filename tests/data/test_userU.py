"""UserU pairs: sources, no look-ahead, future answers recomputed from the data, verification, determinism."""

from __future__ import annotations

import re
import shutil
from collections import Counter
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qanchor.config import PretrainConfig, load_config
from qanchor.data.dataset import EventSeq, load_dataset
from qanchor.data.forecast import forecast_pairs
from qanchor.data.manifest import Manifest
from qanchor.data.schema import USERU_FILE, USERU_SCHEMA, events_table, write_dataset
from qanchor.data.userU import (
    MAX_PER_CATEGORY,
    USERU_VERSION,
    UserUStats,
    _write,
    build_userU,
    events_digest,
    future_pairs,
    stale_userU,
    summarize_future,
    uqa_pairs,
)
from qanchor.data.userU_topics import (
    DAY_US,
    SIGNATURE_QUESTIONS,
    TOPICS,
    Claim,
    History,
    ItemAdoption,
    category,
    signature,
    unbacked_numbers,
    verify,
)
from qanchor.data.validate import validate_dataset
from qanchor.errors import OutputError
from qanchor.train.pretrain import preflight

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


def _seq(days: list[float], texts: list[str], values: list[float] | None = None) -> EventSeq:
    n = len(days)
    value = np.full(n, np.nan, np.float32) if values is None else np.asarray(values, np.float32)
    return EventSeq((np.asarray(days) * DAY_US).astype(np.int64), texts, value, np.zeros((n, 0), np.float32))


def test_forecast_questions_depend_on_nothing_after_the_cutoff():
    """Which questions a forecast cutoff gets reads only events before it and the dataset's modalities.

    The user has purchases all along, app events only after the window and values only inside it. Cutting the
    history at the window's end must leave every pair as it was (the old generator drew the modality among the
    user's own, app included only if used some day, and asked the amount question when the window held values),
    a modality the user never used is asked about too, and no amount question is asked of a user without values
    before the cutoff.
    """
    c, w = 60 * DAY_US, WINDOW * DAY_US
    events = {"purchase": _seq([float(d) for d in range(0, 100, 3)], ["GROCERY / BREAD"] * 34,
                               [np.nan] * 20 + [5.0] * 10 + [np.nan] * 4),  # values on days 60-87 only
              "app": _seq([95.0, 96.0], ["Opened Mail"] * 2)}
    full, cut = History(events, 100 * DAY_US), History(events, 100 * DAY_US).before(c + w)
    assert "app" in full.modalities and "app" not in cut.modalities
    modalities, asked = ["purchase", "app", "web"], Counter()
    for seed in range(40):
        pairs = forecast_pairs(full, [c], np.random.default_rng(seed), None, modalities, WINDOW)
        assert pairs == forecast_pairs(cut, [c], np.random.default_rng(seed), None, modalities, WINDOW), seed
        asked.update(q.split(" events in")[0].split()[-1] for _, q, _ in pairs if q.endswith(f"events in the next {WINDOW} days?"))
        assert not any("amounts" in q for _, q, _ in pairs)
    assert set(asked) == set(modalities)  # every modality of the dataset, whether the user has it or not
    app = forecast_pairs(full, [c], np.random.default_rng(1), None, ["app"], WINDOW)
    assert (c, f"Will this user have app events in the next {WINDOW} days?", "No app events.") in app
    valued = {"purchase": _seq([10.0, 70.0], ["GROCERY / BREAD"] * 2, [4.0, 6.0])}
    amount = [a for _, q, a in forecast_pairs(History(valued, 100 * DAY_US), [c], np.random.default_rng(0), None,
                                              ["purchase"], WINDOW) if "amounts" in q]
    assert amount == ["No: 6 after 0."]


def test_forecast_names_only_short_categories_and_sums_amounts_in_float64():
    """A "category" that is a URL or a long search term (a text's first word) made a question longer than the tiny
    presets' query budget, and pretraining refused pairs the user never wrote; amounts summed in float32 lost digits."""
    long_url = "https://shop.example.com/women/shoes/running?size=38&colour=blue"
    events = {"page": _seq([1.0, 2.0, 70.0], [long_url, "Home", "Home"])}
    other = {"page": _seq([1.0, 2.0], ["低风险理财产品推荐和收益率比较分析", "Opened Mail"])}  # one token per character
    adoption = ItemAdoption([History(events, 100 * DAY_US), History(other, 100 * DAY_US)])
    asked = [q for seed in range(30) for _, q, _ in forecast_pairs(History(events, 100 * DAY_US), [60 * DAY_US],
                                                                   np.random.default_rng(seed), adoption, ["page"], WINDOW)]
    assert any("home page events again" in q for q in asked)
    assert not any("https" in q or "低" in q for q in asked)  # each would make a question of over 32 tokens
    assert any("opened page events for the first time" in q for q in asked)  # a short category is asked
    big = np.array([1.7e9, 3.3e9, 9.1e9, 2.9e9, 4.4e9, 7.7e9], np.float32)
    valued = {"bill": _seq([35.0, 45.0, 61.0, 70.0, 80.0, 85.0], ["Rent"] * 6, big.tolist())}
    amount = [a for _, q, a in forecast_pairs(History(valued, 100 * DAY_US), [60 * DAY_US], np.random.default_rng(0),
                                              None, ["bill"], WINDOW) if "amounts" in q]
    after, before = big[2:].astype(np.float64).sum(), big[:2].astype(np.float64).sum()
    assert amount == [f"No: {after:,.0f} after {before:,.0f}."]


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


def test_verify_rejects_an_answer_whose_numbers_its_claims_do_not_back(built):
    """True claims beside an invented answer used to pass: only claimed texts were looked for in the answer."""
    root, _, _ = built
    h = _history(root, "u002")
    n = len(h.all)
    assert verify([Claim("count", n)], h, f"This user logged {n} events.")
    assert not verify([Claim("count", n)], h, f"This user logged {n + 991} events on 300 active days.")
    assert not verify([Claim("count", n)], h, f"{n} events, about 2.5 per week.")  # a rate no claim backs
    fav = TOPICS["favourites"](h, np.random.default_rng(0))
    top = fav.claims[0]
    assert verify(fav.claims, h, fav.answer)
    # a second item with a count that no claim backs
    assert not verify([top], h, f"Most frequent: '{top.value}'; 'CASINO CHIPS' (40 times).")
    assert unbacked_numbers([Claim("count", 1234)], "1,234 events at 06:00-12:00 UTC in app2", ["app2"]) == []
    assert unbacked_numbers([Claim("count", 12)], "12 events, 13 days") == ["13"]
    # signed amounts, an item text that is a number, a column shown with spaces: all backed
    assert unbacked_numbers([Claim("value_sum", -75.0, "bill"), Claim("value_count", 6, "bill")],
                            "Bill amounts total -75.0 over 6 events.", ["bill"]) == []
    assert unbacked_numbers([Claim("value_sum", 75.0, "bill")], "Bill amounts total -75.0.", ["bill"]) == ["-75.0"]
    assert unbacked_numbers([Claim("top_item", "5", "rating"), Claim("item_count", 15, "rating", "5")],
                            "Most frequent: rating '5' (15 times).", ["rating"]) == []
    assert unbacked_numbers([Claim("extra_count", 6, "bill", "tax_2"), Claim("count", 6, "bill"),
                             Claim("extra_sum", 12.0, "bill", "tax_2")],
                            "A tax 2 appears on 6 of 6 bill events, 12.0 in total.", ["bill"]) == []


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


# ------------------------------------------------------------------------------------- categories
@pytest.mark.parametrize(("modality", "text", "expected"), [
    ("purchase", "grocery / cheese / grated cheese / national", "purchase/grocery"),  # a path: its head
    ("coupon", "coupon: grocery / yogurt", "coupon/coupon: grocery"),
    ("spm", "Home > Wealth > Fund detail > Buy", "spm/home"),
    ("app", "Opened Alipay", "app/opened"),  # no structure: the first word
    ("campaign", "campaign type b, 53 days", "campaign/campaign"),  # a trailing quantity is not a kind
    ("rating", "Silent History (1954), drama / documentary", "rating/drama"),  # a title is a name, not a kind
    ("rating", "Galactic Colony (1999), science fiction", "rating/science fiction"),
    ("rating", "American President, The (1995), Comedy|Romance", "rating/comedy"),
])
def test_category_reads_a_names_attributes_not_its_first_word(modality, text, expected):
    assert category(modality, text) == expected


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


# ------------------------------------------------------------------------------------ signature pairs
def _app_history(texts: list[str], cutoff_days: int = 100) -> History:
    ts = np.arange(len(texts), dtype=np.int64) * DAY_US
    n = len(texts)
    return History({"app": EventSeq(ts, texts, np.full(n, np.nan, np.float32), np.zeros((n, 0), np.float32))},
                   cutoff_days * DAY_US)


def test_signature_names_what_few_users_share():
    """tf-idf over users: an item every user has is never named, a rare repeated one comes first, counts are
    recounted, one category holds at most two places, and the answer verifies."""
    h = _app_history(["Opened Mail"] * 9 + ["Opened Chess"] * 3 + ["Installed Go"] * 2 + ["Opened Maps"] * 4
                     + ["Opened Chat"] * 5)
    item_users = {"app": Counter({"Opened Mail": 100, "Opened Chess": 2, "Installed Go": 5, "Opened Maps": 40,
                                  "Opened Chat": 10})}
    qa = signature(h, np.random.default_rng(0), item_users, n_users=100)
    assert qa.question in SIGNATURE_QUESTIONS
    # scores: chess 3*log(101/3)=10.6, chat 5*log(101/11)=11.1, go 2*log(101/6)=5.6, maps 4*log(101/41)=3.6;
    # mail 9*log(101/101)=0 is never named, maps is the third "Opened" item (two per category)
    assert qa.answer == "Distinctive: app: Opened Chat (x5), Opened Chess (x3), Installed Go (x2)."
    assert verify(qa.claims, h, qa.answer)
    assert [c.value for c in qa.claims] == [5, 3, 2] and all(c.metric == "item_count" for c in qa.claims)
    everyone = {"app": Counter({t: 100 for t in set(h.all.text)})}
    assert signature(h, np.random.default_rng(0), everyone, n_users=100) is None


def test_signature_sheds_items_to_fit_the_word_budget():
    texts = [f"Opened app number {i} with a rather long descriptive name" for i in range(6)]
    h = _app_history([t for i, t in enumerate(texts) for _ in range(6 - i)])
    qa = signature(h, np.random.default_rng(0), {"app": Counter()}, n_users=50, max_per_category=6, max_words=25)
    assert len(qa.answer.split()) <= 25 and qa.answer.startswith("Distinctive: app: Opened app number 0 ")
    assert len(qa.claims) == 2 and verify(qa.claims, h, qa.answer)


def test_history_before_an_internal_cutoff():
    h = _app_history(["a", "b", "c", "d"])
    early = h.before(2 * DAY_US)
    assert early.all.text == ["a", "b"] and early.cutoff_us == 2 * DAY_US and len(early.events["app"].extras) == 2
    assert h.before(h.cutoff_us).all.text == h.all.text
    with pytest.raises(ValueError, match="no later"):
        h.before(h.cutoff_us + 1)


def test_item_adoption_counts_only_what_happened_by_each_cutoff():
    """Users per text, users in all and the dataset's categories as of any cutoff: a user counts for a text from its
    first event of it on, and a category exists from the first event of it by anyone."""
    a = History({"app": _seq([1, 2, 5], ["Opened Chess", "Opened Chess", "Installed Go"])}, 100 * DAY_US)
    b = History({"app": _seq([90, 4], ["Played Zebra", "Opened Chess"])}, 100 * DAY_US)  # unsorted on purpose
    adoption = ItemAdoption([a, b, History({}, 100 * DAY_US)])
    days = (1, 2, 4, 5, 100)
    assert [adoption.users_as_of(d * DAY_US)["app"].get("Opened Chess") for d in days] == [0, 1, 1, 2, 2]
    assert [adoption.n_users(d * DAY_US) for d in days] == [0, 1, 1, 2, 2]  # the user without events never counts
    assert adoption.users_as_of(90 * DAY_US)["app"].get("Played Zebra") == 0
    assert adoption.users_as_of(91 * DAY_US)["app"].get("Played Zebra") == 1
    assert adoption.users_as_of(91 * DAY_US)["app"].get("Never seen", 0) == 0
    assert adoption.categories(5 * DAY_US) == {"app": ["app/opened"]}
    assert adoption.categories(100 * DAY_US) == {"app": ["app/installed", "app/opened", "app/played"]}
    lean = ItemAdoption([a, b], per_user=False)  # first times only: the same categories, no per-user counts
    assert all(lean.categories(d * DAY_US) == adoption.categories(d * DAY_US) for d in (1, 3, 6, 91))
    with pytest.raises(ValueError, match="per_user=True"):
        lean.users_as_of(DAY_US)


def test_pairs_at_an_internal_cutoff_ignore_other_users_later_events(tmp_path):
    """Another user's events after a pair's cutoff must not change the pair: before UserU version 4 a category first
    seen after it was asked about ("first time" questions, almost always "No"), and items adopted by others after it
    lost their weight in the user's signature answer."""
    manifest = Manifest.from_dict({"name": "late", "cutoff": "2024-06-30T00:00:00+00:00",
                                   "modalities": [{"name": "bill", "kind": "sequence"}]})
    cut = int(np.datetime64("2024-06-30", "us").astype(np.int64))
    cats = ["Food / a", "Food / b", "Fuel / x", "Books / y", "Travel / z"]

    def build(name: str, late: bool) -> list[dict]:
        rng = np.random.default_rng(0)
        cols = {k: [] for k in ("user_id", "modality", "ts", "text", "value")}

        def add(user: str, ts: int, text: str) -> None:
            for key, v in zip(cols, (user, "bill", ts, text, 1.0)):
                cols[key].append(v)
        for u in "ABC":
            for d in sorted(rng.integers(1, 180, 40)):
                add(u, cut - int(d) * DAY_US, cats[int(rng.integers(len(cats)))])
        for d in (170, 165, 160, 150):
            add("A", cut - d * DAY_US, "Rare shop / corner")
        if late:  # the day before the dataset cutoff: after every internal cutoff of A's
            for u in "BC":
                add(u, cut - DAY_US, "Rare shop / corner")
                add(u, cut - DAY_US // 2, "Zebra club / membership")
        root = write_dataset(tmp_path / name, manifest, [events_table(manifest, cols)])
        build_userU(root, seed=0, progress=False, signature=True)
        rows = pq.read_table(root / USERU_FILE).to_pylist()
        return [r for r in rows if r["user_id"] == "A" and r["cutoff"] < manifest.cutoff]

    early, with_late = build("early", False), build("late", True)
    manifest = Manifest.from_dict({"name": "old", "cutoff": "1960-06-30T00:00:00+00:00",  # cutoffs before 1970 seed too
                                   "modalities": [{"name": "bill", "kind": "sequence"}]})
    cut = int(np.datetime64("1960-06-30", "us").astype(np.int64))
    assert build("old", False)
    assert with_late == early
    sources = Counter(r["source"] for r in early)
    assert sources["forecast"] and sources["signature"]  # both kinds of pair are there to be changed
    assert all("zebra" not in r["query"] for r in with_late)


def test_signature_pairs_in_build(built, tmp_path):
    """signature=True adds verified pairs at the dataset cutoff and at each future cutoff, recounted from the
    events before each pair's own cutoff, and leaves every other source's rows as they were."""
    root, _, table = built
    other = _copy(root, tmp_path / "sig")
    stats = build_userU(other, seed=0, progress=False, signature=True)
    with_sig = pq.read_table(other / USERU_FILE)
    assert [r for r in with_sig.to_pylist() if r["source"] != "signature"] == table.to_pylist()
    rows = _rows(with_sig, "signature")
    assert stats.pairs["signature"] == len(rows) > 0 and stats.dropped_unverified == 0
    ds = load_dataset(other)
    future_cuts = {(r["user_id"], r["cutoff"]) for r in _rows(table, "future")}
    item_users, n_users = Counter(), 0
    for u in ds.users():
        n_users += 1
        item_users.update({(m, t) for m, s in u.events.items() for t in s.text if len(s)})
    for r in rows:
        assert r["cutoff"] == ds.manifest.cutoff or (r["user_id"], r["cutoff"]) in future_cuts
        assert r["query"] in SIGNATURE_QUESTIONS and r["answer"].startswith("Distinctive: ")
        c = int(np.datetime64(r["cutoff"].replace(tzinfo=None), "us").astype(np.int64))
        events = ds.user(r["user_id"]).events
        truth = Counter((m, t) for m, s in events.items() for t, ts in zip(s.text, s.ts) if ts < c)
        items = [(grp.split(": ", 1)[0], text, int(k)) for grp in r["answer"][len("Distinctive: "):-1].split("; ")
                 for text, k in re.findall(r"(.+?) \(x(\d+)\)(?:, |$)", grp.split(": ", 1)[1])]
        assert items, r["answer"]
        for m, text, k in items:
            assert truth[(m, text)] == k, (r["answer"], m, text)
            assert item_users[(m, text)] < n_users  # an item every user has carries no information


def test_an_older_userU_file_says_what_changed_and_how_to_rebuild(built, tmp_path, capsys):
    """A file the generator wrote before its pairs changed is named when pretraining reads it (with the change and the
    command that rebuilds it), and training goes on; a current file or pairs of the user's own are never called stale."""
    root, _, table = built
    meta = pq.read_schema(root / USERU_FILE).metadata
    assert meta[b"qanchor_userU_version"] == str(USERU_VERSION).encode() and stale_userU(root / USERU_FILE) is None
    old = _copy(root, tmp_path / "ds")
    unstamped = {k: v for k, v in meta.items() if k != b"qanchor_userU_version"}  # as written before the stamp
    pq.write_table(table.replace_schema_metadata(unstamped), old / USERU_FILE)
    why = stale_userU(old / USERU_FILE)
    assert why is not None and "carries no UserU version" in why and "version 2: " in why and "rating/horror" in why
    assert f"`qanchor data userU {old}`" in why and str(old / USERU_FILE) in why
    cfg = load_config(str(Path(__file__).resolve().parents[2] / "configs/pretrain/tiny-synth.yaml"),
                      [f"data.path={old}", f"output_dir={tmp_path / 'run'}", "data.max_events={}", "train.batch_size=4"],
                      schema=PretrainConfig)
    capsys.readouterr()
    preflight(cfg)  # a warning line in the run's log, not a refusal: the pairs are still valid training pairs
    assert [line.split(" ", 2)[2] for line in capsys.readouterr().err.splitlines()] == [f"warning: {why}"]
    pq.write_table(table.replace_schema_metadata({**unstamped, b"qanchor_userU_version": b"1"}), old / USERU_FILE)
    stamped = stale_userU(old / USERU_FILE)
    assert stamped is not None and "holds UserU pairs of version 1, before these changes" in stamped
    pq.write_table(table.replace_schema_metadata({}), old / USERU_FILE)  # someone's own pairs: theirs to keep
    assert stale_userU(old / USERU_FILE) is None and stale_userU(tmp_path / "absent.parquet") is None


def test_pairs_built_from_other_events_are_named_when_pretraining_reads_them(built, tmp_path, capsys):
    """The file records what its pairs were computed from: a copy of the dataset (new file times) still matches, and
    after an event file changes pretraining names the file and the rebuild command (a warning: training goes on)."""
    root, _, _ = built
    copy = _copy(root, tmp_path / "ds")
    shutil.copy2(root / USERU_FILE, copy / USERU_FILE)
    assert pq.read_schema(copy / USERU_FILE).metadata[b"qanchor_userU_events"] == events_digest(load_dataset(root)).encode()
    assert stale_userU(copy / USERU_FILE, load_dataset(copy)) is None
    part = sorted((copy / "events").glob("*.parquet"))[0]
    events = pq.read_table(part)
    pq.write_table(events.slice(0, events.num_rows - 1), part)  # one event fewer
    ds = load_dataset(copy)
    why = stale_userU(copy / USERU_FILE, ds)
    assert why is not None and f"{copy / USERU_FILE} holds UserU pairs built from other events than {copy} holds now" in why
    assert f"`qanchor data userU {copy}`" in why and stale_userU(copy / USERU_FILE) is None  # no dataset, no check
    cfg = load_config(str(Path(__file__).resolve().parents[2] / "configs/pretrain/tiny-synth.yaml"),
                      [f"data.path={copy}", f"output_dir={tmp_path / 'run'}", "data.max_events={}", "train.batch_size=4"],
                      schema=PretrainConfig)
    capsys.readouterr()
    preflight(cfg)
    assert [line.split(" ", 2)[2] for line in capsys.readouterr().err.splitlines()] == [f"warning: {why}"]
    preflight(cfg, world=1, rank=1)  # every rank of a distributed run checks; one says it (it was once per process)
    assert capsys.readouterr().err == ""
    build_userU(copy, seed=0, progress=False)  # rebuilt: current again
    assert stale_userU(copy / USERU_FILE, load_dataset(copy)) is None


def test_a_dataset_without_events_gets_no_pairs_and_the_command_does_not_claim_it_wrote_them(tmp_path, capsys):
    import pyarrow as pa

    from qanchor.cli import main

    manifest = Manifest.from_dict({"name": "t", "cutoff": "2024-01-01", "modalities": [{"name": "tabular", "kind": "tabular"}],
                                   "tasks": [{"name": "churn", "domain": "risk", "query": "Will it churn?",
                                              "label_window_days": 30}]})
    root = write_dataset(tmp_path / "tab", manifest, [], pa.table({"user_id": ["a", "b"], "x": [1.0, 2.0]}),
                         {"churn": pa.table({"user_id": ["a", "b"], "label": pa.array([0, 1], pa.int8())})})
    assert main(["data", "userU", str(root), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert not (root / "userU.parquet").exists()
    assert out.startswith("wrote no ") and "no pairs for any of 2 users" in out


def test_own_pairs_are_rebuilt_after_the_cutoff_moves_earlier(built, tmp_path, capsys):
    """The stale-pairs fix the error names works: `qanchor data userU DIR` replaces its own pairs even when they no
    longer fit the dataset (built before its cutoff moved earlier), instead of refusing to load the dataset."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import yaml

    from qanchor.cli import main
    from qanchor.errors import DataValidationError

    root = tmp_path / "ds"
    shutil.copytree(built[0], root, ignore=shutil.ignore_patterns(".qanchor_cache"))
    manifest = yaml.safe_load((root / "manifest.yaml").read_text())
    earlier = load_dataset(root).manifest.cutoff - timedelta(days=20)
    manifest["cutoff"] = earlier.isoformat()
    (root / "manifest.yaml").write_text(yaml.safe_dump(manifest))
    for path in (root / "events").glob("*.parquet"):  # the events of the last 20 days are now the label window
        table = pq.read_table(path)
        pq.write_table(table.filter(pc.less(table.column("ts"), pa.scalar(earlier, table.schema.field("ts").type))), path)
    with pytest.raises(DataValidationError, match=r"pair cutoff lies after the dataset cutoff .*rebuild them with "
                                                  r"`qanchor data userU"):
        validate_dataset(root)
    assert main(["data", "userU", str(root)]) == 0, capsys.readouterr().err
    report = validate_dataset(root)
    cutoffs = pq.read_table(root / USERU_FILE).column("cutoff").cast(pa.int64()).to_numpy()
    assert report.n_userU_pairs > 0 and cutoffs.max() <= _cutoff_us(load_dataset(root))


def test_pairs_of_a_user_the_dataset_lacks_are_refused(built, tmp_path):
    """Hand-made pairs for a user with no events, tabular row or label passed validation, then pretraining stopped on
    a bare KeyError."""
    import pyarrow as pa

    from qanchor.errors import DataValidationError

    root = _copy(built[0], tmp_path / "ds")
    pairs = pq.read_table(built[0] / USERU_FILE)
    ids = pairs.column("user_id").to_pylist()
    ids[3] = ids[3].upper() + " "
    pq.write_table(pairs.set_column(0, "user_id", pa.array(ids, pa.string())).replace_schema_metadata(None),
                   root / USERU_FILE)
    with pytest.raises(DataValidationError, match=rf"userU.parquet, column 'user_id', row 3: user '{re.escape(ids[3])}' "
                                                  r"is not a user of this dataset"):
        validate_dataset(root)


def test_pretraining_a_dataset_without_events_says_what_can_run_instead(tiny_dataset, tmp_path):
    """`data userU` writes no pairs for a dataset without sequence events, and pretraining then told the user to run
    `data userU`: round and round. It now says there is nothing to pretrain on and what can run."""
    import yaml

    from qanchor.errors import DataValidationError

    ds_dir = tmp_path / "ds"
    shutil.copytree(tiny_dataset, ds_dir, ignore=shutil.ignore_patterns(".qanchor_cache", "events"))
    manifest = yaml.safe_load((ds_dir / "manifest.yaml").read_text())
    manifest["modalities"] = [m for m in manifest["modalities"] if m["kind"] == "tabular"]  # tabular features only
    (ds_dir / "manifest.yaml").write_text(yaml.safe_dump(manifest))
    cfg = load_config(str(Path(__file__).resolve().parents[2] / "configs/pretrain/tiny-synth.yaml"),
                      [f"data.path={ds_dir}", f"output_dir={tmp_path / 'run'}", "data.max_events={}"], schema=PretrainConfig)
    with pytest.raises(DataValidationError, match=r"the dataset has no sequence events, so there is nothing to pretrain "
                                                  r"on .*`qanchor bench checkpoint=null data.path="):
        preflight(cfg)


def test_pairs_text_that_is_not_utf8_is_refused_at_the_door(built, tmp_path):
    """Events, tabular and task files were checked for UTF-8, the pairs file not: a bad byte in an answer passed
    validation and every pre-flight check, then ended pretraining in a rank-0 UnicodeDecodeError naming nothing."""
    from qanchor.errors import DataValidationError

    root = tmp_path / "ds"
    shutil.copytree(built[0], root, ignore=shutil.ignore_patterns(".qanchor_cache"))
    table = pq.read_table(root / USERU_FILE)
    raw = table.column("answer").cast(pa.binary()).to_pylist()
    raw[3] = b"caf\xff answer"
    broken = table.set_column(table.schema.get_field_index("answer"), "answer", pa.array(raw, pa.binary()).view(pa.string()))
    pq.write_table(broken, root / USERU_FILE)
    with pytest.raises(DataValidationError, match=r"userU.parquet.*'answer'.*row 3.*not valid UTF-8"):
        validate_dataset(root)


def test_amounts_are_never_added_across_modalities():
    """Forecast's amount question summed every modality's values (a purchase's money with a page's dwell seconds and
    a campaign's days), and the largest-single-amount topic took the largest over them: 10.7% of the synthetic world's
    amount answers and 13.6% of its largest amounts were about another quantity than money. Both now ask of one
    modality, the first in the manifest with values; sums that round alike are shown with the decimals that differ."""
    c = 60 * DAY_US
    events = {"bill": _seq([10.0, 40.0, 70.0], ["Coffee", "Rent", "Coffee"], [3.5, 17.4, 17.25]),
              "spm": _seq([20.0, 65.0, 66.0], ["Home", "Loans", "Loans"], [5.0, 900.0, 800.0])}
    h = History(events, 100 * DAY_US)
    amount = [(q, a) for _, q, a in forecast_pairs(h, [c], np.random.default_rng(0), None, ["bill", "spm"], WINDOW)
              if "amounts" in q]
    # bill: 17.25 in the next 30 days against 17.4 before; with spm's seconds added it read "No: 1,717 after 17"
    assert amount == [(f"Will this user's bill amounts in the next {WINDOW} days be lower than in the previous "
                       f"{WINDOW}?", "Yes: 17.2 after 17.4.")]
    largest = TOPICS["largest"](h, np.random.default_rng(0))
    assert largest.answer.startswith("The largest single bill amount was 17.4 ('Rent', on ")
    assert "bill" in largest.question and verify(largest.claims, h, largest.answer)
    # the same total written another way differs in its float32 bits: equal, not "Yes: 3.3000 after 3.3000."
    same = {"bill": _seq([40.0, 50.0, 70.0], ["Rent", "Rent", "Rent"], [1.1, 2.2, 3.3])}
    assert [a for _, q, a in forecast_pairs(History(same, 100 * DAY_US), [c], np.random.default_rng(0), None, ["bill"],
                                            WINDOW) if "amounts" in q] == ["No: 3 after 3."]
    only_pages = TOPICS["largest"](History({"spm": events["spm"]}, 100 * DAY_US), np.random.default_rng(0))
    assert only_pages.answer.startswith("The largest single spm amount was 900.0 ('Loans', on ")


def test_a_blank_event_text_is_never_named():
    """The validator accepts an empty text: answers named it as an item ("app '' (3 times)") or a category ("app/"),
    and the check passed, since every answer holds the empty string."""
    events = {"app": _seq([1.0, 2.0, 3.0, 70.0, 71.0], ["", " ", "", "", "Opened Mail"]),
              "bill": _seq([5.0, 72.0], ["Coffee", "   "], [2.0, 9.0])}
    h = History(events, 100 * DAY_US)
    rng = np.random.default_rng(0)
    favourites, categories = TOPICS["favourites"](h, rng), TOPICS["categories"](h, rng)
    assert favourites.answer == "Most frequent: app 'Opened Mail' (1 time); bill 'Coffee' (1 time)."
    assert categories.answer == "Top categories: app/opened (1 event), bill/coffee (1 event)."
    assert verify(favourites.claims, h, favourites.answer) and verify(categories.claims, h, categories.answer)
    largest = TOPICS["largest"](h, rng)  # the largest bill amount's text is blank: its amount and day only
    assert re.fullmatch(r"The largest single bill amount was 9\.00 \(on \d{4}-\d\d-\d\d\)\.", largest.answer)
    assert verify(largest.claims, h, largest.answer)
    future = summarize_future(h, 60 * DAY_US, WINDOW)
    assert "''" not in future and "app: Opened Mail (x1)" in future and "3 active days" in future
    assert TOPICS["favourites"](History({"app": _seq([1.0], [""])}, 100 * DAY_US), rng) is None
    # a text whose category has no name ("| drama" reads "rating/") is an item, never a category
    rated = History({"rating": _seq([1.0, 2.0, 3.0], ["| drama", "| drama", "Heat (1995), crime"])}, 100 * DAY_US)
    top = TOPICS["categories"](rated, rng)
    assert top.answer == "Top categories: rating/crime (1 event)." and verify(top.claims, rated, top.answer)
    assert summarize_future(History({"app": _seq([70.0], [""])}, 100 * DAY_US), 60 * DAY_US, WINDOW) is None


def test_pairs_of_the_users_own_put_there_during_the_build_are_kept(built, tmp_path):
    """The build checked for a `userU.parquet` of the user's own only before its work, so one copied in while the pairs
    were built (tens of seconds at Complete Journey's scale) was replaced, or deleted when no user had pairs."""
    root = _copy(built[0], tmp_path / "ds")
    mine = pa.table({"user_id": ["u001"], "cutoff": pa.array([0], pa.timestamp("us", tz="UTC")), "query": ["q?"],
                     "answer": ["a."], "source": ["uqa"]}).replace_schema_metadata({"note": "my own pairs"})

    class WritesOwnPairsMidBuild(_Generator):  # stands in for another process writing the file during the build
        def generate(self, user_summary: str, topic: str):
            if not (root / USERU_FILE).exists():
                pq.write_table(mine, root / USERU_FILE)
            return super().generate(user_summary, topic)

    with pytest.raises(OutputError, match="was not written by `qanchor data userU`"):
        build_userU(root, seed=0, generator=WritesOwnPairsMidBuild(0), progress=False)
    assert pq.read_schema(root / USERU_FILE).metadata == {b"note": b"my own pairs"}
    assert not [p.name for p in root.iterdir() if p.name.startswith(".") and "userU" in p.name]  # no temporary left
    # the no-pairs path deleted the file without looking again
    with pytest.raises(OutputError, match="was not written by `qanchor data userU`"):
        _write(pa.table({"user_id": pa.array([], pa.string())}), root / USERU_FILE, "x")
    assert pq.read_schema(root / USERU_FILE).metadata == {b"note": b"my own pairs"}
