"""answer / choose / describe: cached == uncached, batch invariance, hand-computed scores, verified profiles, errors."""

from __future__ import annotations

import math
import re
from datetime import timedelta, timezone

import numpy as np
import pytest
import torch

from qanchor.cli import main
from qanchor.data.dataset import EventSeq
from qanchor.data.profile import ASPECTS, PROFILE_QUESTIONS, Verified, squeeze, tidy, verify_answer
from qanchor.data.userU_topics import DAY_US, TOPICS, History
from qanchor.errors import CheckpointError, ModelInputError
from qanchor.infer.api import QAnchor, events_before
from qanchor.model.factory import save_checkpoint
from tests.model.helpers import tiny_cfg

QUESTIONS = ["How recently was this user active?", "What does this user do most often?"]


@pytest.fixture(scope="module")
def users(infer_env):
    return list(infer_env.ds.users())[:5]


def _history(qa: QAnchor, record) -> History:
    cutoff = qa.cutoff_us(None)
    extra = {m.name: m.numeric_columns for m in qa.manifest.sequence_modalities}
    return History(events_before(record.events, cutoff), cutoff, extra)


def test_answer_cached_equals_uncached_and_batch_invariant(infer_env, users):
    qa = infer_env.qa
    cached = qa.answer(users, QUESTIONS, max_new_tokens=12)
    assert len(cached) == len(users) and all(len(row) == len(QUESTIONS) for row in cached)
    assert all(isinstance(t, str) and t for row in cached for t in row)  # random weights: some text, never empty
    assert cached == qa.answer(users, QUESTIONS, max_new_tokens=12, use_cache=False)
    alone = [qa.answer(u, QUESTIONS, max_new_tokens=12)[0] for u in users]
    assert alone == cached
    small = QAnchor(qa.model, qa.tokenizer, qa.meta, qa.run_cfg, text_cache=infer_env.cache, batch_size=2, max_rows=3)
    assert small.answer(users, QUESTIONS, max_new_tokens=12) == cached


def test_choose_scores_match_a_hand_computed_forward(infer_env, users):
    qa = infer_env.qa
    options = ["coffee shop", "online casino weekly", "fuel"]
    choices = qa.choose(users, QUESTIONS[0], options)
    reference = qa.choose(users, QUESTIONS[0], options, use_cache=False)
    for c, r in zip(choices, reference):
        assert c.option == r.option == max(c.scores, key=c.scores.get)
        assert max(abs(c.scores[o] - r.scores[o]) for o in options) < 1e-4
    # by hand: one full forward through the backbone's own LM head, mean log-probability of option + end token
    model, tok = qa.model, qa.tokenizer
    with torch.inference_mode():
        prefix = model.prefixes(qa.pipeline.collate(qa.pack([users[2]], qa.cutoff_us(None))))[0]
        q = tok(QUESTIONS[0], add_special_tokens=False)["input_ids"]
        o = tok(options[1], add_special_tokens=False)["input_ids"]
        ids = model.token_ids
        tail = torch.tensor([*q, ids.user_emb, ids.answer, *o])
        seq = torch.cat([prefix, model.embed_tokens(tail)])[None]
        logits = model.backbone(inputs_embeds=seq, attention_mask=torch.ones(seq.shape[:2], dtype=torch.long)).logits[0]
        logp = torch.log_softmax(logits.float(), -1)
        start = prefix.shape[0] + len(q) + 2  # first option token
        targets = [*o, ids.end]
        expected = float(np.mean([float(logp[start - 1 + j, t]) for j, t in enumerate(targets)]))
    assert abs(choices[2].scores[options[1]] - expected) < 1e-4


def test_choose_per_user_questions_and_options(infer_env, users):
    qa = infer_env.qa
    opts = [["a b", "c d"], ["fuel", "cinema", "casino"], ["x", "y"]]
    per_user = qa.choose(users[:3], QUESTIONS[:1] * 3, opts)
    assert [list(c.scores) for c in per_user] == opts
    for u, o, c in zip(users[:3], opts, per_user):
        assert qa.choose(u, QUESTIONS[0], o)[0].scores == pytest.approx(c.scores, abs=1e-5)
    with pytest.raises(ModelInputError, match="per user"):
        qa.choose(users[:3], QUESTIONS[0], opts[:2])


