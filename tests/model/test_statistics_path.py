"""model.statistics_path: the user's standardised input statistics reach the embedding through a linear map (or one
whose inputs a query-dependent gate scales), on every path that makes an embedding: the training forward, cached and
uncached serving, the prompt tuner's prefix store; saved and reloaded with the checkpoint."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from qanchor.errors import ConfigError
from qanchor.infer.api import QAnchor
from qanchor.model.factory import ModelMeta, load_checkpoint, save_checkpoint
from qanchor.model.prefix_cache import PrefixStore
from qanchor.train.pretrain import fit_input_stats
from tests.conftest import QUERIES
from tests.helpers import load_benchmark
from tests.model.helpers import model_and_stream, tiny_cfg

GATED = ["model.user_encoder.summary_stats=history", "model.statistics_path=gated"]


@pytest.fixture(scope="module")
def env(tiny_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("statistics_path")
    ds_dir = root / "ds"
    shutil.copytree(tiny_dataset, ds_dir, ignore=shutil.ignore_patterns(".qanchor_cache"))
    cfg = tiny_cfg(GATED)
    model, tokenizer, stream, ds, pipe, _ = model_and_stream(ds_dir, cfg)
    fit_input_stats(model, ds, pipe)
    with torch.no_grad():  # a trained gate is not the identity: make the query matter through it
        model.statistics_path.gate.weight.normal_(0.0, 0.5)
    model.eval()
    meta = ModelMeta(ds.manifest.to_dict(), pipe.cache.dim, {}, list(ds.tabular_columns))
    ckpt = save_checkpoint(root / "ck", model, tokenizer, cfg, meta)
    qa = QAnchor.from_pretrained(ckpt, text_cache_dir=ds.text_cache_dir, batch_size=4)
    return SimpleNamespace(root=root, ds_dir=ds_dir, cfg=cfg, model=model, tokenizer=tokenizer, stream=stream, ds=ds,
                           pipe=pipe, ckpt=ckpt, qa=qa)


def test_statistics_are_the_modality_tokens_inputs_standardised(env):
    """Per sequence modality: what the modality token reads, standardised with the modal adapter's stored statistics,
    zeros and a 0 flag for a user without events there; the tabular modality: its standardised values and missing
    flags; modalities in manifest order."""
    enc = env.model.user_encoder
    users = env.pipe.collate([env.pipe.packer.pack(env.ds.user(u)) for u in ("u000", "u001", "u002")])
    stats = enc.statistics(users)
    assert stats.shape == (3, enc.statistics_width()) == (3, env.model.statistics_path.linear.in_features)
    width, start, blocks = enc.summary_width, 0, {}
    for name in enc.names:
        if name == enc.tabular_name:
            n_tab = len(env.ds.tabular_columns)
            block = stats[:, start : start + 2 * n_tab]
            assert torch.equal(block[:, :n_tab], enc.tabular.standardise(users.tabular, users.tabular_missing))
            assert torch.equal(block[:, n_tab:], users.tabular_missing.float())
            start += 2 * n_tab
            continue
        raw = enc.summary_inputs(name, users)[1]
        z = ((raw - enc.modal_adapter.numeric_mean) / enc.modal_adapter.numeric_std).clamp(-10, 10)
        present = users.modalities[name].mask.any(1)
        block, flag = stats[:, start : start + width], stats[:, start + width]
        assert torch.allclose(block[present], z[present], atol=1e-6) and torch.equal(flag, present.float())
        assert torch.equal(block[~present], torch.zeros_like(block[~present]))
        blocks[name] = stats[:, start : start + width + 1]
        start += width + 1
    assert start == stats.shape[1]
    assert not users.modalities["search"].mask[1].any() and not blocks["search"][1].any()  # u001: no search events
    assert blocks["bill"][1, -1] == 1 and blocks["bill"][1, :-1].abs().sum() > 0


def test_project_adds_the_gated_statistics_and_needs_them(env):
    """normalize(projection(h) + W (2 sigmoid(G h) * s) + b): the gate reads the anchor's hidden state, so two
    queries weight one user's statistics differently; without the statistics, project refuses."""
    model, path = env.model, env.model.statistics_path
    h, s = torch.randn(5, model.hidden_size), torch.randn(5, model.user_encoder.statistics_width())
    with torch.no_grad():
        by_hand = model.projection(h) + (s * 2 * torch.sigmoid(h @ path.gate.weight.T + path.gate.bias)) @ path.linear.weight.T
        by_hand = torch.nn.functional.normalize(by_hand + path.linear.bias, dim=-1)
        assert torch.allclose(model.project(h, s), by_hand, atol=1e-5)
        other = torch.randn(5, model.hidden_size)
        assert (path(h, s) - path(other, s)).abs().max() > 1e-3  # another hidden state, other gates
    with pytest.raises(ValueError, match="statistics_path='gated'.*user_statistics"):
        model.project(h)


