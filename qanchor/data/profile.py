"""Profile aspects: fixed questions, and parsers that turn a written answer back into checkable claims.

``QAnchor.describe`` asks the model these questions (the UserU topics' own wording, so the model answers in
the form it was trained on) and keeps a sentence only when :func:`claims_of` reads every number, name and
word of it as :class:`~qanchor.data.userU_topics.Claim` objects that :func:`verify` recomputes from the
user's events. A sentence the parser cannot read completely is dropped too: nothing unchecked is shown.

Parsing works on a squeezed form (lower case, no whitespace), so the spacing a WordPiece tokenizer puts
around punctuation (``"( 26 % )"``) does not matter; names are matched back to the user's own texts.

Example:
    >>> h = History(user.events, cutoff_us)                                       # doctest: +SKIP
    >>> claims_of("time_of_day", "Most active in the evening (18:00-24:00 UTC, 53% of events).", h)  # doctest: +SKIP
    [Claim(metric='top_hour_bucket', value='evening'), Claim(metric='hour_share', value=53.0, arg='evening')]
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable

from qanchor.data.userU_topics import BUCKETS, Claim, History, category, verify

__all__ = ["ASPECTS", "PROFILE_QUESTIONS", "claims_of", "check_sentence", "tidy"]

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

_NUM = r"(-?[\d,]+(?:\.\d+)?)"
_INT = r"(\d+)"


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


def _modality(h: History, name: str) -> str | None:
    """The user's modality whose squeezed name is ``name``."""
    return next((m for m in h.events if squeeze(m) == name), None)


def _items(body: str, pattern: str, sep: str) -> list[re.Match] | None:
    """Every ``sep``-separated part of ``body`` fully matched by ``pattern``, or None if any part is not."""
    parts = [p for p in body.split(sep)]
    matches = [re.fullmatch(pattern, p) for p in parts]
    return None if not parts or any(m is None for m in matches) else matches  # type: ignore[return-value]


def _body(text: str, head: str) -> str | None:
    s = squeeze(text).rstrip(".")
    return s[len(head) :] if s.startswith(head) else None


def _activity(text: str, h: History) -> list[Claim] | None:
    m = re.fullmatch(rf"{_INT}events?on{_INT}activedays?across{_INT}modalit(?:y|ies)\(([^()]*)\)", squeeze(text).rstrip("."))
    if m is None or m.group(4).split(",") != [squeeze(x) for x in h.modalities]:
        return None
    return [Claim("count", int(m.group(1))), Claim("active_days", int(m.group(2))), Claim("n_modalities", int(m.group(3)))]


def _spending(text: str, h: History) -> list[Claim] | None:
    parts = _items(squeeze(text).rstrip("."), rf"(\w+)amountstotal{_NUM}over{_INT}events?", ";")
    if parts is None:
        return None
    claims = []
    for p in parts:
        mod = _modality(h, p.group(1))
        if mod is None:
            return None
        claims += [Claim("value_sum", _number(p.group(2)), mod), Claim("value_count", int(p.group(3)), mod)]
    return claims


def _categories(text: str, h: History) -> list[Claim] | None:
    body = _body(text, "topcategories:")
    parts = None if body is None else _items(body, rf"(\w+)/([^(),]+)\({_INT}events?\)", ",")
    if parts is None:
        return None
    counts = Counter(category(m, t) for m in h.modalities for t in h.seq(m).text)
    by_squeezed = {squeeze(c): c for c in counts}
    claims, named = [], set()
    for p in parts:
        cat = by_squeezed.get(f"{p.group(1)}/{p.group(2)}")
        if cat is None:
            return None
        named.add(cat)
        claims.append(Claim("category_count", int(p.group(3)), cat.split("/", 1)[0], cat))
    # "top": no category left out may have more events than one that is named
    if max((k for c, k in counts.items() if c not in named), default=0) > min(counts[c] for c in named):
        return None
    return claims


def _recency(text: str, h: History) -> list[Claim] | None:
    body = _body(text, "lasteventbymodality:")
    parts = None if body is None else _items(body, r"(\w+?)(today|(\d+)days?ago)", ",")
    if parts is None:
        return None
    claims = []
    for p in parts:
        mod = _modality(h, p.group(1))
        if mod is None:
            return None
        claims.append(Claim("days_since_last", 0 if p.group(2) == "today" else int(p.group(3)), mod))
    return claims


