"""A synthetic world of payment-app users: six modalities and ten binary tasks with known truth.

Each user gets eight latent traits (affluence, risk appetite, deal seeking, activity, travel and
investing interest, digital savviness, financial stress). The traits drive everything observable:
how many events each modality has (gamma-Poisson counts), which categories events fall in (softmax
over trait-dependent logits), amounts, time of day and recency, and a noisy tabular profile. Task
labels are Bernoulli(sigmoid(w . traits + b)), with ``b`` tuned so each task hits its positive rate;
the task files keep that probability as ``prob``, so the best achievable AUC is known.

Example (a few seconds)::

    from data_tools.synth import build_synthetic
    from qanchor.data.validate import validate_dataset
    path = build_synthetic("/tmp/synth", n_users=2000, seed=0)
    print(validate_dataset(path).events_per_modality)

Identical arguments give byte-identical files: all randomness comes from PCG64 streams keyed by
(seed, stream, part), and nothing depends on set order or the clock.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
from numpy.polynomial.hermite_e import hermegauss

from qanchor.data.manifest import Manifest, ModalityKind, ModalitySpec, TaskDomain, TaskSpec
from qanchor.data.schema import events_table, write_dataset
from qanchor.logs import progress as progress_iter

__all__ = ["build_synthetic", "latent_traits", "user_ids", "traits_of", "TRAITS", "MODALITIES", "FEATURES", "TASKS"]

TRAITS = ("aff", "risk", "deal", "act", "travel", "invest", "digital", "stress")
_CORR = (("aff", "invest", .4), ("aff", "stress", -.4), ("risk", "stress", .3), ("deal", "aff", -.25),
         ("travel", "aff", .35), ("digital", "act", .4), ("digital", "invest", .2), ("deal", "act", .2))
PART_USERS = 10_000  # users per event file: bounds memory, one progress tick each
NO_EVENTS_RATE, NO_TABULAR_RATE = 0.01, 0.10
COUNT_SHAPE = 2.0  # gamma shape of the per-user rate multiplier: overdispersed (negative binomial) counts
DAY_US = 86_400_000_000


def _vec(spec: str) -> np.ndarray:
    """'aff=.5 risk=-1' -> a weight vector over TRAITS."""
    out = np.zeros(len(TRAITS))
    for tok in spec.split():
        name, val = tok.split("=")
        out[TRAITS.index(name)] = float(val)
    return out


def _sigma() -> np.ndarray:
    sigma = np.eye(len(TRAITS))
    for a, b, r in _CORR:
        i, j = TRAITS.index(a), TRAITS.index(b)
        sigma[i, j] = sigma[j, i] = r
    return sigma


SIGMA = _sigma()


class Cat(NamedTuple):
    name: str
    logit: float
    weights: str  # trait weights of this category's choice logit
    items: str  # '|'-separated texts, most popular first
    log_amount: float = 0.0  # bill only: log of the typical amount


class Modality(NamedTuple):
    name: str
    description: str
    rate: float  # mean events per user who has the modality
    count_w: str  # trait weights of the log event rate
    presence: float  # logit of having the modality at all
    presence_w: str
    hour: float  # typical hour of day
    cats: tuple[Cat, ...]
    extras: tuple[str, ...] = ()


# fmt: off
BILL = (
    Cat("food", 1.2, "deal=.3 act=.3", "Starbucks coffee|McDonald's meal|KFC chicken bucket|Subway sandwich|Domino's pizza|Local noodle bar|Chipotle burrito|Dunkin' donuts|Pret A Manger lunch|Bubble tea shop", 2.0),
    Cat("groceries", 1.4, "deal=.4 stress=.2", "Walmart groceries|Costco wholesale|Whole Foods Market|Aldi groceries|Kroger groceries|Trader Joe's|7-Eleven convenience store|Lidl groceries|Carrefour supermarket", 3.8),
    Cat("transport", .9, "act=.3", "Shell fuel station|BP fuel station|Uber ride|Lyft ride|Metro card top-up|City parking meter|Bike sharing monthly pass|Toll road payment|Chevron fuel station", 2.9),
    Cat("entertainment", .5, "digital=.5 act=.2", "Netflix subscription|Spotify premium|Cinema tickets|Steam game purchase|Disney+ subscription|Concert tickets|Bowling alley|YouTube Premium", 2.7),
    Cat("utilities", .8, "aff=-.2", "Electricity bill|Water bill|Gas utility bill|Mobile phone bill|Home broadband bill|Rent payment|Home insurance premium", 4.4),
    Cat("health", .2, "aff=.2", "City Hospital pharmacy|CVS pharmacy|Dental clinic|Gym membership|Optician glasses|Walgreens pharmacy|Health insurance premium|Physiotherapy session", 3.6),
    Cat("travel", -.8, "travel=1.4 aff=.4", "Airline tickets|Hilton hotel booking|Airbnb stay|Booking.com reservation|Train tickets|Car rental|Travel insurance|Duty free shop", 5.6),
    Cat("luxury", -1.6, "aff=1.3 deal=-.5", "Gucci boutique|Apple Store|Rolex watch dealer|Louis Vuitton store|Fine dining restaurant|Tiffany jewellery|Sephora cosmetics", 6.0),
    Cat("risky", -2.0, "risk=1.2 stress=1.0 aff=-.4", "Payday loan repayment|Casino online top-up|Sports betting deposit|Lottery tickets|Pawn shop|Buy-now-pay-later instalment|Crypto exchange deposit|Cash advance fee", 4.2),
    Cat("education", -1.0, "invest=.3 aff=.3", "Online course fee|University tuition|Bookstore purchase|Language school|Coursera subscription|Kindergarten fee", 4.6),
    Cat("shopping", .6, "deal=.5 digital=.3", "Amazon order|IKEA furniture|Zara clothing|H&M clothing|Best Buy electronics|Nike store|Target store|eBay purchase", 3.9),
    Cat("investing", -1.8, "invest=1.5 aff=.5", "Mutual fund subscription|Brokerage account deposit|Gold savings plan|Pension top-up|Money market fund purchase", 6.2),
)
MINI = (
    Cat("mobility", .6, "act=.4", "Bike sharing mini-program|Ride hailing mini-program|Parking finder|Metro QR code|EV charging finder"),
    Cat("food", .8, "deal=.3", "Food delivery mini-program|Restaurant booking|Grocery delivery|Coffee pre-order|Group buying"),
    Cat("deals", .0, "deal=1.4", "Coupon centre|Cashback rewards|Flash sale mini-program|Points mall|Daily check-in bonus"),
    Cat("credit", -.8, "stress=1.2 risk=.5", "Credit score check|Loan marketplace|Credit card bill repayment|Instalment calculator|Debt consolidation helper"),
    Cat("wealth", -.8, "invest=1.4 aff=.4", "Mutual fund market|Money market fund|Gold savings|Stock quotes|Pension planner"),
    Cat("travel", -.9, "travel=1.4", "Flight booking mini-program|Hotel booking mini-program|Visa helper|Travel insurance quote|Currency exchange"),
    Cat("utilities", .3, "", "Utility bill payment|Mobile top-up|Government services|Tax filing helper"),
    Cat("games", -.6, "risk=.8 digital=.4", "Mini games hub|Lottery mini-program|Sports scores|Fantasy league"),
    Cat("health", -.6, "", "Hospital appointment|Pharmacy delivery|Health insurance claim|Vaccine booking"),
)
SPM = (
    Cat("wealth", -.4, "invest=1.5", "Home > Wealth > Money market fund|Home > Wealth > Mutual funds > Top performers|Home > Wealth > Fund detail > Buy|Home > Wealth > Gold|Home > Wealth > Pension plan"),
    Cat("credit", -.6, "stress=1.3 risk=.5", "Home > Credit > Loan application|Home > Credit > Credit limit|Home > Credit > Repayment schedule|Home > Credit > Overdue notice|Home > Credit > Cash advance"),
    Cat("coupons", .0, "deal=1.4", "Coupon page > Redeem|Coupon page > Browse|Home > Rewards > Points mall|Home > Promotions > Flash sale|Home > Rewards > Cashback"),
    Cat("travel", -.9, "travel=1.5", "Home > Travel > Flights|Home > Travel > Hotels|Home > Travel > Travel card offer|Home > Travel > Insurance"),
    Cat("cards", -.7, "aff=1.0 act=.3", "Home > Cards > Upgrade to Platinum|Home > Cards > Card benefits|Home > Cards > Annual fee|Home > Cards > Apply for a new card"),
    Cat("membership", -1.0, "digital=1.0 aff=.5", "Home > Membership > Premium trial|Home > Membership > Compare plans|Home > Membership > Cancel plan"),
    Cat("account", 1.0, "act=.3", "Home > Account > Settings|Home > Account > Security|Home > Bills > History|Home > Transfer|Home > Balance"),
    Cat("help", -1.2, "act=-.6 stress=.5 risk=.3", "Help centre > Close account|Help centre > Dispute a charge|Help centre > Contact us|Help centre > Report fraud"),
)
APP = (
    Cat("social", 1.0, "digital=.4", "Opened WeChat|Opened TikTok|Installed TikTok|Opened Instagram|Opened WhatsApp|Opened Facebook|Installed Snapchat"),
    Cat("finance", .6, "invest=.6 aff=.4", "Opened Alipay|Opened banking app|Installed Robinhood|Opened PayPal|Installed Revolut|Opened stock trading app"),
    Cat("lending", -1.4, "stress=1.4 risk=.6", "Installed lending app QuickCash|Installed lending app CashNow|Opened loan app MoneyTap|Installed BNPL app Klarna|Opened credit builder app"),
    Cat("gambling", -1.8, "risk=1.5", "Installed BetKing|Opened PokerStars|Installed sports betting app|Opened online casino app|Installed crypto exchange app"),
    Cat("travel", -.8, "travel=1.4", "Opened Booking.com|Installed Skyscanner|Opened Airbnb|Opened airline app|Installed Google Translate"),
    Cat("shopping", .5, "deal=.6", "Opened Amazon|Opened Taobao|Installed Temu|Opened Shein|Opened eBay"),
    Cat("deals", -.3, "deal=1.3", "Opened Honey|Installed Groupon|Opened cashback app Rakuten|Installed coupon wallet"),
    Cat("tools", .2, "digital=.6", "Opened Gmail|Opened Google Maps|Installed Notion|Opened weather app|Installed VPN app"),
    Cat("games", .0, "digital=.4 risk=.3", "Opened Candy Crush|Installed Genshin Impact|Opened PUBG Mobile|Opened chess app"),
)
SEARCH = (
    Cat("travel", -.4, "travel=1.5", "cheap flights to tokyo|hotel deals paris|best time to visit bali|airport lounge access|travel credit card miles|visa for japan"),
    Cat("loans", -1.2, "stress=1.4 risk=.5", "payday loan no credit check|how to borrow money fast|consolidate credit card debt|late payment fee|cash advance limit|increase credit limit"),
    Cat("coupons", .0, "deal=1.4", "coupon for coffee|promo code food delivery|cashback offers this week|free shipping code|discount groceries"),
    Cat("investing", -.6, "invest=1.5", "best money market fund|index fund fees|how to buy mutual funds|gold price today|retirement savings plan"),
    Cat("luxury", -1.3, "aff=1.3", "rolex submariner price|louis vuitton bag|business class upgrade|premium credit card benefits|fine dining near me"),
    Cat("food", .6, "", "pizza near me|sushi delivery|coffee shop open now|healthy lunch ideas"),
    Cat("entertainment", .3, "digital=.5", "netflix new releases|concert tickets|premium music subscription|game console deals"),
    Cat("gambling", -1.6, "risk=1.5", "online casino bonus|sports betting odds|lottery results|crypto price prediction"),
    Cat("health", -.3, "", "pharmacy open now|dentist appointment|gym membership price|flu symptoms"),
)
# fmt: on
MODALITIES = (
    Modality("bill", "payments; value = amount, discount = coupon amount", 34, "act=.5 aff=.2", 3.5, "act=.5", 13, BILL, ("discount",)),
    Modality("mini", "mini-program openings", 18, "act=.4 digital=.3", .3, "digital=.8 deal=.3", 12, MINI),
    Modality("spm", "page visits; value = dwell seconds", 26, "act=.5 digital=.2", .5, "digital=.6 act=.4", 20, SPM),
    Modality("app", "app installs and opens", 11, "digital=.4 act=.2", 1.5, "digital=.6", 21, APP),
    Modality("search", "search terms", 12, "digital=.4 act=.2", .0, "digital=.9 act=.2", 22, SEARCH),
)


class Feature(NamedTuple):
    name: str
    weights: str
    noise: float
    kind: str  # lin: a + b*z clipped to [lo, hi]; exp: a*e^(b*z); cnt: Poisson(a*e^(b*z)); pct: sigmoid(a + b*z); bin: z > a
    a: float
    b: float = 1.0
    lo: float = -math.inf
    hi: float = math.inf


FEATURES = (
    Feature("age", "aff=.3 digital=-.5 invest=.2", .8, "lin", 40, 11, 18, 90),
    Feature("account_age_days", "act=.3 aff=.2", 1.0, "lin", 900, 600, 1, 5000),
    Feature("credit_limit", "aff=1 stress=-.4", .5, "exp", 5000, .6),
    Feature("n_cards", "aff=.5 act=.3 risk=.2", .5, "cnt", 1.5, .4),
    Feature("monthly_income_est", "aff=1.2", .5, "exp", 4000, .5),
    Feature("balance_avg_30d", "aff=1 stress=-.6", .6, "exp", 3000, .9),
    Feature("balance_avg_90d", "aff=1 stress=-.5", .5, "exp", 3000, .85),
    Feature("n_transfers_30d", "act=.8 digital=.3", .5, "cnt", 6, .5),
    Feature("savings_rate", "aff=.5 stress=-.8 invest=.4", .6, "pct", -1.5, .8),
    Feature("debt_to_income", "stress=1 risk=.4 aff=-.3", .6, "exp", .3, .6),
    Feature("n_late_payments_12m", "stress=1.2 risk=.3", .7, "cnt", .4, .8),
    Feature("credit_utilization", "stress=.9 risk=.4 aff=-.4", .6, "pct", -.5, 1),
    Feature("n_credit_inquiries_6m", "stress=.8 risk=.6", .7, "cnt", .8, .7),
    Feature("fund_holdings_value", "invest=1.2 aff=.8", .8, "exp", 2000, 1.2),
    Feature("n_fund_products", "invest=1.3 aff=.3", .6, "cnt", .8, .8),
    Feature("n_insurance_products", "aff=.6 invest=.2", .8, "cnt", .7, .5),
    Feature("n_devices", "digital=.6", .6, "cnt", 1.5, .3),
    Feature("login_days_30d", "act=1 digital=.5", .7, "lin", 15, 7, 0, 30),
    Feature("push_opt_in", "deal=.6 act=.3", 1.0, "bin", -.2),
    Feature("avg_session_minutes", "act=.5 digital=.3 invest=.2", .6, "exp", 4, .5),
    Feature("n_coupons_held", "deal=1.2", .7, "cnt", 3, .7),
    Feature("coupon_redeem_rate_90d", "deal=1.3 act=.3", .8, "pct", -1, .9),
    Feature("n_merchants_90d", "act=.9 aff=.3", .5, "cnt", 15, .5),
    Feature("n_overseas_txn_12m", "travel=1.3 aff=.5", .7, "cnt", 1, 1),
    Feature("has_mortgage", "aff=.6 stress=.3", 1.0, "bin", .5),
    Feature("has_car_loan", "stress=.4 aff=.2", 1.0, "bin", .8),
    Feature("n_dependents", "aff=.1", 1.0, "cnt", .8, .4),
    Feature("city_tier", "aff=-.6 digital=-.3", .8, "lin", 2.2, .9, 1, 4),
    Feature("kyc_level", "act=.4 aff=.3", .8, "lin", 2, .8, 1, 3),
    Feature("risk_questionnaire_score", "risk=.9 invest=.5", .6, "lin", 50, 15, 0, 100),
    Feature("n_failed_logins_30d", "risk=.5 digital=-.3", .8, "cnt", .3, .8),
    Feature("n_disputes_12m", "risk=.6 stress=.3", .8, "cnt", .2, .7),
    Feature("credit_score", "aff=.6 stress=-1 risk=-.3", .6, "lin", 680, 60, 300, 850),
    Feature("overdraft_count_12m", "stress=1.1 aff=-.5", .7, "cnt", .5, .9),
    Feature("membership_level", "aff=.7 act=.4", .8, "lin", 1.5, 1, 0, 4),
    Feature("n_referrals", "digital=.6 deal=.5", .8, "cnt", .3, .8),
    Feature("card_tenure_months", "aff=.3 act=.2", 1.0, "lin", 48, 30, 0, 360),
    Feature("n_subscriptions", "digital=.7 aff=.3", .6, "cnt", 2, .5),
)


class Task(NamedTuple):
    name: str
    domain: TaskDomain
    window: int
    rate: float  # target positive rate
    weights: str
    query: str


E, R, M = TaskDomain.ENGAGEMENT, TaskDomain.RISK, TaskDomain.MARKETING
TASKS = (
    Task("churn", E, 90, .20, "act=-1.1 digital=-.5 stress=.4", "Will this user stop using the app in the next 90 days?"),
    Task("app_active", E, 30, .42, "act=1.0 digital=.7", "Will this user open the app on at least 20 of the next 30 days?"),
    Task("fund_purchase", E, 30, .05, "invest=1.4 aff=.5", "Will this user buy a mutual fund in the next 30 days?"),
    Task("default_90d", R, 90, .04, "stress=1.3 risk=.7 aff=-.4", "Will this user default on a loan repayment in the next 90 days?"),
    Task("fraud_flag", R, 60, .035, "risk=1.0 digital=-.4", "Will this user's account be flagged for fraud in the next 60 days?"),
    Task("overdraft", R, 30, .15, "stress=1.1 aff=-.6 act=.3", "Will this user overdraw their account in the next 30 days?"),
    Task("coupon_redeem", M, 30, .35, "deal=1.3 act=.4", "Will this user redeem a coupon in the next 30 days?"),
    Task("travel_offer", M, 60, .12, "travel=1.3 aff=.4", "Will this user accept a travel offer for flights or hotels in the next 60 days?"),
    Task("card_upgrade", M, 90, .08, "aff=1.0 act=.4 stress=-.4", "Will this user upgrade to a premium credit card in the next 90 days?"),
    Task("premium_subscribe", M, 60, .06, "digital=.9 aff=.6 deal=-.3", "Will this user subscribe to the premium membership in the next 60 days?"),
)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(list(key)))


def _bias_for_rate(w: np.ndarray, rate: float) -> float:
    """The bias b with E[sigmoid(b + w.t)] = rate for t ~ N(0, SIGMA), by quadrature, so it is a
    property of the world, not of the sample (rates stay comparable across seeds and sizes)."""
    x, gw = hermegauss(80)
    s = math.sqrt(float(w @ SIGMA @ w))
    lo, hi = -20.0, 20.0
    for _ in range(100):
        b = (lo + hi) / 2
        lo, hi = (b, hi) if (gw @ _sigmoid(b + s * x)) / gw.sum() < rate else (lo, b)
    return (lo + hi) / 2


class _Compiled(NamedTuple):
    """A modality's categories as arrays, plus its items' offsets in the global vocabulary."""

    spec: Modality
    cat_logit: np.ndarray  # (C,)
    cat_w: np.ndarray  # (C, traits)
    log_amount: np.ndarray  # (C,)
    cum: np.ndarray  # cumulative Zipf popularity over all items of this modality
    cat_lo: np.ndarray  # cum mass before each category's first item
    cat_mass: np.ndarray
    cat_first: np.ndarray  # index of each category's first item
    cat_last: np.ndarray
    vocab_offset: int


def _compile() -> tuple[tuple[_Compiled, ...], pa.Array]:
    out, vocab = [], []
    for m in MODALITIES:
        items = [c.items.split("|") for c in m.cats]
        pop = np.concatenate([1.0 / np.arange(1, len(i) + 1) ** 0.8 for i in items])  # a few big merchants
        sizes = np.array([len(i) for i in items])
        first = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        cum = np.cumsum(pop)
        lo = np.concatenate([[0.0], cum])[first]
        mass = np.add.reduceat(pop, first)
        out.append(_Compiled(m, np.array([c.logit for c in m.cats]), np.stack([_vec(c.weights) for c in m.cats]),
                             np.array([c.log_amount for c in m.cats]), cum, lo, mass, first,
                             first + sizes - 1, len(vocab)))
        vocab += [t for i in items for t in i]
    return tuple(out), pa.array(vocab, pa.string())


COMPILED, VOCAB = _compile()
MOD_NAMES = pa.array([m.name for m in MODALITIES], pa.string())


def _timestamps(rng, t: np.ndarray, hour: float, cut_us: int, days: int) -> np.ndarray:
    """Event times strictly before the cutoff and within ``days`` of it (``t``: traits per event)."""
    n = len(t)
    # active users' events crowd towards the cutoff, fading users' lie further back (a churn signal)
    day = np.floor(days * rng.random(n) ** np.exp(0.4 * t[:, 3])).astype(np.int64)
    hours = np.mod(hour + 1.5 * t[:, 1] + 3.5 * rng.standard_normal(n), 24.0)  # risk-takers live late
    tod = np.minimum((hours * 3.6e9).astype(np.int64), DAY_US - 1)
    return cut_us - (np.minimum(day, days - 1) + 1) * DAY_US + tod


def _modality_events(rng, c: _Compiled, traits: np.ndarray, silent: np.ndarray, cut_us: int, days: int) -> dict:
    m = c.spec
    n = len(traits)
    present = (rng.random(n) < _sigmoid(m.presence + traits @ _vec(m.presence_w))) & ~silent
    w = _vec(m.count_w)
    mean = m.rate * np.exp(traits @ w - 0.5 * w @ SIGMA @ w)  # normalised so the population mean is `rate`
    counts = np.where(present, rng.poisson(mean * rng.gamma(COUNT_SHAPE, 1 / COUNT_SHAPE, n)), 0)
    user = np.repeat(np.arange(n), counts)
    t = traits[user]
    # Gumbel-max trick: a softmax draw per event without a Python loop
    cat = np.argmax(c.cat_logit + t @ c.cat_w.T + rng.gumbel(size=(len(user), len(c.cat_logit))), axis=1)
    item = np.searchsorted(c.cum, c.cat_lo[cat] + rng.random(len(user)) * c.cat_mass[cat], side="right")
    item = np.clip(item, c.cat_first[cat], c.cat_last[cat])  # guards float edges at category bounds
    value = np.full(len(user), np.nan, np.float32)
    discount = np.full(len(user), np.nan, np.float32)
    if m.name == "bill":
        value = np.round(np.exp(c.log_amount[cat] + 0.4 * t[:, 0] + 0.6 * rng.standard_normal(len(user))), 2)
        coupon = rng.random(len(user)) < _sigmoid(-2.8 + 1.3 * t[:, 2])
        discount = np.where(coupon, np.round(value * rng.uniform(0.05, 0.3, len(user)), 2), np.nan)
    elif m.name == "spm":
        value = np.round(np.exp(3.2 - 0.2 * t[:, 6] + 0.9 * rng.standard_normal(len(user))), 1)
    return {"user": user, "ts": _timestamps(rng, t, m.hour, cut_us, days), "text": item + c.vocab_offset,
            "value": value.astype(np.float32), "discount": discount.astype(np.float32)}


def _event_part(manifest: Manifest, traits: np.ndarray, ids: pa.Array, k: int, seed: int,
                cut_us: int, days: int) -> pa.Table:
    lo, hi = k * PART_USERS, min(len(traits), (k + 1) * PART_USERS)
    rng = _rng(seed, 1, k)
    silent = rng.random(hi - lo) < NO_EVENTS_RATE  # users with no sequence events at all
    if k == 0 and silent.all():  # a tiny world whose every user drew "no events": the format needs some events
        silent[0] = False
    parts = [_modality_events(rng, c, traits[lo:hi], silent, cut_us, days) for c in COMPILED]
    if k == 0:  # the user kept from "no events" can still miss every modality (one user, seed 47): draw again, from a
        redraw = _rng(seed, 1, k, 1)  # stream of its own, so that every world with events stays byte-identical
        while not any(len(p["user"]) for p in parts):
            parts = [_modality_events(redraw, c, traits[lo:hi], silent, cut_us, days) for c in COMPILED]
    cols = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    mod = np.repeat(np.arange(len(parts)), [len(p["user"]) for p in parts])
    order = np.lexsort((cols["ts"], cols["user"]))  # user then time, for compression and readers
    return events_table(manifest, {
        "user_id": ids.slice(lo, hi - lo).take(cols["user"][order]),
        "modality": MOD_NAMES.take(mod[order]), "ts": cols["ts"][order],
        "text": VOCAB.take(cols["text"][order]), "value": cols["value"][order],
        "discount": cols["discount"][order],
    })


def _feature(rng, f: Feature, traits: np.ndarray) -> np.ndarray:
    z = traits @ _vec(f.weights) + f.noise * rng.standard_normal(len(traits))
    if f.kind == "lin":
        return np.round(np.clip(f.a + f.b * z, f.lo, f.hi))  # ages, days, levels: whole numbers
    if f.kind == "exp":
        return np.round(f.a * np.exp(f.b * z), 2)
    if f.kind == "cnt":
        return rng.poisson(f.a * np.exp(f.b * z)).astype(np.float64)
    if f.kind == "pct":
        return np.round(_sigmoid(f.a + f.b * z), 4)
    return (z > f.a).astype(np.float64)  # bin


def _tabular(traits: np.ndarray, ids: pa.Array, seed: int) -> pa.Table:
    rng = _rng(seed, 2)
    keep = np.flatnonzero(rng.random(len(traits)) >= NO_TABULAR_RATE)
    if not len(keep) and len(traits):  # a tiny world whose every user drew "no row": the format needs one row
        keep = np.array([0])
    cols = {"user_id": ids.take(keep)}
    for f in FEATURES:
        values = _feature(rng, f, traits[keep])
        values[rng.random(len(keep)) < rng.uniform(0.10, 0.20)] = np.nan  # 10-20% missing per column
        cols[f.name] = pa.array(values.astype(np.float32), pa.float32(), from_pandas=True)
    return pa.table(cols)


def _tasks(traits: np.ndarray, ids: pa.Array, seed: int) -> dict[str, pa.Table]:
    rng = _rng(seed, 3)
    out = {}
    for t in TASKS:
        w = _vec(t.weights)
        prob = _sigmoid(_bias_for_rate(w, t.rate) + traits @ w)
        label = (rng.random(len(traits)) < prob).astype(np.int8)
        out[t.name] = pa.table({"user_id": ids, "label": label, "prob": prob})
    return out


def _manifest(cutoff: datetime, seed: int, n_users: int, days: int) -> Manifest:
    mods = [ModalitySpec(m.name, ModalityKind.SEQUENCE, m.extras, m.description) for m in MODALITIES]
    mods.append(ModalitySpec("tabular", ModalityKind.TABULAR, (), "profile and account features"))
    tasks = tuple(TaskSpec(t.name, t.domain, t.query, t.window) for t in TASKS)
    prov = {"generator": "data_tools.synth", "seed": seed, "n_users": n_users, "history_days": days}
    return Manifest("synth", cutoff, tuple(mods), tasks, prov)


def latent_traits(seed: int, n_users: int) -> np.ndarray:
    """(n_users, 8) the users' latent :data:`TRAITS` in a world drawn with ``seed``, in :func:`user_ids` order: what
    every observable and every task's true probability is drawn from."""
    return _rng(seed, 0).multivariate_normal(np.zeros(len(TRAITS)), SIGMA, n_users, method="cholesky")


