"""The pretraining stream: deterministic per (seed, step), and query-grouped batches when asked."""

from __future__ import annotations

import shutil
from collections import Counter

import numpy as np
import pytest

from qanchor.train.pairs import PretrainStream
from tests.model.helpers import model_and_stream


@pytest.fixture(scope="module")
def stream(tiny_dataset, tmp_path_factory):
    ds_dir = tmp_path_factory.mktemp("pairs") / "ds"
    shutil.copytree(tiny_dataset, ds_dir, ignore=shutil.ignore_patterns(".qanchor_cache"))
    return model_and_stream(ds_dir)[2]


def _grouped(stream: PretrainStream, g: int, seed: int = 0) -> PretrainStream:
    return PretrainStream(stream.ds, stream.pipe, stream.tokenizer, stream.token_ids, stream.model_cfg, seed=seed,
                          group_size=g)


def test_query_groups_share_one_query(stream):
    grouped = _grouped(stream, 4)
    order = grouped.epoch_order(0)
    assert sorted(order.tolist()) == sorted(stream.epoch_order(0).tolist())  # the same pairs, only ordered
    queries = [grouped.queries[i] for i in order]
    groups = [queries[i : i + 4] for i in range(0, len(queries) - len(queries) % 4, 4)]
    same = sum(len(set(g)) == 1 for g in groups)
    # every query with >= 4 pairs fills whole groups; only the mixed leftovers (fewer than 4 per query) differ
    leftovers = sum(n % 4 for n in Counter(queries).values())
    assert same >= len(groups) - -(-leftovers // 4) and same > 0
    ids = grouped.pair_ids(0, 8)
    assert len({grouped.queries[i] for i in ids[:4]}) == 1 or leftovers  # a batch of 8 = two groups of 4


def test_stream_is_a_pure_function_of_seed_and_step(stream):
    a, b = _grouped(stream, 2, seed=3), _grouped(stream, 2, seed=3)
    assert np.array_equal(a.pair_ids(5, 4), b.pair_ids(5, 4))
    assert not np.array_equal(_grouped(stream, 2, seed=4).epoch_order(0), a.epoch_order(0))


@pytest.mark.parametrize("world", [1, 2])
def test_answers_for_steps_are_exactly_the_answers_the_steps_use(stream, world):
    batch = 4
    per_epoch = len(stream) // (batch * world)
    steps = per_epoch + 3  # crosses an epoch boundary
    used = [i for step in range(steps) for rank in range(world) for i in stream.pair_ids(step, batch, rank, world)]
    assert sorted(stream.pair_ids_for_steps(steps, batch * world).tolist()) == sorted(used)
    assert {stream.answers[i] for i in used} <= set(stream.answers_for_steps(steps, batch * world))
    few = stream.answers_for_steps(2, batch * world)  # a short run primes only what it will meet
    assert few == sorted({stream.answers[i] for step in range(2) for r in range(world)
                          for i in stream.pair_ids(step, batch, r, world)})
    assert len(few) < len(set(stream.answers))
    assert stream.pair_ids_for_steps(0, batch).size == 0
    assert stream.answers_for_steps(10**9, batch) == sorted(set(stream.answers))  # an epoch or more: every answer


@pytest.mark.parametrize("fraction, sources", [(0.0, {"future", "forecast"}), (1.0, {"uqa"})])
def test_a_uqa_fraction_of_0_or_1_trains_on_one_kind_of_pair(stream, fraction, sources):
    """uqa_fraction=1 used to add every uqa pair to every future and forecast pair (a share of 0.6 here)."""
    only = PretrainStream(stream.ds, stream.pipe, stream.tokenizer, stream.token_ids, stream.model_cfg, seed=0,
                          uqa_fraction=fraction)
    source = stream.ds.userU().sort_by([("user_id", "ascending"), ("cutoff", "ascending"), ("source", "ascending"),
                                        ("query", "ascending")]).column("source").to_pylist()  # the stream's pair order
    drawn = {source[i] for i in only.epoch_order(0)}
    assert drawn <= sources and len(only) == sum(s in sources for s in source)


def test_a_time_varying_tabular_snapshot_is_withheld_from_pairs_cut_before_the_dataset_cutoff(stream, monkeypatch):
    """The tabular values are taken at the dataset's cutoff; "logins in the last 30 days" there describes the window a
    pair cut 30 days earlier asks about. Static values (the default: demographics) reach every pair."""
    from dataclasses import replace

    earlier = [i for i in range(len(stream)) if stream.cutoff_us[i] < stream.pipe.packer.cutoff_us][:40]
    assert earlier
    static = stream.pack_pairs(np.array(earlier))
    with_tabular = [k for k, p in enumerate(static) if p.tabular is not None]
    assert with_tabular  # the tiny dataset has tabular rows: the static default hands them on
    manifest = stream.ds.manifest
    varying = replace(manifest, modalities=tuple(replace(m, time_varying=m.kind.value == "tabular")
                                                 for m in manifest.modalities))
    monkeypatch.setattr(stream.ds, "manifest", varying)
    withheld = stream.pack_pairs(np.array(earlier))
    assert all(p.tabular is None for p in withheld)
    for a, b in zip(static, withheld):  # only the snapshot is withheld: the events are packed alike
        assert a.user_id == b.user_id
        for name in a.modalities:
            assert np.array_equal(a.modalities[name].text_rows, b.modalities[name].text_rows)


def test_a_user_asked_several_questions_at_one_cutoff_is_packed_once_and_as_packed_alone(stream, monkeypatch):
    """Setup packs thousands of pairs to standardise the query evidence; a user asked four questions at one cutoff
    was packed four times. Pairs of one (user, cutoff) now share one packed user, equal to that user packed alone;
    a table kept across calls is read and added to."""
    key = lambda i: (stream.user_ids[i], int(stream.cutoff_us[i]))  # noqa: E731
    counts = Counter(key(i) for i in range(len(stream)))
    shared = next(k for k, n in counts.items() if n > 1)
    ids = np.array([i for i in range(len(stream)) if key(i) == shared] + [i for i in range(len(stream))
                                                                           if key(i) != shared][:30])
    packs = []
    real_pack = stream.pipe.packer.pack
    monkeypatch.setattr(stream.pipe.packer, "pack", lambda record, cutoff: packs.append(1) or real_pack(record, cutoff))
    table: dict = {}
    packed = stream.pack_pairs(ids, table)
    assert len(packs) == len({key(i) for i in ids}) < len(ids)
    assert packed[0] is packed[1] and len(table) == len(packs)
    for i, user in zip(ids, packed):  # each as it would be packed on its own
        alone = real_pack(stream._record(stream.user_ids[i], int(stream.partition_of[i])), int(stream.cutoff_us[i]))
        assert user.user_id == alone.user_id and user.modalities.keys() == alone.modalities.keys()
        for name, m in user.modalities.items():
            assert np.array_equal(m.text_rows, alone.modalities[name].text_rows)
            assert np.array_equal(m.numeric, alone.modalities[name].numeric)
            assert np.array_equal(m.history, alone.modalities[name].history)
    before = len(packs)
    again = stream.pack_pairs(ids[:5], table)
    assert len(packs) == before and all(a is b for a, b in zip(again, packed[:5]))  # read from the table kept
