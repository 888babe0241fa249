"""Look-alike index: flat is exact, IVF (chosen by size) agrees with it, ids and self-exclusion are right."""

from __future__ import annotations

import numpy as np
import pytest

from qanchor.errors import ModelInputError
from qanchor.infer.export import embeddings_table
from qanchor.infer.index import LookalikeIndex


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(20, 32))
    vecs = centers[rng.integers(0, 20, 4000)] + 0.3 * rng.normal(size=(4000, 32))  # clustered, like real users
    return np.array([f"u{i:05d}" for i in range(4000)], dtype=object), (vecs / np.linalg.norm(vecs, axis=1, keepdims=True)).astype(np.float32)


def test_flat_is_exact_and_excludes_self(data):
    ids, vecs = data
    index = LookalikeIndex.build(ids, vecs)
    assert index.meta["kind"] == "flat"
    hits = index.search_user("u00042", k=5)
    truth = np.argsort(-(vecs @ vecs[42]))[1:6]
    assert [u for u, _ in hits] == list(ids[truth])
    assert np.allclose([s for _, s in hits], (vecs @ vecs[42])[truth], atol=1e-5)


def test_ivf_chosen_by_size_and_recalls_flat(data, tmp_path):
    ids, vecs = data
    ivf = LookalikeIndex.build(ids, vecs, ivf_min_size=1000)
    assert ivf.meta["kind"] == "ivf" and ivf.meta["nprobe"] >= 1
    flat = LookalikeIndex.build(ids, vecs)
    queries = vecs[:50]
    recall = np.mean([len({u for u, _ in a} & {u for u, _ in b}) / 10
                      for a, b in zip(ivf.search(queries, 10), flat.search(queries, 10))])
    assert recall > 0.9
    ivf.save(tmp_path / "i.faiss")
    loaded = LookalikeIndex.load(tmp_path / "i.faiss")
    assert loaded.search_user("u00007", 3) == ivf.search_user("u00007", 3)


def test_from_exported_embeddings(tmp_path):
    from qanchor.data.io import write_parquet

    emb = np.random.default_rng(1).normal(size=(5, 2, 8)).astype(np.float32)
    write_parquet(embeddings_table([f"u{i}" for i in range(5)], ["a", "b"], emb), tmp_path / "part-00000.parquet")
    index = LookalikeIndex.from_embeddings(tmp_path, "b")
    top = index.search(emb[3, 1], k=1)[0][0]
    assert top[0] == "u3" and top[1] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ModelInputError, match=r"no embeddings for query id 'zzz'; it holds \['a', 'b'\]"):
        LookalikeIndex.from_embeddings(tmp_path, "zzz")
    with pytest.raises(ModelInputError, match="not in this index"):
        index.search_user("nobody")
    with pytest.raises(ModelInputError, match="dimensions"):
        index.search(np.ones(3))


def test_index_build_settings_are_checked_before_any_work():
    from qanchor.config import IndexBuildConfig, load_config
    from qanchor.errors import ConfigError

    for bad in ("nprobe=-3", "nprobe=0", "ivf_min_size=0"):
        with pytest.raises(ConfigError, match="must be >= 1"):
            load_config(None, [bad], schema=IndexBuildConfig)
    assert load_config(None, ["nprobe=4"], schema=IndexBuildConfig).nprobe == 4


def test_a_rebuild_stopped_between_its_files_is_refused(data, tmp_path):
    """Each of the three files is replaced atomically, not the three together: a rebuild killed after its faiss file
    paired the new vectors with the old user ids (same count, same width) and searches answered with wrong users."""
    import shutil

    ids, vecs = data
    LookalikeIndex.build(ids[:100], vecs[:100]).save(tmp_path / "old.faiss")
    LookalikeIndex.build(np.array([f"new{i}" for i in range(100)], dtype=object), vecs[100:200]).save(tmp_path / "new.faiss")
    shutil.copy(tmp_path / "new.faiss", tmp_path / "old.faiss")  # the new vectors are in place, the rest is old
    with pytest.raises(ModelInputError, match="not written by one build"):
        LookalikeIndex.load(tmp_path / "old.faiss")
    assert LookalikeIndex.load(tmp_path / "new.faiss").search(vecs[100], 1)[0][0][0] == "new0"


def test_a_first_build_stopped_between_its_files_can_be_run_again(data, tmp_path, monkeypatch):
    """A first build killed after its faiss file (before its description) left a file the re-run called "not part of a
    qanchor index", and refused to replace its own output."""
    from qanchor.infer import index as index_mod

    ids, vecs = data
    built = LookalikeIndex.build(ids[:100], vecs[:100])

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies after the faiss file, before the user list and the description

    monkeypatch.setattr(index_mod.pq, "write_table", killed)  # the user list's write
    with pytest.raises(KeyboardInterrupt):
        built.save(tmp_path / "i.faiss")
    monkeypatch.undo()
    assert (tmp_path / "i.faiss").exists()
    with pytest.raises(ModelInputError, match="its build stopped before it finished"):
        LookalikeIndex.load(tmp_path / "i.faiss")
    built.save(tmp_path / "i.faiss")  # the re-run replaces its own files
    assert LookalikeIndex.load(tmp_path / "i.faiss").search(vecs[3], 1)[0][0][0] == ids[3]


