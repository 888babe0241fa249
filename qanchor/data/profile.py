"""Profile aspects: fixed questions, and the reading of a written answer as facts that are each checked.

``QAnchor.describe`` asks the model these questions (the UserU topics' own wording, so the model answers in
the form it was trained on). :func:`facts_of` reads an answer clause by clause as :class:`Fact` objects: each
fact carries the :class:`~qanchor.data.userU_topics.Claim` objects behind its numbers and names (or, for a
word derived from numbers such as "rising", a recomputation of that word). :func:`verify_answer` keeps the
facts whose claims recompute from the user's events and writes the sentence from those alone, in the
aspect's own template with the user's own names: a clause that cannot be read, or a fact that does not
hold, is dropped and counted, so nothing unchecked is ever shown.

Parsing works on a squeezed form (lower case, no whitespace), so the spacing a WordPiece tokenizer puts
around punctuation (``"( 26 % )"``) does not matter; names are matched back to the user's own texts.

Example:
    >>> h = History(user.events, cutoff_us)                                                          # doctest: +SKIP
    >>> verify_answer("time_of_day", "Most active in the evening (18:00-24:00 UTC, 12% of events).", h)  # doctest: +SKIP
    Verified(sentence='Time of day: most active in the evening, 18:00-24:00 UTC.', kept=1, dropped=1)
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from qanchor.data.userU_topics import (
    BUCKETS,
    METRICS,
    Claim,
    History,
    named_category,
    shown_amount,
    verify,
)

__all__ = ["ASPECTS", "PROFILE_QUESTIONS", "Fact", "Verified", "facts_of", "kept_slots", "verify_answer", "squeeze", "tidy"]

# aspect -> the question the model is asked (what the user does most, when, how much, what changed recently)
PROFILE_QUESTIONS: dict[str, str] = {
    "favourites": "What does this user do most often?",
    "categories": "Which categories does this user engage with most?",
    "time_of_day": "At what time of day is this user most active?",
    "weekend": "Is this user more active on weekends or weekdays?",
    "activity": "How many events has this user logged, and on how many days?",
    "frequency": "How many events does this user have per week?",
    "spending": "What do the amounts in this user's history add up to?",
    "recency": "How recently was this user active?",
    "trend": "Is this user becoming more or less active?",
}
ASPECTS = tuple(PROFILE_QUESTIONS)
# how an aspect's kept facts are introduced in the profile
_LEADS = {"favourites": "Most frequent", "categories": "Top categories", "time_of_day": "Time of day",
          "weekend": "Weekends", "activity": "On record", "frequency": "Events per week", "spending": "Amounts",
          "recency": "Last event", "trend": "Trend"}

# a number as the templates write it: thousands in groups of three ("1,484"), or plain; a lone "," or "-," is none
_NUM = r"(-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?)"
_INT = r"(\d+)"
_HOURS = {b: f"{lo:02d}:00-{hi:02d}:00" for b, lo, hi in BUCKETS}


@dataclass(frozen=True)
class Fact:
    """One checkable statement: shown as ``text`` when every claim recomputes (and ``check``, if any, holds)."""

    text: str
    claims: tuple[Claim, ...] = ()
    check: Callable[[History], bool] | None = None  # a recomputation beyond the claims (a word derived from counts)
    detail: str | None = None  # shown as "(detail)" after the fact just before it when that one is kept too
    # kept only when the fact just before it holds: a count under "Most frequent" read as a rank that did not hold
    needs_previous: bool = False

    def holds(self, h: History) -> bool:
        if not self.claims and self.check is None:
            return False  # nothing to check: never shown
        return (not self.claims or verify(list(self.claims), h)) and (self.check is None or self.check(h))


@dataclass(frozen=True)
class Verified:
    """An answer after checking: the sentence of its kept facts (None when none holds) and the counts."""

    sentence: str | None
    kept: int
    dropped: int  # facts that do not hold plus clauses that could not be read


def squeeze(text: str) -> str:
    """Lower case without whitespace: the form answers are parsed in."""
    return re.sub(r"\s+", "", text.lower())


def tidy(text: str) -> str:
    """A decoded answer made readable: WordPiece spacing around punctuation and inside numbers removed,
    the first letter capitalised (a byte-level BPE decode is left as it is)."""
    t = re.sub(r"\s+", " ", text).strip()
    t = re.sub(r"\(\s+", "(", t)
    t = re.sub(r"\s+([,.;:%)?!])", r"\1", t)
    t = re.sub(r"(\d)([.,:])\s+(\d)", r"\1\2\3", t)  # "6. 5" -> "6.5", "1, 484" -> "1,484", "18 : 00" -> "18:00"
    t = re.sub(r"(\d)\s*-\s*(\d)", r"\1-\2", t)
    t = re.sub(r"'\s+([^']*?)\s+'", r"'\1'", t)
    return t[:1].upper() + t[1:]


def _number(s: str) -> float:
    return float(s.replace(",", ""))


def _modality_clause(h: History, clause: str, rest: str, facts: Callable[[str, re.Match], Slots]) -> Slots | None:
    """The facts ``facts(modality, match)`` of ``clause``: ``clause`` opens with the squeezed name of one of the user's
    modalities and ``rest`` (a pattern) matches what follows it; None when no modality of the user's reads that way.
    Every name that opens the clause is a candidate reading (a lazy ``\\w+?`` read the squeezed "web2 10 days ago" as
    "web" 210 days ago, and trying only the longest name read "web 25 days ago" as "web2" 5 days ago beside a modality
    "web2"): the first reading, longest name first, whose facts all hold is taken, else the first (then dropped)."""
    readings = [facts(mod, m) for mod in sorted(h.events, key=lambda m: (-len(squeeze(m)), m))
                if clause.startswith(squeeze(mod)) and (m := re.fullmatch(rest, clause[len(squeeze(mod)):]))]
    if not readings:
        return None
    return _first_holding(h, readings)


def _n(k: int | str, word: str) -> str:
    return f"{k} {word}" if str(k) == "1" else f"{k} {word}s"


def _clauses(text: str, head: str, sep: str) -> list[str] | None:
    """The clauses after ``head`` (squeezed), or None when the answer does not open with it. ``sep`` is a pattern:
    one that only matches after a clause's closing "(... times)" keeps an item named "Milk; 2l" in one clause."""
    s = squeeze(text).rstrip(".")
    return re.split(sep, s[len(head) :]) if s.startswith(head) else None


