"""QAnchor.embed: cached == uncached, query-conditioned, batch-invariant, deterministic, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
import torch

from qanchor.data.dataset import EventSeq, UserRecord
from qanchor.errors import CheckpointError, ModelInputError
from qanchor.infer.api import QAnchor, embed
from tests.conftest import QUERIES

CUTOFF = datetime(2024, 6, 30, tzinfo=timezone.utc)


def random_user(rng: np.random.Generator, uid: str) -> dict:
    """A user built in code: random modalities, event counts (some above the cap of 8), texts and values."""
    texts = ["Coffee shop", "Opened Alipay", "cheap flights", "Bookshop", "Paid rent", "loan"]
    events = {}
    for modality in ("bill", "app", "search"):
        n = int(rng.integers(0, 12))
        if n:
            events[modality] = [{"ts": CUTOFF - timedelta(hours=float(rng.uniform(1, 2000))),
                                 "text": texts[int(rng.integers(len(texts)))],
                                 "value": float(rng.gamma(2, 10)) if rng.random() < 0.7 else None,
                                 **({"discount": float(rng.uniform(0, 3))} if modality == "bill" and rng.random() < 0.5 else {})}
                                for _ in range(n)]
    tabular = {"age": float(rng.integers(18, 80)), "income": None} if rng.random() < 0.5 else None
    return {"user_id": uid, "events": events, "tabular": tabular}


@pytest.fixture(scope="module")
def users(infer_env):
    rng = np.random.default_rng(7)
    records = list(infer_env.ds.users())[:6]
    return records + [random_user(rng, f"r{i}") for i in range(6)]


def test_cached_equals_uncached(infer_env, users):
    qa = infer_env.qa
    cached = qa.embed(users, QUERIES)
    reference = qa.embed(users, QUERIES, use_cache=False)
    assert cached.shape == (len(users), len(QUERIES), 128) and cached.dtype == np.float32
    assert np.abs(cached - reference).max() < 1e-4
    assert np.allclose(np.linalg.norm(cached, axis=-1), 1.0, atol=1e-5)


def test_queries_and_users_differ(infer_env, users):
    emb = infer_env.qa.embed(users, QUERIES)
    for a in range(len(QUERIES)):
        for b in range(a + 1, len(QUERIES)):
            assert np.abs(emb[:, a] - emb[:, b]).max(axis=-1).min() > 1e-3  # every user, every pair of queries
    assert np.abs(emb[0, 0] - emb[1, 0]).max() > 1e-3


def test_alone_equals_in_batch_and_deterministic(infer_env, users):
    qa = infer_env.qa
    batch = qa.embed(users, QUERIES)
    for i in (0, 3, 7, 11):
        alone = qa.embed(users[i], QUERIES)
        assert np.abs(alone[0] - batch[i]).max() < 1e-5
    assert np.array_equal(batch, qa.embed(users, QUERIES))  # bitwise on CPU


def test_dict_user_equals_dataset_record(infer_env):
    rec = infer_env.ds.user("u002")
    as_dict = {"user_id": rec.user_id, "tabular": dict(zip(infer_env.ds.tabular_columns, rec.tabular.tolist())),
               "events": {m: [{"ts": np.datetime64(int(t), "us"), "text": x, "value": None if np.isnan(v) else float(v),
                               **({"discount": None if np.isnan(e[0]) else float(e[0])} if m == "bill" else {})}
                              for t, x, v, e in zip(s.ts, s.text, s.value, s.extras)] for m, s in rec.events.items()}}
    as_dict["tabular"] = {k: (None if np.isnan(v) else v) for k, v in as_dict["tabular"].items()}
    qa = infer_env.qa
    assert np.array_equal(qa.embed(rec, QUERIES), qa.embed(as_dict, QUERIES))


def test_user_without_events_and_module_level_embed(infer_env):
    qa = infer_env.qa
    vec = embed({"user_id": "nobody", "events": {}}, QUERIES[0], model=qa)
    assert vec.shape == (128,) and np.isfinite(vec).all()
    assert np.array_equal(vec, qa.embed({"user_id": "nobody", "events": {}}, QUERIES[:1])[0, 0])


def test_cutoff_changes_ages_and_late_events_warn(infer_env):
    qa = infer_env.qa
    user = {"user_id": "x", "events": {"bill": [{"ts": "2024-06-29T10:00:00Z", "text": "Coffee shop", "value": 3.0}]}}
    a = qa.embed(user, QUERIES[:1])
    b = qa.embed(user, QUERIES[:1], cutoff="2024-09-30T00:00:00+00:00")
    assert np.abs(a - b).max() > 1e-5
    with pytest.warns(UserWarning, match="after the cutoff"):
        qa.embed(user, QUERIES[:1], cutoff="2024-06-01")


@pytest.mark.parametrize("user, message", [
    ({"user_id": "x", "events": {"sms": []}}, "unknown modality 'sms'"),
    ({"user_id": "x", "events": {"bill": [{"ts": "2024-01-01", "value": 1.0}]}}, "needs 'ts'"),
    ({"user_id": "x", "events": {"bill": [{"ts": "yesterday", "text": "a"}]}}, "not an ISO datetime"),
    ({"user_id": "x", "events": {"bill": [{"ts": 1700000000, "text": "a"}]}}, "not a timestamp"),
    ({"user_id": "x", "events": {"bill": [{"ts": "2024-01-01", "text": "a", "value": "12"}]}}, "expected a number"),
    ({"user_id": "x", "events": {"bill": [{"ts": "2024-01-01", "text": "a", "price": 1}]}}, "unknown field 'price'"),
    ({"user_id": "x", "events": {"bill": ["coffee"]}}, "must be a dict"),
    ({"user_id": "x", "events": {}, "tabular": {"height": 1.8}}, "unknown tabular feature 'height'"),
    ({"user_id": "x", "events": {"bill": [{"ts": "2024-01-01", "text": "a", "value": float("inf")}]}}, "event 0, field 'value'.*infinite"),
    ({"user_id": "x", "events": {"bill": [{"ts": "2024-01-01", "text": "a", "value": -1e39}]}}, "beyond float32 range"),
    ({"user_id": "", "events": {}}, "user_id"),
    ({"id": "x"}, "unknown user field"),
])
def test_bad_users_raise(infer_env, user, message):
    with pytest.raises(ModelInputError, match=message):
        infer_env.qa.embed(user, QUERIES[:1])


def test_a_record_with_an_infinite_value_is_refused_and_nan_means_missing(infer_env):
    """A UserRecord built in code skips the dict checks: an infinity would reach every statistic of the user."""
    seq = EventSeq(np.array([1_700_000_000_000_000, 1_700_000_100_000_000]), ["Coffee shop", "Taxi"],
                   np.array([3.0, np.inf], np.float32), np.full((2, 1), np.nan, np.float32))
    with pytest.raises(ModelInputError, match="user 'x', modality 'bill', event 1, field 'value': infinite"):
        infer_env.qa.embed(UserRecord("x", {"bill": seq}, None), QUERIES[:1])
    seq.value[1] = np.nan  # missing: allowed, as in a dataset
    assert np.isfinite(infer_env.qa.embed(UserRecord("x", {"bill": seq}, None), QUERIES[:1])).all()


def test_a_record_out_of_order_or_with_ragged_arrays_is_refused(infer_env):
    """Packing keeps a sequence's newest events from its end: an unsorted UserRecord silently kept the wrong ones
    (0.1 off the sorted user's embedding), and ragged arrays failed deep inside with numpy's message."""
    t0, t1 = 1_700_000_000_000_000, 1_700_000_100_000_000
    unsorted = EventSeq(np.array([t1, t0]), ["Taxi", "Coffee shop"], np.array([3.0, 1.0], np.float32),
                        np.full((2, 1), np.nan, np.float32))
    with pytest.raises(ModelInputError, match="user 'x', modality 'bill': event 1 is older than the one before it"):
        infer_env.qa.embed(UserRecord("x", {"bill": unsorted}, None), QUERIES[:1])
    ragged = EventSeq(np.array([t0]), ["Coffee shop", "Taxi"], np.array([3.0, 1.0], np.float32),
                      np.full((2, 1), np.nan, np.float32))
    with pytest.raises(ModelInputError, match="its arrays differ in length"):
        infer_env.qa.embed(UserRecord("x", {"bill": ragged}, None), QUERIES[:1])


@pytest.mark.parametrize("queries", [[""], ["   "], [], [None], ["\u200b"], ["\x00"]])
def test_bad_queries_raise(infer_env, queries):
    with pytest.raises(ModelInputError, match="quer"):
        infer_env.qa.embed({"user_id": "x", "events": {}}, queries)


def test_incompatible_checkpoint_refused(infer_env, tmp_path):
    import shutil

    bad = tmp_path / "ck"
    shutil.copytree(infer_env.ckpt, bad)
    meta = json.loads((bad / "qanchor.json").read_text())
    (bad / "qanchor.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(CheckpointError, match="format 99"):
        QAnchor.from_pretrained(bad)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        QAnchor.from_pretrained(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="a checkpoint is a directory path"):
        embed({"user_id": "x", "events": {}}, QUERIES[0], model=None)


@pytest.mark.parametrize("edit", [{"num_hidden_layers": 3}, {"intermediate_size": -1}, {"rope_scaling": {"type": "bogus"}},
                                  {"num_hidden_layers": "two"}, {"num_attention_heads": 0}, {"dtype": "bogus"}],
                         ids=["layers", "negative", "rope", "string", "zero-heads", "dtype"])
def test_an_edited_backbone_config_is_one_clear_error(infer_env, tmp_path, edit):
    """Values transformers checks only as it builds the model (a layer count its layer types disagree with, an unknown
    rope type, a negative size) escaped the checkpoint's checks as a 49-line traceback."""
    import shutil

    bad = tmp_path / "ck"
    shutil.copytree(infer_env.ckpt, bad)
    config = json.loads((bad / "backbone_config.json").read_text())
    (bad / "backbone_config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(CheckpointError, match="backbone"):
        QAnchor.from_pretrained(bad)


def test_a_checkpoint_too_large_for_the_memory_is_not_only_called_damaged(infer_env, monkeypatch):
    """An allocation failure was reported as a damaged backbone config, sending users to re-copy a good checkpoint; it
    is one error that names both causes (a sound model too large for the machine, or an edited size)."""
    import transformers

    def no_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory: you tried "
                           "to allocate 2000000000 bytes")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", no_memory)
    with pytest.raises(CheckpointError, match=r"asks for more memory than this machine can give \(.*can't allocate "
                                              r"memory.*\): run it on a machine with more memory, or, if that file"):
        QAnchor.from_pretrained(infer_env.ckpt)


def test_a_checkpoint_with_a_nan_weight_is_refused_naming_it(infer_env, tmp_path):
    """Every embedding of such a model is NaN, and `qanchor embed` wrote them all without a word."""
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "ck"
    shutil.copytree(infer_env.ckpt, bad)
    weights = load_file(bad / "model.safetensors")
    name = next(k for k, v in weights.items() if v.is_floating_point() and v.numel() > 1 and "backbone" not in k)
    weights[name] = weights[name].clone()
    weights[name].view(-1)[0] = float("nan")
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"the weight {name} holds NaN"):
        QAnchor.from_pretrained(bad)


