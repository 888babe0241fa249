"""model.user_encoder.summary_text=history (with data.history_text): each modality token reads, and the content
components summarise, the mean text vector of the modality's whole history before the cutoff, not only of the kept
(most recent max_events) events, as summary_stats=history does for the counts."""

from __future__ import annotations

import shutil
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from qanchor.config import PretrainConfig, load_config
from qanchor.data.dataset import EventSeq
from qanchor.data.history import events_before
from qanchor.errors import ConfigError
from qanchor.train.pretrain import fit_input_stats
from tests.model.helpers import model_and_stream, tiny_cfg

CAP = 4  # kept events per modality: the tiny dataset's longest history is 10 events
# summary_stats=basic: the modality token's statistics are of the kept events only, so an older event reaches it only
# through the whole history's text vector
HISTORY = [f"data.default_max_events={CAP}", "loss.profile_weight=1", "model.user_encoder.content_components=4",
           "model.user_encoder.summary_text=history", "data.history_text=true"]


@pytest.fixture(scope="module")
def env(tiny_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("history_text")
    ds_dir = root / "ds"
    shutil.copytree(tiny_dataset, ds_dir, ignore=shutil.ignore_patterns(".qanchor_cache"))
    models = {}
    for form, overrides in (("history", HISTORY), ("kept", HISTORY[:-2])):
        model, tokenizer, stream, ds, pipe, cfg = model_and_stream(ds_dir, tiny_cfg(overrides))
        fit_input_stats(model, ds, pipe)
        models[form] = SimpleNamespace(model=model.eval(), pipe=pipe, cfg=cfg)
    # the user and modality with the longest history: most of it lies beyond the kept events
    uid, name, n = max(((r.user_id, m, len(s)) for r in ds.users() for m, s in r.events.items()), key=lambda x: x[2])
    assert n > CAP + 2
    return SimpleNamespace(ds=ds, models=models, uid=uid, name=name, n=n)


def _with_oldest_text(record, name, text):
    """``record`` with the text of modality ``name``'s oldest event replaced (never a kept event here)."""
    seq = record.events[name]
    texts = [text, *list(seq.text)[1:]]
    return replace(record, events={**record.events, name: EventSeq(seq.ts, texts, seq.value, seq.extras)})


def test_the_packed_vector_is_the_mean_over_every_earlier_event(env):
    """data.history_text packs, per sequence modality, the mean of the text vectors of every event before the cutoff
    (repeated texts count each time); at an earlier cutoff only the events before it. Without the setting nothing is
    packed."""
    pipe = env.models["history"].pipe
    record = env.ds.user(env.uid)
    seq = record.events[env.name]
    vectors = pipe.cache.vectors
    for cutoff in (pipe.packer.cutoff_us, int(seq.ts[CAP + 1])):
        packed = pipe.pack_many([record], cutoff)[0].modalities[env.name]
        before = events_before(seq, cutoff)
        want = vectors[pipe.cache.rows(before.text)].astype(np.float64).mean(0)
        assert packed.history_text.shape == (pipe.cache.dim,)
        np.testing.assert_allclose(packed.history_text, want, atol=1e-6)
        kept = vectors[packed.text_rows].mean(0)
        assert len(packed.text_rows) < len(before) and np.abs(kept - want).max() > 1e-3  # not the kept events' mean
    assert env.models["kept"].pipe.packer.pack(record).modalities[env.name].history_text is None
    batch = env.models["kept"].pipe.collate([env.models["kept"].pipe.packer.pack(record)])
    assert batch.modalities[env.name].history_text is None


def test_an_older_event_changes_the_modality_token_and_the_content_only_with_history(env):
    """Changing the text of an event older than the kept ones changes what a summary_text=history model reads (its
    modality token and its content components), and nothing a summary_text=kept model reads."""
    record = env.ds.user(env.uid)
    other = next(t for r in env.ds.users() for s in r.events.values() for t in s.text
                 if t not in set(record.events[env.name].text))
    changed = _with_oldest_text(record, env.name, other)
    for form, expect_change in (("history", True), ("kept", False)):
        m = env.models[form]
        enc = m.model.user_encoder
        a, b = (m.pipe.collate(m.pipe.pack_many([r])) for r in (record, changed))
        with torch.no_grad():
            token = [enc.encode_modality(env.name, x).token for x in (a, b)]
            content = [enc.content(env.name, x) for x in (a, b)]
        assert torch.equal(a.modalities[env.name].text_vec, b.modalities[env.name].text_vec)  # same kept events
        assert (not torch.allclose(token[0], token[1], atol=1e-6)) == expect_change, form
        assert (not torch.allclose(content[0], content[1], atol=1e-6)) == expect_change, form
    enc = env.models["history"].model.user_encoder
    batch = env.models["history"].pipe.collate(env.models["history"].pipe.pack_many([record]))
    assert torch.equal(enc.summary_inputs(env.name, batch)[0], batch.modalities[env.name].history_text)


def test_the_content_basis_is_fitted_on_the_whole_history(env):
    """fit_input_stats fits the components on the training users' whole-history means: over them the first component
    has mean 0 and variance 1."""
    m = env.models["history"]
    enc = m.model.user_encoder
    users = m.pipe.collate([m.pipe.packer.pack(r) for r in env.ds.users()])
    for name in enc.sequence_names:
        present = users.modalities[name].mask.any(1)
        z = enc.content(name, users)[present].double()
        assert abs(float(z[:, 0].mean())) < 1e-4 and abs(float(z[:, 0].var(unbiased=False)) - 1) < 1e-3, name


def test_a_batch_without_the_vector_is_refused_with_what_to_set(env):
    m = env.models["history"]
    batch = env.models["kept"].pipe.collate([env.models["kept"].pipe.packer.pack(env.ds.user(env.uid))])
    with pytest.raises(ValueError, match="data.history_text=true"):
        m.model.user_encoder.encode_modality(env.name, batch)


def test_the_two_settings_go_together():
    base = ["model.preset=tiny"]
    with pytest.raises(ConfigError, match="summary_text=history with data.history_text=false"):
        load_config(None, base + ["model.user_encoder.summary_text=history"], schema=PretrainConfig)
    with pytest.raises(ConfigError, match="summary_text=kept with data.history_text=true"):
        load_config(None, base + ["data.history_text=true"], schema=PretrainConfig)
    with pytest.raises(ConfigError, match="summary_input"):
        load_config(None, base + ["model.user_encoder.summary_text=history", "data.history_text=true",
                                  "model.user_encoder.summary_input=tokens"], schema=PretrainConfig)


# The content components in the wide path instead of the profile's targets (content_use=path), of the whole history
PATH = [*HISTORY, "model.statistics_path=add", "model.user_encoder.content_use=path"]


@pytest.fixture(scope="module")
def path_env(env, tmp_path_factory):
    model, tokenizer, stream, ds, pipe, cfg = model_and_stream(env.ds.root, tiny_cfg(PATH))
    fit_input_stats(model, ds, pipe)
    return SimpleNamespace(model=model.eval(), pipe=pipe, cfg=cfg, stream=stream, ds=ds,
                           users=pipe.collate([pipe.packer.pack(r) for r in ds.users()]))


def test_the_path_reads_each_modalitys_content_after_its_statistics(env, path_env):
    """statistics(): each sequence modality's block is its standardised statistics and presence flag, then its
    content components (of the whole history); the path's input width follows, and the profile's targets no longer
    hold them."""
    enc, users = path_env.model.user_encoder, path_env.users
    stats = enc.statistics(users)
    assert stats.shape[1] == enc.statistics_width() == path_env.model.statistics_path.linear.in_features
    start = 0
    for name in enc.names:
        block = enc.modality_statistics(name, users)
        assert torch.equal(stats[:, start:start + block.shape[1]], block)
        if name in enc.sequence_names:
            assert block.shape[1] == enc.summary_width + 1 + enc.content_components
            assert torch.equal(block[:, -enc.content_components:], enc.content(name, users))
        start += block.shape[1]
    assert start == stats.shape[1]
    assert enc.profile(users).shape[1] == enc.profile_width() == len(enc.sequence_names) * enc.profile_stats_width + 2 * len(
        path_env.ds.tabular_columns)
    kept = env.models["history"].model.user_encoder  # content_use=target: not in the path
    assert kept.statistics_width() == len(kept.sequence_names) * (kept.summary_width + 1) + 2 * len(path_env.ds.tabular_columns)


def test_the_path_learns_from_the_content_columns(path_env):
    """A training step's gradient reaches the path's weights on the content columns."""
    model, enc = path_env.model, path_env.model.user_encoder
    model.train()
    model.zero_grad()
    model(path_env.stream.batch(1, 4), path_env.cfg.loss).loss.backward()
    grad = model.statistics_path.linear.weight.grad  # (D, S)
    first = enc.sequence_names[0]  # its block: the statistics, the presence flag, then the content
    start = sum(enc.modality_statistics(n, path_env.users).shape[1] for n in enc.names[:enc.names.index(first)])
    start += enc.summary_width + 1
    assert grad[:, start:start + enc.content_components].abs().sum() > 0
    model.zero_grad()
    model.eval()


def test_content_in_the_path_needs_a_path():
    base = ["model.preset=tiny", "model.user_encoder.content_use=path", "model.user_encoder.content_components=4"]
    with pytest.raises(ConfigError, match="statistics_path=none builds none"):
        load_config(None, base + ["model.statistics_path=none"], schema=PretrainConfig)
    # in the path the components do something without the profile loss, so that is allowed; as targets it is not
    cfg = load_config(None, base + ["model.statistics_path=add", "loss.profile_weight=0"], schema=PretrainConfig)
    assert cfg.model.user_encoder.content_use == "path"
    with pytest.raises(ConfigError, match="loss.profile_weight=0 turns off"):
        load_config(None, ["model.preset=tiny", "model.user_encoder.content_components=4", "loss.profile_weight=0"],
                    schema=PretrainConfig)
