"""Dict users and dataset records are mapped into the model's layout by name, or refused clearly."""

from __future__ import annotations

import numpy as np
import pytest

from qanchor.data.dataset import EventSeq, UserRecord
from qanchor.data.manifest import Manifest
from qanchor.errors import ModelInputError
from qanchor.infer.user_input import record_adapter, to_microseconds, to_record
from tests.conftest import tiny_manifest


def _manifest(bill_columns: list[str], extra_modality: bool = False) -> Manifest:
    raw = tiny_manifest().to_dict()
    raw["modalities"][0]["numeric_columns"] = bill_columns
    if extra_modality:
        raw["modalities"].append({"name": "sms", "kind": "sequence"})
    return Manifest.from_dict(raw)


def test_adapter_is_identity_for_the_same_layout():
    m = tiny_manifest()
    rec = UserRecord("u", {}, np.array([1.0, 2.0], np.float32))
    assert record_adapter(m, ["age", "income"], m, ["age", "income"])(rec) is rec


def test_adapter_remaps_columns_by_name():
    model = _manifest(["discount", "tip"])
    data = _manifest(["tip"])
    adapt = record_adapter(data, ["income"], model, ["age", "income"])
    seq = EventSeq(np.array([1, 2]), ["a", "b"], np.array([1.0, 2.0], np.float32), np.array([[5.0], [6.0]], np.float32))
    out = adapt(UserRecord("u", {"bill": seq}, np.array([42.0], np.float32)))
    assert np.isnan(out.events["bill"].extras[:, 0]).all() and out.events["bill"].extras[:, 1].tolist() == [5.0, 6.0]
    assert np.isnan(out.tabular[0]) and out.tabular[1] == 42.0


def test_data_lacking_some_of_the_models_inputs_is_said_once_per_layout(capsys):
    """A modality, numeric column or tabular feature the model was trained with and the data lack is read as missing
    for every user: a re-export that dropped a log source moved every score without a word."""
    from qanchor.infer.user_input import _layout_adapter

    _layout_adapter.cache_clear()  # each pair is said once per process: earlier tests used this one
    model = _manifest(["discount", "tip"])
    record_adapter(_manifest(["tip"]), ["income"], model, ["age", "income"])
    err = capsys.readouterr().err
    assert "warning: the data lack 2 of the model's inputs (bill column 'discount', tabular feature 'age')" in err
    record_adapter(_manifest(["tip"]), ["income"], model, ["age", "income"])  # the same pair again: said once
    record_adapter(model, ["age", "income"], model, ["age", "income"])  # complete data: nothing to say
    assert capsys.readouterr().err == ""
    without_app = Manifest.from_dict({**model.to_dict(), "modalities": [m for m in model.to_dict()["modalities"]
                                                                           if m["name"] != "app"]})
    record_adapter(without_app, ["age", "income"], model, ["age", "income"])
    assert "the data lack 1 of the model's inputs (modality 'app')" in capsys.readouterr().err


def test_adapter_refuses_what_the_model_does_not_know():
    with pytest.raises(ModelInputError, match="modality 'sms' is unknown"):
        record_adapter(_manifest(["discount"], extra_modality=True), [], tiny_manifest(), [])
    with pytest.raises(ModelInputError, match="feature 'height'"):
        record_adapter(tiny_manifest(), ["height"], tiny_manifest(), ["age"])


def test_dict_events_sorted_and_times_parsed():
    rec = to_record({"user_id": "u", "events": {"app": [{"ts": "2024-01-02T00:00:00Z", "text": "late"},
                                                        {"ts": "2024-01-01T00:00:00", "text": "early"}]}},
                    tiny_manifest(), ["age", "income"])
    assert rec.events["app"].text == ["early", "late"] and rec.tabular is None
    assert to_microseconds("2024-01-01T01:00:00+01:00") == to_microseconds("2024-01-01T00:00:00Z")
    assert to_microseconds(np.datetime64("1970-01-01T00:00:02")) == 2_000_000


@pytest.mark.parametrize("missing", [np.datetime64("NaT"), "pandas"])
def test_a_missing_timestamp_is_refused_by_event(missing):
    """NaT was stored as the smallest int64: the event sorted first, its age overflowed to 0 and it counted as
    happening at the cutoff, silently."""
    if missing == "pandas":
        missing = __import__("pandas").NaT
    user = {"user_id": "x", "events": {"app": [{"ts": "2024-01-01T00:00:00Z", "text": "ok"},
                                               {"ts": missing, "text": "when?"}]}}
    with pytest.raises(ModelInputError, match=r"user 'x', modality 'app', event 1: the timestamp is missing \(NaT\)"):
        to_record(user, tiny_manifest(), ["age", "income"])