Slots = list[Fact | None]  # None: a clause that could not be read (counted as dropped, never shown)


def _activity(text: str, h: History) -> Slots:
    s = squeeze(text)
    slots: Slots = []
    m = re.match(rf"{_INT}events?on", s)
    slots.append(Fact(_n(m.group(1), "event"), (Claim("count", int(m.group(1))),)) if m else None)
    m = re.search(rf"on{_INT}activedays?", s)
    slots.append(Fact(_n(m.group(1), "active day"), (Claim("active_days", int(m.group(1))),)) if m else None)
    m = re.search(rf"across{_INT}modalit(?:y|ies)\(([^()]*)\)", s)
    if m:
        names = m.group(2).split(",")
        same = names == [squeeze(x) for x in h.modalities]
        word = "modality" if m.group(1) == "1" else "modalities"
        slots.append(Fact(f"{m.group(1)} {word} ({', '.join(h.modalities)})",
                          (Claim("n_modalities", int(m.group(1))),), lambda _h, same=same: same))
    else:
        slots.append(None)
    return slots


def _spending(text: str, h: History) -> Slots:
    slots: Slots = []
    for part in squeeze(text).rstrip(".").split(";"):
        read = _modality_clause(h, part, rf"amountstotal{_NUM}over{_INT}events?", lambda mod, m: [
            # shown as the template writes it, not as the model did ("3.4499"): the claim holds to that digit
            Fact(f"{mod} total {shown_amount(_number(m.group(1)))[0]}", (Claim("value_sum", _number(m.group(1)), mod),)),
            Fact(f"{_n(m.group(2), mod + ' event')} with an amount", (Claim("value_count", int(m.group(2)), mod),),
                 detail=f"over {_n(m.group(2), 'event')}")])
        slots.extend(read if read is not None else [None])
    return slots


def _categories(text: str, h: History, as_read: Callable[[str], str] | None = None) -> Slots:
    parts = _clauses(text, "topcategories:", r"(?<=events\)),|(?<=event\)),")
    if parts is None:
        return [None]
    counts = Counter(c for m in h.modalities for t in h.seq(m).text if (c := named_category(m, t)))
    by_read = _by_reading(counts, as_read)
    names = [m.group(1) if (m := re.fullmatch(rf"(\w+/.+)\({_INT}events?\)", p)) else None for p in parts]
    named = [by_read.get(name) for name in names]
    top = sorted(counts.values(), reverse=True)
    # the answer claims its categories are the user's k largest: k counts each of the user's categories it names once,
    # so a clause repeated in a greedy-decoding loop does not loosen the test, nor an unreadable or invented one empty it
    k = len({name for name in names if name in by_read})
    cutoff = top[min(k, len(top)) - 1] if top and k else 0

    def among_top(cat: str) -> Callable[[History], bool]:  # one of the k largest categories (ties count)
        return lambda _h: counts[cat] >= cutoff > 0

    slots: Slots = []
    for p, cats in zip(parts, named):
        if not cats:
            slots.append(None)
            continue
        n = int(re.fullmatch(rf".*\({_INT}events?\)", p).group(1))
        slots.extend(_first_holding(h, [[Fact(cat, check=among_top(cat)),
                                         Fact(f"{cat}: {_n(n, 'event')}", (Claim("category_count", n, cat.split("/", 1)[0], cat),),
                                              detail=_n(n, "event"), needs_previous=True)] for cat in cats]))
    return slots