def test_choose_many_reads_each_user_once_and_equals_choose(infer_env, users, monkeypatch):
    qa = infer_env.qa
    pairs = [(QUESTIONS[0], ["coffee shop", "fuel"]), (QUESTIONS[1], ["a b", "c d", "online casino weekly"])]
    encoded = []  # users whose prefix went through the model, per call of model.prefixes
    real = qa.model.prefixes
    monkeypatch.setattr(qa.model, "prefixes", lambda batch: encoded.append(len(batch.user_ids)) or real(batch))
    many = qa.choose_many(users, pairs)
    assert sum(encoded) == len(users)  # once per user, for both questions
    assert [[list(c.scores) for c in row] for row in many] == [[o for _, o in pairs]] * len(users)
    for k, (question, options) in enumerate(pairs):
        for row, alone in zip(many, qa.choose(users, question, options)):
            assert row[k].option == alone.option
            assert row[k].scores == pytest.approx(alone.scores, abs=1e-5)
    for row, ref in zip(many, qa.choose_many(users, pairs, use_cache=False)):
        assert all(c.scores == pytest.approx(r.scores, abs=1e-4) for c, r in zip(row, ref))
    per_user = qa.choose_many(users[:3], [pairs[:1], pairs, pairs[1:]])  # per user, lists of any length
    assert [len(row) for row in per_user] == [1, 2, 1]
    assert per_user[2][0].scores == pytest.approx(many[2][1].scores, abs=1e-5)
    with pytest.raises(ModelInputError, match="per user"):
        qa.choose_many(users[:3], [pairs, pairs])
    with pytest.raises(ModelInputError, match="non-empty list"):
        qa.choose_many(users[0], [])
    with pytest.raises(ModelInputError, match="at least 2"):
        qa.choose_many(users[0], [("Which?", ["only one"])])


@pytest.mark.parametrize("call, match", [
    (lambda qa, u: qa.answer(u, ["  "]), "non-empty"),
    (lambda qa, u: qa.answer(u, []), "no question"),
    (lambda qa, u: qa.choose(u, "Which?", ["only one"]), "at least 2"),
    (lambda qa, u: qa.choose(u, "Which?", ["\u200b", "yes"]), "has no tokens"),  # it could win
    (lambda qa, u: qa.choose(u, "Which?", "yes"), "at least 2"),
    (lambda qa, u: qa.choose(u, "Which?", ["same", "same "]), "repeat"),
    # "repeat" was said of options that differ only where the tokenizer reads them alike
    (lambda qa, u: qa.choose(u, "Which?", ["Café", "cafe"]), "read the same by this model's tokenizer"),
    (lambda qa, u: qa.choose(u, "Which?", ["ok", "word " * 60]), "answer tokens"),
    (lambda qa, u: qa.describe(u, ["favourites", "horoscope"]), "horoscope"),
])
def test_bad_requests_are_clear_errors(infer_env, users, call, match):
    with pytest.raises(ModelInputError, match=match):
        call(infer_env.qa, users[0])


def test_template_answers_verify_and_wrong_facts_do_not(infer_env):
    qa = infer_env.qa
    checked = 0
    for i, record in enumerate(infer_env.ds.users()):
        h = _history(qa, record)
        for aspect in ASPECTS:
            truth = TOPICS[aspect](h, np.random.default_rng(i)) if len(h.all) else None
            if truth is None:
                continue
            full = verify_answer(aspect, truth.answer, h)
            assert full.dropped == 0 and full.kept >= 1 and full.sentence, (aspect, truth.answer)
            spaced = re.sub(r"([(),;:%'/.])", r" \1 ", truth.answer.lower())  # how a WordPiece decode spaces it
            assert verify_answer(aspect, tidy(spaced), h) == full, truth.answer
            # one number off: that fact is dropped, the others stay, and the wrong number is never shown
            wrong = re.sub(r"\d+", lambda m: str(int(m.group()) + 3), truth.answer, count=1)
            bad = verify_answer(aspect, wrong, h)
            assert bad.dropped >= 1 and bad.kept <= full.kept - 1 + (bad.kept == 0), (wrong, bad)
            first = re.search(r"\d+", wrong).group()
            assert bad.sentence is None or first not in re.findall(r"\d+", bad.sentence) or \
                re.findall(r"\d+", truth.answer).count(first) > 0, (wrong, bad)
            # words the template does not have are not read, so never shown
            extra = verify_answer(aspect, truth.answer.rstrip(".") + " and loves zebras.", h)
            assert extra.sentence is None or "zebra" not in extra.sentence
            checked += 1
    assert checked > 100