@pytest.mark.parametrize("events, match", [
    (EventSeq([1, 2], ["a", "b"], np.zeros(2, np.float32), np.zeros((2, 1), np.float32)), "ts must be a 1-d numpy array"),
    (EventSeq(np.array([1, 2]), ["a", "b"], np.zeros(2, np.float32), np.zeros(2, np.float32)), "extras must be a 2-d"),
    (EventSeq(np.array([1, 2]), ["a", 7], np.zeros(2, np.float32), np.zeros((2, 1), np.float32)),
     "event 1: text must be a string, got int"),
    (EventSeq(np.array([1, 2]), ["a", "caf\udce9"], np.zeros(2, np.float32), np.zeros((2, 1), np.float32)),
     "event 1, field 'text': not valid Unicode"),
])
def test_a_badly_shaped_record_is_a_clear_error(events, match):
    """A list for ts, 1-d extras, a number for a text and a lone surrogate gave tracebacks from numpy or the tokenizer."""
    with pytest.raises(ModelInputError, match=match):
        to_record(UserRecord("x", {"bill": events}), tiny_manifest(), ["age", "income"])


def test_dict_users_with_broken_text_and_a_dataframe_as_users_are_clear_errors():
    user = {"user_id": "x", "events": {"app": [{"ts": "2024-01-01T00:00:00Z", "text": "caf\udce9"}]}}
    with pytest.raises(ModelInputError, match=r"user 'x', modality 'app', event 0, field 'text': not valid Unicode"):
        to_record(user, tiny_manifest(), ["age", "income"])
    with pytest.raises(ModelInputError, match="iterating a DataFrame gives its column names"):
        to_record("user_id", tiny_manifest(), ["age", "income"])


def test_a_records_layout_travels_with_it_into_the_model(infer_env, tmp_path):
    """The README's pattern, `model.embed([... ds.users()], q)`, read a dataset's records by position: with the
    tabular columns written in another order the model read income as age (embeddings 0.34 apart for a trained model),
    while the same dataset passed whole was remapped by name. A dataset's records now carry their layout."""
    import shutil

    import pyarrow.parquet as pq

    from qanchor.data.dataset import RecordLayout, load_dataset

    other = tmp_path / "reordered"
    shutil.copytree(infer_env.ds_dir, other, ignore=shutil.ignore_patterns(".qanchor_cache"))
    table = pq.read_table(other / "tabular.parquet")
    pq.write_table(table.select(["user_id", *reversed(table.column_names[1:])]), other / "tabular.parquet")
    reordered = load_dataset(other)
    assert reordered.tabular_columns == list(reversed(infer_env.ds.tabular_columns)) == ["income", "age"]
    ids, query = ["u002", "u004", "u006"], ["Will this user stop paying?"]
    records = list(reordered.users(ids))
    assert records[0].layout == RecordLayout.of(reordered.manifest, ["income", "age"]) == reordered.user("u002").layout
    qa = infer_env.qa
    expected = qa.embed(list(infer_env.ds.users(ids)), query)
    np.testing.assert_allclose(qa.embed(records, query), expected, atol=1e-6)
    np.testing.assert_allclose(qa.embed(reordered.user("u002"), query), expected[:1], atol=1e-6)
    np.testing.assert_allclose(qa.embed(reordered, query)[[qa_i for qa_i, u in enumerate(reordered.user_ids) if u in ids]],
                               expected, atol=1e-6)
    np.testing.assert_array_equal(to_record(records[0], qa.manifest, qa.tabular_columns).tabular,
                                  infer_env.ds.user("u002").tabular)
    # a record built by hand has no layout: it is read in the model's own order, as documented
    bare = UserRecord("u002", records[0].events, records[0].tabular)
    assert bare.layout is None and bare == records[0]  # the layout is not part of what a record holds
    np.testing.assert_array_equal(to_record(bare, qa.manifest, qa.tabular_columns).tabular,
                                  infer_env.ds.user("u002").tabular[::-1])