def _recency(text: str, h: History) -> Slots:
    parts = _clauses(text, "lasteventbymodality:", ",")
    if parts is None:
        return [None]
    slots: Slots = []
    for p in parts:
        def said(mod: str, m: re.Match) -> Slots:
            days = 0 if m.group(1) is None else int(m.group(1))
            return [Fact(f"{mod} {'today' if days == 0 else _n(days, 'day') + ' ago'}", (Claim("days_since_last", days, mod),))]

        read = _modality_clause(h, p, r"today|(\d+)days?ago", said)
        slots.extend(read if read is not None else [None])
    return slots


def _frequency(text: str, h: History) -> Slots:
    m = re.fullmatch(rf"about{_NUM}eventsperweekoverall\((.*)perweek\)", squeeze(text).rstrip("."))
    if m is None:
        return [None]
    slots: Slots = [Fact(f"{_number(m.group(1)):.1f} overall", (Claim("per_week", _number(m.group(1))),))]
    for p in m.group(2).split(","):
        read = _modality_clause(h, p, _NUM, lambda mod, n: [Fact(f"{mod} {_number(n.group(1)):.1f}",
                                                                (Claim("per_week", _number(n.group(1)), mod),))])
        slots.extend(read if read is not None else [None])
    return slots


def _favourites(text: str, h: History, as_read: Callable[[str], str] | None = None) -> Slots:
    parts = _clauses(text, "mostfrequent:", r"(?<=times\));|(?<=time\));")
    if parts is None:
        return [None]
    slots: Slots = []
    for p in parts:
        def said(mod: str, m: re.Match) -> Slots:
            items = _by_reading(h.seq(mod).text, as_read).get(m.group(1))
            if not items:  # an item this user never had: nothing to check it against
                return [None]
            return _first_holding(h, [[Fact(f"{mod} '{item}'", (Claim("top_item", item, mod),)),
                                       Fact(f"'{item}' {_n(m.group(2), 'time')}", (Claim("item_count", int(m.group(2)), mod, item),),
                                            detail=_n(m.group(2), "time"), needs_previous=True)] for item in items])

        read = _modality_clause(h, p, rf"'(.+)'\({_INT}times?\)", said)
        slots.extend(read if read is not None else [None])
    return slots


def _by_reading(names, as_read: Callable[[str], str] | None) -> dict[str, list[str]]:
    """The user's own ``names`` by the squeezed form an answer can hold them in: ``as_read`` (the model's tokenizer,
    encoded and decoded: an uncased WordPiece writes "Café crème" as "cafe creme", CJK and emoji as [UNK]) or as they
    are. Names that read alike share a form: each is a candidate, and only one whose claims hold is shown."""
    out: dict[str, list[str]] = {}
    for name in dict.fromkeys(names):
        out.setdefault(squeeze(as_read(name) if as_read is not None else name), []).append(name)
    return out


def _first_holding(h: History, readings: list[Slots]) -> Slots:
    """The first of several candidate readings of one clause whose facts all hold, else the first (then dropped)."""
    return next((r for r in readings if all(f is not None and f.holds(h) for f in r)), readings[0])


def _lean(share: float) -> str:
    lean = "weekends" if share > 100 * 2 / 7 + 10 else "weekdays" if share < 100 * 2 / 7 - 10 else None
    return f"this user leans towards {lean}" if lean else "activity is spread evenly over the week"


def _weekend(text: str, h: History) -> Slots:
    m = re.fullmatch(rf"{_INT}of{_INT}events\({_INT}%\)fallonweekends,so(.+)", squeeze(text).rstrip("."))
    if m is None:
        return [None]
    k, n, share = int(m.group(1)), int(m.group(2)), int(m.group(3))
    word = next((w for w in (_lean(100), _lean(0), _lean(100 * 2 / 7)) if squeeze(w) == m.group(4)), None)
    # the topic picks its word from the share rounded as the answer states it: so must the check
    def true_word(hh: History) -> bool:  # no events, no share (NaN): no lean is true of them
        share = METRICS["weekend_share"][0](hh, "", "")
        return math.isfinite(share) and word == _lean(round(share))

    return [Fact(f"{k} of {_n(n, 'event')} on weekends", (Claim("weekend_count", k), Claim("count", n))),
            Fact(f"{share}% of events on weekends", (Claim("weekend_share", share),), detail=f"{share}%"),
            Fact(word, check=true_word) if word else None]


