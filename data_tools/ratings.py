"""A synthetic ratings world: one modality of rated titles, and profile tasks that only the titles' content answers.

Complete Journey and the synthetic payments world are count-driven: how much and how often a user acts predicts
their tasks, and a logistic regression on RFM counts is the peer to beat. Many user logs are the opposite: everyone
rates, watches or reads about as much, and *what* they chose says who they are (a MovieLens-style dataset with
demographic tasks). This world is that case, with known truth, so a recipe can be checked on a dataset whose signal
is in the event texts before it meets one:

- each user has a gender, an age and an occupation; their taste for each of 12 genres is a linear function of
  those plus personal noise;
- they give a negative-binomial number of ratings (median about 60, a long tail into the hundreds; the count
  carries almost nothing about the profile), each title drawn by a softmax over the titles' genre affinities, with
  replacement: a title may be rated again (about a quarter of a user's ratings repeat one; median about 46 distinct
  titles); the value is the 1-5 star rating, higher where the taste is stronger;
- a title's text names it and its genres ("Midnight Harbour (1987), crime / drama"), so a sentence encoder sees
  the content;
- tasks are profile questions with deterministic labels (domain ``profile``): the user's own attributes.

Example (a few seconds)::

    from data_tools.ratings import build_ratings
    path = build_ratings("/tmp/ratings", n_users=2000, seed=0)

Identical arguments give byte-identical files (PCG64 streams keyed by (seed, stream)).
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa

from qanchor.data.manifest import Manifest, ModalityKind, ModalitySpec, TaskDomain, TaskSpec
from qanchor.data.schema import events_table, write_dataset

__all__ = ["build_ratings", "GENRES", "OCCUPATIONS", "TASKS"]

DAY_US = 86_400_000_000
# genre, words its titles are made of (first half adjectives / second half nouns)
GENRES = (
    ("action", "Iron|Rogue|Lethal|Final|Burning|Steel|Savage|Maximum", "Strike|Vengeance|Protocol|Fury|Impact|Siege|Mission|Rampage"),
    ("comedy", "Crazy|Lucky|Awkward|Silly|Big|Happy|Wild|Clumsy", "Weekend|Neighbours|Wedding|Roommates|Vacation|Family|Party|Road Trip"),
    ("drama", "Quiet|Broken|Distant|Long|Silent|Fading|Open|Last", "Summer|Letters|Promises|River|House|Years|Window|Goodbye"),
    ("romance", "Sweet|Endless|Secret|Tender|First|Paris|Forever|Sunset", "Kiss|Love|Heart|Romance|Affair|Valentine|Embrace|Honeymoon"),
    ("horror", "Dark|Cursed|Bloody|Haunted|Hollow|Wicked|Grim|Possessed", "Night|Cabin|Ritual|Asylum|Curse|Scream|Demon|Graveyard"),
    ("science fiction", "Galactic|Quantum|Stellar|Cyber|Orbital|Alien|Robotic|Temporal", "Frontier|Colony|Android|Nebula|Paradox|Invasion|Starship|Matrix"),
    ("documentary", "True|Hidden|Untold|Real|Wild|Living|Deep|Ancient", "Planet|Oceans|Economy|History|Climate|Empire|Science|Nature"),
    ("animation", "Little|Magic|Brave|Tiny|Flying|Happy|Clever|Fluffy", "Dragon|Bunny|Princess|Puppy|Kingdom|Robot Friend|Forest Tale|Penguins"),
    ("crime", "Cold|Dirty|Midnight|Deadly|Corrupt|Silent|Double|Stolen", "Harbour|Heist|Witness|Detective|Alibi|Cartel|Verdict|Getaway"),
    ("musical", "Dancing|Golden|Singing|Broadway|Starlit|Jazz|Rhythm|Velvet", "Dreams|Melody|Stage|Chorus|Ballroom|Serenade|Show|Nights"),
    ("war", "Bloody|Northern|Forgotten|Brave|Burning|Iron|Lost|Fallen", "Front|Battalion|Beachhead|Trenches|Regiment|Siege|Convoy|Resistance"),
    ("western", "Dusty|Lone|Wild|Outlaw|Golden|Red|High|Desert", "Frontier|Ranch|Gunslinger|Sheriff|Canyon|Saloon|Stagecoach|Mesa"),
)
OCCUPATIONS = ("student", "technology", "arts", "retired", "other")
OCC_RATE = (0.2, 0.2, 0.12, 0.1, 0.38)
# Taste (genre logit) = BASE + gender effect + age effect (per decade above 35) + occupation effect + noise.
BASE = np.array([.6, .6, .5, .1, -.2, .1, -.6, -.4, .3, -.7, -.5, -.8])
FEMALE = np.array([-.8, .1, .5, 1.1, .1, -.6, .1, .3, -.1, .8, -.6, -.4])
PER_DECADE = np.array([-.25, -.15, .25, .0, -.35, -.15, .3, -.3, .1, .2, .35, .45])
OCC_EFFECT = {
    "student": np.array([.3, .5, -.2, .1, .5, .3, -.2, .4, 0, 0, -.2, -.4]),
    "technology": np.array([.3, 0, -.2, -.3, 0, 1.0, .4, 0, .1, -.3, .1, -.2]),
    "arts": np.array([-.5, 0, .7, .3, -.1, -.2, .6, .2, 0, .9, -.3, -.2]),
    "retired": np.array([-.3, -.2, .4, .1, -.6, -.4, .5, -.3, .2, .4, .6, .8]),
    "other": np.zeros(12),
}
TASTE_NOISE = 0.8  # personal taste beyond the profile: what keeps the oracle below 1
N_TITLES = 400
MEAN_RATINGS, COUNT_SHAPE = 70.0, 1.5
TASKS = (
    ("is_female", "Is this user a woman?"),
    ("age_under_25", "Is this user younger than 25?"),
    ("age_over_50", "Is this user older than 50?"),
    ("occupation_student", "Is this user a student?"),
    ("occupation_technology", "Does this user work in technology or engineering?"),
    ("occupation_arts", "Does this user work in the arts?"),
)


def _rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(list(key)))


def _titles(rng: np.random.Generator) -> tuple[list[str], np.ndarray]:
    """N_TITLES title texts and their genre membership (N_TITLES, 12): one main genre, a second one for about half."""
    texts, member = [], np.zeros((N_TITLES, len(GENRES)))
    seen = set()
    while len(texts) < N_TITLES:
        g = int(rng.integers(len(GENRES)))
        second = int(rng.integers(len(GENRES))) if rng.random() < 0.5 else g
        adj = GENRES[g][1].split("|")[rng.integers(8)]
        noun = GENRES[second if rng.random() < 0.5 else g][2].split("|")[rng.integers(8)]
        year = int(1950 + rng.integers(74))
        genres = GENRES[g][0] if second == g else f"{GENRES[g][0]} / {GENRES[second][0]}"
        text = f"{adj} {noun} ({year}), {genres}"
        if text in seen:
            continue
        seen.add(text)
        member[len(texts), g] = 1.0
        member[len(texts), second] = max(member[len(texts), second], 0.6)
        texts.append(text)
    return texts, member


_DRAW_ROWS = 8192  # ratings whose titles are drawn at once (8192 x 400 float64: 26 MB per array)


def build_ratings(out_dir: str | Path, n_users: int, seed: int, cutoff: str = "2024-06-30T00:00:00+00:00",
                  history_days: int = 730) -> Path:
    """Write a ratings world of ``n_users`` users to ``out_dir`` (replaced whole) and return it."""
    if n_users < 1 or history_days < 1:
        raise ValueError(f"n_users ({n_users}) and history_days ({history_days}) must be at least 1")
    cut = datetime.fromisoformat(cutoff)
    cut = (cut if cut.tzinfo else cut.replace(tzinfo=timezone.utc)).astimezone(timezone.utc)
    cut_us = (cut - datetime(1970, 1, 1, tzinfo=timezone.utc)) // timedelta(microseconds=1)
    texts, member = _titles(_rng(seed, 0))
    popularity = _rng(seed, 1).normal(0, 0.8, N_TITLES)  # some titles are watched by everyone

    rng = _rng(seed, 2)
    female = rng.random(n_users) < 0.35
    occupation = rng.choice(len(OCCUPATIONS), size=n_users, p=OCC_RATE)
    age = np.where(OCCUPATIONS.index("student") == occupation, rng.normal(22, 3, n_users),
                   np.where(OCCUPATIONS.index("retired") == occupation, rng.normal(67, 5, n_users),
                            rng.normal(38, 11, n_users)))
    age = np.clip(np.round(age), 16, 85)
    taste = (BASE + female[:, None] * FEMALE + ((age - 35) / 10)[:, None] * PER_DECADE
             + np.stack([OCC_EFFECT[OCCUPATIONS[o]] for o in occupation])
             + TASTE_NOISE * rng.standard_normal((n_users, len(GENRES))))  # (U, G)
    # How many titles each user rated: overdispersed, and nearly independent of who they are.
    counts = rng.poisson(MEAN_RATINGS * rng.gamma(COUNT_SHAPE, 1 / COUNT_SHAPE, n_users)) + 5
    user = np.repeat(np.arange(n_users), counts)
    affinity = taste @ member.T  # (U, N_TITLES)
    # Gumbel-max: one softmax draw per rating, over the ratings in blocks (a (ratings, titles) array at once took
    # 0.5 GB per 1,000 users); the generator hands out the same numbers in the same order either way
    title = np.empty(len(user), np.int64)
    for start in range(0, len(user), _DRAW_ROWS):
        rows = user[start : start + _DRAW_ROWS]
        logits = affinity[rows] + popularity  # (block, N_TITLES)
        title[start : start + len(rows)] = np.argmax(logits + rng.gumbel(size=logits.shape), axis=1)
    rating = np.clip(np.round(3.2 + 0.6 * affinity[user, title] + 0.9 * rng.standard_normal(len(user))), 1, 5)
    day = np.floor(history_days * rng.random(len(user))).astype(np.int64)
    ts = cut_us - (day + 1) * DAY_US + (rng.random(len(user)) * (DAY_US - 1)).astype(np.int64)
    order = np.lexsort((ts, user))

    width = max(6, len(str(n_users)))
    ids = pa.array([f"u{i:0{width}d}" for i in range(1, n_users + 1)], pa.string())
    manifest = Manifest(
        "ratings", cut,
        (ModalitySpec("rating", ModalityKind.SEQUENCE, (), "a title the user rated; value = stars (1-5)"),),
        tuple(TaskSpec(name, TaskDomain.PROFILE, query, 30, "a profile attribute, fixed at the cutoff")
              for name, query in TASKS),
        {"generator": "data_tools.ratings", "seed": seed, "n_users": n_users, "history_days": history_days})
    events = events_table(manifest, {
        "user_id": ids.take(user[order]), "modality": pa.array(["rating"] * len(user), pa.string()),
        "ts": ts[order], "text": pa.array(texts, pa.string()).take(title[order]),
        "value": rating[order].astype(np.float32)})
    labels = {
        "is_female": female,
        "age_under_25": age < 25,
        "age_over_50": age > 50,
        "occupation_student": occupation == OCCUPATIONS.index("student"),
        "occupation_technology": occupation == OCCUPATIONS.index("technology"),
        "occupation_arts": occupation == OCCUPATIONS.index("arts"),
    }
    tasks = {name: pa.table({"user_id": ids, "label": pa.array(labels[name].astype(np.int8))}) for name, _ in TASKS}
    return write_dataset(out_dir, manifest, [events], None, tasks)