def _frequency(text: str, h: History) -> list[Claim] | None:
    m = re.fullmatch(rf"about{_NUM}eventsperweekoverall\((.*)perweek\)", squeeze(text).rstrip("."))
    parts = None if m is None else _items(m.group(2), rf"(\w+?){_NUM}", ",")
    if parts is None:
        return None
    claims = [Claim("per_week", _number(m.group(1)))]
    for p in parts:
        mod = _modality(h, p.group(1))
        if mod is None:
            return None
        claims.append(Claim("per_week", _number(p.group(2)), mod))
    return claims


def _favourites(text: str, h: History) -> list[Claim] | None:
    body = _body(text, "mostfrequent:")
    parts = None if body is None else _items(body, rf"(\w+?)'(.+)'\({_INT}times?\)", ";")
    if parts is None:
        return None
    claims = []
    for p in parts:
        mod = _modality(h, p.group(1))
        item = None if mod is None else next((t for t in h.seq(mod).text if squeeze(t) == p.group(2)), None)
        if item is None:
            return None
        claims += [Claim("top_item", item, mod), Claim("item_count", int(p.group(3)), mod, item)]
    return claims


def _lean(share: float) -> str:
    lean = "weekends" if share > 100 * 2 / 7 + 10 else "weekdays" if share < 100 * 2 / 7 - 10 else None
    return squeeze(f"this user leans towards {lean}" if lean else "activity is spread evenly over the week")


def _weekend(text: str, h: History) -> list[Claim] | None:
    m = re.fullmatch(rf"{_INT}of{_INT}events\({_INT}%\)fallonweekends,so(.+)", squeeze(text).rstrip("."))
    if m is None or m.group(4) != _lean(int(m.group(3))):
        return None
    return [Claim("weekend_count", int(m.group(1))), Claim("count", int(m.group(2))), Claim("weekend_share", int(m.group(3)))]


def _time_of_day(text: str, h: History) -> list[Claim] | None:
    hours = {b: f"{lo:02d}:00-{hi:02d}:00utc" for b, lo, hi in BUCKETS}
    names = "|".join(hours)
    m = re.fullmatch(rf"mostactiveinthe({names})\(([^,]*),{_INT}%ofevents\)(?:,thenthe({names})\({_INT}%\))?",
                     squeeze(text).rstrip("."))
    if m is None or m.group(2) != hours[m.group(1)]:
        return None
    claims = [Claim("top_hour_bucket", m.group(1)), Claim("hour_share", int(m.group(3)), "", m.group(1))]
    if m.group(4):
        claims.append(Claim("hour_share", int(m.group(5)), "", m.group(4)))
    return claims


def _trend(text: str, h: History) -> list[Claim] | None:
    m = re.fullmatch(rf"activityis(rising|falling|steady):{_INT}events?inthefirsthalfofthehistory,{_INT}inthesecondhalf",
                     squeeze(text).rstrip("."))
    if m is None:
        return None
    first, second = int(m.group(2)), int(m.group(3))
    word = "rising" if second > 1.25 * first else "falling" if second < 0.8 * first else "steady"
    if word != m.group(1):
        return None
    return [Claim("half_count", first, "", "first"), Claim("half_count", second, "", "second")]


_PARSERS: dict[str, Callable[[str, History], list[Claim] | None]] = {
    "favourites": _favourites, "categories": _categories, "time_of_day": _time_of_day, "weekend": _weekend,
    "activity": _activity, "frequency": _frequency, "spending": _spending, "recency": _recency, "trend": _trend,
}


def claims_of(aspect: str, text: str, h: History) -> list[Claim] | None:
    """The claims behind every fact of ``text`` (an answer to ``PROFILE_QUESTIONS[aspect]``), or None when the
    text is not fully in the aspect's form (so it cannot be checked)."""
    if aspect not in _PARSERS:
        raise KeyError(f"unknown profile aspect {aspect!r}; choose from {', '.join(ASPECTS)}")
    return _PARSERS[aspect](text, h)


def check_sentence(aspect: str, text: str, h: History) -> bool:
    """True when every fact of ``text`` is read as a claim and every claim recomputes from ``h``."""
    claims = claims_of(aspect, text, h)
    return claims is not None and verify(claims, h)