def user_ids(n_users: int) -> list[str]:
    """The user ids of a world of ``n_users`` users: u000001, u000002, ... (wider for more than 999,999 users)."""
    width = max(6, len(str(n_users)))
    return [f"u{i:0{width}d}" for i in range(1, n_users + 1)]


def traits_of(dataset_dir: str | Path) -> dict[str, np.ndarray]:
    """user id -> latent traits (8,) of a world written by :func:`build_synthetic`, redrawn from the seed and size its
    manifest records (no file holds them). Raises ValueError for a dataset this generator did not write."""
    manifest = Manifest.load(dataset_dir)
    prov = manifest.provenance or {}
    if prov.get("generator") != "data_tools.synth" or "seed" not in prov or "n_users" not in prov:
        raise ValueError(f"{dataset_dir}: its manifest's provenance ({prov or 'none'}) does not name data_tools.synth "
                         "with a seed and a size: latent traits exist only for a synthetic world built by "
                         "`qanchor data synth`")
    n = int(prov["n_users"])
    return dict(zip(user_ids(n), latent_traits(int(prov["seed"]), n)))


def build_synthetic(out_dir: str | Path, n_users: int, seed: int,
                    cutoff: str = "2024-06-30T00:00:00+00:00", history_days: int = 180, progress: bool = True) -> Path:
    """Write a synthetic dataset of ``n_users`` users to ``out_dir`` (replaced whole) and return it."""
    if n_users < 1 or history_days < 1:
        raise ValueError(f"n_users ({n_users}) and history_days ({history_days}) must be at least 1")
    cut = datetime.fromisoformat(cutoff)
    cut = (cut if cut.tzinfo else cut.replace(tzinfo=timezone.utc)).astimezone(timezone.utc)
    cut_us = (cut - datetime(1970, 1, 1, tzinfo=timezone.utc)) // timedelta(microseconds=1)
    traits = latent_traits(seed, n_users)
    ids = pa.array(user_ids(n_users), pa.string())
    manifest = _manifest(cut, seed, n_users, history_days)
    n_parts = -(-n_users // PART_USERS)
    # a generator, not a list: each part is built as write_dataset writes it, so one part is in memory
    parts: Iterator[pa.Table] = (_event_part(manifest, traits, ids, k, seed, cut_us, history_days)
                                 for k in range(n_parts))
    parts = progress_iter(parts, total=n_parts, desc="synth events", unit="part", enabled=progress)
    return write_dataset(out_dir, manifest, parts, _tabular(traits, ids, seed), _tasks(traits, ids, seed))