def test_fact_level_profile_keeps_what_holds():
    from qanchor.data.dataset import EventSeq
    from qanchor.data.userU_topics import History

    day, hour = 86_400_000_000, 3_600_000_000
    ts = np.array([d * day + 20 * hour for d in (1, 2, 3, 9)] + [4 * day + 8 * hour])  # 4 evenings, 1 morning
    h = History({"bill": EventSeq(np.sort(ts), ["Coffee"] * 5, np.ones(5, np.float32), np.zeros((5, 0), np.float32))},
                10 * day)
    said = "Most active in the evening (18:00-24:00 UTC, 55% of events), then the morning (20%)."
    out = verify_answer("time_of_day", said, h)
    assert out == Verified("Time of day: most active in the evening, 18:00-24:00 UTC; 20% in the morning.", 2, 1)
    right = verify_answer("time_of_day", "Most active in the evening (18:00-24:00 UTC, 80% of events), then the morning (20%).", h)
    assert right == Verified("Time of day: most active in the evening, 18:00-24:00 UTC (80% of events); 20% in the morning.", 3, 0)
    assert verify_answer("time_of_day", "Most active at lunch.", h) == Verified(None, 0, 1)
    out = verify_answer("recency", "Last event by modality: bill today, app 3 days ago.", h)
    assert out == Verified("Last event: bill today.", 1, 1)  # a modality the user does not have is not read


def test_a_user_without_events_and_a_repeated_fact_verify_without_a_traceback_or_a_double_count():
    """The weekend word was checked against the share's rounding, a NaN for a user with no events: `describe` ended in
    a traceback on such a user whenever the model wrote the template. And a fact the answer repeated (greedy decoding
    loops) was kept, shown and counted once per repeat."""
    from qanchor.data.dataset import EventSeq

    day = 86_400_000_000
    said = "3 of 10 events (30%) fall on weekends, so activity is spread evenly over the week."
    assert verify_answer("weekend", said, History({}, 10 * day)) == Verified(None, 0, 3)
    ts = np.array([1, 2, 3, 4, 5, 8, 9]) * day  # 1970-01-02 was a Friday: days 2, 3 and 9 fall on weekends
    h = History({"bill": EventSeq(ts, ["Coffee"] * 7, np.ones(7, np.float32), np.zeros((7, 0), np.float32))}, 10 * day)
    once = verify_answer("weekend", "3 of 7 events (43%) fall on weekends, so this user leans towards weekends.", h)
    assert once.kept == 3 and once.dropped == 0
    twice = verify_answer("recency", "Last event by modality: bill 1 day ago, bill 1 day ago.", h)
    assert twice == Verified("Last event: bill 1 day ago.", 1, 0)  # a repeat is neither kept again nor dropped
    # two modalities' counts of one item read alike ("'Coffee' 3 times") but are two facts: both kept
    both = History({m: EventSeq(ts[:3], ["Coffee"] * 3, np.ones(3, np.float32), np.zeros((3, 0), np.float32))
                    for m in ("bill", "app")}, 10 * day)
    said = "Most frequent: bill 'Coffee' (3 times); app 'Coffee' (3 times)."
    assert verify_answer("favourites", said, both) == Verified(
        "Most frequent: bill 'Coffee' (3 times); app 'Coffee' (3 times).", 4, 0)
    looped = "Most frequent: bill 'Coffee' (3 times); bill 'Coffee' (3 times); app 'Coffee' (3 times)."
    assert verify_answer("favourites", looped, both) == verify_answer("favourites", said, both)


def _bought(texts: list[str]) -> History:
    """One modality "buy" of these texts, a day apart."""
    ts = np.arange(len(texts), dtype=np.int64) * DAY_US
    return History({"buy": EventSeq(ts, texts, np.ones(len(ts), np.float32), np.zeros((len(ts), 0), np.float32))},
                   100 * DAY_US)


