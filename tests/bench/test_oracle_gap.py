"""benchmarks/oracle_gap.py: the synthetic world's gap to the oracle taken apart with the generator's own traits."""

from __future__ import annotations

import numpy as np
import pytest

from data_tools.synth import TRAITS, build_synthetic
from tests.conftest import build_tiny_dataset
from tests.helpers import load_benchmark


@pytest.fixture(scope="module")
def og():
    return load_benchmark("oracle_gap")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_synthetic(tmp_path_factory.mktemp("og") / "world", n_users=1000, seed=5, progress=False)


def test_a_reading_of_the_traits_is_cross_fitted(og):
    """Features that hold the traits read them back (R^2 near 1); pure noise reads nothing (R^2 <= 0), which an
    in-sample fit over 200 noise columns would not give: no user's own traits enter its reading."""
    rng = np.random.default_rng(0)
    traits = rng.normal(size=(600, len(TRAITS)))
    noise = rng.normal(size=(600, 200))
    held = og.r_squared(og.read_traits(np.hstack([traits + 0.05 * rng.normal(size=traits.shape), noise]), traits, "ridge"), traits)
    assert min(held.values()) > 0.95
    blind = og.r_squared(og.read_traits(noise, traits, "ridge"), traits)
    assert max(blind.values()) < 0.02
    with pytest.raises(ValueError, match="ridge.*lgbm"):
        og.read_traits(noise, traits, "forest")


def test_the_gap_is_labels_plus_data_plus_representation(og):
    rows = {"oracle": {"auc": 0.81}, "true_traits": {"auc": 0.80}, "observed_traits_linear": {"auc": 0.77},
            "observed_traits_lgbm": {"auc": 0.78}, "embedding:a": {"auc": 0.75}, "embedding:b": {"auc": 0.76}}
    d = og.decompose(rows, ["a", "b"])
    assert d["observed_ceiling"] == 0.78  # the better reading of the data
    assert d["labels"] == pytest.approx(0.01) and d["data"] == pytest.approx(0.02)
    assert d["embedding"] == pytest.approx(0.755) and d["representation"] == pytest.approx(0.025)
    assert d["labels"] + d["data"] + d["representation"] == pytest.approx(d["oracle_gap"]) == pytest.approx(0.055)
    assert set(og.decompose(rows, [])) == {"labels", "data", "observed_ceiling"}


def test_on_a_world_the_truth_beats_its_reading_and_the_reading_holds_the_traits(og, world):
    result = og.run(str(world), [], "What kind of user is this?", lgbm=False)
    rows = result["rows"]
    assert set(rows) == {"oracle", "true_traits", "observed_traits_linear"}
    assert rows["oracle"]["auc"] > rows["observed_traits_linear"]["auc"]
    assert rows["true_traits"]["auc"] > rows["observed_traits_linear"]["auc"]
    r2 = result["trait_r2"]["observed_traits_linear"]
    assert set(r2) == set(TRAITS)
    # activity drives every modality's counts, so the data show it well; none is read perfectly from events
    assert r2["act"] > 0.6 and all(0.1 < v < 0.99 for v in r2.values()), r2
    assert result["decomposition"]["labels"] == pytest.approx(rows["oracle"]["auc"] - rows["true_traits"]["auc"])
    assert len(result["per_task"]) == 10


def test_a_dataset_the_generator_did_not_write_is_refused_by_name(og, tmp_path):
    data = build_tiny_dataset(tmp_path / "tiny")
    with pytest.raises(SystemExit, match="tiny.*data_tools.synth"):
        og.run(str(data), [], "What kind of user is this?", lgbm=False)