def test_a_question_or_option_with_a_lone_surrogate_is_one_clear_error(infer_env):
    """Event texts were checked, questions not: `qanchor ask "question=$(printf 'caf\\xe9?')"` (argv decoded with
    surrogateescape) and the same in embed / answer / choose ended in the tokenizer's TypeError."""
    qa, user = infer_env.qa, infer_env.ds.user("u002")
    bad = "Does this user buy caf\udce9?"
    with pytest.raises(ModelInputError, match=r"query 'Does this user buy caf\\udce9\?': not valid Unicode text \(character 22\)"):
        qa.embed([user], [bad])
    with pytest.raises(ModelInputError, match="not valid Unicode text"):
        qa.option_ids(bad)
    with pytest.raises(ModelInputError, match=r"query 1: not valid Unicode text \(character 22\)"):
        qa.query_vectors(["Will it churn?", bad])  # public: a TypeError from the sentence encoder's tokenizer
    with pytest.raises(ModelInputError, match="an option must be text, got int"):
        qa.option_ids(3)
    assert qa.embed([user], ["Does this user buy café?"]).shape == (1, 1, 128)


def test_malformed_arguments_are_one_clear_error(infer_env):
    """Each ended in a bare TypeError or AttributeError from numpy or Python."""
    qa, user = infer_env.qa, infer_env.ds.user("u002")
    with pytest.raises(ModelInputError, match="queries must be a question or a list of questions, got NoneType"):
        qa.embed([user], None)
    asked = ["Will this user stop paying?", "Will this user redeem a coupon?"]
    want = qa.embed([user], asked)
    for queries in (np.array(asked), (q for q in asked), tuple(asked)):  # any ordered iterable of questions
        np.testing.assert_array_equal(qa.embed([user], queries), want)
    for unordered in (set(asked), dict.fromkeys(asked), b"Will this user stop paying?"):  # no order to return, or bytes
        with pytest.raises(ModelInputError, match="queries must be a question or a list of questions"):
            qa.embed([user], unordered)
    with pytest.raises(ModelInputError, match=r"user 'u002': events must be a dict modality -> EventSeq .*got NoneType"):
        qa.embed([UserRecord("u002", None)], ["Will this user stop paying?"])
    with pytest.raises(ModelInputError, match=r"user 'u002': tabular must be a numpy array of numbers .*got a object array"):
        qa.embed([UserRecord("u002", user.events, np.array([1.0, None], dtype=object))], ["Will this user stop paying?"])


def test_a_dataset_in_another_column_order_reads_its_ties_as_the_model_does():
    """The layout adapter remapped a dataset's extra columns to the model's order and left ties as the dataset's
    column order put them: the same user embedded from the dataset and as records differed."""
    from qanchor.data.dataset import RecordLayout, in_event_order, order_key

    data_layout = RecordLayout((("bill", ("tip", "discount")), ("app", ()), ("search", ())), ())
    model_manifest = _manifest(["discount", "tip"])
    adapt = record_adapter(_manifest(["tip", "discount"]), [], model_manifest, [])
    extras = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 2.0], [2.0, 0.0]], np.float32)  # (tip, discount)
    seq = in_event_order(EventSeq(np.zeros(4, np.int64), ["Coffee"] * 4, np.full(4, 3.0, np.float32), extras))
    got = adapt(UserRecord("u", {"bill": seq}, None, data_layout)).events["bill"]
    keys = [order_key(got, i) for i in range(len(got))]
    assert keys == sorted(keys) and got.extras[:, 0].tolist() == [0.0, 0.0, 1.0, 2.0]  # by discount, then tip