def test_a_count_is_shown_only_with_the_rank_it_belongs_to():
    """An item or category whose rank did not hold lost its rank fact but kept its count, shown alone under the heading
    as if the rank held: "Most frequent: 'Milk' 2 times." for the user's rarer item. Now both are dropped (a
    time-of-day share or an amount's count, which say no rank, still stand alone: see the tests above and below)."""
    h = _bought(["Coffee"] * 10 + ["Milk"] * 2)
    assert verify_answer("favourites", "Most frequent: buy 'Milk' (2 times).", h) == Verified(None, 0, 2)
    assert verify_answer("favourites", "Most frequent: buy 'Coffee' (10 times).", h) == Verified(
        "Most frequent: buy 'Coffee' (10 times).", 2, 0)
    h = _bought(["A / x"] * 10 + ["B / x"] * 8 + ["D / x"])
    assert verify_answer("categories", "Top categories: buy/d (1 event).", h) == Verified(None, 0, 2)
    assert verify_answer("categories", "Top categories: buy/a (10 events), buy/d (1 event).", h) == Verified(
        "Top categories: buy/a (10 events).", 2, 2)


def test_the_top_categories_cut_off_counts_each_named_category_once():
    """"Top" meant among the user's n largest categories, n every clause of the answer: a repeated clause (greedy
    decoding loops) let the 4th of 4 categories pass as top, and one clause more than the user has categories (a
    repeat, an unreadable or an invented one) made the cut-off 0, so every true top category was dropped."""
    h = _bought(["A / x"] * 10 + ["B / x"] * 8 + ["C / x"] * 6 + ["D / x"] * 5)
    said = "Top categories: buy/a (10 events), buy/d (5 events)."
    looped = "Top categories: buy/a (10 events), buy/a (10 events), buy/a (10 events), buy/d (5 events)."
    assert verify_answer("categories", looped, h) == verify_answer("categories", said, h) == Verified(
        "Top categories: buy/a (10 events).", 2, 2)  # buy/d is not among the 2 largest; a repeat is shown once
    h = _bought(["A / x"] * 10 + ["B / x"] * 8)
    both = "Top categories: buy/a (10 events); buy/b (8 events)."
    assert verify_answer("categories", "Top categories: buy/a (10 events), buy/a (10 events), buy/b (8 events).",
                         h) == Verified(both, 4, 0)
    assert verify_answer("categories", "Top categories: buy/a (10 events), buy/zzz (3 events), buy/b (8 events).",
                         h) == Verified(both, 4, 1)  # an invented category is dropped and widens nothing
    assert verify_answer("categories", "Top categories: buy/a (10 events), and zebras.", _bought(["A / x"] * 10)) == \
        Verified("Top categories: buy/a (10 events).", 2, 1)  # an unreadable clause too


def test_amounts_and_rates_hold_to_the_digit_the_template_shows_and_malformed_numbers_are_dropped():
    """A flat 0.05 tolerance kept "total 3.49" for a true 3.45 (the template writes two decimals below 10) and showed
    the model's own digits ("3.4499", "14,84"); a lone "," where a number goes ended describe in a traceback."""
    from qanchor.data.dataset import EventSeq

    day = 86_400_000_000
    ts = np.array([1, 2, 3]) * day
    h = History({"bill": EventSeq(ts, ["Coffee"] * 3, np.array([1.0, 1.2, 1.25], np.float32),
                                  np.zeros((3, 0), np.float32))}, 7 * day)
    assert verify_answer("spending", "Bill amounts total 3.45 over 3 events.", h).kept == 2
    assert verify_answer("spending", "Bill amounts total 3.49 over 3 events.", h) == Verified(
        "Amounts: 3 bill events with an amount.", 1, 1)
    assert verify_answer("spending", "Bill amounts total 3.4499 over 3 events.", h).sentence == \
        "Amounts: bill total 3.45 (over 3 events)."  # the template's digits, not the model's
    for said in ("Bill amounts total , over 3 events.", "Bill amounts total -, over 3 events.",
                 "Bill amounts total 1,4,8,4 over 3 events."):
        assert verify_answer("spending", said, h).dropped >= 1, said  # unreadable: dropped, no traceback
    assert verify_answer("frequency", "About , events per week overall (bill 0.7 per week).", h) == Verified(None, 0, 1)
    rate = verify_answer("frequency", "About 3.00 events per week overall (bill 3.04 per week).", h)
    assert rate.sentence == "Events per week: 3.0 overall; bill 3.0." and rate.kept == 2  # shown to 0.1, as written


