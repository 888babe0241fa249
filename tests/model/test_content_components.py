"""model.user_encoder.content_components: what a user's kept events are about (the top principal components of each
sequence modality's mean event-text vector, standardised on the training users) joins the profile loss's target beside
the counts; fitted by fit_input_stats, saved and reloaded with the checkpoint."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
import torch

from qanchor.config import PretrainConfig, load_config
from qanchor.errors import ConfigError
from qanchor.model.factory import ModelMeta, load_checkpoint, save_checkpoint
from qanchor.train.pretrain import fit_input_stats
from tests.model.helpers import model_and_stream, tiny_cfg

K = 4
CONTENT = ["model.user_encoder.summary_stats=history", "model.statistics_path=add", "loss.profile_weight=1",
           f"model.user_encoder.content_components={K}"]


@pytest.fixture(scope="module")
def env(tiny_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("content")
    ds_dir = root / "ds"
    shutil.copytree(tiny_dataset, ds_dir, ignore=shutil.ignore_patterns(".qanchor_cache"))
    cfg = tiny_cfg(CONTENT)
    model, tokenizer, stream, ds, pipe, _ = model_and_stream(ds_dir, cfg)
    fit_input_stats(model, ds, pipe)
    model.eval()
    users = pipe.collate([pipe.packer.pack(r) for r in ds.users()])
    return SimpleNamespace(root=root, cfg=cfg, model=model, tokenizer=tokenizer, stream=stream, ds=ds, pipe=pipe,
                           users=users)


def _mean_text(users, name):
    mb = users.modalities[name]
    w = mb.mask.float().unsqueeze(-1)
    return (mb.text_vec * w).sum(1) / w.sum(1).clamp_min(1.0), mb.mask.any(1)


def test_components_are_standardised_and_uncorrelated_on_the_training_users(env):
    """fit_input_stats fits each modality's basis on the users with events there: over those users the components
    have mean 0 and identity covariance (principal directions scaled to unit variance); other users get zeros."""
    enc = env.model.user_encoder
    ranks = []
    for name in enc.sequence_names:
        z = enc.content(name, env.users).double()
        _, present = _mean_text(env.users, name)
        assert z.shape == (len(env.users), K)
        assert torch.equal(z[~present], torch.zeros_like(z[~present]))
        zp = z[present]
        assert zp.abs().max() < 10  # the clamp is a guard, not what shapes these users
        assert torch.allclose(zp.mean(0), torch.zeros(K, dtype=torch.float64), atol=1e-4)
        cov = (zp - zp.mean(0)).T @ (zp - zp.mean(0)) / len(zp)
        # directions beyond the data's rank (a modality with few distinct texts in this small dataset) stay zero
        rank = int((enc.content_basis[enc.sequence_names.index(name)].abs().sum(-1) > 0).sum())
        assert rank >= 1
        expected = torch.diag(torch.tensor([1.0] * rank + [0.0] * (K - rank), dtype=torch.float64))
        assert torch.allclose(cov, expected, atol=1e-3), name
        ranks.append(rank)
    assert max(ranks) == K  # at least one modality has K full components


def test_spectrum_scaling_keeps_each_modalitys_relative_spread(env, tmp_path):
    """content_scale=spectrum: the same principal directions, one scale per modality, so the components stay
    uncorrelated with variances in the data's own proportions (descending, the quiet ones quiet), their mean over the
    fitted directions 1 (the modality's total weight as with unit scaling)."""
    cfg = tiny_cfg([*CONTENT, "model.user_encoder.content_scale=spectrum"])
    model, _, _, ds, pipe, _ = model_and_stream(env.ds.root, cfg)
    fit_input_stats(model, ds, pipe)
    enc, unit = model.user_encoder, env.model.user_encoder
    spread = []
    for name in enc.sequence_names:
        i = enc.sequence_names.index(name)
        rank = int((enc.content_basis[i].abs().sum(-1) > 0).sum())
        assert rank == int((unit.content_basis[i].abs().sum(-1) > 0).sum())
        directions = torch.nn.functional.normalize(enc.content_basis[i, :rank].double(), dim=-1)
        assert torch.allclose(directions, torch.nn.functional.normalize(unit.content_basis[i, :rank].double(), dim=-1),
                              atol=1e-6)
        _, present = _mean_text(env.users, name)
        z = enc.content(name, env.users).double()[present]
        cov = (z - z.mean(0)).T @ (z - z.mean(0)) / len(z)
        variances = torch.diagonal(cov)[:rank]
        assert torch.allclose(cov[:rank, :rank], torch.diag(variances), atol=1e-3)  # still uncorrelated
        assert float(variances.mean()) == pytest.approx(1.0, abs=1e-3)
        assert torch.all(variances[:-1] >= variances[1:] - 1e-6)
        spread.append(float(variances[0] / variances[-1]))
    assert max(spread) > 1.5  # unequal: with unit scaling every ratio is 1


def test_the_components_are_the_principal_directions(env):
    """The first component is the mean text vector's projection on its top principal direction: it explains more of
    the users' variance than any other unit direction (compared against the other directions the basis holds)."""
    enc = env.model.user_encoder
    name = enc.sequence_names[0]
    mean_text, present = _mean_text(env.users, name)
    x = mean_text[present].double()
    x = x - x.mean(0)
    i = enc.sequence_names.index(name)
    directions = torch.nn.functional.normalize(enc.content_basis[i].double(), dim=-1)  # (K, T)
    variance = ((x @ directions.T) ** 2).mean(0)  # (K,)
    assert torch.all(variance[:-1] >= variance[1:] - 1e-9)  # sorted: the first holds the most
    top = torch.linalg.svd(x, full_matrices=False)[2][0]
    assert abs(float(directions[0] @ top)) > 0.999


def test_the_profile_ends_with_the_components_and_the_path_does_not_read_them(env):
    """profile(): the window statistics and tabular block as before, then every sequence modality's content, in
    manifest order; the decoder's width follows. The wide path's input (statistics()) is unchanged: the embedding
    must carry the content, nothing hands it over."""
    enc, users = env.model.user_encoder, env.users
    stats, profile = enc.statistics(users), enc.profile(users)
    assert profile.shape == (len(users), enc.profile_width()) == (len(users), env.model.profile_decoder.linear.out_features)
    n_seq, n_tab = len(enc.sequence_names), len(env.ds.tabular_columns)
    assert enc.profile_width() == n_seq * (enc.profile_stats_width + K) + 2 * n_tab
    head = torch.cat([enc.summary_inputs(n, users)[1][:, :enc.profile_stats_width] for n in enc.sequence_names]
                     + [enc.tabular.standardise(users.tabular, users.tabular_missing), users.tabular_missing.float()], -1)
    assert torch.equal(profile[:, :head.shape[1]], head)
    tail = torch.cat([enc.content(n, users) for n in enc.sequence_names], dim=-1)
    assert torch.equal(profile[:, head.shape[1]:], tail)
    assert stats.shape[1] == enc.statistics_width() == n_seq * (enc.summary_width + 1) + 2 * n_tab


def test_the_profile_loss_trains_the_decoder_on_the_content_targets(env):
    """A training step's loss reaches the decoder rows of the content targets: the embedding is asked for them."""
    model = env.model
    n_content = len(model.user_encoder.sequence_names) * K
    model.train()
    model.zero_grad()
    model(env.stream.batch(1, 4), env.cfg.loss).loss.backward()
    grad = model.profile_decoder.linear.weight.grad  # (P, D)
    assert grad[-n_content:].abs().sum() > 0 and grad[:-n_content].abs().sum() > 0
    model.zero_grad()
    model.eval()


def test_content_follows_each_users_own_events(env):
    """Two users with different event texts get different components, and a user's components do not depend on who
    else is in the batch."""
    enc, pipe, ds = env.model.user_encoder, env.pipe, env.ds
    pair = pipe.collate([pipe.packer.pack(ds.user(u)) for u in ("u000", "u002")])
    alone = pipe.collate([pipe.packer.pack(ds.user("u002"))])
    for name in enc.sequence_names:
        if not pair.modalities[name].mask.any(1).all():
            continue
        z = enc.content(name, pair)
        assert not torch.allclose(z[0], z[1]), name
        assert torch.allclose(enc.content(name, alone)[0], z[1], atol=1e-6), name


def test_the_checkpoint_keeps_the_basis(env):
    """Saved and reloaded: the same basis, the same embedding; a model without content components keeps no buffer."""
    meta = ModelMeta(env.ds.manifest.to_dict(), env.pipe.cache.dim, {}, list(env.ds.tabular_columns))
    ckpt = save_checkpoint(env.root / "ck", env.model, env.tokenizer, env.cfg, meta)
    loaded, *_ = load_checkpoint(ckpt)
    assert torch.equal(loaded.user_encoder.content_basis, env.model.user_encoder.content_basis)
    assert loaded.user_encoder.content_basis.abs().sum() > 0
    loaded.eval()
    batch = env.stream.batch(1, 4)
    with torch.no_grad():
        assert torch.equal(loaded(batch).anchor, env.model(batch).anchor)
    plain, *_ = model_and_stream(env.root / "ds", tiny_cfg(CONTENT[:-1]))
    assert not hasattr(plain.user_encoder, "content_basis")


def test_a_negative_count_or_no_profile_loss_is_a_config_error():
    with pytest.raises(ConfigError, match="content_components"):
        load_config(None, ["model.preset=tiny", "model.user_encoder.content_components=-1"], schema=PretrainConfig)
    with pytest.raises(ConfigError, match="loss.profile_weight"):  # targets of a loss that is off: a setting that does nothing
        load_config(None, ["model.preset=tiny", "model.user_encoder.content_components=4", "loss.profile_weight=0"],
                    schema=PretrainConfig)
