"""benchmarks/grad_balance.py: per-term gradient norms add up to the step's own gradient, split by parameter group."""

from __future__ import annotations

import math

import pytest
import torch

from tests.helpers import copy_dataset, load_benchmark


@pytest.fixture(scope="module")
def env(tiny_dataset, tmp_path_factory):
    from qanchor.config import LossConfig
    from qanchor.data.dataset import load_dataset
    from qanchor.data.text_cache import TextVectorCache
    from qanchor.infer.api import QAnchor
    from qanchor.model.factory import ModelMeta, build_model, save_checkpoint
    from tests.model.helpers import encoder, tiny_cfg

    root = tmp_path_factory.mktemp("grad")
    ds_dir = copy_dataset(tiny_dataset, root / "ds", with_userU=True)
    ds = load_dataset(ds_dir)
    cache = TextVectorCache(ds.text_cache_dir, encoder())
    cfg = tiny_cfg(["loss.profile_weight=3", "loss.ntp_weight=0.5"])
    torch.manual_seed(0)
    model, tokenizer = build_model(cfg.model, ds.manifest, cache.dim, ds.tabular_columns, training_aids=LossConfig(profile_weight=1.0))
    ckpt = save_checkpoint(root / "ckpt", model, tokenizer, cfg,
                           ModelMeta(ds.manifest.to_dict(), cache.dim, {}, list(ds.tabular_columns)))
    return load_benchmark("grad_balance"), QAnchor.from_pretrained(ckpt, text_cache=cache, batch_size=8), ds


def test_terms_and_groups_add_up_to_the_step_gradient(env):
    gb, q, ds = env
    r = gb.gradient_balance(q, ds, batches=1, batch_size=4)
    row = r["per_batch"][0]
    assert r["profile_weight"] == 3.0
    # The groups partition the parameters: squared norms add up, for each term and for the total.
    for key in ("contrastive", "ntp", "profile", "total"):
        parts = sum(row[f"{g}/{key}"] ** 2 for g in ("backbone", "user_encoder", "heads"))
        assert row[f"all/{key}"] == pytest.approx(math.sqrt(parts), rel=1e-5)
    # Nothing of the next-token loss reaches the embedding heads; the profile loss reaches the decoder.
    assert row["heads/ntp"] == 0.0 and row["heads/profile"] > 0
    # The total is the gradient the training step itself takes on the same batch (weights applied as it applies them).
    from qanchor.train.pairs import PretrainStream

    cfg = q.run_cfg
    stream = PretrainStream(ds, q.pipeline, q.tokenizer, q.model.token_ids, cfg.model, seed=4321,
                            uqa_fraction=cfg.train.uqa_fraction, group_size=cfg.train.query_group_size)
    q.model.zero_grad(set_to_none=True)
    q.model(stream.batch(0, 4), cfg.loss).loss.backward()
    step_norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in q.model.parameters() if p.grad is not None))
    q.model.zero_grad(set_to_none=True)
    assert row["all/total"] == pytest.approx(step_norm, rel=1e-4)
    assert row["clip_factor"] == pytest.approx(min(1.0, cfg.train.grad_clip / step_norm))
    for key, value in row.items():
        if "cos(" in key:
            assert -1.0 <= value <= 1.0


def test_profile_weight_override_scales_only_its_term(env):
    gb, q, ds = env
    base = gb.gradient_balance(q, ds, batches=1, batch_size=4)["per_batch"][0]
    double = gb.gradient_balance(q, ds, batches=1, batch_size=4, profile_weight=6.0)["per_batch"][0]
    assert double["all/profile"] == pytest.approx(2 * base["all/profile"], rel=1e-5)
    assert double["all/ntp"] == pytest.approx(base["all/ntp"], rel=1e-6)
    assert double["all/contrastive"] == pytest.approx(base["all/contrastive"], rel=1e-6)
    assert double["all/cos(ntp,profile)"] == pytest.approx(base["all/cos(ntp,profile)"], abs=1e-5)
    off = gb.gradient_balance(q, ds, batches=1, batch_size=4, profile_weight=0.0)["per_batch"][0]
    assert "all/profile" not in off and off["all/total"] < base["all/total"]
    table = gb.markdown({"ckpt": gb.gradient_balance(q, ds, batches=1, batch_size=4)})
    assert "| ckpt | backbone |" in table and "Clip factor" in table


def test_the_total_holds_every_weighted_term_of_the_step(tiny_dataset, tmp_path):
    """With loss.future_weight set, the script's total and clip factor left the future term out: not the step's."""
    from qanchor.data.dataset import load_dataset
    from qanchor.data.text_cache import TextVectorCache
    from qanchor.infer.api import QAnchor
    from qanchor.model.factory import ModelMeta, build_model, save_checkpoint
    from qanchor.train.pairs import PretrainStream
    from tests.model.helpers import encoder, tiny_cfg

    ds_dir = copy_dataset(tiny_dataset, tmp_path / "ds", with_userU=True)
    ds = load_dataset(ds_dir)
    cache = TextVectorCache(ds.text_cache_dir, encoder())
    cfg = tiny_cfg(["loss.profile_weight=1", "loss.future_weight=5"])
    torch.manual_seed(0)
    model, tokenizer = build_model(cfg.model, ds.manifest, cache.dim, ds.tabular_columns, training_aids=cfg.loss)
    ckpt = save_checkpoint(tmp_path / "ckpt", model, tokenizer, cfg,
                           ModelMeta(ds.manifest.to_dict(), cache.dim, {}, list(ds.tabular_columns)))
    q = QAnchor.from_pretrained(ckpt, text_cache=cache, batch_size=8)
    row = load_benchmark("grad_balance").gradient_balance(q, ds, batches=1, batch_size=4)["per_batch"][0]
    assert row["all/future"] > 0
    stream = PretrainStream.for_run(ds, q.pipeline, q.tokenizer, q.model.token_ids, q.run_cfg, seed=4321)
    torch.manual_seed(0)
    q.model.train()
    q.model.zero_grad(set_to_none=True)
    q.model(stream.batch(0, 4), q.run_cfg.loss).loss.backward()
    step_norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in q.model.parameters() if p.grad is not None))
    assert row["all/total"] == pytest.approx(step_norm, rel=1e-4)