def test_template_answers_about_modalities_named_with_digits_verify_whole():
    """Squeezed, "web2 10 days ago" reads "web210daysago": a lazy name read it as "web", 210 days, and dropped it."""
    from qanchor.data.dataset import EventSeq
    from qanchor.data.userU_topics import DAY_US, verify

    def seq(days):
        ts = np.array(sorted(days), np.int64) * DAY_US
        return EventSeq(ts, ["x"] * len(ts), np.ones(len(ts), np.float32), np.zeros((len(ts), 0), np.float32))

    h = History({"web2": seq([1, 5, 90]), "bill": seq([2, 3])}, 100 * DAY_US)
    for aspect in ("recency", "frequency", "spending"):
        truth = TOPICS[aspect](h, np.random.default_rng(0))
        assert verify(truth.claims, h, truth.answer), truth.answer
        out = verify_answer(aspect, truth.answer, h)
        assert out.dropped == 0 and "web2" in out.sentence, (truth.answer, out)
    # beside "web2", "web 25 days ago" squeezes to "web25daysago": read as "web2", 5 days, only, it was dropped
    h = History({"web2": seq([86]), "web": seq([75])}, 100 * DAY_US)
    out = verify_answer("recency", "Last event by modality: web2 14 days ago, web 25 days ago.", h)
    assert out == Verified("Last event: web2 14 days ago, web 25 days ago.".replace(", web", "; web"), 2, 0)


def test_item_and_category_names_are_read_as_the_tokenizer_writes_them_and_as_written():
    """An uncased WordPiece writes "Café crème" as "cafe creme" and CJK as [UNK] (dropped from the decoded answer), so
    a true answer about such an item could never be matched to the user's own; items holding ";" and categories
    holding parentheses were split or refused. Names that read alike are each tried, and only a true one is shown."""
    from transformers import AutoTokenizer

    from qanchor.data.dataset import EventSeq
    from qanchor.data.text_cache import default_encoder_path
    from qanchor.data.userU_topics import DAY_US

    tok = AutoTokenizer.from_pretrained(default_encoder_path())
    as_read = lambda t: tidy(tok.decode(tok(t, add_special_tokens=False)["input_ids"], skip_special_tokens=True))  # noqa: E731

    def seq(texts):
        ts = np.arange(len(texts), dtype=np.int64) * DAY_US
        return EventSeq(ts, texts, np.ones(len(ts), np.float32), np.zeros((len(ts), 0), np.float32))

    h = History({"buy": seq(["Café crème"] * 4 + ["Café Crème"]), "note": seq(["Milk; 2l"] * 3 + ["eggs"]),
                 "lunch": seq(["午餐 / 套餐"] * 2 + ["沙拉 / 套餐"]), "shop": seq(["(paren) / x"] * 6)}, 30 * DAY_US)
    for aspect in ("favourites", "categories"):
        truth = TOPICS[aspect](h, np.random.default_rng(0))
        said = as_read(truth.answer)  # what the model can say: "cafe creme", the CJK names gone
        if aspect == "favourites":
            assert "'cafe creme'" in said and "'milk; 2l'" in said
        else:
            assert "shop/(paren)(6events)" in squeeze(said)
        out = verify_answer(aspect, said, h, as_read)
        assert out == verify_answer(aspect, truth.answer, h), (said, out)  # the user's own names, every fact kept
        assert out.dropped == 0, (said, out)
        assert "Café crème" in out.sentence if aspect == "favourites" else "shop/(paren)" in out.sentence, out
        if aspect == "favourites":
            assert verify_answer(aspect, said, h).kept < out.kept  # without the tokenizer's reading it was dropped