def test_two_builds_of_one_path_at_once_never_load_as_one(data, tmp_path, monkeypatch):
    """Build A's files went in place, then build B ran whole, then A described the files by hashing what lay at the
    paths (B's): the index loaded with A's description and B's vectors. The digests are now those of the files each
    build wrote, taken before they are put in place, so what loads is one build's (or is refused)."""
    from qanchor.infer import index as index_mod

    ids, vecs = data
    a = LookalikeIndex.build(ids[:100], vecs[:100])
    b = LookalikeIndex.build(ids[:100], vecs[100:200])
    real, raced = index_mod._sampled_digest, []

    def b_runs_meanwhile(path):
        if not raced:  # A hashes its faiss file: B's whole build happens now
            raced.append(True)
            b.save(tmp_path / "i.faiss")
        return real(path)

    monkeypatch.setattr(index_mod, "_sampled_digest", b_runs_meanwhile)
    a.save(tmp_path / "i.faiss")  # A finishes last
    monkeypatch.undo()
    try:
        loaded = LookalikeIndex.load(tmp_path / "i.faiss")
    except ModelInputError as err:
        assert "not written by one build" in str(err)
        return
    (user, score), = loaded.search(vecs[0], 1)[0]  # A's vectors under A's description, or nothing
    assert user == ids[0] and score == pytest.approx(1.0, abs=1e-5)


def test_inputs_an_index_cannot_hold_are_named(tmp_path):
    """Mismatched lengths were called "user ids repeat", 1-D vectors a ValueError, and a NaN row was indexed, never
    found, and searching its user blamed the query; a folder of other Parquet files was a KeyError traceback."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids, v = np.array([f"u{i}" for i in range(20)], dtype=object), np.random.default_rng(0).normal(size=(20, 8))
    with pytest.raises(ModelInputError, match="got 10 user ids but 20 vectors"):
        LookalikeIndex.build(ids[:10], v)
    with pytest.raises(ModelInputError, match=r"vectors must be \[N, D\]"):
        LookalikeIndex.build(ids[:1], v[0])
    v[3] = np.nan
    with pytest.raises(ModelInputError, match="embeddings of u3 hold NaN or inf"):
        LookalikeIndex.build(ids, v)
    (tmp_path / "events").mkdir()
    pq.write_table(pa.table({"user_id": ["a"], "ts": [1], "text": ["x"]}), tmp_path / "events" / "part-00000.parquet")
    with pytest.raises(ModelInputError, match="not an embedding shard .*query_id, embedding"):
        LookalikeIndex.from_embeddings(tmp_path / "events", "q0")


def test_an_index_knows_the_model_that_made_its_vectors_and_refuses_another_models_vector(infer_env, tmp_path, capsys):
    """A vector embedded by another checkpoint was searched without a word (vectors of two models share no space);
    a zero vector returned arbitrary users at score 0; a repeated user id was blamed on a query_id already given."""
    import json

    from qanchor.data.io import write_parquet
    from qanchor.infer.export import export_embeddings

    export_embeddings(infer_env.qa, infer_env.ds, [("churn", "Will this user stop paying?")], tmp_path / "e",
                      progress=False)
    index = LookalikeIndex.from_embeddings(tmp_path / "e", "churn")
    own = infer_env.qa.weights_id()
    assert index.meta["checkpoint"] == own == json.loads((tmp_path / "e" / "export.json").read_text())["checkpoint"]
    index.save(tmp_path / "i.faiss")
    index = LookalikeIndex.load(tmp_path / "i.faiss")
    vector = infer_env.qa.embed(infer_env.ds.user("u002"), "Will this user stop paying?")[0, 0]
    assert index.search(vector, 1, made_by=own)[0][0][0] == "u002"
    with pytest.raises(ModelInputError, match="the vector was embedded by model 0000000000000000, the index holds"):
        index.search(vector, 1, made_by="0" * 64)
    with pytest.raises(ModelInputError, match="all zeros"):
        index.search(np.zeros_like(vector), 1)
    emb = np.random.default_rng(1).normal(size=(3, 1, 8)).astype(np.float32)
    (tmp_path / "twice").mkdir()
    for shard in ("part-00000.parquet", "part-00001.parquet"):  # one export's shard copied twice
        write_parquet(embeddings_table(["u0", "u1", "u2"], ["a"], emb), tmp_path / "twice" / shard)
    with pytest.raises(ModelInputError, match="user id 'u0' appears more than once among the embeddings of query 'a'"):
        LookalikeIndex.from_embeddings(tmp_path / "twice", "a")
    with pytest.raises(ModelInputError, match="user id 'u0' appears more than once; give each user one vector"):
        LookalikeIndex.build(np.array(["u0", "u1", "u0"]), emb[:, 0])
    # an index that records no model (built before the record, or from bare arrays): the check is said to be impossible
    bare = LookalikeIndex.build(np.array(["u0", "u1", "u2"]), emb[:, 0])
    capsys.readouterr()
    assert bare.search(emb[1, 0], 1, made_by=own)[0][0][0] == "u1"
    assert "does not record the model that made its vectors" in capsys.readouterr().err
    # one embedding saved as a row ([1, D]) is one vector, from the command line too
    from qanchor.cli import main

    np.save(tmp_path / "row.npy", vector[None, :])
    assert main(["index", "search", f"index={tmp_path / 'i.faiss'}", f"vector={tmp_path / 'row.npy'}", "k=1", "json=true",
                 f"checkpoint={infer_env.ckpt}"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["user_id"] == "u002"
    np.save(tmp_path / "queries.npy", np.stack([vector, vector])[None])  # one user under two queries, [1, Q, D]
    assert main(["index", "search", f"index={tmp_path / 'i.faiss'}", f"vector={tmp_path / 'queries.npy'}"]) == 2
    assert "holds an array of shape (1, 2, 128)" in capsys.readouterr().err