def test_a_fresh_gate_is_the_identity_and_the_path_only_adds(env):
    """A new gated path starts with every gate at 1 (the plain linear path); with the path's map zeroed, the model's
    anchors equal those of a model without the path holding the same other weights."""
    fresh, *_ = model_and_stream(env.ds_dir, tiny_cfg(GATED))
    h, s = torch.randn(4, fresh.hidden_size), torch.randn(4, fresh.user_encoder.statistics_width())
    with torch.no_grad():
        assert torch.allclose(fresh.statistics_path(h, s), fresh.statistics_path.linear(s), atol=1e-6)
    plain, *_ = model_and_stream(env.ds_dir, tiny_cfg(GATED[:1]))
    assert plain.statistics_path is None and plain.user_statistics(env.stream.batch(0, 2).users) is None
    missing, unexpected = fresh.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("statistics_path.") for k in missing) and missing
    with torch.no_grad():
        fresh.statistics_path.linear.weight.zero_()
        fresh.statistics_path.linear.bias.zero_()
    fresh.eval()
    plain.eval()
    batch = env.stream.batch(0, 4)
    with torch.no_grad():
        assert torch.allclose(fresh(batch).anchor, plain(batch).anchor, atol=1e-6)


def test_training_reaches_the_path_and_the_checkpoint_keeps_it(env):
    model = env.model
    model.train()
    model.zero_grad()
    model(env.stream.batch(1, 4), env.cfg.loss).loss.backward()
    for p in (model.statistics_path.linear.weight, model.statistics_path.gate.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    model.zero_grad()
    model.eval()
    loaded, *_ = load_checkpoint(env.ckpt)
    batch = env.stream.batch(2, 4)
    with torch.no_grad():
        assert torch.equal(loaded(batch).anchor, model(batch).anchor)
    assert torch.equal(loaded.statistics_path.gate.weight, model.statistics_path.gate.weight)


def test_serving_and_the_prefix_store_agree(env):
    """QAnchor.embed cached == uncached; the prompt tuner's PrefixStore gives the same embeddings as serving."""
    qa = env.qa
    records = list(env.ds.users())[:6]
    cached = qa.embed(records, QUERIES)
    assert np.abs(cached - qa.embed(records, QUERIES, use_cache=False)).max() < 1e-4
    assert np.allclose(np.linalg.norm(cached, axis=-1), 1.0, atol=1e-5)
    users = qa.pipeline.collate(qa.pack(records, qa.cutoff_us(None)))
    store = PrefixStore.encode(qa.model, [users])
    assert store.statistics.shape == (6, qa.model.user_encoder.statistics_width())
    suffix = qa.suffixes([(QUERIES[1], None)])[0]
    from_store = store.embed(qa.model, suffix, torch.arange(6)).numpy()
    assert np.abs(from_store - cached[:, 1]).max() < 1e-4


def test_a_text_prefix_model_has_no_statistics_path():
    with pytest.raises(ConfigError, match="statistics_path.*user_input"):
        tiny_cfg(["model.statistics_path=add", "model.user_input=text"])



def test_the_path_free_loss_is_what_a_model_without_the_path_would_pay(env):
    """loss.path_free_weight: the contrastive and profile losses once more on the embedding without the path. That
    term equals the loss of a model without a path holding the same other weights, and it enters the total with its
    weight; without a path to leave out, the config refuses."""
    aids = ["loss.profile_weight=2"]
    with_path, *_ = model_and_stream(env.ds_dir, tiny_cfg(["model.statistics_path=add", *aids]))
    plain, *_ = model_and_stream(env.ds_dir, tiny_cfg(aids))
    with torch.no_grad():  # a path that changes the anchors, so leaving it out matters
        with_path.statistics_path.linear.weight.normal_(0.0, 0.5)
    missing, unexpected = plain.load_state_dict(with_path.state_dict(), strict=False)
    assert not missing and all(k.startswith("statistics_path.") for k in unexpected)
    with_path.eval()
    plain.eval()
    batch = env.stream.batch(3, 4)
    off = tiny_cfg(["model.statistics_path=add", *aids]).loss
    on = tiny_cfg(["model.statistics_path=add", "loss.path_free_weight=0.5", *aids]).loss
    with torch.no_grad():
        base, out, alone = with_path(batch, off), with_path(batch, on), plain(batch, off)
    assert not torch.allclose(out.anchor, alone.anchor, atol=1e-3)  # the path is on in the served embedding
    assert float(base.loss_path_free) == 0.0
    expected = alone.loss_contrastive + 2 * alone.loss_profile
    assert torch.allclose(out.loss_path_free, expected, atol=1e-5)
    assert torch.allclose(out.loss, base.loss + 0.5 * expected, atol=1e-5)
    with_path.train()
    with_path.zero_grad()
    with_path(batch, on).loss_path_free.backward()  # trains the backbone and leaves the path alone
    assert all(p.grad is None for p in with_path.statistics_path.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in with_path.backbone.parameters())
    with pytest.raises(ConfigError, match="path_free_weight.*statistics_path"):
        tiny_cfg(["loss.path_free_weight=0.5"])
    with pytest.raises(ConfigError, match="path_free_weight must be >= 0"):
        tiny_cfg(["model.statistics_path=add", "loss.path_free_weight=-1"])


def test_the_quality_probe_splits_the_embedding_into_its_two_summands(env):
    """benchmarks/quality_probe.py's path rows read the two parts the embedding is the normalised sum of."""
    qp = load_benchmark("quality_probe")
    user_ids = [r.user_id for r in list(env.ds.users())[:5]]
    _, emb, _, _, _, parts = qp.embed_all(env.qa, env.ds, user_ids, QUERIES[:2])
    assert parts.shape == (5, 2, 2, emb.shape[-1])
    summed = parts.sum(2)
    np.testing.assert_allclose(summed / np.linalg.norm(summed, axis=-1, keepdims=True), emb, atol=1e-5)
    assert not np.allclose(parts[:, 0, 1], parts[:, 1, 1])  # a gated path: the query reweights the statistics


def test_the_quality_probe_reads_exactly_what_the_path_reads(env):
    """The probe's ``statistics`` row: each user's row of ``model.user_statistics``, in the order asked for."""
    qp = load_benchmark("quality_probe")
    records = list(env.ds.users())[:5]
    user_ids = [r.user_id for r in records]
    stats = qp.path_statistics(env.qa, env.ds, user_ids, chunk=2)  # several chunks
    with torch.no_grad():
        users = env.qa.pipeline.collate(env.qa.pack(records, env.qa.cutoff_us(env.ds.manifest.cutoff)))
        direct = env.qa.model.user_statistics(users).float().numpy()
    assert stats.shape == (5, env.qa.model.user_encoder.statistics_width())
    np.testing.assert_allclose(stats, direct, atol=1e-6)
    np.testing.assert_allclose(qp.path_statistics(env.qa, env.ds, user_ids[::-1]), direct[::-1], atol=1e-6)
    assert np.abs(stats).sum() > 0


def test_a_principal_path_is_a_fixed_faithful_map_with_one_learned_gain(env, tmp_path):
    """statistics_path=principal: fitted with the input standardisation, the map centres the training users'
    statistics and keeps their geometry (distances scaled by one constant where the statistics have no more
    dimensions than the embedding, as here), at unit mean squared norm; training moves only its gain; the checkpoint keeps it."""
    cfg = tiny_cfg(["model.statistics_path=principal"])
    model, tokenizer, stream, ds, pipe, _ = model_and_stream(env.ds_dir, cfg)
    path = model.statistics_path
    assert path.linear is None and not path.basis.any()  # unfitted: adds nothing
    fit_input_stats(model, ds, pipe)
    users = pipe.collate([pipe.packer.pack(r) for r in ds.users()])
    with torch.no_grad():
        stats = model.user_encoder.statistics(users)
        mapped = path(None, stats)
    assert mapped.shape == (len(stats), cfg.model.embedding_dim)
    assert torch.allclose(mapped.mean(0), torch.zeros(mapped.shape[1]), atol=1e-4)
    assert mapped.pow(2).sum(-1).mean().item() == pytest.approx(1.0, rel=1e-4)
    assert stats.shape[1] <= min(cfg.model.embedding_dim, len(stats) - 1), stats.shape  # room for every direction
    scale = (torch.cdist(mapped, mapped) / torch.cdist(stats, stats).clamp_min(1e-6))[~torch.eye(len(stats), dtype=bool)]
    assert scale.std() / scale.mean() < 1e-3
    model.train()
    model(stream.batch(0, 4), cfg.loss).loss.backward()
    assert path.gain.grad is not None and path.gain.grad.abs() > 0
    assert [n for n, p in path.named_parameters()] == ["gain"]
    model.eval()
    meta = ModelMeta(ds.manifest.to_dict(), pipe.cache.dim, {}, list(ds.tabular_columns))
    loaded, *_ = load_checkpoint(save_checkpoint(tmp_path / "ck", model, tokenizer, cfg, meta))
    assert torch.equal(loaded.statistics_path.basis, path.basis) and torch.equal(loaded.statistics_path.center, path.center)
    batch = stream.batch(1, 4)
    with torch.no_grad():
        assert torch.equal(loaded(batch).anchor, model(batch).anchor)
