"""Grounded question-answer topics for UserU ``uqa`` pairs, and the claims that check them.

Each topic reads one user's :class:`History` (events before the dataset cutoff, any modality names)
and returns a question, a short English answer and the :class:`Claim` objects behind its numbers and
item names. :func:`verify` recomputes every claim from the events, so an answer from any generator
(the templates here, or an LLM behind ``qanchor.data.userU.QAGenerator``) is kept only when its facts
hold: the paper's reflection step, made mechanical.

Example:
    >>> h = History(user.events, cutoff_us)                              # doctest: +SKIP
    >>> qa = TOPICS["recency"](h, np.random.default_rng(0))             # doctest: +SKIP
    >>> qa.answer                                                        # doctest: +SKIP
    'Last event by modality: bill 3 days ago, app 12 days ago, search today.'
    >>> verify(qa.claims, h, qa.answer)                                  # doctest: +SKIP
    True
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from itertools import compress
from typing import NamedTuple

import numpy as np

from qanchor.data.dataset import EventSeq

__all__ = ["named", "named_category", "BUCKETS", "DAY_US", "Claim", "QA", "History", "METRICS", "SIGNATURE_QUESTIONS", "TOPICS", "TOPIC_BRIEFS",
           "category", "item_groups", "ItemAdoption", "signature", "unbacked_numbers", "verify", "summarize"]

DAY_US = 86_400_000_000
_WEEK_US, _HOUR_US = 7 * DAY_US, 3_600_000_000
_SEP = re.compile(r" / | > |\s*\|\s*")  # path separators: "a / b", "Home > Wealth", "Comedy|Drama"
_FIELD = ", "  # "Midnight Harbour (1987), crime / drama": a name, then its attributes
BUCKETS = (("night", 0, 6), ("morning", 6, 12), ("afternoon", 12, 18), ("evening", 18, 24))


@dataclass(frozen=True)
class Claim:
    """One checkable fact: ``METRICS[metric](history, modality, arg)`` must equal ``value``.

    ``modality`` "" means all modalities together; ``arg`` names the item, category, column, time
    bucket or half the metric is about. Percentages are 0-100.
    """

    metric: str
    value: float | str
    modality: str = ""
    arg: str = ""


class QA(NamedTuple):
    question: str
    answer: str
    claims: list[Claim]


@lru_cache(maxsize=1 << 16)  # texts repeat heavily (merchants, apps) and this runs per event per claim
def category(modality: str, text: str) -> str:
    """``modality/head``: what kind of thing the event is, read from the text's structure alone (so generation,
    verification and serving agree without a vocabulary).

    A text of comma-separated fields names a thing and then its attributes: the category is the first path segment
    (``" / "``, ``" > "``, ``"|"``) of the last field after the first that starts with a letter, since a title is a
    name, not a kind, and a trailing quantity ("53 days") is not a kind either. Any other text's head is the first
    segment of its path, else its first word.

    Example:
        >>> category("rating", "Midnight Harbour (1987), science fiction / drama"), category("purchase", "GROCERY / BREAD")
        ('rating/science fiction', 'purchase/grocery')
        >>> category("campaign", "campaign type b, 53 days"), category("app", "Opened Alipay")
        ('campaign/campaign', 'app/opened')
    """
    attributes = [f.strip() for f in text.split(_FIELD)[1:] if f.strip()[:1].isalpha()]
    if attributes:  # an attribute is short already: its first path segment, however many words
        return f"{modality}/{_SEP.split(attributes[-1], maxsplit=1)[0].strip().lower()}"
    parts = _SEP.split(text, maxsplit=1)
    head = parts[0] if len(parts) > 1 else (text.split() or [""])[0]
    return f"{modality}/{head.strip().lower()}"


def _empty_seq() -> EventSeq:
    return EventSeq(np.zeros(0, np.int64), [], np.zeros(0, np.float32), np.zeros((0, 0), np.float32))


@dataclass
class History:
    """One user's events before ``cutoff_us`` (µs, UTC); ``extra_names`` = each modality's extra columns."""

    events: dict[str, EventSeq]
    cutoff_us: int
    extra_names: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.modalities = [m for m, s in self.events.items() if len(s)]  # manifest order
        seqs = [self.events[m] for m in self.modalities]
        # the merged view serves the "" (all modalities) claims; extras differ in width so stay per modality
        self.all = _empty_seq() if not seqs else EventSeq(
            np.concatenate([s.ts for s in seqs]), [t for s in seqs for t in s.text],
            np.concatenate([s.value for s in seqs]), np.zeros((sum(map(len, seqs)), 0), np.float32))
        if len(self.all) and int(self.all.ts.max()) >= self.cutoff_us:
            raise ValueError("a History must hold only events before its cutoff")

    def seq(self, modality: str = "") -> EventSeq:
        return self.all if not modality else self.events.get(modality) or _empty_seq()

    def before(self, cutoff_us: int) -> History:
        """The same user's events before an earlier ``cutoff_us`` (an internal cutoff)."""
        if cutoff_us > self.cutoff_us:
            raise ValueError("History.before needs a cutoff no later than the history's own")

        def cut(s: EventSeq) -> EventSeq:
            keep = s.ts < cutoff_us
            return s if keep.all() else EventSeq(s.ts[keep], list(compress(s.text, keep)), s.value[keep], s.extras[keep])

        return History({m: cut(s) for m, s in self.events.items()}, cutoff_us, self.extra_names)

    @property
    def weeks(self) -> float:
        """Weeks from the first event to the cutoff, at least one (so rates of new users stay sane)."""
        return max(1.0, (self.cutoff_us - int(self.all.ts.min())) / _WEEK_US) if len(self.all) else 1.0