def test_the_weekend_word_is_checked_on_the_share_the_answer_states():
    """42 of 109 events (38.53%, stated as 39%) lean towards weekends by the topic's rounded share: the check agrees."""
    from qanchor.data.dataset import EventSeq
    from qanchor.data.userU_topics import DAY_US

    saturday, monday, hour = 2 * DAY_US, 4 * DAY_US, 3_600_000_000  # 1970-01-03 was a Saturday
    ts = np.sort(np.array([saturday + hour * i for i in range(42)] + [monday + hour * i for i in range(67)], np.int64))
    h = History({"app": EventSeq(ts, ["x"] * len(ts), np.ones(len(ts), np.float32), np.zeros((len(ts), 0), np.float32))},
                400 * DAY_US)
    truth = TOPICS["weekend"](h, np.random.default_rng(0))
    assert "(39%)" in truth.answer and "leans towards weekends" in truth.answer
    assert verify_answer("weekend", truth.answer, h).dropped == 0


def test_tidy_undoes_wordpiece_spacing():
    assert tidy("most active in the evening ( 18 : 00 - 24 : 00 utc, 53 % of events ).") == \
        "Most active in the evening (18:00-24:00 utc, 53% of events)."
    assert tidy("about 6. 5 events ; total 1, 484 ' grocery / milk '") == "About 6.5 events; total 1,484 'grocery / milk'"


def test_describe_keeps_only_verified_facts(infer_env, users, monkeypatch):
    qa = infer_env.qa
    user = max(users, key=lambda u: sum(len(s) for s in u.events.values()))
    profile = qa.describe(user)
    h = _history(qa, user)
    assert len(h.all) >= 5 and set(profile.answers) == set(ASPECTS)
    for aspect, (text, sentence) in profile.answers.items():
        assert verify_answer(aspect, text, h).sentence == sentence
    assert profile.sentences == [s for _, s in profile.answers.values() if s is not None]
    uncached = qa.describe(user, ["recency", "trend"], use_cache=False).answers  # the reference path, two aspects
    assert uncached == {a: profile.answers[a] for a in ("recency", "trend")}
    # a model that answers with the true template for half the aspects and a wrong first number for the rest
    truth = {a: TOPICS[a](h, np.random.default_rng(0)) for a in ASPECTS}
    truth = {a: t.answer for a, t in truth.items() if t is not None}
    said = [t if k % 2 == 0 else re.sub(r"\d+", lambda m: str(int(m.group()) + 1), t, count=1)
            for k, t in enumerate(truth.values())]
    replies = iter(said)
    monkeypatch.setattr(qa, "decode", lambda ids: next(replies))
    profile = qa.describe(user, list(truth))
    checks = [verify_answer(a, t, h) for a, t in zip(truth, said)]
    assert len(said) >= 6 and profile.kept == sum(c.kept for c in checks) and profile.dropped == sum(c.dropped for c in checks)
    assert all(c.dropped == 0 for c in checks[::2]) and all(c.dropped >= 1 for c in checks[1::2])
    assert profile.sentences == [c.sentence for c in checks if c.sentence is not None]


def test_describe_questions_are_the_trained_wording():
    for aspect, question in PROFILE_QUESTIONS.items():
        templates = TOPICS[aspect].__code__.co_consts
        assert any(isinstance(c, tuple) and question in c for c in templates), aspect


def test_ask_and_describe_commands(infer_env, tmp_path, capsys):
    common = [f"checkpoint={infer_env.ckpt}", f"data.path={infer_env.ds_dir}", "user=u003", "--quiet"]
    assert main(["ask", *common, "How recently was this user active?", "max_new_tokens=6"]) == 0
    written = capsys.readouterr().out.strip()
    assert written == infer_env.qa.answer(infer_env.ds.user("u003"), [QUESTIONS[0]], max_new_tokens=6)[0][0]
    assert main(["ask", *common, "question=Which one?", "options=[coffee,fuel]", "json=true"]) == 0
    out = capsys.readouterr().out
    # a question with "=" in it is the question, not a setting named "Did this user spend >"
    assert main(["ask", *common, "Did this user spend >= 100?", "max_new_tokens=2"]) == 0
    assert capsys.readouterr().out.strip() == infer_env.qa.answer(infer_env.ds.user("u003"), ["Did this user spend >= 100?"],
                                                                  max_new_tokens=2)[0][0]
    assert '"choice"' in out and '"scores"' in out
    assert main(["describe", *common]) == 0
    assert "verified facts kept" in capsys.readouterr().out
    for args, msg in [(["user=nobody"], "not in dataset"), (['question=" "'], "no question"),
                      (["question=Which?", "options=[one]"], "at least 2")]:
        cmd = ["ask", *[c for c in common if not c.startswith("user=") or args[0].startswith("question")], *args]
        if args[0].startswith("user="):
            cmd.append("How?")
        assert main(cmd) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err