def test_events_of_one_instant_are_ordered_by_content_not_by_list_place():
    """Ties kept the order the events were listed in: the same basket listed another way (another export, another
    SQL plan) gave the model other events at a cap and another order, so another embedding."""
    basket = [{"ts": "2024-01-02T00:00:00Z", "text": t, "value": v, "discount": d}
              for t, v, d in (("Milk", 3.0, 0.0), ("Bread", 2.0, 0.5), ("Milk", 3.0, 1.0), ("Eggs", None, 0.0))]
    first = {"ts": "2024-01-01T00:00:00Z", "text": "Coffee shop", "value": 4.0}
    records = [to_record({"user_id": "u", "events": {"bill": events}}, tiny_manifest(), ["age", "income"]).events["bill"]
               for events in ([first, *basket], basket[::-1] + [first], [basket[2], first, basket[0], basket[3], basket[1]])]
    for seq in records[1:]:
        assert seq.text == records[0].text and np.array_equal(seq.value, records[0].value, equal_nan=True)
        assert np.array_equal(seq.extras, records[0].extras, equal_nan=True) and np.array_equal(seq.ts, records[0].ts)
    assert records[0].text[0] == "Coffee shop"  # time still comes first
    # a UserRecord built by hand with the basket in yet another order reads the same
    seq = records[0]
    order = [0, 4, 3, 2, 1]
    by_hand = UserRecord("u", {"bill": EventSeq(seq.ts[order], [seq.text[i] for i in order], seq.value[order],
                                                seq.extras[order])})
    again = to_record(by_hand, tiny_manifest(), ["age", "income"]).events["bill"]
    assert again.text == seq.text and np.array_equal(again.extras, seq.extras, equal_nan=True)


def test_a_records_times_in_another_unit_are_refused_not_embedded_as_1970():
    """A hand-built UserRecord's ts in seconds were read as microseconds: every event in January 1970, the user embedded
    as one idle for 54 years (0.14 per coordinate off), without a word, where a dataset in that unit is refused. An
    int32 ts (a narrower unit can only be another unit) overflowed inside packing, naming no user."""
    manifest, cols = tiny_manifest(), ["age", "income"]
    at = np.array([1_717_200_000, 1_717_300_000], np.int64)  # 2024-06 in seconds

    def record(ts) -> UserRecord:
        return UserRecord("x", {"bill": EventSeq(ts, ["a", "b"], np.zeros(2, np.float32), np.zeros((2, 1), np.float32))})

    with pytest.raises(ModelInputError, match=r"user 'x': every event lies in 1970 \(the latest ts is 1717300000\).*"
                                              r"multiply them by 10\*\*6 or 10\*\*3"):
        to_record(record(at), manifest, cols)
    with pytest.raises(ModelInputError, match=r"user 'x', modality 'bill': ts must be int64 microseconds since 1970 "
                                              r"\(UTC\), got int32"):
        to_record(record(at.astype(np.int32)), manifest, cols)
    assert to_record(record(at * 10**6), manifest, cols).events["bill"].ts.tolist() == (at * 10**6).tolist()


def test_times_at_the_calendars_ends_and_events_in_a_dataframe_are_clear():
    """0001-01-01 with a local offset (an export's "unknown date") overflowed in astimezone(); a user dict whose events
    were a DataFrame raised pandas' "truth value of a DataFrame is ambiguous"."""
    import pandas as pd

    assert to_microseconds("0001-01-01T00:00:00+01:00") == to_microseconds("0001-01-01T00:00:00Z") - 3_600_000_000
    assert to_microseconds("9999-12-31T23:00:00-05:00") == to_microseconds("9999-12-31T23:00:00Z") + 5 * 3_600_000_000
    assert to_microseconds("2024-06-01T12:00:00+05:30") == to_microseconds("2024-06-01T06:30:00Z")
    frame = pd.DataFrame({"modality": ["app"], "ts": ["2024-06-01"], "text": ["x"]})
    with pytest.raises(ModelInputError, match=r"user 'u1': 'events' must be a dict modality -> list of events, got "
                                              r"DataFrame: from a DataFrame of events with a modality column"):
        to_record({"user_id": "u1", "events": frame}, tiny_manifest(), ["age", "income"])
    with pytest.raises(ModelInputError, match=r"'events' must be a dict modality -> list of events, got ndarray$"):
        to_record({"user_id": "u1", "events": np.array([1, 2])}, tiny_manifest(), ["age", "income"])
    assert to_record({"user_id": "u1", "events": None}, tiny_manifest(), ["age", "income"]).events == {}


def test_a_dataframe_row_as_the_user_is_named(infer_env):
    """One user held in a DataFrame row (iterrows, apply) was iterated as a list of users, and the error spoke of a
    DataFrame's column names."""
    import pandas as pd

    user = {"user_id": "u1", "events": {}}
    with pytest.raises(ModelInputError, match=r"a pandas Series holding one user's fields .*pass row.to_dict\(\)"):
        infer_env.qa.embed(pd.Series(user), ["What does this user do?"])
    assert infer_env.qa.embed(pd.Series([user, user]), ["What does this user do?"]).shape == (2, 1, 128)
