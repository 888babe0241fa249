"""UserU ``forecast`` pairs: yes/no questions about a user's next 30 days, asked at internal cutoffs.

Scenario tasks are forward-looking binary questions ("will this household stop shopping?", "will it buy
seafood?", "will it redeem a coupon?"). ``future`` pairs summarise the next window as a list of items;
``forecast`` pairs ask the window the way tasks do, on any manifest:

- activity: will the user be active at all; will it be less active than in the previous window;
- modality: will the user have events of modality *m* (one drawn per cutoff);
- category again: will it touch a category it had before the cutoff (one drawn from its own history);
- category first time: will it touch a category of the dataset it never touched before (one drawn).
- amount: will its total amount of one modality fall versus the previous window (datasets with values; the first
  modality, in the manifest's order, of which the user has values before the cutoff: a modality's values have their
  own unit, a purchase's money, a page's dwell seconds, a campaign's length in days, and are never added up).

Answers start with "Yes" or "No" and give the counts behind them, all computed from events inside
``[cutoff, cutoff + window)``; the windows end by the dataset cutoff, so no pair looks past it. Cutoffs
whose window is empty are kept (an inactive month is exactly what churn-like tasks ask about).

Which questions a cutoff gets depends on nothing after it: the modality is drawn from the dataset's modalities
(a user who has never used *m*, or starts only after the cutoff, is asked too: a task asks every user), the
categories from the user's events before the cutoff and from the categories some user of the dataset had before it,
and the amount question is asked of users with values before the cutoff. Had the choice looked at the whole
history, the question alone would tell the model something of the answer (asked about *m* only if the user uses *m*
some day; asked about a category no one had yet, almost always "No").
"""

from __future__ import annotations

import weakref
from functools import cache

import numpy as np

from qanchor.data.text_cache import default_encoder_path
from qanchor.data.userU_topics import DAY_US, History, ItemAdoption, category

__all__ = ["forecast_pairs"]


def _label(cat: str) -> str:
    return cat.split("/", 1)[1] or cat


# A category is a short name ("bakery", "coupon: meat-pckgd"). A question naming a long one (a URL, a review's words,
# a search term in a script of one token per character) could outgrow a model's query budget, and pretraining would
# refuse a pair the user never wrote: a question is asked only if it fits the tiny presets' model.max_query_tokens,
# counted with their vocabulary (the bundled MiniLM's; the sentence encoder reads 48 of its tokens, larger presets
# 64 of theirs).
MAX_QUESTION_TOKENS = 32


@cache
def _question_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_encoder_path()))


@cache  # one entry per distinct question the data can ask (a bounded LRU thrashed past 65,536 categories: every miss a
def _fits(question: str) -> bool:  # tokenizer call)
    ids = _question_tokenizer()(question, add_special_tokens=False, verbose=False)["input_ids"]
    return len(ids) <= MAX_QUESTION_TOKENS


def _category_question(cat: str, m: str, window_days: int, first: bool) -> str | None:
    """The again / first-time question about ``cat``, or None where it has no name or would not fit."""
    if not cat.split("/", 1)[-1].strip():  # an empty or blank text's category ("app/"): nothing to name
        return None
    when = "for the first time in the next" if first else "again in the next"
    question = f"Will this user have {_label(cat)} {m} events {when} {window_days} days?"
    return question if _fits(question) else None


# Per adoption table, modality and window: which categories a first-time question can name (in the sorted order of
# ItemAdoption.category_firsts). Built once: per user and cutoff it cost a question and a look-up for every category the
# dataset holds, which made the pairs quadratic on data whose categories grow with the users (search terms, URLs).
_ASKABLE: weakref.WeakKeyDictionary[ItemAdoption, dict[tuple[str, int], np.ndarray]] = weakref.WeakKeyDictionary()


def _askable_first_time(adoption: ItemAdoption, m: str, window_days: int) -> np.ndarray:
    by_key = _ASKABLE.setdefault(adoption, {})
    if (m, window_days) not in by_key:
        names, _ = adoption.category_firsts(m)
        by_key[(m, window_days)] = np.fromiter((_category_question(x, m, window_days, True) is not None for x in names),
                                               bool, count=len(names))
    return by_key[(m, window_days)]


def _first_time_pick(adoption: ItemAdoption, m: str, c: int, own: set[str], window_days: int,
                     rng: np.random.Generator) -> tuple[str, str] | None:
    """A category some user had before ``c`` and this user had not (``own``), whose first-time question can be asked,
    drawn uniformly in name order, with its question: the draw a list of every such category made, one mask apart."""
    names, firsts = adoption.category_firsts(m)
    if not names:
        return None
    mask = (firsts < c) & _askable_first_time(adoption, m, window_days)
    index = adoption.category_index(m)
    mask[[index[x] for x in own if x in index]] = False
    candidates = np.flatnonzero(mask)
    if not len(candidates):
        return None
    cat = names[int(candidates[int(rng.integers(len(candidates)))])]
    return cat, _category_question(cat, m, window_days, True)


