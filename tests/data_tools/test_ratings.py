"""The ratings world: deterministic bytes, one modality before the cutoff, profile labels that the titles' content
answers and the counts do not."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score

from data_tools.ratings import GENRES, TASKS, build_ratings
from qanchor.data.manifest import Manifest, ModalityKind, TaskDomain
from qanchor.data.schema import USERU_FILE
from qanchor.data.userU import build_userU
from qanchor.data.validate import validate_dataset

N_USERS = 1500


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return build_ratings(tmp_path_factory.mktemp("ratings") / "ds", n_users=N_USERS, seed=3)


def _file_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes_and_another_seed_differs(world, tmp_path):
    assert _file_bytes(build_ratings(tmp_path / "again", n_users=N_USERS, seed=3)) == _file_bytes(world)
    assert _file_bytes(build_ratings(tmp_path / "other", n_users=N_USERS, seed=4)) != _file_bytes(world)


def test_one_rating_modality_no_tabular_profile_tasks_and_a_valid_dataset(world):
    report = validate_dataset(world)
    m = Manifest.load(world)
    assert [(s.name, s.kind) for s in m.modalities] == [("rating", ModalityKind.SEQUENCE)]
    assert [t.name for t in m.tasks] == [name for name, _ in TASKS]
    assert all(t.domain is TaskDomain.PROFILE for t in m.tasks)
    assert report.n_users == N_USERS and report.n_tabular_users == 0
    events = ds.dataset(world / "events", format="parquet").to_table()
    assert events["ts"].to_numpy().max() < np.datetime64(m.cutoff.replace(tzinfo=None), "us")
    stars = events["value"].to_numpy()
    assert set(np.unique(stars)) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    per_user = np.unique(events["user_id"].to_numpy(zero_copy_only=False), return_counts=True)[1]
    assert len(per_user) == N_USERS and per_user.min() >= 5 and np.median(per_user) > 40  # long histories
    texts = set(events["text"].to_pylist())
    genre_names = [g[0] for g in GENRES]
    assert all(any(g in t for g in genre_names) for t in texts)  # every title names its genres


def _user_features(world: Path):
    events = ds.dataset(world / "events", format="parquet").to_table().to_pandas()
    genre_names = [g[0] for g in GENRES]
    share = np.stack([events["text"].str.contains(g, regex=False).to_numpy(float) for g in genre_names], axis=1)
    frame = events[["user_id"]].copy()
    for j, g in enumerate(genre_names):
        frame[g] = share[:, j]
    genre_share = frame.groupby("user_id").mean()
    count = np.log(events.groupby("user_id").size())
    return genre_share, count


def test_the_titles_answer_the_profile_tasks_and_the_counts_do_not(world):
    """What the world is for: a regression on each user's genre shares (what a mean text vector holds) predicts every
    task well above chance, one on the number of ratings does not."""
    genre_share, count = _user_features(world)
    for name, _ in TASKS:
        labels = pq.read_table(world / "tasks" / f"{name}.parquet").to_pandas().set_index("user_id")["label"]
        y = labels.loc[genre_share.index].to_numpy()
        auc_content = cross_val_score(LogisticRegression(max_iter=2000), genre_share.to_numpy(), y, cv=3,
                                      scoring="roc_auc").mean()
        auc_count = cross_val_score(LogisticRegression(), count.loc[genre_share.index].to_numpy()[:, None], y, cv=3,
                                    scoring="roc_auc").mean()
        assert auc_content > 0.7, (name, auc_content)
        assert abs(auc_count - 0.5) < 0.08, (name, auc_count)


def test_pretraining_questions_name_genres_not_title_words(tmp_path):
    """UserU's category questions ("top categories", "X events again / for the first time") read each title's genres:
    the first word of "Midnight Harbour (1987), crime" named a title word, so no category question was about taste."""
    root = build_ratings(tmp_path / "small", n_users=80, seed=5)
    stats = build_userU(root, seed=0, progress=False)
    assert stats.dropped_unverified == 0
    answers = " ".join(pq.read_table(root / USERU_FILE).column("answer").to_pylist())
    queries = pq.read_table(root / USERU_FILE).column("query").to_pylist()
    named = set(re.findall(r"rating/([^(),]+?) \(\d+ events?\)", answers))
    asked = {m.group(1) for q in queries if (m := re.search(r"have ([^?]+?) rating events (?:again|for the first time)", q))}
    genres = {g for g, *_ in GENRES}
    assert len(named) >= 5 and named <= genres
    assert len(asked) >= 5 and asked <= genres