def test_a_checkpoint_without_its_token_table_is_refused_not_served_with_a_random_one(infer_env, tmp_path):
    """The token table is both the input embeddings and the LM head: safetensors' report of what it did not fill left
    out a tied group none of whose names the file held, so a file without the table loaded, with the table as built
    (random), and served embeddings up to 0.25 off per coordinate. A file holding both names was refused naming the
    one the model reads."""
    import shutil

    from safetensors.torch import load_file, save_file

    weights = load_file(infer_env.ckpt / "model.safetensors")
    table = "backbone.model.embed_tokens.weight"
    assert table in weights and "backbone.lm_head.weight" not in weights  # stored once, under the input side's name
    for name, stored, said in (
            ("no-table", {k: v for k, v in weights.items() if k != table}, rf"missing \['{table}'\], unexpected \[\]"),
            ("twice", {**weights, "backbone.lm_head.weight": weights[table].clone()},
             r"missing \[\], unexpected \['backbone.lm_head.weight'\]"),
            ("head-only", {**{k: v for k, v in weights.items() if k != table}, "backbone.lm_head.weight": weights[table]},
             None)):
        bad = tmp_path / name
        shutil.copytree(infer_env.ckpt, bad)
        save_file(stored, bad / "model.safetensors", metadata={"format": "pt"})
        if said is None:  # the table under the head's name: the same tensor, and the same embeddings
            served = QAnchor.from_pretrained(bad).embed([infer_env.ds.user("u002")], QUERIES[:1])
            assert np.array_equal(served, infer_env.qa.embed([infer_env.ds.user("u002")], QUERIES[:1]))
            continue
        with pytest.raises(CheckpointError, match=said):
            QAnchor.from_pretrained(bad)