def _amount_answer(after: np.ndarray, before: np.ndarray) -> str:
    """The amount question's answer: lower or not, and the two sums, in whole numbers or with the fewest decimals that
    show them apart ("Yes: 17 after 17." said lower of two sums that round alike).

    The values are float32 (a dataset's amounts), each off its written decimal by up to half a float32 step: two sums
    of the same total written another way (1.10 + 2.20 and 3.30) differ in their last bits. Sums within that error
    are equal: "No", both shown alike.

        >>> f32 = lambda *x: np.array(x, np.float32)
        >>> _amount_answer(f32(17.25), f32(17.4)), _amount_answer(f32(3.3), f32(1.1, 2.2)), _amount_answer(f32(), f32())
        ('Yes: 17.2 after 17.4.', 'No: 3 after 3.', 'No: 0 after 0.')
    """
    a, b = float(np.nansum(after, dtype=np.float64)), float(np.nansum(before, dtype=np.float64))  # float32 loses digits
    error = np.finfo(np.float32).eps * float(np.nansum(np.abs(after), dtype=np.float64) +
                                              np.nansum(np.abs(before), dtype=np.float64))
    if abs(a - b) <= error:
        shown = f"{(a + b) / 2:,.0f}"
        return f"No: {shown} after {shown}."
    for digits in range(7):
        shown_a, shown_b = f"{a:,.{digits}f}", f"{b:,.{digits}f}"
        if shown_a != shown_b:
            break
    return f"{'Yes' if a < b else 'No'}: {shown_a} after {shown_b}."


def _window(h: History, m: str, lo: int, hi: int) -> tuple[np.ndarray, list[str], np.ndarray]:
    s = h.seq(m)  # empty for a modality the user has no events of
    sel = (s.ts >= lo) & (s.ts < hi)
    return s.ts[sel], [t for t, k in zip(s.text, sel) if k], s.value[sel]


def forecast_pairs(h: History, cutoffs: list[int], rng: np.random.Generator, adoption: ItemAdoption | None,
                   modalities: list[str], window_days: int = 30) -> list[tuple[int, str, str]]:
    """``(cutoff_us, question, answer)`` pairs at each internal cutoff (see the module docstring).

    ``adoption``: when every user first had each text, the pool of the first-time question as of each cutoff (None:
    no first-time questions).
    ``modalities``: the dataset's sequence modalities (manifest order), the pool of the modality question; a user's
    own modalities would make the question depend on events after the cutoff.
    """
    out: list[tuple[int, str, str]] = []
    w = window_days * DAY_US
    for c in cutoffs:
        assert c + w <= h.cutoff_us, "a forecast window must end by the dataset cutoff"
        nxt = {m: _window(h, m, c, c + w) for m in modalities}
        prev = {m: _window(h, m, c - w, c) for m in modalities}
        before = {m: {category(m, t) for t, ts in zip(h.seq(m).text, h.seq(m).ts) if ts < c} for m in modalities}
        n_next = sum(len(v[0]) for v in nxt.values())
        n_prev = sum(len(v[0]) for v in prev.values())
        days = len({int(t) // DAY_US for v in nxt.values() for t in v[0]})
        q = f"Will this user be active in the next {window_days} days?"
        out.append((c, q, f"Yes: {n_next} events on {days} days." if n_next else "No: no activity."))
        q = f"Will this user be less active in the next {window_days} days than in the previous {window_days}?"
        out.append((c, q, f"{'Yes' if n_next < n_prev else 'No'}: {n_next} events after {n_prev}."))
        m = modalities[int(rng.integers(len(modalities)))] if modalities else None
        if m is not None:
            k = len(nxt[m][0])
            out.append((c, f"Will this user have {m} events in the next {window_days} days?",
                        f"Yes: {k} {m} events." if k else f"No {m} events."))
            own = [(x, q) for x in sorted(before[m]) if (q := _category_question(x, m, window_days, False))]
            if own:
                cat, question = own[int(rng.integers(len(own)))]
                k = sum(category(m, t) == cat for t in nxt[m][1])
                out.append((c, question, f"Yes: {k} times." if k else "No."))
            picked = _first_time_pick(adoption, m, c, before[m], window_days, rng) if adoption is not None else None
            if picked is not None:
                cat, question = picked
                k = sum(category(m, t) == cat for t in nxt[m][1])
                out.append((c, question, f"Yes: {k} times." if k else "No."))
        valued = next((m for m in modalities if np.isfinite(h.seq(m).value[h.seq(m).ts < c]).any()), None)
        if valued is not None:  # values before c
            out.append((c, f"Will this user's {valued} amounts in the next {window_days} days be lower than in the "
                           f"previous {window_days}?", _amount_answer(nxt[valued][2], prev[valued][2])))
    return out