def _time_of_day(text: str, h: History) -> Slots:
    names = "|".join(_HOURS)
    m = re.fullmatch(rf"mostactiveinthe({names})\(([^,]*)utc,{_INT}%ofevents\)(?:,thenthe({names})\({_INT}%\))?",
                     squeeze(text).rstrip("."))
    if m is None:
        return [None]
    b1 = m.group(1)
    slots: Slots = [Fact(f"most active in the {b1}, {_HOURS[b1]} UTC", (Claim("top_hour_bucket", b1),))
                    if m.group(2) == _HOURS[b1] else None,
                    Fact(f"{m.group(3)}% of events in the {b1}", (Claim("hour_share", int(m.group(3)), "", b1),),
                         detail=f"{m.group(3)}% of events")]
    if m.group(4):
        slots.append(Fact(f"{m.group(5)}% in the {m.group(4)}", (Claim("hour_share", int(m.group(5)), "", m.group(4)),)))
    return slots


def _trend_word(first: float, second: float) -> str:
    return "rising" if second > 1.25 * first else "falling" if second < 0.8 * first else "steady"


def _trend(text: str, h: History) -> Slots:
    m = re.fullmatch(rf"activityis(rising|falling|steady):{_INT}events?inthefirsthalfofthehistory,{_INT}inthesecondhalf",
                     squeeze(text).rstrip("."))
    if m is None:
        return [None]
    word, first, second = m.group(1), int(m.group(2)), int(m.group(3))
    half = METRICS["half_count"][0]
    return [Fact(f"activity is {word}", check=lambda hh: _trend_word(half(hh, "", "first"), half(hh, "", "second")) == word),
            Fact(f"{_n(first, 'event')} in the first half of the history", (Claim("half_count", first, "", "first"),)),
            Fact(f"{_n(second, 'event')} in the second half", (Claim("half_count", second, "", "second"),))]


_PARSERS: dict[str, Callable[..., Slots]] = {
    "favourites": _favourites, "categories": _categories, "time_of_day": _time_of_day, "weekend": _weekend,
    "activity": _activity, "frequency": _frequency, "spending": _spending, "recency": _recency, "trend": _trend,
}


def facts_of(aspect: str, text: str, h: History, as_read: Callable[[str], str] | None = None) -> Slots:
    """The facts of ``text`` (an answer to ``PROFILE_QUESTIONS[aspect]``) in reading order; ``None`` marks a clause
    that could not be read as the aspect's template (so it cannot be checked). ``as_read``: how the model's tokenizer
    gives back a text (encoded, then decoded), so that the user's item and category names are found in the answer in
    that form and shown as the user's own."""
    if aspect not in _PARSERS:
        raise KeyError(f"unknown profile aspect {aspect!r}; choose from {', '.join(ASPECTS)}")
    if aspect in ("favourites", "categories"):
        return _PARSERS[aspect](text, h, as_read)
    return _PARSERS[aspect](text, h)


def kept_slots(slots: Slots, h: History) -> list[bool | None]:
    """Per slot of an answer: True (kept: it holds for ``h``), False (dropped: unreadable or untrue), or None (a repeat of
    a fact kept before it, which greedy decoding of a young model writes in loops: neither kept again nor dropped). A
    fact is its text and its claims: two modalities' "'Coffee' 3 times" are two facts. A fact that needs the one before
    it (an item's count after "is the most frequent") is dropped with it: shown alone, it reads as the rank."""
    said: set[tuple] = set()
    status: list[bool | None] = []
    for fact in slots:
        if fact is None or not fact.holds(h) or (fact.needs_previous and (not status or status[-1] is False)):
            status.append(False)
        elif (key := (fact.text, fact.claims)) in said:
            status.append(None)
        else:
            said.add(key)
            status.append(True)
    return status


def verify_answer(aspect: str, text: str, h: History, as_read: Callable[[str], str] | None = None) -> Verified:
    """Keep the facts of ``text`` that hold for ``h`` (each once) and write them as one sentence; count the rest as
    dropped."""
    slots = facts_of(aspect, text, h, as_read)
    status = kept_slots(slots, h)
    shown: list[str] = []
    previous_kept = False
    for fact, holds in zip(slots, status):
        if holds is None:  # a repeat: its detail must not attach to the fact shown before it
            previous_kept = False
            continue
        if holds and fact.detail is not None and previous_kept:
            shown[-1] += f" ({fact.detail})"  # e.g. "purchase/grocery (459 events)"
        elif holds:
            shown.append(fact.text)
        previous_kept = holds and fact.detail is None  # a detail attaches to its own fact, never to another detail
    sentence = f"{_LEADS[aspect]}: {'; '.join(shown)}." if shown else None
    return Verified(sentence, status.count(True), status.count(False))