@pytest.mark.parametrize("users", [None, 3, "u001"], ids=["none", "int", "user-id"])
def test_users_of_the_wrong_type_are_one_clear_error(infer_env, users):
    with pytest.raises(ModelInputError, match="users must be a user"):
        infer_env.qa.embed(users, QUERIES[:1])


def test_an_integer_beyond_any_float_is_refused_like_an_infinity(infer_env):
    user = {"user_id": "x", "events": {"bill": [{"ts": CUTOFF - timedelta(days=1), "text": "Coffee", "value": 10**400}]}}
    with pytest.raises(ModelInputError, match=r"user 'x'.*field 'value'.*beyond float32 range"):
        infer_env.qa.embed(user, QUERIES[:1])


def test_a_checkpoint_reads_without_the_preset_file_it_was_trained_from(infer_env, users, tmp_path):
    """A checkpoint is self-describing: its config.yaml holds every model key, so the preset file named in it (a
    user's own YAML on the training machine) need not exist where the checkpoint is read."""
    import shutil

    import yaml

    moved = tmp_path / "ck"
    shutil.copytree(infer_env.ckpt, moved)
    run = yaml.safe_load((moved / "config.yaml").read_text())
    run["model"]["preset"] = str(tmp_path / "gone" / "my_model.yaml")  # trained from a file that is not here
    (moved / "config.yaml").write_text(yaml.safe_dump(run, sort_keys=False))
    qa = QAnchor.from_pretrained(moved, text_cache=infer_env.cache, batch_size=8)
    assert qa.run_cfg.model == infer_env.qa.run_cfg.model.__class__(**{**infer_env.qa.run_cfg.model.__dict__,
                                                                          "preset": run["model"]["preset"]})
    np.testing.assert_array_equal(qa.embed(users[:3], QUERIES), infer_env.qa.embed(users[:3], QUERIES))