def test_ask_and_the_bench_read_a_datasets_columns_by_name_not_position(infer_env, tmp_path, capsys):
    """The same data with its tabular columns in another order: `ask` and the bench's embedder read the columns by
    position, so the user's age went where the model reads income (`embed` remapped them by name)."""
    import json
    import shutil

    import pyarrow.parquet as pq

    from qanchor.bench.embedder import QAnchorEmbedder
    from qanchor.data.dataset import load_dataset

    other = tmp_path / "reordered"
    shutil.copytree(infer_env.ds_dir, other, ignore=shutil.ignore_patterns(".qanchor_cache"))
    table = pq.read_table(other / "tabular.parquet")
    pq.write_table(table.select(["user_id", *reversed(table.column_names[1:])]), other / "tabular.parquet")
    reordered = load_dataset(other)
    assert reordered.tabular_columns == list(reversed(infer_env.ds.tabular_columns))

    def scores(path) -> dict:
        assert main(["ask", f"checkpoint={infer_env.ckpt}", f"data.path={path}", "user=u002", "--quiet",
                     "question=Which one?", "options=[coffee,fuel]", "json=true"]) == 0
        return json.loads(capsys.readouterr().out)["scores"]

    np.testing.assert_array_equal(next(infer_env.qa.dataset_records(reordered, ["u002"])).tabular,
                                  infer_env.ds.user("u002").tabular)  # what `ask` and `describe` now read
    same, moved = scores(infer_env.ds_dir), scores(other)
    assert moved == pytest.approx(same, abs=1e-5)
    ids, requests = ["u000", "u002", "u004"], [("Will this user stop paying?", None)]
    np.testing.assert_allclose(QAnchorEmbedder(infer_env.qa, reordered).embed_many(ids, requests),
                               QAnchorEmbedder(infer_env.qa, infer_env.ds).embed_many(ids, requests), atol=1e-5)


def test_ask_counts_event_ages_from_the_datasets_cutoff_as_embed_does(infer_env, tmp_path, capsys):
    """On a dataset whose cutoff is later than the model's, `ask` answers about the dataset's moment by default
    (its setting says so, and `embed` does the same), not the moment the model was trained at."""
    import json
    import shutil

    later = tmp_path / "later"
    shutil.copytree(infer_env.ds_dir, later, ignore=shutil.ignore_patterns(".qanchor_cache"))
    manifest = (later / "manifest.yaml").read_text()
    assert "2024-06-30T00:00:00+00:00" in manifest
    (later / "manifest.yaml").write_text(manifest.replace("2024-06-30T00:00:00+00:00", "2024-12-31T00:00:00+00:00"))
    common = ["ask", f"checkpoint={infer_env.ckpt}", f"data.path={later}", "user=u003", "--quiet", "json=true",
              "question=How recently was this user active?", "options=[yes,no]", f"text_cache_dir={tmp_path / 'text'}"]
    scores = {}
    for name, extra in [("default", []), ("dataset", ["cutoff=2024-12-31T00:00:00+00:00"]),
                        ("model", ["cutoff=2024-06-30T00:00:00+00:00"])]:
        assert main([*common, *extra]) == 0
        scores[name] = json.loads(capsys.readouterr().out)["scores"]
    assert scores["default"] == scores["dataset"] and scores["default"] != scores["model"]