# --------------------------------------------------------------------------------------- metrics
def named(text: str) -> bool:
    """Whether an answer can name ``text``: a blank one (the validator accepts an empty text) is an event, counted as
    one, but never an item or a category ("app ''", "app/"), which every answer would hold and a check pass."""
    return bool(text.strip())


def named_category(modality: str, text: str) -> str | None:
    """``text``'s :func:`category`, or None where it has no name to give ("| drama" is "rating/", as "" is "app/")."""
    cat = category(modality, text)
    return cat if cat.split("/", 1)[-1].strip() else None


def _top_texts(texts: list[str], k: int) -> list[tuple[str, int]]:
    """Most frequent nameable texts, ties broken by text so that every run picks the same ones."""
    return sorted(Counter(t for t in texts if named(t)).items(), key=lambda kv: (-kv[1], kv[0]))[:k]


def _argmax_set(counter: Counter) -> frozenset:
    top = max(counter.values(), default=0)
    return frozenset(k for k, v in counter.items() if v == top and top > 0)


def _hours(h: History, m: str) -> np.ndarray:
    return (h.seq(m).ts % DAY_US) // _HOUR_US


def _weekend(h: History, m: str) -> np.ndarray:
    return (h.seq(m).ts // DAY_US + 3) % 7 >= 5  # 1970-01-01 was a Thursday (Monday = 0)


def _iso_day(ts_us: int) -> str:
    return datetime.fromtimestamp(int(ts_us) / 1e6, tz=timezone.utc).date().isoformat()


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _pct(part: float, whole: float) -> float:
    return 100.0 * part / whole if whole else math.nan


def _half(h: History, m: str, arg: str) -> int:
    mid = (int(h.all.ts.min()) + h.cutoff_us) // 2 if len(h.all) else h.cutoff_us
    ts = h.seq(m).ts
    return int((ts < mid).sum() if arg == "first" else (ts >= mid).sum())


def _extra(h: History, m: str, col: str) -> np.ndarray:
    names = h.extra_names.get(m, ())
    if col not in names or not len(h.seq(m)):
        return np.zeros(0, np.float32)
    x = h.seq(m).extras[:, names.index(col)]
    return x[np.isfinite(x) & (x != 0)]


def _bucket_counts(h: History, m: str) -> Counter:
    hours = _hours(h, m)
    return Counter({b: int(((hours >= lo) & (hours < hi)).sum()) for b, lo, hi in BUCKETS})


def _max_mask(h: History, m: str) -> np.ndarray:
    v = h.seq(m).value
    return np.isfinite(v) & (v == np.nanmax(v)) if np.isfinite(v).any() else np.zeros(len(v), bool)


Metric = Callable[[History, str, str], "float | frozenset"]
# name -> (recompute, how to compare): exact counts, amounts within rounding, percents within 0.5 points,
# member = the claimed text must be one of the (tied) true answers
METRICS: dict[str, tuple[Metric, str]] = {
    "count": (lambda h, m, a: len(h.seq(m)), "exact"),
    "active_days": (lambda h, m, a: len(np.unique(h.seq(m).ts // DAY_US)), "exact"),
    "n_modalities": (lambda h, m, a: len(h.modalities), "exact"),
    "value_count": (lambda h, m, a: int(np.isfinite(h.seq(m).value).sum()), "exact"),
    "value_sum": (lambda h, m, a: float(np.nansum(h.seq(m).value, dtype=np.float64)), "amount"),
    "value_max": (lambda h, m, a: float(np.nanmax(h.seq(m).value)) if np.isfinite(h.seq(m).value).any()
                  else math.nan, "amount"),
    "value_max_item": (lambda h, m, a: frozenset(t for t, k in zip(h.seq(m).text, _max_mask(h, m)) if k),
                       "member"),
    "value_max_day": (lambda h, m, a: frozenset(_iso_day(t) for t in h.seq(m).ts[_max_mask(h, m)]), "member"),
    "item_count": (lambda h, m, a: sum(t == a for t in h.seq(m).text), "exact"),
    "top_item": (lambda h, m, a: _argmax_set(Counter(t for t in h.seq(m).text if named(t))), "member"),
    "category_count": (lambda h, m, a: sum(category(m, t) == a for t in h.seq(m).text), "exact"),
    "days_since_last": (lambda h, m, a: (h.cutoff_us - int(h.seq(m).ts.max())) // DAY_US if len(h.seq(m))
                        else math.nan, "exact"),
    "per_week": (lambda h, m, a: len(h.seq(m)) / h.weeks, "rate"),
    "weekend_count": (lambda h, m, a: int(_weekend(h, m).sum()), "exact"),
    "weekend_share": (lambda h, m, a: _pct(_weekend(h, m).sum(), len(h.seq(m))), "percent"),
    "hour_share": (lambda h, m, a: _pct(_bucket_counts(h, m)[a], len(h.seq(m))), "percent"),
    "top_hour_bucket": (lambda h, m, a: _argmax_set(_bucket_counts(h, m)), "member"),
    "modality_share": (lambda h, m, a: _pct(len(h.seq(m)), len(h.all)), "percent"),
    "half_count": (_half, "exact"),
    "extra_count": (lambda h, m, a: len(_extra(h, m, a)), "exact"),
    "extra_sum": (lambda h, m, a: float(_extra(h, m, a).sum(dtype=np.float64)), "amount"),
}


def _holds(claimed: float | str, true: float | frozenset, how: str) -> bool:
    if how == "member":
        return isinstance(claimed, str) and claimed in true
    try:  # an external generator may hand back anything
        c, t = float(claimed), float(true)
    except (TypeError, ValueError):
        return False
    if isinstance(claimed, str) or not (math.isfinite(c) and math.isfinite(t)):
        return False
    if how == "exact":
        return c == t
    if how == "percent":
        return abs(c - t) <= 0.5 + 1e-9  # shown as whole percents
    if how == "rate":
        return abs(c - t) <= 0.05 + 1e-6  # per-week rates are shown to 0.1
    # amounts are shown as _amount rounds them (two decimals below 10, one below 1,000, whole numbers from there):
    # off by at most half the last shown digit (a flat 0.05 kept "total 3.49" for a true 3.45)
    return abs(c - t) <= (0.5 if abs(t) >= 1000 else 0.05 if abs(t) >= 10 else 0.005) + 1e-6


def verify(claims: list[Claim], h: History, answer: str | None = None) -> bool:
    """True when ``claims`` is non-empty and each recomputes from ``h``. With ``answer``, the two must also say the same:
    every claimed text (item, bucket) appears in it, and every number it states is one of the claims' values, so an
    answer cannot name counts or amounts its claims do not back (an LLM's true claims beside an invented answer)."""
    if not claims:
        return False  # an answer with nothing to check cannot be called grounded
    for c in claims:
        if not isinstance(c, Claim) or c.metric not in METRICS or (c.modality and c.modality not in h.events):
            return False
        fn, how = METRICS[c.metric]
        if not _holds(c.value, fn(h, c.modality, c.arg), how):
            return False
        if answer is not None and isinstance(c.value, str) and c.value.lower() not in answer.lower():
            return False
    return answer is None or not unbacked_numbers(claims, answer, h.modalities)


_NUMBER = re.compile(r"(?<![\w.])-?\d[\d,]*(?:\.\d+)?")  # signed: refunds and money out are negative amounts
_CLOCK = re.compile(r"\b\d{2}:\d{2}\b")  # the time-of-day buckets' fixed hours ("06:00-12:00 UTC")


def unbacked_numbers(claims: list[Claim], answer: str, modalities: Iterable[str] = ()) -> list[str]:
    """The numbers ``answer`` states that no claim's value backs (as shown: whole counts, rounded amounts, whole
    percents). Digits inside claimed texts (item names, categories, days) and modality names are not numbers the
    answer states; nor are clock times."""
    text = answer.lower()
    named = {str(v).lower() for c in claims if isinstance(c, Claim) for v in (c.value, c.arg) if isinstance(v, str) and v}
    named |= {n.replace("_", " ") for n in named}  # a column "tax_2" is shown as "tax 2"
    for name in sorted(named | {m.lower() for m in modalities}, key=len, reverse=True):
        # whole words only: an item text "5" must not cut "15 times" down to "1 times"
        text = re.sub(rf"(?<!\w){re.escape(name)}(?!\w)", " ", text)
    values = []
    for c in claims:
        try:
            values.append(float(c.value))
        except (TypeError, ValueError):
            continue
    unbacked = []
    for shown in _NUMBER.findall(_CLOCK.sub(" ", text)):
        x = float(shown.replace(",", "").rstrip("."))
        if not any(math.isclose(x, v, rel_tol=1e-9, abs_tol=1e-9) for v in values):
            unbacked.append(shown)
    return unbacked


# ---------------------------------------------------------------------------------------- topics
def _n(k: int, word: str, plural: str | None = None) -> str:
    return f"{k} {word if k == 1 else plural or word + 's'}"


def shown_amount(x: float) -> tuple[str, float]:
    """Round for reading: whole numbers from 1,000, one decimal from 10, else two."""
    nd = 0 if abs(x) >= 1000 else 1 if abs(x) >= 10 else 2
    return f"{x:,.{nd}f}", round(x, nd)


def _ago(days: int) -> str:
    return "today" if days == 0 else f"{_n(days, 'day')} ago"


def _ask(rng: np.random.Generator, templates: tuple[str, ...], **kw: str) -> str:
    return templates[int(rng.integers(len(templates)))].format(**kw)


def _by_count(h: History) -> list[str]:
    return sorted(h.modalities, key=lambda m: (-len(h.seq(m)), h.modalities.index(m)))


def _valued(h: History) -> list[str]:
    counts = {m: int(np.isfinite(h.seq(m).value).sum()) for m in h.modalities}
    return [m for m in sorted(counts, key=lambda m: -counts[m]) if counts[m]]


def _activity(h: History, rng: np.random.Generator) -> QA | None:
    n, d, k = len(h.all), METRICS["active_days"][0](h, "", ""), len(h.modalities)
    q = _ask(rng, ("How active is this user overall?", "How much activity does this user have on record?",
                   "How many events has this user logged, and on how many days?"))
    a = f"{_n(n, 'event')} on {_n(d, 'active day')} across {_n(k, 'modality', 'modalities')} ({', '.join(h.modalities)})."
    return QA(q, a, [Claim("count", n), Claim("active_days", d), Claim("n_modalities", k)])


def _spending(h: History, rng: np.random.Generator) -> QA | None:
    parts, claims = [], []
    for m in _valued(h)[:2]:
        k = METRICS["value_count"][0](h, m, "")
        total, total_v = shown_amount(METRICS["value_sum"][0](h, m, ""))
        parts.append(f"{m} amounts total {total} over {_n(k, 'event')}")
        claims += [Claim("value_sum", total_v, m), Claim("value_count", k, m)]
    q = _ask(rng, ("What do the amounts in this user's history add up to?", "How large are this user's recorded "
                   "amounts in total?", "What is the total value of this user's activity?"))
    return QA(q, _cap("; ".join(parts)) + ".", claims) if parts else None


def _categories(h: History, rng: np.random.Generator) -> QA | None:
    counts = Counter(c for m in h.modalities for t in h.seq(m).text if (c := named_category(m, t)))
    if not counts:
        return None
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
    q = _ask(rng, ("Which categories does this user engage with most?", "What are this user's top categories?",
                   "Where does most of this user's activity fall?"))
    a = "Top categories: " + ", ".join(f"{c} ({_n(k, 'event')})" for c, k in top) + "."
    return QA(q, a, [Claim("category_count", k, c.split("/", 1)[0], c) for c, k in top])


def _recency(h: History, rng: np.random.Generator) -> QA | None:
    last = {m: METRICS["days_since_last"][0](h, m, "") for m in h.modalities}
    mods = sorted(last, key=lambda m: (last[m], h.modalities.index(m)))[:3]
    q = _ask(rng, ("How recently was this user active?", "When did this user last do something in each area?",
                   "How long ago was this user's latest activity?"))
    a = "Last event by modality: " + ", ".join(f"{m} {_ago(last[m])}" for m in mods) + "."
    return QA(q, a, [Claim("days_since_last", last[m], m) for m in mods])


def _frequency(h: History, rng: np.random.Generator) -> QA | None:
    rate = {m: round(len(h.seq(m)) / h.weeks, 1) for m in ["", *_by_count(h)[:3]]}
    q = _ask(rng, ("How often is this user active in a typical week?", "How many events does this user have "
                   "per week?", "What is this user's weekly activity rate?"))
    per = ", ".join(f"{m} {rate[m]:.1f}" for m in list(rate)[1:])
    a = f"About {rate['']:.1f} events per week overall ({per} per week)."
    return QA(q, a, [Claim("per_week", r, m) for m, r in rate.items()])


def _favourites(h: History, rng: np.random.Generator) -> QA | None:
    parts, claims = [], []
    for m in [m for m in _by_count(h) if any(map(named, h.seq(m).text))][:3]:
        text, k = _top_texts(h.seq(m).text, 1)[0]
        parts.append(f"{m} '{text}' ({_n(k, 'time')})")
        claims += [Claim("top_item", text, m), Claim("item_count", k, m, text)]
    if not parts:
        return None
    q = _ask(rng, ("What does this user do most often?", "What is this user's most frequent activity in each area?",
                   "Which items keep coming back in this user's history?"))
    return QA(q, "Most frequent: " + "; ".join(parts) + ".", claims)


def _weekend_topic(h: History, rng: np.random.Generator) -> QA | None:
    n = len(h.all)
    if n < 5:
        return None  # too few events for a habit
    k = int(_weekend(h, "").sum())
    share = round(_pct(k, n))
    lean = "weekends" if share > 100 * 2 / 7 + 10 else "weekdays" if share < 100 * 2 / 7 - 10 else None
    habit = f"this user leans towards {lean}" if lean else "activity is spread evenly over the week"
    q = _ask(rng, ("Is this user more active on weekends or weekdays?", "Does this user have a weekend habit?",
                   "How does this user's activity split between weekdays and weekends?"))
    a = f"{k} of {n} events ({share}%) fall on weekends, so {habit}."
    return QA(q, a, [Claim("weekend_count", k), Claim("count", n), Claim("weekend_share", share)])


def _time_of_day(h: History, rng: np.random.Generator) -> QA | None:
    n = len(h.all)
    if n < 5:
        return None
    counts = _bucket_counts(h, "")
    (b1, k1), (b2, k2) = sorted(counts.items(), key=lambda kv: (-kv[1], [b for b, *_ in BUCKETS].index(kv[0])))[:2]
    hours = {b: f"{lo:02d}:00-{hi:02d}:00" for b, lo, hi in BUCKETS}
    s1, s2 = round(_pct(k1, n)), round(_pct(k2, n))
    q = _ask(rng, ("At what time of day is this user most active?", "Is this user a morning or an evening person?",
                   "When during the day does this user usually act?"))
    a = f"Most active in the {b1} ({hours[b1]} UTC, {s1}% of events)"
    claims = [Claim("top_hour_bucket", b1), Claim("hour_share", s1, "", b1)]
    if k2:
        a, claims = a + f", then the {b2} ({s2}%)", [*claims, Claim("hour_share", s2, "", b2)]
    return QA(q, a + ".", claims)


def _mix(h: History, rng: np.random.Generator) -> QA | None:
    if len(h.modalities) < 2:
        return None
    share = {m: round(_pct(len(h.seq(m)), len(h.all))) for m in _by_count(h)}
    q = _ask(rng, ("How is this user's activity split across modalities?", "Which channels does this user use, "
                   "and how much?", "What is this user's modality mix?"))
    a = ", ".join(f"{m} {s}%" for m, s in share.items()) + " of all events."
    return QA(q, _cap(a), [Claim("modality_share", s, m) for m, s in share.items()])


def _largest(h: History, rng: np.random.Generator) -> QA | None:
    # within one modality, the first in the manifest's order with amounts (a purchase's money, not a page's dwell
    # seconds or a campaign's length in days, which the largest over every modality mixed in): each modality's
    # value has its own unit
    m = next((m for m in h.modalities if np.isfinite(h.seq(m).value).any()), None)
    if m is None:
        return None
    i = int(np.flatnonzero(_max_mask(h, m))[0])
    shown, v = shown_amount(float(h.seq(m).value[i]))
    day = _iso_day(h.seq(m).ts[i])
    text = h.seq(m).text[i]
    q = _ask(rng, ("What was this user's largest single {m} amount?", "What is the biggest single {m} amount for this "
                   "user?", "Which single {m} event of this user carried the highest amount?"), m=m)
    if not named(text):  # nothing to name: the amount and its day
        return QA(q, f"The largest single {m} amount was {shown} (on {day}).", [Claim("value_max", v, m),
                                                                                Claim("value_max_day", day, m)])
    a = f"The largest single {m} amount was {shown} ('{text}', on {day})."
    return QA(q, a, [Claim("value_max", v, m), Claim("value_max_item", text, m), Claim("value_max_day", day, m)])


def _trend(h: History, rng: np.random.Generator) -> QA | None:
    if len(h.all) < 4:
        return None
    first, second = _half(h, "", "first"), _half(h, "", "second")
    word = "rising" if second > 1.25 * first else "falling" if second < 0.8 * first else "steady"
    q = _ask(rng, ("Is this user becoming more or less active?", "How has this user's activity changed over time?",
                   "Is this user's engagement growing or declining?"))
    a = f"Activity is {word}: {_n(first, 'event')} in the first half of the history, {second} in the second half."
    return QA(q, a, [Claim("half_count", first, "", "first"), Claim("half_count", second, "", "second")])


def _extras(h: History, rng: np.random.Generator) -> QA | None:
    found = [(len(_extra(h, m, c)), m, c) for m in h.modalities for c in h.extra_names.get(m, ())]
    found = sorted((f for f in found if f[0]), key=lambda f: -f[0])
    if not found:
        return None
    k, m, col = found[0]
    shown, total = shown_amount(METRICS["extra_sum"][0](h, m, col))
    n = len(h.seq(m))
    q = _ask(rng, ("How often do this user's {m} events carry a {c}?", "How much {c} shows up in this user's {m} "
                   "history?", "Does this user's {m} activity come with a {c}, and how much?"), m=m, c=col.replace("_", " "))
    a = f"A {col.replace('_', ' ')} appears on {k} of {_n(n, m + ' event')}, {shown} in total."
    return QA(q, a, [Claim("extra_count", k, m, col), Claim("count", n, m), Claim("extra_sum", total, m, col)])


TOPICS: dict[str, Callable[[History, np.random.Generator], QA | None]] = {
    "activity": _activity, "spending": _spending, "categories": _categories, "recency": _recency,
    "frequency": _frequency, "favourites": _favourites, "weekend": _weekend_topic, "time_of_day": _time_of_day,
    "mix": _mix, "largest": _largest, "trend": _trend, "extras": _extras,
}
# what an external (LLM) generator is asked to write about, one line per topic
TOPIC_BRIEFS = {
    "activity": "overall activity: number of events and active days", "spending": "totals of recorded amounts",
    "categories": "top categories of events", "recency": "how long ago the user was last active per modality",
    "frequency": "events per week", "favourites": "most frequent item per modality",
    "weekend": "weekend versus weekday habit", "time_of_day": "time-of-day habit (UTC)",
    "mix": "share of events per modality", "largest": "largest single amount",
    "trend": "first half versus second half of the history", "extras": "extra numeric fields such as discounts",
}


def item_groups(items: list[tuple[int, str, int]], modalities: list[str]) -> str:
    """``(modality index, text, count)`` as ``"bill: A (x5), B (x2); app: C (x1)"``: groups in manifest order,
    items in the given order within each group."""
    groups: dict[int, list[str]] = {}
    for i, text, k in sorted(items, key=lambda item: item[0]):  # stable
        groups.setdefault(i, []).append(f"{text} (x{k})")
    return "; ".join(f"{modalities[i]}: {', '.join(texts)}" for i, texts in groups.items())


SIGNATURE_QUESTIONS = ("What sets this user apart from other users?", "What is distinctive about this user's activity?",
                       "Which items characterise this user?")


class _UsersAsOf:
    """How many users had each text of one modality before a cutoff (``.get(text, 0)``, as a Counter answers)."""

    def __init__(self, first_seen: dict[str, np.ndarray], cutoff_us: int):
        self._first_seen, self._cutoff_us = first_seen, cutoff_us

    def get(self, text: str, default: int = 0) -> int:
        times = self._first_seen.get(text)
        return default if times is None else int(np.searchsorted(times, self._cutoff_us, side="left"))


class ItemAdoption:
    """When each user first had each event text, per modality, so that a pair at an internal cutoff counts only
    what had happened by then: how many users had a text (:func:`signature`'s weights) and which categories the
    dataset held (forecast's first-time questions). Counted at the dataset cutoff instead, one user's event after
    the pair's cutoff would change another user's pair (a category first seen later would be asked about, almost
    always answered "No", a shortcut the served cutoff never offers).

    ``per_user=False`` keeps only each text's first time (enough for :meth:`categories`, a fraction of the memory);
    :meth:`users_as_of` then refuses.
    """

    def __init__(self, histories: Iterable[History], per_user: bool = True):
        self.per_user = per_user
        collected: dict[str, dict[str, list[int]]] = {}
        starts: list[int] = []
        for h in histories:
            if len(h.all):
                starts.append(int(h.all.ts.min()))
            for m in h.modalities:
                firsts = _first_times(h.events[m])
                texts = collected.setdefault(m, {})
                for text, t in firsts.items():
                    if per_user:
                        texts.setdefault(text, []).append(t)
                    elif t < texts.get(text, [np.iinfo(np.int64).max])[0]:
                        texts[text] = [t]
        self._first_seen = {m: {text: np.sort(np.asarray(ts, np.int64)) for text, ts in texts.items()}
                            for m, texts in collected.items()}
        self._user_starts = np.sort(np.asarray(starts, np.int64))
        category_first: dict[str, dict[str, int]] = {}
        for m, texts in self._first_seen.items():
            cats = category_first.setdefault(m, {})
            for text, ts in texts.items():
                c = category(m, text)
                cats[c] = min(cats.get(c, int(ts[0])), int(ts[0]))
        self._category_first = {m: dict(sorted(cats.items())) for m, cats in category_first.items()}
        self._firsts_arrays: dict[str, tuple[list[str], np.ndarray]] = {}
        self._index: dict[str, dict[str, int]] = {}

    def n_users(self, cutoff_us: int) -> int:
        """Users with an event before ``cutoff_us``."""
        return int(np.searchsorted(self._user_starts, cutoff_us, side="left"))

    def users_as_of(self, cutoff_us: int) -> dict[str, _UsersAsOf]:
        """Per modality, how many users had each text before ``cutoff_us`` (:func:`signature`'s ``item_users``)."""
        if not self.per_user:
            raise ValueError("ItemAdoption(per_user=False) keeps no per-user times; build it with per_user=True")
        return {m: _UsersAsOf(texts, cutoff_us) for m, texts in self._first_seen.items()}

    def categories(self, cutoff_us: int) -> dict[str, list[str]]:
        """Per modality, the categories (``category(m, text)``) some user had before ``cutoff_us``, sorted."""
        return {m: [c for c, t in cats.items() if t < cutoff_us] for m, cats in self._category_first.items()}

    def category_firsts(self, modality: str) -> tuple[list[str], np.ndarray]:
        """``modality``'s categories, sorted, and when some user first had each (int64 microseconds): what
        :meth:`categories` filters, as arrays a caller asking at many cutoffs can mask at once."""
        if modality not in self._firsts_arrays:
            cats = self._category_first.get(modality, {})
            self._firsts_arrays[modality] = (list(cats), np.fromiter(cats.values(), np.int64, count=len(cats)))
        return self._firsts_arrays[modality]

    def category_index(self, modality: str) -> dict[str, int]:
        """Each of ``modality``'s categories -> its position in :meth:`category_firsts`."""
        if modality not in self._index:
            self._index[modality] = {c: i for i, c in enumerate(self.category_firsts(modality)[0])}
        return self._index[modality]


def _first_times(seq: EventSeq) -> dict[str, int]:
    """Each distinct text's earliest timestamp in one sequence."""
    first: dict[str, int] = {}
    for text, t in zip(seq.text, seq.ts.tolist()):
        if t < first.get(text, t + 1):
            first[text] = t
    return first


def signature(h: History, rng: np.random.Generator, item_users: Mapping[str, Mapping[str, int]], n_users: int,
              max_items: int = 6, max_per_category: int = 2, max_words: int = 55) -> QA | None:
    """What tells this user apart: the items it repeats that few other users have.

    Each distinct text scores ``count x log((1 + n_users) / (1 + users with it))`` (tf-idf over users), so an
    item every user has scores 0 and is never named. At most ``max_per_category`` items of one category, then
    items are shed (lowest score first) until the answer fits ``max_words``. Every other topic asks about
    amounts, times and counts, which an activity level largely answers; this one can only be told apart from
    another user's answer by what the user's events are about, which is what scenario tasks hinge on.
    None when nothing scores above 0. ``item_users``: per modality, how many users had each text and ``n_users``
    how many users there were, both by ``h``'s cutoff (:meth:`ItemAdoption.users_as_of`, :meth:`ItemAdoption.n_users`).
    """
    scored = []
    for i, m in enumerate(h.modalities):
        users = item_users.get(m, Counter())
        for text, k in Counter(t for t in h.seq(m).text if named(t)).items():
            score = k * math.log((1 + n_users) / (1 + users.get(text, 0)))
            if score > 1e-9:
                scored.append((-score, i, text, k))
    per_category: Counter = Counter()
    chosen = []
    for _, i, text, k in sorted(scored):
        cat = category(h.modalities[i], text)
        if per_category[cat] < max_per_category:
            per_category[cat] += 1
            chosen.append((i, text, k))
            if len(chosen) == max_items:
                break
    if not chosen:
        return None
    q = _ask(rng, SIGNATURE_QUESTIONS)
    while True:
        a = f"Distinctive: {item_groups(chosen, h.modalities)}."
        if len(a.split()) <= max_words or len(chosen) == 1:
            return QA(q, a, [Claim("item_count", k, h.modalities[i], text) for i, text, k in chosen])
        chosen = chosen[:-1]


def summarize(h: History) -> str:
    """A compact fact sheet of the user for an external generator to ground its answers in."""
    lines = [f"History before {_iso_day(h.cutoff_us)}: {_n(len(h.all), 'event')} in {_n(len(h.modalities), 'modality', 'modalities')}."]
    for m in h.modalities:
        s = h.seq(m)
        line = f"{m}: {_n(len(s), 'event')}, last {_ago(METRICS['days_since_last'][0](h, m, ''))}"
        if np.isfinite(s.value).any():
            line += f", amounts total {shown_amount(float(np.nansum(s.value, dtype=np.float64)))[0]}"
        top = ", ".join(f"{t} (x{k})" for t, k in _top_texts(s.text, 3))
        lines.append(f"{line}; most frequent: {top}.")
    return "\n".join(lines)