class FakeHead:
    """Duck-typed scenario head: a prompt, a query, the checkpoint it was tuned on, a linear score."""

    def __init__(self, query: str, hidden: int, checkpoint_hash: str, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.query, self.checkpoint_hash = query, checkpoint_hash
        self.prompt = torch.randn(3, hidden, generator=g)
        self.direction = torch.randn(128, generator=g)

    def score(self, embeddings: torch.Tensor) -> torch.Tensor:
        return embeddings @ self.direction


def test_heads_share_one_prefix_and_are_checked(infer_env, users):
    qa = infer_env.qa
    heads = [FakeHead(QUERIES[i], qa.model.hidden_size, qa.checkpoint_hash, seed=i) for i in range(2)]
    plain = qa.embed(users, QUERIES[:1])
    with_head = qa.embed(users, QUERIES[:1], head=heads[0])
    assert np.abs(plain - with_head).max() > 1e-3
    assert np.abs(with_head - qa.embed(users, QUERIES[:1], head=heads[0], use_cache=False)).max() < 1e-4
    many = qa.embed_many(users, [(QUERIES[0], heads[0]), (QUERIES[1], heads[1]), (QUERIES[0], None)])
    assert np.abs(many[:, 0:1] - with_head).max() < 1e-5 and np.abs(many[:, 2:3] - plain).max() < 1e-5
    scores = qa.score(users, heads[1])
    assert scores.shape == (len(users),)
    assert np.allclose(scores, many[:, 1] @ heads[1].direction.numpy(), atol=1e-5)
    assert qa.score_many(users, heads).shape == (len(users), 2)
    stale = FakeHead(QUERIES[0], qa.model.hidden_size, "0" * 64, seed=0)
    with pytest.raises(CheckpointError, match="re-run prompt-tune"):
        qa.embed(users, QUERIES[:1], head=stale)
    with pytest.raises(ModelInputError, match="has no 'prompt'"):
        qa.embed(users, QUERIES[:1], head=object())


def test_a_library_caller_gets_no_weight_loading_bar_in_its_log(infer_env):
    """A pipeline calling qanchor from Python, logging to a file (stderr not a terminal), must not get transformers'
    "Loading weights" bar for the sentence encoder qanchor loads on its behalf; the caller's own bar switch is kept."""
    script = (f"from qanchor.infer.api import QAnchor\n"
              f"from transformers.utils import logging as hf_logging\n"
              f"qa = QAnchor.from_pretrained({str(infer_env.ckpt)!r})\n"
              f"user = {{'user_id': 'u', 'events': {{'bill': [{{'ts': '2024-06-01T00:00:00+00:00', 'text': 'a text no cache holds'}}]}}}}\n"
              f"qa.embed(user, 'Will this user travel?')\n"
              f"print('bars on:', hf_logging.is_progress_bar_enabled())\n")
    quiet = ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY", "TRANSFORMERS_NO_ADVISORY_WARNINGS", "QANCHOR_NO_BARS")
    env = {k: v for k, v in os.environ.items() if k not in quiet}
    done = subprocess.run([sys.executable, "-c", script], env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "bars on: True" in done.stdout  # transformers' own default, untouched for the caller
    assert "Loading weights" not in done.stderr and "\r" not in done.stderr


def test_the_checkpoint_hash_is_of_the_weights_loaded_not_of_a_file_published_since(infer_env, tmp_path):
    """A pretraining run keeps publishing checkpoint/ while a model read from it serves: the hash that heads, exports
    and states record must name the weights the object holds (it was read from the file on first use)."""
    import shutil

    from qanchor.model.factory import checkpoint_hash, save_checkpoint

    ckpt = tmp_path / "ckpt"
    shutil.copytree(infer_env.ckpt, ckpt)
    qa = QAnchor.from_pretrained(ckpt, text_cache=infer_env.cache)
    loaded = checkpoint_hash(ckpt)
    with torch.no_grad():
        for p in qa.model.parameters():
            newer = p.detach().clone().mul_(1.01)
            break
    other = QAnchor.from_pretrained(ckpt, text_cache=infer_env.cache).model
    with torch.no_grad():
        next(other.parameters()).copy_(newer)
    save_checkpoint(ckpt, other, qa.tokenizer, qa.run_cfg, qa.meta)  # the run publishes newer weights
    assert checkpoint_hash(ckpt) != loaded
    assert qa.checkpoint_hash == loaded


def test_text_that_spells_a_control_token_is_read_as_words(infer_env):
    """A query (or an option) naming "<|user_emb|>" or "[SEP]" put the anchor or the end token in the middle of the
    question; it is text like any other."""
    qa = infer_env.qa
    ids = qa.model.token_ids
    special = set(qa.tokenizer.all_special_ids) | {ids.user, ids.user_emb, ids.m_start, ids.m_end, *ids.modality,
                                                     ids.end, ids.answer}
    for text in ("Is <|user_emb|> high?", "a [SEP] b [MASK] c [PAD]"):
        assert not special & set(qa.option_ids(text))
        suffix = qa.suffixes([(text, None)])[0]
        assert suffix.shape[0] == len(qa.option_ids(text)) + 1  # the words, then the one anchor


def test_events_after_the_cutoff_count_as_its_last_moment_everywhere(infer_env):
    """They were kept as event tokens but left out of the whole history's statistics, which count events before the
    cutoff: a user whose events all came after it read as one with tokens and no history (a combination training
    never makes). Now every part of the model sees them as events of the cutoff's last microsecond."""
    qa = infer_env.qa
    cutoff = datetime(2024, 6, 30, tzinfo=timezone.utc)
    texts = ["Coffee shop", "Taxi", "Paid rent"]
    late = {"user_id": "x", "events": {"bill": [{"ts": cutoff + timedelta(hours=h), "text": t, "value": 3.0}
                                                for h, t in zip((0, 5, 30), texts)]}}
    at_last_moment = {"user_id": "x", "events": {"bill": [{"ts": cutoff - timedelta(microseconds=1), "text": t,
                                                          "value": 3.0} for t in texts]}}
    with pytest.warns(UserWarning, match="3 events are at or after the cutoff") as caught:
        moved = qa.embed(late, QUERIES, cutoff=cutoff)
    assert [w.filename for w in caught] == [__file__]  # the caller's own line, not one inside qanchor
    assert np.array_equal(moved, qa.embed(at_last_moment, QUERIES, cutoff=cutoff))
    assert np.abs(moved - qa.embed({"user_id": "x", "events": {}}, QUERIES, cutoff=cutoff)).max() > 1e-3


def test_late_events_are_warned_about_once_per_call_not_per_batch(infer_env, monkeypatch):
    """The warning came once per streamed chunk of users, each with its own count: ~1,000 of them for 1M users."""
    import warnings

    qa = infer_env.qa
    cutoff = datetime(2024, 6, 30, tzinfo=timezone.utc)
    users = [{"user_id": f"x{i}", "events": {"bill": [{"ts": cutoff + timedelta(hours=1), "text": "Taxi", "value": 1.0}]}}
             for i in range(5)]
    monkeypatch.setattr(qa, "stream_users", 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qa.embed(users, QUERIES[:1], cutoff=cutoff)
    late = [w for w in caught if "at or after the cutoff" in str(w.message)]
    assert len(late) == 1 and "said once per call" in str(late[0].message)


def test_a_checkpoint_with_metadata_a_newer_qanchor_added_loads_with_a_warning(infer_env, tmp_path, capsys):
    """A newer qanchor of the same checkpoint format may record more (as tokenizer_size was added): an older one read
    its qanchor.json into ModelMeta(**raw) and called the checkpoint damaged."""
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(infer_env.ckpt, ckpt)
    meta = json.loads((ckpt / "qanchor.json").read_text())
    (ckpt / "qanchor.json").write_text(json.dumps({**meta, "something_new": 1}))
    loaded = QAnchor.from_pretrained(ckpt)
    out, err = capsys.readouterr()
    assert "entries this qanchor does not know (something_new)" in err and out == ""  # a library caller's stdout is its own
    assert np.array_equal(loaded.embed({"user_id": "x", "events": {}}, QUERIES[:1]),
                          infer_env.qa.embed({"user_id": "x", "events": {}}, QUERIES[:1]))


def test_a_checkpoint_whose_encoder_folder_moved_is_served_through_a_cache_opened_on_the_new_place(infer_env, tmp_path):
    """The cache's encoder was compared by path: once the encoder folder a checkpoint was trained with had moved (a
    cluster's /shared/models to a server's /opt/models), neither the model's own pipeline (the old path) nor a cache on
    the new place could serve it. The checkpoint records what the encoder computes, and that is compared."""
    import shutil

    from qanchor.config import TextEncoderConfig
    from qanchor.data.text_cache import SentenceEncoder, TextVectorCache, default_encoder_path
    from qanchor.errors import CheckpointError
    from qanchor.infer.api import QAnchor

    first = tmp_path / "models" / "minilm"
    shutil.copytree(default_encoder_path(), first)
    ckpt = tmp_path / "ckpt"
    shutil.copytree(infer_env.ckpt, ckpt)
    meta = json.loads((ckpt / "qanchor.json").read_text())
    meta["text_encoder"] = {**meta["text_encoder"], "path": str(first)}
    meta["text_encoder_digest"] = SentenceEncoder(TextEncoderConfig(path=str(first))).digest
    (ckpt / "qanchor.json").write_text(json.dumps(meta))
    moved = tmp_path / "elsewhere" / "encoder"
    moved.parent.mkdir()
    first.rename(moved)
    user, query = [infer_env.ds.user("u002")], ["Will this user stop paying?"]
    cache = TextVectorCache(tmp_path / "text", SentenceEncoder(TextEncoderConfig(path=str(moved))))
    served = QAnchor.from_pretrained(ckpt, text_cache=cache).embed(user, query)
    assert np.allclose(served, infer_env.qa.embed(user, query), atol=1e-5)
    (ckpt / "qanchor.json").write_text(json.dumps({**meta, "text_encoder_digest": "0" * 12}))  # trained on another encoder
    with pytest.raises(CheckpointError, match=r"its weights, tokenizer or settings differ: digest [0-9a-f]{12}, trained 0{12}"):
        QAnchor.from_pretrained(ckpt, text_cache=cache).embed(user, query)
    # a checkpoint from before the digest, whose encoder folder is gone: nothing to check a cache against, so refused
    (ckpt / "qanchor.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "text_encoder_digest"}))
    with pytest.raises(CheckpointError, match="did not record what its encoder computes, and whose encoder cannot be found"):
        QAnchor.from_pretrained(ckpt, text_cache=cache).embed(user, query)


def test_the_encoder_digest_outlives_a_transformers_upgrade(monkeypatch):
    """The digest hashed the config's transformers_version: after an upgrade every checkpoint was refused its own
    encoder's cache. The cache's key keeps it (an upgrade re-encodes the cached texts, as it always did)."""
    import transformers.configuration_utils as configuration_utils

    from qanchor.data.text_cache import SentenceEncoder

    encoder = SentenceEncoder()
    digest, key = encoder.digest, encoder.key
    monkeypatch.setattr(configuration_utils, "__version__", "99.0.0")
    assert encoder.digest == digest and encoder.key != key


def test_the_encoder_digest_reads_the_encoders_config_file_not_the_librarys_view_of_it(monkeypatch, tmp_path, infer_env,
                                                                                       capsys):
    """The digest hashed the config as the installed transformers describes it: 4.57 lists some 40 generation
    defaults (num_beams, top_k...) that 5.x dropped, so one encoder had two digests, and every checkpoint saved under
    one version warned of a changed encoder under the other (measured: the bundled MiniLM read d1f0b9c74854 under
    4.57.6, f78493e19473 under 5.25.0; today's digest is 3641d88a57ee under both). It now reads the folder's
    config.json; a checkpoint that recorded the older digest is still recognised, without a word, under the
    transformers version that wrote it."""
    import shutil

    import transformers

    from qanchor.config import TextEncoderConfig
    from qanchor.data.text_cache import SentenceEncoder, default_encoder_path

    encoder = SentenceEncoder(device="cpu")
    digest, as_described = encoder.digest, encoder._fingerprint(with_library=False)
    described = transformers.PretrainedConfig.to_dict
    monkeypatch.setattr(transformers.PretrainedConfig, "to_dict",
                        lambda self: {**described(self), "num_beams": 1, "top_k": 50, "tf_legacy_loss": False})
    other_version = SentenceEncoder(device="cpu")
    assert other_version.digest == digest  # the same file, weights and tokenizer: the same encoder
    assert other_version._fingerprint(with_library=False) != as_described  # what the older digest read has moved
    monkeypatch.undo()
    assert encoder.recognises(as_described) == "digest"  # a checkpoint saved before: recognised, as exactly as it was
    ckpt = tmp_path / "ckpt"
    shutil.copytree(infer_env.ckpt, ckpt)
    meta = json.loads((ckpt / "qanchor.json").read_text())
    (ckpt / "qanchor.json").write_text(json.dumps({**meta, "text_encoder_digest": as_described}))
    capsys.readouterr()
    QAnchor.from_pretrained(ckpt).embed([infer_env.ds.user("u002")], ["Will this user stop paying?"])
    assert "warning" not in capsys.readouterr().err

    edited = tmp_path / "minilm"  # a setting the weights do not show, changed in the file: another encoder
    shutil.copytree(default_encoder_path(), edited)
    config = json.loads((edited / "config.json").read_text())
    (edited / "config.json").write_text(json.dumps({**config, "layer_norm_eps": 1e-5}))
    assert SentenceEncoder(TextEncoderConfig(path=str(edited)), device="cpu").digest != digest
    (edited / "config.json").write_text(json.dumps({**config, "_name_or_path": "/elsewhere", "transformers_version": "9"}))
    assert SentenceEncoder(TextEncoderConfig(path=str(edited)), device="cpu").digest == digest  # where and by what made


def test_a_text_cache_of_other_encoder_settings_is_refused(infer_env, tmp_path):
    """Only the vectors' width was compared: a cache opened with max_length=5 (the checkpoint's is 48) moved embeddings
    by up to 0.2 without a word."""
    from qanchor.config import TextEncoderConfig
    from qanchor.data.text_cache import SentenceEncoder, TextVectorCache
    from qanchor.errors import CheckpointError
    from qanchor.infer.api import QAnchor

    short = TextVectorCache(tmp_path / "text", SentenceEncoder(TextEncoderConfig(max_length=5)))
    qa = QAnchor.from_pretrained(infer_env.ckpt, text_cache=short)
    with pytest.raises(CheckpointError, match=r"encoder all-MiniLM-L6-v2 with max_length=5, but .* was trained with "
                                              r"all-MiniLM-L6-v2 and max_length=48"):
        qa.embed([infer_env.ds.user("u002")], ["Will this user stop paying?"])
    same = TextVectorCache(tmp_path / "text", SentenceEncoder(TextEncoderConfig()))
    assert QAnchor.from_pretrained(infer_env.ckpt, text_cache=same).embed([infer_env.ds.user("u002")],
                                                                          ["Will this user stop paying?"]).shape == (1, 1, 128)


def test_a_model_saved_before_a_training_check_serves_with_its_own_packing(infer_env, tmp_path):
    """Setting the packing rebuilt the run config, which ran the checks a new run gets: a model whose recipe a later
    check refuses (here a negative margin) loaded, then every inference command on it failed."""
    import shutil

    from qanchor.config import DataOverrides

    ckpt = tmp_path / "ckpt"
    shutil.copytree(infer_env.ckpt, ckpt)
    saved = (ckpt / "config.yaml").read_text()
    assert "  margin: " in saved
    (ckpt / "config.yaml").write_text(saved.replace("  margin: ", "  margin: -1.0 #", 1))
    model = QAnchor.from_pretrained(ckpt)
    model.use_packing(DataOverrides(default_max_events=4))
    assert model.run_cfg.loss.margin == -1 and model.run_cfg.data.default_max_events == 4



def test_an_encoder_changed_with_its_weights_sum_kept_is_another_encoder(tmp_path, infer_env, capsys):
    """The key and digest held the weights' sum to 7 digits: an encoder fine-tuned in its folder (a change that sum
    could miss), or two weights swapped, kept both, and its stale cached vectors were served. They now hash the
    weights' bytes; a checkpoint that recorded the sum's digest is still recognised by it."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from qanchor.config import TextEncoderConfig
    from qanchor.data.text_cache import SentenceEncoder, TextVectorCache, default_encoder_path
    from qanchor.errors import CheckpointError
    from qanchor.infer.api import QAnchor

    swapped = tmp_path / "minilm"
    shutil.copytree(default_encoder_path(), swapped)
    weights = load_file(swapped / "model.safetensors")
    name = next(k for k, v in weights.items() if v.ndim == 2 and v.shape[0] > 1 and not torch.equal(v[0], v[1]))
    weights[name] = weights[name][torch.tensor([1, 0, *range(2, weights[name].shape[0])])].contiguous()
    save_file(weights, swapped / "model.safetensors", metadata={"format": "pt"})
    original = SentenceEncoder(TextEncoderConfig(path=str(default_encoder_path())), device="cpu")
    changed = SentenceEncoder(TextEncoderConfig(path=str(swapped)), device="cpu")
    legacy = original._fingerprint(with_library=False, legacy_sum=True)
    assert changed._fingerprint(with_library=False, legacy_sum=True) == legacy  # the sum could not tell them apart
    assert changed.digest != original.digest
    assert changed.key.rsplit("-", 1)[1] != original.key.rsplit("-", 1)[1]
    assert original.computes(legacy) and original.computes(original._fingerprint(with_library=True, legacy_sum=True))
    assert not original.computes("0" * 12)

    ckpt = tmp_path / "ckpt"
    shutil.copytree(infer_env.ckpt, ckpt)
    meta = json.loads((ckpt / "qanchor.json").read_text())
    user, query = [infer_env.ds.user("u002")], ["Will this user stop paying?"]
    for recorded in (original.digest, legacy):  # today's digest and an older checkpoint's: both this encoder's
        (ckpt / "qanchor.json").write_text(json.dumps({**meta, "text_encoder_digest": recorded}))
        cache = TextVectorCache(tmp_path / "text", SentenceEncoder(TextEncoderConfig(), device="cpu"))
        capsys.readouterr()
        assert np.allclose(QAnchor.from_pretrained(ckpt, text_cache=cache).embed(user, query),
                           infer_env.qa.embed(user, query), atol=1e-5)
        warned = "recorded its text encoder by the sum of the weights" in capsys.readouterr().err
        assert warned == (recorded == legacy)  # a match by the sum alone is said: it cannot see a fine-tuning
    (ckpt / "qanchor.json").write_text(json.dumps({**meta, "text_encoder_digest": original.digest}))
    cache = TextVectorCache(tmp_path / "text", changed)
    with pytest.raises(CheckpointError, match="its weights, tokenizer or settings differ"):
        QAnchor.from_pretrained(ckpt, text_cache=cache).embed(user, query)


def test_the_models_own_encoder_is_checked_against_the_one_it_was_trained_with(tmp_path, infer_env, capsys):
    """Only a text cache handed in was compared with the checkpoint's record of its encoder: the model's own pipeline
    (every command's path) opened the encoder at the recorded path, or the installed package, and served whatever
    it computed, so an encoder folder replaced since training (or an upgraded package) moved every embedding
    without a word. Said, not refused: the record also reads the encoder's config as the installed transformers
    describes it, which another version may do with other keys."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from qanchor.config import TextEncoderConfig
    from qanchor.data.text_cache import SentenceEncoder, default_encoder_path
    from qanchor.infer.api import QAnchor

    folder = tmp_path / "minilm"
    shutil.copytree(default_encoder_path(), folder)
    ckpt = tmp_path / "ckpt"
    shutil.copytree(infer_env.ckpt, ckpt)
    meta = json.loads((ckpt / "qanchor.json").read_text())
    trained = SentenceEncoder(TextEncoderConfig(path=str(folder)), device="cpu").digest
    (ckpt / "qanchor.json").write_text(json.dumps({**meta, "text_encoder": {**meta["text_encoder"], "path": str(folder)},
                                                   "text_encoder_digest": trained}))
    user, query = [infer_env.ds.user("u002")], ["Will this user stop paying?"]
    capsys.readouterr()
    served = QAnchor.from_pretrained(ckpt, text_cache_dir=tmp_path / "text").embed(user, query)
    assert np.allclose(served, infer_env.qa.embed(user, query), atol=1e-5)
    assert "warning" not in capsys.readouterr().err
    weights = load_file(folder / "model.safetensors")  # the folder's encoder changed after training: two rows swapped
    name = next(k for k, v in weights.items() if v.ndim == 2 and v.shape[0] > 1 and not torch.equal(v[0], v[1]))
    weights[name] = weights[name][torch.tensor([1, 0, *range(2, weights[name].shape[0])])].contiguous()
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    QAnchor.from_pretrained(ckpt, text_cache_dir=tmp_path / "text").embed(user, query)
    err = capsys.readouterr().err
    assert f"warning: the text encoder {folder} does not compute what {ckpt} recorded" in err and f"recorded {trained}" in err
    # the installed package against a checkpoint trained with another encoder of the same width
    (ckpt / "qanchor.json").write_text(json.dumps({**meta, "text_encoder_digest": "0" * 12}))
    QAnchor.from_pretrained(ckpt, text_cache_dir=tmp_path / "text").embed(user, query)
    assert "all-MiniLM-L6-v2 (the installed package) does not compute what" in capsys.readouterr().err
    # a checkpoint that recorded the weights' sum (before 2026-12-07): recognised, with the warning a text cache gets
    legacy = SentenceEncoder(device="cpu")._fingerprint(with_library=False, legacy_sum=True)
    (ckpt / "qanchor.json").write_text(json.dumps({**meta, "text_encoder_digest": legacy}))
    QAnchor.from_pretrained(ckpt, text_cache_dir=tmp_path / "text").embed(user, query)
    err = capsys.readouterr().err
    assert "recorded its text encoder by the sum of the weights" in err and "does not compute" not in err