def test_checkpoint_without_a_trained_language_head_is_refused(infer_env, tmp_path, capsys):
    cfg = tiny_cfg(["model.max_query_tokens=16", "loss.mode=contrastive"])
    ckpt = save_checkpoint(tmp_path / "ckpt", infer_env.qa.model, infer_env.qa.tokenizer, cfg, infer_env.qa.meta)
    qa = QAnchor.from_pretrained(ckpt, text_cache=infer_env.cache)
    with pytest.raises(CheckpointError, match="contrastive"):
        qa.answer(infer_env.ds.user("u003"), QUESTIONS)
    assert qa.embed(infer_env.ds.user("u003"), QUESTIONS).shape == (1, 2, 128)  # it still embeds
    assert main(["describe", f"checkpoint={ckpt}", f"data.path={infer_env.ds_dir}", "user=u003"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "loss.mode=contrastive" in err[0]


def test_events_before_cuts_at_the_cutoff(infer_env):
    record = infer_env.ds.user("u003")
    cutoff = infer_env.qa.cutoff_us(infer_env.qa.cutoff - timedelta(days=10))
    kept = events_before(record.events, cutoff)
    for m, seq in kept.items():
        assert (seq.ts < cutoff).all() and len(seq.text) == len(seq.ts) == len(seq.value) == len(seq.extras)
        assert (record.events[m].ts < cutoff).sum() == len(seq)
    assert math.isfinite(float(infer_env.qa.cutoff.replace(tzinfo=timezone.utc).timestamp()))


def test_describe_checks_facts_against_the_events_the_model_read(infer_env, monkeypatch):
    """describe(cutoff=T) moves events at or after T to T's last moment for the model, but verified the facts against
    the history without them: a fact stating exactly what the model read was dropped as wrong."""
    import warnings

    from qanchor.infer.api import _moved_before

    qa = infer_env.qa
    record = infer_env.ds.user("u002")
    newest = max(int(s.ts[-1]) for s in record.events.values() if len(s.ts))
    cutoff_us = newest - 3 * 86_400_000_000  # three days before the user's newest event: some events are late
    assert any((s.ts >= cutoff_us).any() for s in record.events.values())
    extra = {m.name: m.numeric_columns for m in qa.manifest.sequence_modalities}
    read = History(_moved_before(record, cutoff_us).events, cutoff_us, extra)
    truth = TOPICS["activity"](read, np.random.default_rng(0)).answer  # a perfect reading of the model's own input
    ids = qa.tokenizer(truth, add_special_tokens=False)["input_ids"]
    monkeypatch.setattr(qa, "_generate", lambda prefixes, rows, n, use_cache: [ids for _ in rows])
    when = (infer_env.ds.manifest.cutoff + timedelta(microseconds=cutoff_us - infer_env.ds.manifest.cutoff_us))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "events at or after the cutoff count as its last moment"
        profile = qa.describe(record, ["activity"], cutoff=when.isoformat())
    assert profile.kept >= 2 and profile.dropped == 0


def test_a_repeated_aspect_is_asked_and_counted_once(infer_env, users):
    """aspects=[recency, recency] counted its facts twice and showed them once."""
    once = infer_env.qa.describe(users[1], ["recency"])
    twice = infer_env.qa.describe(users[1], ["recency", "recency"])
    assert (twice.kept, twice.dropped, twice.sentences) == (once.kept, once.dropped, once.sentences)


def test_cached_decoding_matches_the_full_recompute_with_sharp_logits(infer_env, users):
    """The fixture's random model spreads its next-token logits almost evenly, so cached and uncached scores agreed
    whatever the cache held. With weights drawn wide the logits are sharp: the answers differ from user to user, end
    at different steps, and must still equal the full recompute token for token (a wrong position id or a stale cache
    row changes them)."""
    import copy

    qa = infer_env.qa
    model = copy.deepcopy(qa.model)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.backbone.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    sharp = QAnchor(model, qa.tokenizer, qa.meta, qa.run_cfg, text_cache=infer_env.cache, batch_size=8)
    questions = ["How recently was this user active?", "Why?", "What does this user do most often on weekends?"]
    cached = sharp.answer(users, questions, max_new_tokens=16)
    assert cached == sharp.answer(users, questions, max_new_tokens=16, use_cache=False)
    flat = [text for row in cached for text in row]
    assert len(set(flat)) > len(flat) // 2  # sharp: the users' answers differ ...
    assert len({len(sharp.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in flat}) > 1  # ... and end apart
    options = ["coffee shop", "online casino weekly", "fuel"]
    for c, r in zip(sharp.choose(users, questions[0], options), sharp.choose(users, questions[0], options, use_cache=False)):
        assert c.option == r.option
        assert max(abs(c.scores[o] - r.scores[o]) for o in options) < 1e-4
        assert max(r.scores.values()) - min(r.scores.values()) > 0.5  # the options are told apart, not a tie
