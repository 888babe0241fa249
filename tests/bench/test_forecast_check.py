"""benchmarks/forecast_check.py: R^2 of the next days' statistics from the model's inputs vs its embedding."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.helpers import copy_dataset, load_benchmark


@pytest.fixture(scope="module")
def fc():
    return load_benchmark("forecast_check")


def test_r2_is_one_for_the_truth_and_zero_for_the_mean(fc):
    rng = np.random.default_rng(0)
    y = rng.normal(size=(50, 3))
    assert fc.r2(y, y) == pytest.approx(1.0)
    assert fc.r2(np.broadcast_to(y.mean(0), y.shape), y) == pytest.approx(0.0, abs=1e-12)
    constant = np.column_stack([y[:, 0], np.ones(50)])  # a target without variance is left out, not divided by 0
    assert fc.r2(constant, constant) == pytest.approx(1.0)


def test_rows_tell_a_linear_read_a_nonlinear_one_and_an_empty_embedding_apart(fc):
    """Targets linear in the statistics: ridge reads them; a noise embedding reads nothing and adds nothing;
    a squared target only the trees read."""
    rng = np.random.default_rng(1)
    n = 600
    stats = rng.normal(size=(n, 4))
    y = np.column_stack([stats[:, 0] + 0.1 * rng.normal(size=n), stats[:, 1] ** 2 + 0.1 * rng.normal(size=n)])
    emb = rng.normal(size=(n, 8))
    groups = np.repeat(np.arange(n // 3), 3)  # three pairs per user, never split across train and test
    linear = fc.evaluate(stats, emb, y[:, :1], None, groups)
    assert linear["stats_ridge"] > 0.95 and abs(linear["embedding_ridge"]) < 0.05
    assert linear["stats_embedding_ridge"] == pytest.approx(linear["stats_ridge"], abs=0.01)
    assert "decoder" not in linear
    squared = fc.evaluate(stats, emb, y[:, 1:], y[:, 1:], groups)
    assert squared["stats_lgbm"] > 0.8 and squared["stats_ridge"] < 0.05
    assert squared["decoder"] == pytest.approx(1.0)  # a decoder that outputs the truth
    # a noisy decoder reads less than the truth, a decoder of noise nothing: the row scores the decoder's output
    noisy = fc.evaluate(stats, emb, y[:, 1:], y[:, 1:] + 0.5 * rng.normal(size=(n, 1)) * y[:, 1:].std(), groups)
    assert 0.5 < noisy["decoder"] < 0.95  # about 1 - 0.5^2
    assert fc.evaluate(stats, emb, y[:, 1:], rng.normal(size=(n, 1)), groups)["decoder"] < 0.05


def test_run_scores_untrained_pairs_with_a_complete_window(fc, tiny_dataset, tmp_path):
    from qanchor.model.factory import ModelMeta, save_checkpoint
    from qanchor.train.pretrain import fit_future_stats
    from tests.model.helpers import model_and_stream, tiny_cfg

    ds_dir = copy_dataset(tiny_dataset, tmp_path / "ds", with_userU=True)
    cfg = tiny_cfg(["loss.future_weight=1", "loss.future_days=20", "train.max_steps=3", "train.batch_size=4"])
    model, tokenizer, stream, ds, pipe, _ = model_and_stream(ds_dir, cfg)
    fit_future_stats(model, stream, global_batch=4)
    ckpt = save_checkpoint(tmp_path / "ck", model, tokenizer, cfg,
                           ModelMeta(ds.manifest.to_dict(), pipe.cache.dim, {}, list(ds.tabular_columns)))
    ids = fc.held_out_pairs(stream, cfg, 10_000, seed=0)
    assert len(ids) and stream.future_complete[ids].all()
    assert not set(ids.tolist()) & set(stream.pair_ids_for_steps(3, 4).tolist())  # nothing the run trained on
    out = tmp_path / "fc.json"
    torch.manual_seed(0)
    assert fc.main(["--checkpoint", str(ckpt), "--data", str(ds_dir), "--days", "20", "--pairs", "80",
                    "--out", str(out)]) == 0
    run = json.loads(out.read_text())["runs"][0]
    assert run["pairs"] == min(80, len(ids)) and run["targets"] == 4 * len(ds.manifest.sequence_modalities)
    assert set(fc.ROWS) <= set(run)  # the decoder row too: the checkpoint forecasts 20 days
    assert all(v <= 1.0 for k, v in run.items() if k in fc.ROWS)


@pytest.mark.parametrize("content_use", ["target", "path"])
def test_the_statistics_hold_each_modalitys_summary_then_exactly_the_tabular_block(fc, tiny_dataset, tmp_path, content_use):
    """pair_features' statistics: each sequence modality's summary statistics, then the tabular values and missing
    flags cut from the profile, whether the content components are among the profile's targets (they come last
    there) or go to the wide path (the profile then holds none)."""
    from qanchor.infer.api import QAnchor
    from qanchor.model.factory import ModelMeta, save_checkpoint
    from qanchor.train.pretrain import fit_future_stats, fit_input_stats
    from tests.model.helpers import model_and_stream, tiny_cfg

    ds_dir = copy_dataset(tiny_dataset, tmp_path / "ds", with_userU=True)
    cfg = tiny_cfg(["model.statistics_path=add", "loss.profile_weight=1", "model.user_encoder.content_components=4",
                    f"model.user_encoder.content_use={content_use}", "loss.future_weight=1", "loss.future_days=20"])
    model, tokenizer, stream, ds, pipe, _ = model_and_stream(ds_dir, cfg)
    fit_input_stats(model, ds, pipe)
    fit_future_stats(model, stream, global_batch=4)
    ckpt = save_checkpoint(tmp_path / "ck", model, tokenizer, cfg,
                           ModelMeta(ds.manifest.to_dict(), pipe.cache.dim, {}, list(ds.tabular_columns)))
    q = QAnchor.from_pretrained(ckpt, text_cache_dir=ds.text_cache_dir)
    ids = np.arange(min(6, len(stream.user_ids)))
    stats, *_ = fc.pair_features(q, stream, ids)
    enc = q.model.user_encoder
    n_seq, n_tab = len(enc.sequence_names), len(ds.tabular_columns)
    assert stats.shape == (len(ids), n_seq * enc.summary_width + 2 * n_tab)
    users = q.pipeline.collate(stream.pack_pairs(ids))
    tabular = torch.cat([enc.tabular.standardise(users.tabular, users.tabular_missing), users.tabular_missing.float()], -1)
    np.testing.assert_allclose(stats[:, -2 * n_tab:], tabular.numpy(), atol=1e-6)
