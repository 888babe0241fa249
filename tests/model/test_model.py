from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest
import torch

from qanchor.config import LossConfig, load_config
from qanchor.data.batch import TextBatch
from qanchor.data.manifest import Manifest
from qanchor.errors import ConfigError
from qanchor.model.factory import ModelMeta, build_model, load_checkpoint, save_checkpoint
from qanchor.model.layout import special_token_names
from qanchor.model.losses import masked_infonce
from qanchor.model.prefix_cache import anchor_hidden, anchor_hidden_uncached, encode_prefixes
from qanchor.model.qanchor_model import AnswerBank, StatisticsPath
from qanchor.train.pretrain import fit_evidence_stats, fit_input_stats
from tests.model.helpers import model_and_stream, tiny_cfg


@pytest.fixture(scope="module")
def setup(tiny_dataset, tmp_path_factory):
    ds_dir = tmp_path_factory.mktemp("m") / "ds"
    shutil.copytree(tiny_dataset, ds_dir, ignore=shutil.ignore_patterns(".qanchor_cache"))
    return model_and_stream(ds_dir)


def test_forward_shapes_norms_and_losses(setup):
    model, _, stream, *_ = setup
    model.eval()
    batch = stream.batch(0, 4)
    out = model(batch)
    assert out.anchor.shape == (4, 128) and out.answer.shape == (4, 128)
    assert torch.allclose(out.anchor.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert torch.isfinite(out.loss) and out.loss_contrastive > 0 and out.loss_ntp > 0
    assert torch.allclose(out.loss, out.loss_contrastive + out.loss_ntp)
    cl_only = model(batch, LossConfig(mode="contrastive"))
    assert cl_only.loss_ntp == 0 and torch.allclose(cl_only.loss, out.loss_contrastive)
    ntp_only = model(batch, LossConfig(mode="ntp"))
    assert ntp_only.answer is None and torch.allclose(ntp_only.loss, out.loss_ntp, atol=1e-5)
    assert torch.allclose(ntp_only.anchor, out.anchor, atol=1e-5)  # the answer never reaches the anchor


def test_anchor_is_causal_and_query_conditioned(setup):
    model, _, stream, *_ = setup
    model.eval()
    batch = stream.batch(1, 4)
    with torch.no_grad():
        a = model(batch).anchor
        scrambled = TextBatch(torch.flip(batch.answers.ids, dims=[0]), torch.flip(batch.answers.lengths, dims=[0]))
        batch.answers = scrambled
        b = model(batch).anchor
        batch.queries = TextBatch(batch.queries.ids[:, :2].clone(), torch.full((4,), 2))
        c = model(batch).anchor
    assert torch.allclose(a, b, atol=1e-6)
    assert (a - c).abs().max() > 1e-3


def test_gradients_reach_every_trainable_part(setup):
    model, _, stream, *_ = setup
    model.train()
    model.zero_grad()
    model(stream.batch(2, 4)).loss.backward()
    for name in ("user_encoder.modal_adapter", "user_encoder.user_adapter", "user_encoder.event_adapters.bill",
                 "user_encoder.tabular", "projection", "backbone"):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(name) and p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), name


def test_save_load_identical_embeddings(setup, tmp_path):
    model, tokenizer, stream, ds, packer, cfg = setup
    model.eval()
    batch = stream.batch(0, 4)
    with torch.no_grad():
        before = model(batch)
    meta = ModelMeta(ds.manifest.to_dict(), packer.cache.dim, {}, list(ds.tabular_columns))
    save_checkpoint(tmp_path / "ck", model, tokenizer, cfg, meta)
    loaded, tok2, meta2, cfg2 = load_checkpoint(tmp_path / "ck")
    with torch.no_grad():
        after = loaded(batch)
    assert torch.equal(before.anchor, after.anchor) and torch.equal(before.answer, after.answer)
    assert torch.equal(before.loss, after.loss)
    assert tok2.convert_tokens_to_ids("<|user_emb|>") == model.token_ids.user_emb


def test_checkpoint_version_refused(setup, tmp_path):
    from qanchor.errors import CheckpointError

    model, tokenizer, _, ds, packer, cfg = setup
    meta = ModelMeta(ds.manifest.to_dict(), packer.cache.dim, {}, list(ds.tabular_columns), format_version=99)
    save_checkpoint(tmp_path / "old", model, tokenizer, cfg, meta)
    with pytest.raises(CheckpointError, match="format 99"):
        load_checkpoint(tmp_path / "old")


def test_a_save_refuses_a_checkpoint_holding_files_of_the_users_own(setup, tmp_path):
    """Each save replaced checkpoint/ whole: notes or evaluations a user put in it were deleted without a word. The
    marker records the names a save wrote (a tokenizer's files vary), and anything else stops the next save."""
    from qanchor.data.io import output_record
    from qanchor.errors import OutputError

    model, tokenizer, _, ds, packer, cfg = setup
    meta = ModelMeta(ds.manifest.to_dict(), packer.cache.dim, {}, list(ds.tabular_columns))
    save_checkpoint(tmp_path / "ck", model, tokenizer, cfg, meta)
    assert {"model.safetensors", "config.yaml", "qanchor.json"} <= set(output_record(tmp_path / "ck")["holds"])
    save_checkpoint(tmp_path / "ck", model, tokenizer, cfg, meta)  # its own files only: replaced
    (tmp_path / "ck" / "eval").mkdir()
    (tmp_path / "ck" / "eval" / "auc.json").write_text("{}")
    with pytest.raises(OutputError, match=r"also 'eval'"):
        save_checkpoint(tmp_path / "ck", model, tokenizer, cfg, meta)
    assert (tmp_path / "ck" / "eval" / "auc.json").read_text() == "{}"


def test_empty_modality_uses_learned_empty_token(setup):
    model, _, stream, *_ = setup
    model.eval()

    users = [stream.pipe.packer.pack(stream.ds.user(uid)) for uid in ("u000", "u001")]  # u000: no events; u001: no search
    batch = stream.pipe.collate(users)
    with torch.no_grad():
        tokens = model.user_encoder(batch)
    names = model.user_encoder.names
    search = names.index("search")
    assert torch.equal(tokens.modality[1, search], model.user_encoder.empty.weight[search])
    assert torch.equal(tokens.modality[0, names.index("bill")], model.user_encoder.empty.weight[names.index("bill")])
    assert not torch.equal(tokens.modality[1, names.index("bill")], model.user_encoder.empty.weight[names.index("bill")])


def _int_literals() -> set[int]:
    found = set()
    for path in Path("qanchor").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
                found.add(node.value)
    return found


def test_no_token_id_literal_in_code(setup):
    _, tokenizer, *_ = setup
    literals = _int_literals()
    special = {tokenizer.convert_tokens_to_ids(n) for n in special_token_names(["bill", "app", "search", "tabular"])}
    qwen_specials = set(range(151643, 151700)) | {77091}  # what the authors' code hard-coded
    # Small ids (BERT's 100-103) collide with ordinary constants such as -100; the ids a hard-coding bug
    # would write are the added tokens' and Qwen's, all far above any constant the code needs.
    assert min(special) > 30000
    assert not literals & (special | qwen_specials)


@pytest.mark.parametrize("preset,hidden,layers", [("qwen2.5-0.5b", 896, 24), ("smollm2-135m", 576, 30)])
def test_large_presets_build_without_weights(preset, hidden, layers):
    cfg = load_config(Path("configs/model") / f"{preset}.yaml")
    manifest = Manifest.from_dict({"name": "x", "cutoff": "2024-01-01", "modalities": [
        {"name": n} for n in ("bill", "mini", "spm", "app", "search")] + [{"name": "tabular", "kind": "tabular"}]})
    from qanchor.model.backbone import load_tokenizer

    tokenizer = load_tokenizer(load_config(Path("configs/model/tiny.yaml")).backbone)  # no hub access in tests
    with torch.device("meta"):
        model, _ = build_model(cfg, manifest, 384, [f"f{i}" for i in range(40)], load_weights=False, tokenizer=tokenizer)
    assert model.hidden_size == hidden
    base = model.backbone.get_base_model() if hasattr(model.backbone, "get_base_model") else model.backbone
    assert base.config.num_hidden_layers == layers
    if preset == "qwen2.5-0.5b":
        assert any("lora_A" in n for n, _ in model.named_parameters())
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert not any("q_proj.base_layer" in n for n in trainable)  # base weights frozen under LoRA
    assert model.user_encoder.tabular.n_tokens == cfg.user_encoder.tabular_tokens


@pytest.mark.parametrize("n_modalities", [1, 2, 8])
def test_encoder_built_from_any_manifest(n_modalities):
    from qanchor.config import UserEncoderConfig
    from qanchor.data.batch import ModalityBatch, UserBatch
    from qanchor.model.user_encoder import HierarchicalUserEncoder

    manifest = Manifest.from_dict({"name": "x", "cutoff": "2024-01-01",
                                   "modalities": [{"name": f"m{i}", "numeric_columns": ["a"] * (i % 2)} for i in range(n_modalities)]})
    enc = HierarchicalUserEncoder(manifest, UserEncoderConfig(adapter_hidden=16), text_dim=8, hidden=12, n_tabular=0)
    mods = {m.name: ModalityBatch(torch.randn(3, 5, 8), torch.randn(3, 5, 7 + 2 * len(m.numeric_columns)), torch.rand(3, 5) > 0.3)
            for m in manifest.modalities}
    out = enc(UserBatch(["a", "b", "c"], mods))
    assert out.modality.shape == (3, n_modalities, 12) and out.user.shape == (3, 12)
    assert len(out.events) == n_modalities
    stats = enc.statistics(UserBatch(["a", "b", "c"], mods))  # the statistics path's input, no tabular modality
    assert stats.shape == (3, enc.statistics_width()) == (3, n_modalities * (enc.summary_width + 1))


def test_anchor_is_never_a_prediction_position(setup):
    """<|user_emb|> is followed by <|answer|>: the anchor predicts nothing, the marker predicts the answer."""
    model, *_ = setup
    prefix, suffix = torch.zeros(5, model.hidden_size), torch.zeros(3, model.hidden_size)
    answer = torch.tensor([11, 12, 13])
    row, labels, anchor = model.sequence(prefix, suffix, answer)
    assert anchor == 7 and row.shape[0] == 5 + 3 + 1 + 3
    assert labels[anchor + 1] == -100  # the token after the anchor (the marker) is no target of the anchor
    assert labels[anchor + 2 :].tolist() == [11, 12, 13] and (labels[: anchor + 2] == -100).all()
    assert torch.equal(row[anchor + 1], model.embed_tokens(torch.tensor(model.token_ids.answer)))
    row, labels, _ = model.sequence(prefix, suffix, None)
    assert row.shape[0] == 8 and (labels == -100).all()


def test_event_inputs_are_normalised_separately(setup):
    """Text and numeric parts are normalised and projected separately, then summed."""
    model, *_ = setup
    adapter = model.user_encoder.event_adapters["bill"]
    adapter.set_stats(torch.full_like(adapter.numeric_mean, 2.0), torch.full_like(adapter.numeric_std, 4.0))
    text = torch.nn.functional.normalize(torch.randn(1, 1, 384), dim=-1)
    numeric = torch.full((1, 1, adapter.numeric_mean.shape[0]), 6.0)
    expected = adapter.out(adapter.text_in(adapter.text_norm(text)) + adapter.numeric_in((numeric - 2.0) / 4.0))
    assert torch.allclose(expected, adapter(text, numeric))
    assert adapter.text_norm(text).std().item() == pytest.approx(1.0, rel=0.05)  # unit-norm text lifted to unit scale


def test_window_summary_by_hand():
    from qanchor.model.user_encoder import window_summary

    text = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]]])  # (1, 3, 2); the third event is padding
    numeric = torch.zeros(1, 3, 7)
    numeric[0, :, 2] = torch.tensor([0.2, 0.6, 5.0])  # ages (log1p(days) / 5)
    numeric[0, :, 0] = torch.tensor([1.0, 3.0, 7.0])  # signed log values
    mask = torch.tensor([[True, True, False]])
    mean_text, stats = (x[0] for x in window_summary(text, numeric, mask))
    assert mean_text.tolist() == pytest.approx([0.5, 0.5])  # the padded event does not count
    assert stats[0].item() == pytest.approx(float(torch.log1p(torch.tensor(2.0))) / 3)
    assert stats[1:3].tolist() == pytest.approx([0.2, 0.6])  # newest and oldest kept event's age
    assert stats[3].item() == pytest.approx(2.0) and stats[5].item() == pytest.approx(0.4)  # mean value, mean age
    empty = torch.cat(window_summary(text, numeric, torch.zeros(1, 3, dtype=torch.bool)), dim=-1)
    assert torch.isfinite(empty).all() and empty.abs().sum() == 0


def test_text_answer_tower_projects_frozen_vectors(tiny_dataset, tmp_path):
    """answer_tower=text_encoder: answers are frozen sentence vectors through a projection of their own."""
    import shutil

    ds_dir = tmp_path / "ds"
    shutil.copytree(tiny_dataset, ds_dir, ignore=shutil.ignore_patterns(".qanchor_cache"))
    cfg = tiny_cfg(["model.answer_tower=text_encoder", "loss.margin=null"])
    model, _, stream, ds, pipe, _ = model_and_stream(ds_dir, cfg)
    stream.answer_cache = pipe.cache  # the event-text cache serves: only the answers' vectors are needed
    batch = stream.batch(0, 4)
    assert batch.answer_vec.shape == (4, 384)
    out = model(batch, LossConfig(mode="contrastive", margin=None))
    out.loss.backward()
    assert model.answer_projection[0].weight.grad.abs().sum() > 0
    assert torch.allclose(out.answer.norm(dim=-1), torch.ones(4))
    with pytest.raises(ValueError, match="answer_vec"):
        model.encode_answers(batch.answers, None)


def test_answer_bank_adds_reprojected_earlier_answers_as_negatives(tiny_dataset, tmp_path):
    """loss.answer_bank: earlier answers' frozen vectors, projected with today's weights, are extra negatives."""
    ds_dir = tmp_path / "ds"
    shutil.copytree(tiny_dataset, ds_dir, ignore=shutil.ignore_patterns(".qanchor_cache"))
    model, _, stream, ds, pipe, _ = model_and_stream(ds_dir, tiny_cfg(["model.answer_tower=text_encoder"]))
    stream.answer_cache = pipe.cache
    model.eval()  # no dropout: the same function twice
    loss_cfg = LossConfig(mode="contrastive", margin=None)
    first, second = stream.batch(0, 4), stream.batch(1, 4)
    bank = AnswerBank(6)
    model(first, loss_cfg, answer_bank=bank)  # an empty bank: nothing to add, then it receives this batch
    assert len(bank) == 4 and torch.equal(bank.vec, first.answer_vec) and torch.equal(bank.hash, first.answer_hash)
    out = model(second, loss_cfg, answer_bank=bank)
    # The loss is masked InfoNCE with the first batch's answers, re-projected now, as anchor->answer negatives.
    earlier = model.encode_answers(first.answers, first.answer_vec)
    same_bank = second.answer_hash[:, None] == first.answer_hash[None, :]
    expected, n = masked_infonce(out.anchor, out.answer, margin=None, same_answer=second.answer_hash[:, None]
                                 == second.answer_hash[None, :], bank=earlier, same_bank=same_bank)
    assert out.loss_contrastive.item() == pytest.approx((expected / n).item(), rel=1e-6)
    plain = model(second, loss_cfg)
    assert out.loss_contrastive.item() > plain.loss_contrastive.item()
    # Newest first, the oldest dropped at the size limit.
    assert len(bank) == 6 and torch.equal(bank.vec[:4], second.answer_vec) and torch.equal(bank.vec[4:], first.answer_vec[:2])
    restored = AnswerBank(0)
    restored.load_state_dict(bank.state_dict())
    assert restored.size == 6 and torch.equal(restored.vec, bank.vec) and torch.equal(restored.hash, bank.hash)
    assert torch.equal(restored.query_hash[:4], second.query_hash)
    # scope same_query: only other users' answers to the anchor's own query are negatives.
    # a later batch that shares some of the first batch's queries, not all
    later = next(b for b in (stream.batch(i, 4) for i in range(1, 64))
                 if 0 < (b.query_hash[:, None] != first.query_hash[None, :]).sum() < 16)
    banks = {scope: AnswerBank(4) for scope in ("all", "same_query")}
    for bank_q in banks.values():
        bank_q.push(first.answer_vec, first.answer_hash, first.query_hash)
    out_q = model(later, LossConfig(mode="contrastive", margin=None, answer_bank_scope="same_query"),
                  answer_bank=banks["same_query"])
    out_all = model(later, loss_cfg, answer_bank=banks["all"])
    other_query = later.query_hash[:, None] != first.query_hash[None, :]
    expected_q, n_q = masked_infonce(out_q.anchor, out_q.answer, margin=None, same_answer=later.answer_hash[:, None]
                                     == later.answer_hash[None, :], bank=earlier,
                                     same_bank=(later.answer_hash[:, None] == first.answer_hash[None, :]) | other_query)
    assert out_q.loss_contrastive.item() == pytest.approx((expected_q / n_q).item(), rel=1e-6)
    assert out_q.loss_contrastive.item() < out_all.loss_contrastive.item()
    backbone_tower, *_ = model_and_stream(ds_dir, tiny_cfg())
    with pytest.raises(ValueError, match="answer_tower=text_encoder"):
        backbone_tower(second, loss_cfg, answer_bank=AnswerBank(4))


def test_answer_bank_needs_the_text_tower():
    with pytest.raises(ConfigError, match="loss.answer_bank needs model.answer_tower=text_encoder"):
        tiny_cfg(["loss.answer_bank=64"])
    with pytest.raises(ConfigError, match="loss.answer_bank must be >= 0"):
        tiny_cfg(["model.answer_tower=text_encoder", "loss.answer_bank=-1"])
    assert tiny_cfg(["model.answer_tower=text_encoder", "loss.answer_bank=64"]).loss.answer_bank == 64


def test_projection_hidden_zero_makes_linear_heads(tiny_dataset, tmp_path):
    """model.projection_hidden=0: both heads are one linear map, so the embedding is normalize(W h + b) of the
    anchor's hidden state; the default keeps the paper's MLP; a negative width is a config error."""
    ds_dir = tmp_path / "ds"
    shutil.copytree(tiny_dataset, ds_dir, ignore=shutil.ignore_patterns(".qanchor_cache"))
    model, *_ = model_and_stream(ds_dir, tiny_cfg(["model.answer_tower=text_encoder", "model.projection_hidden=0"]))
    for head in (model.projection, model.answer_projection):
        assert len(head) == 1 and isinstance(head[0], torch.nn.Linear)
    assert model.projection[0].weight.shape == (128, model.hidden_size)
    h = torch.randn(5, model.hidden_size)
    expected = torch.nn.functional.normalize(h @ model.projection[0].weight.T + model.projection[0].bias, dim=-1)
    assert torch.allclose(model.project(h), expected, atol=1e-6)
    default, *_ = model_and_stream(ds_dir, tiny_cfg(["model.answer_tower=text_encoder"]))
    assert [type(m) for m in default.projection] == [torch.nn.Linear, torch.nn.GELU, torch.nn.Linear]
    with pytest.raises(ConfigError, match="projection_hidden"):
        tiny_cfg(["model.projection_hidden=-1"])


def test_profile_loss_decodes_the_standardised_input_profile(tiny_dataset, tmp_path):
    """loss.profile_weight: a linear decoder from the embedding to each modality's window statistics and the
    standardised tabular values (stats fitted on the training users), its MSE added with the weight; the decoder
    is saved and reloaded with the checkpoint; weight 0 builds none; a negative weight is a config error."""
    from qanchor.model.user_encoder import SUMMARY_STATS, window_summary
    from qanchor.train.pretrain import fit_input_stats

    ds_dir = tmp_path / "ds"
    shutil.copytree(tiny_dataset, ds_dir, ignore=shutil.ignore_patterns(".qanchor_cache"))
    cfg = tiny_cfg(["loss.profile_weight=0.5"])
    model, tokenizer, stream, ds, pipe, _ = model_and_stream(ds_dir, cfg)
    enc = model.user_encoder
    n_seq, n_tab = len(ds.manifest.sequence_modalities), len(ds.tabular_columns)
    assert n_tab > 0 and model.profile_decoder.linear.weight.shape == (n_seq * SUMMARY_STATS + 2 * n_tab, 128)
    fit_input_stats(model, ds, pipe)
    everyone = pipe.collate(pipe.pack_many(list(ds.users())))
    with torch.no_grad():
        profile = enc.profile(everyone)
    z = (profile - model.profile_decoder.mean) / model.profile_decoder.std
    varied = profile.std(0) > 1e-6
    assert torch.allclose(z.mean(0), torch.zeros_like(z[0]), atol=1e-4)  # standardised on these (training) users
    assert torch.allclose(z.std(0, unbiased=False)[varied], torch.ones(int(varied.sum())), atol=1e-4)
    first = ds.manifest.sequence_modalities[0].name
    mb = everyone.modalities[first]
    assert torch.equal(profile[:, :SUMMARY_STATS], window_summary(mb.text_vec, mb.numeric, mb.mask)[1])
    tab = profile[:, n_seq * SUMMARY_STATS:]
    expect = ((everyone.tabular - enc.tabular.mean) / enc.tabular.std).clamp(-10, 10).masked_fill(everyone.tabular_missing, 0)
    assert torch.equal(tab[:, :n_tab], expect) and torch.equal(tab[:, n_tab:], everyone.tabular_missing.float())

    model.eval()
    batch = stream.batch(0, 4)
    out = model(batch, cfg.loss)
    with torch.no_grad():
        target = (enc.profile(batch.users) - model.profile_decoder.mean) / model.profile_decoder.std
        by_hand = (model.profile_decoder.linear(out.anchor * 128**0.5) - target).pow(2).mean()
    assert torch.allclose(out.loss_profile, by_hand, atol=1e-6) and out.loss_profile > 0
    assert torch.allclose(out.loss, out.loss_contrastive + out.loss_ntp + 0.5 * out.loss_profile, atol=1e-6)
    model.zero_grad()
    out.loss_profile.backward()  # it reaches the encoder through the embedding, not only the decoder
    assert model.projection[-1].weight.grad.abs().sum() > 0 and model.profile_decoder.linear.weight.grad.abs().sum() > 0

    meta = ModelMeta(ds.manifest.to_dict(), pipe.cache.dim, {}, list(ds.tabular_columns))
    save_checkpoint(tmp_path / "ck", model, tokenizer, cfg, meta)
    loaded, *_ = load_checkpoint(tmp_path / "ck")
    assert torch.equal(loaded.profile_decoder.mean, model.profile_decoder.mean)
    assert torch.equal(loaded.profile_decoder.linear.weight, model.profile_decoder.linear.weight)
    plain, *_ = model_and_stream(ds_dir)
    assert plain.profile_decoder is None and plain(batch).loss_profile == 0
    with pytest.raises(ValueError, match="profile decoder"):
        plain(batch, LossConfig(profile_weight=1.0))
    with pytest.raises(ConfigError, match="profile_weight"):
        tiny_cfg(["loss.profile_weight=-1"])


def test_profile_sources_restrict_the_profile_loss_to_their_pairs(tiny_dataset, tmp_path):
    """loss.profile_sources=[uqa]: the profile loss is the mean over the batch's uqa pairs only (the forecast
    questions' embeddings are left free); a batch without one adds nothing; a source the dataset's pairs lack
    and an empty list are config errors that say what to do."""
    import pyarrow.parquet as pq

    ds_dir = tmp_path / "ds"
    shutil.copytree(tiny_dataset, ds_dir, ignore=shutil.ignore_patterns(".qanchor_cache"))
    cfg = tiny_cfg(["loss.profile_weight=0.5", "loss.profile_sources=[uqa]"])
    model, _, stream, ds, pipe, _ = model_and_stream(ds_dir, cfg)
    sources = pq.read_table(ds_dir / "userU.parquet").column("source").to_pylist()
    assert stream.profile_rows.sum() == sources.count("uqa") > 0 and (~stream.profile_rows).sum() > 0
    model.eval()
    step = next(s for s in range(50) if 0 < int(stream.batch(s, 8).profile_rows.sum()) < 8)  # a mixed batch
    batch = stream.batch(step, 8)
    rows = batch.profile_rows
    assert rows.tolist() == [stream.profile_rows[i] for i in stream.pair_ids(step, 8)]
    out = model(batch, cfg.loss)
    with torch.no_grad():
        target = (model.user_encoder.profile(batch.users) - model.profile_decoder.mean) / model.profile_decoder.std
        err = (model.profile_decoder.linear(out.anchor * 128**0.5) - target).pow(2).mean(-1)
    assert torch.allclose(out.loss_profile, err[rows].mean(), atol=1e-6)
    assert not torch.allclose(out.loss_profile, err.mean(), atol=1e-6)  # the other pairs do not count
    assert torch.allclose(model(batch.to("cpu"), cfg.loss).loss_profile, out.loss_profile)  # .to keeps the rows
    batch.profile_rows = torch.zeros_like(rows)
    none = model(batch, cfg.loss)
    assert none.loss_profile == 0 and torch.allclose(none.loss, none.loss_contrastive + none.loss_ntp, atol=1e-6)
    missing = sorted({"future", "uqa", "forecast", "signature"} - set(sources))[0]
    with pytest.raises(ConfigError, match=rf"profile_sources names \['{missing}'\].*userU.parquet"):
        model_and_stream(ds_dir, tiny_cfg(["loss.profile_weight=0.5", f"loss.profile_sources=[{missing}]"]))
    # and in preflight, before any event text is encoded (it came after the whole setup)
    from qanchor.train.pretrain import preflight

    with pytest.raises(ConfigError, match=rf"profile_sources names \['{missing}'\]"):
        preflight(tiny_cfg(["loss.profile_weight=0.5", f"loss.profile_sources=[{missing}]", f"data.path={ds_dir}",
                            f"output_dir={ds_dir.parent / 'never'}"]))
    with pytest.raises(ConfigError, match="profile_sources is empty"):
        tiny_cfg(["loss.profile_sources=[]"])


def test_profile_whitening_decorrelates_the_targets_and_keeps_their_scale(tiny_dataset, tmp_path):
    """loss.profile_whitening: the decoder's targets are the standardised profile times a shrunk PCA whitening fitted
    on the training users: uncorrelated there, total variance that of the standardised profile (so profile_weight
    keeps its meaning), a restated statistic no longer counted twice; the matrix is saved with the checkpoint."""
    from qanchor.model.qanchor_model import shrunk_whitening
    from qanchor.train.pretrain import fit_input_stats

    ds_dir = tmp_path / "ds"
    shutil.copytree(tiny_dataset, ds_dir, ignore=shutil.ignore_patterns(".qanchor_cache"))
    cfg = tiny_cfg(["loss.profile_weight=0.5", "loss.profile_whitening=true"])
    model, tokenizer, stream, ds, pipe, _ = model_and_stream(ds_dir, cfg)
    fit_input_stats(model, ds, pipe)
    dec = model.profile_decoder
    with torch.no_grad():
        profile = model.user_encoder.profile(pipe.collate(pipe.pack_many(list(ds.users())))).double()
    z = (profile - dec.mean.double()) / dec.std.double()
    t = dec.target(profile.float()).double()
    cov = t.T @ t / len(t)
    off = cov - torch.diag(cov.diagonal())
    assert off.abs().max() < 1e-3 * cov.diagonal().max()  # uncorrelated on the users it was fitted on
    assert cov.diagonal().sum().item() == pytest.approx((z**2).mean(0).sum().item(), rel=1e-3)  # same total
    # Restating one statistic three times moves less weight to it than plain standardisation does (3x).
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5000, 1, generator=g), torch.randn(5000, 1, generator=g)
    w = shrunk_whitening(torch.cat([a, a, a, b], 1))
    share = (torch.cat([a, a, a], 1) @ w[:3]).pow(2).mean() / (b @ w[3:]).pow(2).mean()
    assert 1.0 < share < 2.0
    model.eval()
    batch = stream.batch(0, 4)
    out = model(batch, cfg.loss)
    with torch.no_grad():
        by_hand = (dec.linear(out.anchor * 128**0.5) - dec.target(model.user_encoder.profile(batch.users))).pow(2).mean()
    assert torch.allclose(out.loss_profile, by_hand, atol=1e-6)
    meta = ModelMeta(ds.manifest.to_dict(), pipe.cache.dim, {}, list(ds.tabular_columns))
    save_checkpoint(tmp_path / "ck", model, tokenizer, cfg, meta)
    loaded, *_ = load_checkpoint(tmp_path / "ck")
    assert loaded.profile_decoder.whitening and torch.equal(loaded.profile_decoder.whiten, dec.whiten)
    with pytest.raises(ValueError, match="whitening matrix"):
        dec.set_stats(dec.mean, dec.std)


def test_window_rfm_equals_the_bench_rfm_features_of_the_kept_events():
    """window_rfm from the batch tensors == signed logs of the peers' RFM features (qanchor.bench.features) computed
    from the raw events: counts by window, active days, distinct texts, value sum / max / std / 30-day sum."""
    import numpy as np

    from qanchor.bench.features import modality_feature_names, modality_features
    from qanchor.data.dataset import EventSeq
    from qanchor.data.packing import event_numeric_features
    from qanchor.model.user_encoder import window_rfm

    day = 86_400 * 1_000_000
    cutoff = 1000 * day
    days_before = [120.0, 45.5, 29.0, 29.0, 6.25, 3.0, 0.5]  # two events on one day; one exactly at midnight
    ts = np.array([cutoff - int(d * day) for d in days_before], np.int64)
    values = np.array([5.0, -2.0, np.nan, 40.0, 7.5, 7.5, 1.0], np.float32)
    texts = ["a", "b", "a", "c", "b", "d", "a"]
    seq = EventSeq(ts, texts, values, np.zeros((len(ts), 0), np.float32))
    numeric = torch.from_numpy(event_numeric_features(seq, cutoff))[None]  # (1, 7, 7)
    vocab = {t: i for i, t in enumerate(sorted(set(texts)))}
    text_vec = torch.nn.functional.one_hot(torch.tensor([vocab[t] for t in texts]), 8).float()[None]
    pad = lambda x, v: torch.cat([x, torch.full_like(x[:, :1], v)], 1)  # noqa: E731  a padded slot must not count
    got = window_rfm(pad(text_vec, 0.0), pad(numeric, 0.0), torch.tensor([[True] * 7 + [False]]))[0].double()
    f = dict(zip(modality_feature_names("m", []), modality_features(seq, cutoff, 0)))
    slog = lambda x: float(np.sign(x) * np.log1p(abs(x)))  # noqa: E731
    expected = [np.log1p(f["m_count_7d"]), np.log1p(f["m_count_30d"]), np.log1p(f["m_count_90d"]),
                np.log1p(f["m_active_days"]), np.log1p(f["m_events_per_active_day"]), np.log1p(f["m_distinct_texts"]),
                slog(f["m_value_sum"]), slog(f["m_value_max"]), slog(f["m_value_std"]), slog(f["m_value_sum_30d"])]
    assert (f["m_count_30d"], f["m_active_days"], f["m_distinct_texts"]) == (5, 6, 4)  # the case covers each path
    assert got.tolist() == pytest.approx(expected, abs=1e-5)
    empty = window_rfm(text_vec, numeric, torch.zeros(1, 7, dtype=torch.bool))
    assert torch.isfinite(empty).all() and empty.abs().sum() == 0
    # amounts legal in the format but past float32's square (wei: 1e18-1e21) gave an infinite std, and a NaN loss
    huge = EventSeq(ts[:3], texts[:3], np.array([1e20, 3e20, 2e20], np.float32), np.zeros((3, 0), np.float32))
    wide = window_rfm(text_vec[:, :3], torch.from_numpy(event_numeric_features(huge, cutoff))[None],
                      torch.ones(1, 3, dtype=torch.bool))[0].double()
    f = dict(zip(modality_feature_names("m", []), modality_features(huge, cutoff, 0)))
    assert torch.isfinite(wide).all() and wide.dtype == torch.float64
    assert wide[-4:].tolist() == pytest.approx([slog(f["m_value_sum"]), slog(f["m_value_max"]), slog(f["m_value_std"]),
                                                slog(f["m_value_sum_30d"])], rel=1e-5)


@pytest.mark.parametrize("stats", ["rfm", "history", "history_timing"])
def test_summary_stats_widen_and_standardise_the_modality_token_input(tiny_dataset, tmp_path, stats):
    """user_encoder.summary_stats=rfm / history: the modality token reads window_summary's statistics and then
    window_rfm's (kept events) / the packed whole-history statistics, standardised on the training users by
    fit_input_stats; the profile carries both; only with summary_input=text."""
    from dataclasses import replace

    from qanchor.data.history import HISTORY_STATS, PACKED_HISTORY
    from qanchor.model.user_encoder import RFM_STATS, SUMMARY_STATS
    from qanchor.train.pretrain import fit_input_stats

    ds_dir = tmp_path / "ds"
    shutil.copytree(tiny_dataset, ds_dir, ignore=shutil.ignore_patterns(".qanchor_cache"))
    cfg = tiny_cfg([f"model.user_encoder.summary_stats={stats}", "loss.profile_weight=1"])
    model, _, stream, ds, pipe, _ = model_and_stream(ds_dir, cfg)
    enc, width = model.user_encoder, SUMMARY_STATS + {"rfm": RFM_STATS, "history": HISTORY_STATS,
                                                    "history_timing": PACKED_HISTORY}[stats]
    assert enc.modal_adapter.numeric_in.in_features == width and enc.summary_width == width
    n_tab = len(ds.tabular_columns)
    assert model.profile_decoder.linear.out_features == len(ds.manifest.sequence_modalities) * width + 2 * n_tab
    fit_input_stats(model, ds, pipe)
    users = pipe.collate(pipe.pack_many(list(ds.users())))
    rows = torch.cat([enc.summary_inputs(n, users)[1][users.modalities[n].mask.any(1)] for n in enc.sequence_names])
    assert torch.allclose(enc.modal_adapter.numeric_mean, rows.mean(0), atol=1e-5)
    assert not torch.equal(enc.modal_adapter.numeric_std, torch.ones(width))
    assert torch.isfinite(model(stream.batch(0, 4), cfg.loss).loss)
    if stats != "rfm":  # history reads the packed RFM statistics, history_timing those and the timing shares
        bill = users.modalities["bill"]
        assert torch.equal(enc.summary_inputs("bill", users)[1][:, SUMMARY_STATS:], bill.history[:, :width - SUMMARY_STATS])
        users.modalities["bill"] = replace(bill, history=None)
        with pytest.raises(ValueError, match="'bill'.*collate_users"):
            enc.summary_inputs("bill", users)
        users.modalities["bill"] = bill
    with pytest.raises(ConfigError, match="summary_input"):
        tiny_cfg([f"model.user_encoder.summary_stats={stats}", "model.user_encoder.summary_input=tokens"])
    # profile_stats=window: the extra statistics feed the modality token but are not reconstruction targets.
    cfg = tiny_cfg([f"model.user_encoder.summary_stats={stats}", "model.user_encoder.profile_stats=window",
                    "loss.profile_weight=1"])
    lean, *_ = model_and_stream(ds_dir, cfg)
    assert lean.user_encoder.modal_adapter.numeric_in.in_features == width
    assert lean.profile_decoder.linear.out_features == len(ds.manifest.sequence_modalities) * SUMMARY_STATS + 2 * n_tab
    fit_input_stats(lean, ds, pipe)
    full = lean.user_encoder.profile(users)
    assert torch.equal(full[:, :SUMMARY_STATS], lean.user_encoder.summary_inputs(enc.sequence_names[0], users)[1][:, :SUMMARY_STATS])


@pytest.mark.parametrize("text_tower,extra", [("backbone", []), ("text_encoder", []),
                                              ("text_encoder", ["model.user_encoder.summary_stats=history",
                                                                "model.statistics_path=gated"]),
                                              ("text_encoder", ["model.query_evidence=true"])])
def test_a_bfloat16_model_reads_a_float32_batch(tiny_dataset, tmp_path, text_tower, extra):
    """DeepSpeed's bf16 engine casts every weight to bfloat16 and leaves the batch as collated (float32 text
    vectors, numerics, statistics): each float input must meet its layer in that layer's dtype. Found on an H200
    (`pytest -m gpu`, the bf16 DeepSpeed step); checked here on the CPU, which runs bfloat16 too."""
    ds_dir = tmp_path / "ds"
    shutil.copytree(tiny_dataset, ds_dir, ignore=shutil.ignore_patterns(".qanchor_cache"))
    model, _, stream, _, pipe, _ = model_and_stream(ds_dir, tiny_cfg([f"model.answer_tower={text_tower}", "loss.profile_weight=1",
                                                                      *extra]))
    stream.answer_cache = pipe.cache  # the text tower reads the answers' vectors (ignored by the backbone tower)
    if model.query_evidence is not None:  # its reference and standardisation, as pretraining sets them
        fit_input_stats(model, stream.ds, pipe)
        fit_evidence_stats(model, stream, 4, 4)
    batch = stream.batch(0, 4)
    reference = model(batch, LossConfig(profile_weight=1.0))
    model = model.to(torch.bfloat16)
    out = model(batch, LossConfig(profile_weight=1.0))
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert abs(out.loss.item() - reference.loss.item()) < 0.05 * abs(reference.loss.item())  # bf16 rounding only
    assert all(p.grad is None or torch.isfinite(p.grad.float()).all() for p in model.parameters())


def test_a_bfloat16_backbone_beside_float32_adapters(tiny_dataset, tmp_path):
    """`model.backbone.dtype=bfloat16` builds the LLM in bfloat16 while the user encoder stays float32: the user tokens
    must enter the backbone in its dtype, cached and uncached alike, in serving and in a training step."""
    ds_dir = tmp_path / "ds"
    shutil.copytree(tiny_dataset, ds_dir, ignore=shutil.ignore_patterns(".qanchor_cache"))
    model, tokenizer, stream, ds, pipe, _ = model_and_stream(ds_dir, tiny_cfg(["model.backbone.dtype=bfloat16"]))
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    assert next(model.user_encoder.parameters()).dtype == torch.float32
    out = model(stream.batch(0, 4))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    model.eval()
    users = pipe.collate(pipe.pack_many([ds.user(u) for u in ("u001", "u002", "u003")]))
    query = torch.tensor(tokenizer("will this user churn?", add_special_tokens=False)["input_ids"])
    index = torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        suffixes = [model.suffix(query, None)] * 4
        cached = anchor_hidden(model, encode_prefixes(model, users), index, suffixes)
        full = anchor_hidden_uncached(model, users, index, suffixes)
    assert (cached.float() - full.float()).abs().max() < 5e-2


def test_future_loss_decodes_each_pairs_next_days(tiny_dataset, tmp_path):
    """loss.future_weight: a linear decoder from the embedding to the window statistics of the future_days after
    each pair's cutoff, standardised on training pairs, on the pairs whose window ends by the dataset's cutoff only
    (never past the data: uqa pairs at the cutoff have no target); saved with the checkpoint; 0 builds none."""
    import numpy as np

    from qanchor.data.history import WINDOW_STATS, window_stats
    from qanchor.train.pretrain import fit_future_stats

    ds_dir = tmp_path / "ds"
    shutil.copytree(tiny_dataset, ds_dir, ignore=shutil.ignore_patterns(".qanchor_cache"))
    cfg = tiny_cfg(["loss.future_weight=0.5", "loss.future_days=20"])
    model, tokenizer, stream, ds, pipe, _ = model_and_stream(ds_dir, cfg)
    names = [m.name for m in ds.manifest.sequence_modalities]
    assert model.future_decoder.linear.weight.shape == (len(names) * len(WINDOW_STATS), 128)
    end_us = int(ds.manifest.cutoff.timestamp()) * 1_000_000
    complete = stream.cutoff_us + 20 * 86_400_000_000 <= end_us
    assert np.array_equal(stream.future_complete, complete) and 0 < complete.sum() < len(complete)
    table = ds.userU().sort_by([("user_id", "ascending"), ("cutoff", "ascending"), ("source", "ascending"),
                                ("query", "ascending")])  # the stream's pair order
    sources = np.asarray(table.column("source").to_pylist())
    assert np.array_equal(table.column("cutoff").cast("int64").to_numpy(), stream.cutoff_us)
    assert not complete[sources == "uqa"].any()  # asked at the dataset's cutoff: nothing after it is known

    # the first 40 complete pairs of the run's order, whatever the budget (a run extended under a constant schedule
    # standardises as a straight run of the longer budget does)
    fit_future_stats(model, stream, global_batch=8, sample=40)
    ids = stream.pair_ids_for_steps(len(stream) // 8, 8)
    first = ids[complete[ids]][:40]
    assert len(first) == 40 and not set(first) <= set(stream.pair_ids_for_steps(3, 8))  # beyond a 3-step budget
    sample = stream.future_targets(first)[0]
    assert torch.allclose(model.future_decoder.mean, sample.double().mean(0).float(), atol=1e-5)
    std = sample.double().std(0, unbiased=False)
    assert torch.allclose(model.future_decoder.std, torch.where(std > 1e-6, std, 1.0).float(), atol=1e-5)
    step = next(s for s in range(50) if 0 < int(stream.batch(s, 8).future_rows.sum()) < 8)  # a mixed batch
    batch = stream.batch(step, 8)
    ids = stream.pair_ids(step, 8)
    row = int(torch.nonzero(batch.future_rows)[0])
    events = ds.users([stream.user_ids[ids[row]]])
    record = next(iter(events))
    by_hand = np.concatenate([window_stats(record.events.get(n), int(stream.cutoff_us[ids[row]]), 20) for n in names])
    assert np.array_equal(batch.future[row].numpy(), by_hand) and by_hand.any()
    assert not batch.future[~batch.future_rows].any()

    model.eval()
    out = model(batch, cfg.loss)
    with torch.no_grad():
        target = (batch.future - model.future_decoder.mean) / model.future_decoder.std
        err = (model.future_decoder.linear(out.anchor * 128**0.5) - target).pow(2).mean(-1)
    keep = batch.future_rows
    assert torch.allclose(out.loss_future, err[keep].mean(), atol=1e-6) and out.loss_future > 0
    assert torch.allclose(out.loss, out.loss_contrastive + out.loss_ntp + 0.5 * out.loss_future, atol=1e-6)
    model.zero_grad()
    out.loss_future.backward()  # it shapes the embedding, not only the decoder
    assert model.projection[-1].weight.grad.abs().sum() > 0

    meta = ModelMeta(ds.manifest.to_dict(), pipe.cache.dim, {}, list(ds.tabular_columns))
    save_checkpoint(tmp_path / "ck", model, tokenizer, cfg, meta)
    loaded, *_ = load_checkpoint(tmp_path / "ck")
    assert torch.equal(loaded.future_decoder.linear.weight, model.future_decoder.linear.weight)
    assert torch.equal(loaded.future_decoder.std, model.future_decoder.std)
    plain, _, plain_stream, *_ = model_and_stream(ds_dir)
    assert plain.future_decoder is None and plain_stream.future_complete is None
    assert plain_stream.batch(0, 4).future is None
    with pytest.raises(ValueError, match="future decoder"):
        plain(plain_stream.batch(0, 4), LossConfig(future_weight=1.0))
    with pytest.raises(ConfigError, match="future_weight"):
        tiny_cfg(["loss.future_weight=-1"])
    with pytest.raises(ConfigError, match="future_days"):
        tiny_cfg(["loss.future_weight=1", "loss.future_days=0"])


@pytest.mark.parametrize("width", [90, 300])  # fewer inputs than embedding columns, and more
def test_an_orthogonal_path_keeps_every_input_direction_at_one_scale(width):
    """``statistics_path_init=orthogonal``: equal singular values (no input direction squashed), at the default
    start's expected squared norm (the path's share of the embedding unchanged); the default spreads them."""
    torch.manual_seed(0)
    ortho = StatisticsPath(16, width, 128, orthogonal=True).linear.weight.detach()
    uniform = StatisticsPath(16, width, 128).linear.weight.detach()
    sv, sv_uniform = torch.linalg.svdvals(ortho), torch.linalg.svdvals(uniform)
    assert torch.allclose(sv, sv[0].expand_as(sv), rtol=1e-4)
    assert sv_uniform.max() / sv_uniform.min() > 3
    assert (ortho ** 2).sum().item() == pytest.approx(128 / 3, rel=1e-4)
    assert (uniform ** 2).sum().item() == pytest.approx(128 / 3, rel=0.05)
    with pytest.raises(ValueError, match="fixed map"):
        StatisticsPath(16, width, 128, principal=True, orthogonal=True)


def test_orthogonal_start_needs_a_learned_path():
    with pytest.raises(ConfigError, match='statistics_path="principal" has none to start'):
        tiny_cfg(["model.statistics_path=principal", "model.statistics_path_init=orthogonal"])
    cfg = tiny_cfg(["model.statistics_path=add", "model.statistics_path_init=orthogonal"])
    assert cfg.model.statistics_path_init == "orthogonal"


@pytest.mark.parametrize("kind", ["backbone", "sentence encoder"])
def test_weights_are_never_unpickled(kind, tmp_path, monkeypatch):
    """A directory whose weights are only a pickle (pytorch_model.bin) is refused with an error that asks for
    safetensors, and torch.load is never called on it: unpickling a file can run its code."""
    from transformers import AutoModel, BertConfig, Qwen2Config

    from qanchor.config import BackboneConfig, TextEncoderConfig
    from qanchor.data.text_cache import SentenceEncoder
    from qanchor.errors import CheckpointError
    from qanchor.model.backbone import build_backbone

    if kind == "backbone":
        hf = Qwen2Config(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         intermediate_size=48)
        model = __import__("transformers").AutoModelForCausalLM.from_config(hf)
    else:
        hf = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48)
        model = AutoModel.from_config(hf)
    hf.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    if kind == "sentence encoder":  # a tokenizer that loads, so that the weights are what is refused
        from qanchor.data.text_cache import default_encoder_path

        for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy(default_encoder_path() / name, tmp_path / name)
    loads = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a) or (_ for _ in ()).throw(AssertionError("unpickled")))
    if kind == "backbone":
        with pytest.raises(CheckpointError, match="safetensors"):
            build_backbone(BackboneConfig(name_or_path=str(tmp_path), hidden_size=32, num_layers=1, num_heads=2,
                                          num_kv_heads=1), 128)
    else:
        with pytest.raises(ConfigError, match="safetensors"):
            SentenceEncoder(TextEncoderConfig(path=str(tmp_path)), device="cpu")
    assert loads == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="flash attention may run where there is a GPU")
def test_a_flash_attention_checkpoint_loads_on_a_cpu_with_sdpa(infer_env, tmp_path):
    """A checkpoint trained with flash_attention_2 on a GPU is served on a CPU with sdpa, the same function (it was a
    traceback: flash-attn not installed); training with it where it cannot run is a ConfigError naming the key."""
    import numpy as np

    from qanchor.config import BackboneConfig
    from qanchor.infer.api import QAnchor
    from qanchor.model.backbone import build_backbone

    ckpt = tmp_path / "ckpt"
    shutil.copytree(infer_env.ckpt, ckpt)
    text = (ckpt / "config.yaml").read_text()
    assert "attn_implementation: eager" in text
    (ckpt / "config.yaml").write_text(text.replace("attn_implementation: eager", "attn_implementation: flash_attention_2"))
    with pytest.warns(UserWarning, match="flash_attention_2, which cannot run here.*sdpa"):
        qa = QAnchor.from_pretrained(ckpt, text_cache=infer_env.cache)
    users = list(infer_env.ds.users())[:4]
    query = ["Will this user stop paying?"]
    np.testing.assert_allclose(qa.embed(users, query), infer_env.qa.embed(users, query), atol=1e-5)
    with pytest.raises(ConfigError, match="attn_implementation=flash_attention_2 needs a CUDA GPU"):
        build_backbone(BackboneConfig(attn_implementation="flash_attention_2", hidden_size=32, num_layers=1,
                                      num_heads=2, num_kv_heads=1), 128)


def test_minilm_rows_start_only_a_minilm_vocabulary():
    """The MiniLM start copies rows by token id: under another tokenizer each token would start from an unrelated
    word's row, so that combination is refused by name."""
    from qanchor.config import BackboneConfig
    from qanchor.model.backbone import build_backbone

    with pytest.raises(ConfigError, match="init_embeddings_from_minilm .* fits only tokenizer=minilm, not 'qwen2.5'"):
        build_backbone(BackboneConfig(tokenizer="qwen2.5", init_embeddings_from_minilm=True, hidden_size=32,
                                      num_layers=1, num_heads=2, num_kv_heads=1, attn_implementation="eager"), 128)
    built = build_backbone(BackboneConfig(tokenizer="qwen2.5", init_embeddings_from_minilm=False, hidden_size=32,
                                          num_layers=1, num_heads=2, num_kv_heads=1, attn_implementation="eager"), 128)
    assert built.get_input_embeddings().weight.shape == (128, 32)


def test_a_pretrained_backbone_must_match_the_shape_its_config_records(tmp_path):
    """With name_or_path set the loaded model's shape rules; a config that says otherwise (a preset copied for another
    model) is refused by key, since every checkpoint records it as the backbone's shape."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from qanchor.config import BackboneConfig
    from qanchor.model.backbone import build_backbone

    hf = Qwen2Config(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                     intermediate_size=48)
    AutoModelForCausalLM.from_config(hf).save_pretrained(tmp_path)  # safetensors
    shape = dict(name_or_path=str(tmp_path), hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                 intermediate_size=48, attn_implementation="eager", init_embeddings_from_minilm=False)
    assert build_backbone(BackboneConfig(**shape), 128).config.num_hidden_layers == 2
    with pytest.raises(ConfigError, match=r"model.backbone.num_layers=24 but .* has 2; model.backbone.architecture=llama "
                                          r"but .* has qwen2"):
        build_backbone(BackboneConfig(**{**shape, "num_layers": 24, "architecture": "llama"}), 128)


def test_a_loaded_backbone_trains_in_training_mode_with_checkpointing_on(tmp_path):
    """from_pretrained returns eval mode, where a layer neither checkpoints nor drops out: the pretrained presets
    (gradient_checkpointing: true) kept every activation, 14x the memory, without a word."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from qanchor.config import BackboneConfig
    from qanchor.model.backbone import build_backbone

    hf = Qwen2Config(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                     intermediate_size=48)
    AutoModelForCausalLM.from_config(hf).save_pretrained(tmp_path)
    built = build_backbone(BackboneConfig(name_or_path=str(tmp_path), hidden_size=32, num_layers=2, num_heads=2,
                                          num_kv_heads=1, intermediate_size=48, attn_implementation="eager",
                                          init_embeddings_from_minilm=False, gradient_checkpointing=True), 128)
    assert all(m.training for m in built.modules())

    def saved_bytes() -> int:  # what autograd keeps for backward
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            out = built(input_ids=torch.randint(0, 128, (2, 64)), use_cache=False)
        out.logits.sum().backward()
        return sum(kept)

    as_built = saved_bytes()
    built.eval()
    assert as_built * 3 < saved_bytes()  # checkpointed layers keep a fraction of what eval mode keeps


def test_new_tokens_start_at_the_mean_row_also_on_spare_rows_of_the_table():
    """Qwen2.5's embedding table has spare rows past its tokenizer: qanchor's tokens land there without a resize and
    kept whatever the rows held (zeros), instead of the mean of the trained rows."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from qanchor.config import BackboneConfig
    from qanchor.model.backbone import add_special_tokens, load_tokenizer

    tokenizer = load_tokenizer(BackboneConfig())
    n = len(tokenizer)
    model = AutoModelForCausalLM.from_config(Qwen2Config(vocab_size=n + 16, hidden_size=32, num_hidden_layers=1,
                                                         num_attention_heads=2, num_key_value_heads=1, intermediate_size=48))
    with torch.no_grad():
        w = model.get_input_embeddings().weight
        w[:n] = torch.randn(n, 32) + 3.0  # trained rows, mean about 3
        w[n:] = 0.0  # spare rows
    ids = add_special_tokens(tokenizer, model, ["<|a|>", "<|b|>"])
    w = model.get_input_embeddings().weight
    assert w.shape[0] == n + 16  # no resize was needed
    for i in ids.values():
        torch.testing.assert_close(w[i], w[:n].mean(0))
    # a tokenizer that holds the tokens already (saved by a run) beside a fresh backbone: the table still grows
    small = AutoModelForCausalLM.from_config(Qwen2Config(vocab_size=n, hidden_size=32, num_hidden_layers=1,
                                                         num_attention_heads=2, num_key_value_heads=1, intermediate_size=48))
    assert add_special_tokens(tokenizer, small, ["<|a|>", "<|b|>"]) == ids
    w = small.get_input_embeddings().weight
    assert w.shape[0] == len(tokenizer) == n + 2
    torch.testing.assert_close(w[n:], w[:n].mean(0, keepdim=True).expand(2, -1))


def test_adding_the_special_tokens_reads_the_vocabulary_once():
    """Each name was looked up in a vocabulary dict rebuilt for it (0.1 s apiece for Qwen2.5's 151,665 tokens); every
    model built or loaded adds one token per modality and five of its own."""
    from qanchor.config import BackboneConfig
    from qanchor.model.backbone import add_special_tokens, load_tokenizer

    tokenizer = load_tokenizer(BackboneConfig())
    reads = []
    real = tokenizer.get_vocab
    tokenizer.get_vocab = lambda: reads.append(1) or real()
    names = [f"<|m{i}|>" for i in range(8)]
    ids = add_special_tokens(tokenizer, None, names)
    assert len(reads) == 1 and sorted(ids) == sorted(names) and len(set(ids.values())) == 8
    assert add_special_tokens(tokenizer, None, names) == ids and len(reads) == 2  # present already: the same ids


def test_distinct_texts_do_not_depend_on_how_wide_the_batch_pads():
    """window_rfm counts a user's distinct texts; padded to more than 25 events (another user in the batch had more),
    cdist's matrix-product path put identical vectors apart and counted repeats as distinct."""
    import torch

    from qanchor.model.user_encoder import window_rfm

    torch.manual_seed(0)
    texts = torch.nn.functional.normalize(torch.randn(4, 384), dim=-1)
    vectors = texts[torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0, 1])]  # 10 events, 4 distinct texts
    numeric = torch.zeros(10, 3)
    rows = []
    for width in (10, 25, 26, 64):
        pad = width - 10
        rows.append(window_rfm(torch.cat([vectors, torch.zeros(pad, 384)])[None],
                               torch.cat([numeric, torch.zeros(pad, 3)])[None],
                               torch.cat([torch.ones(10, dtype=torch.bool), torch.zeros(pad, dtype=torch.bool)])[None]))
    for row in rows[1:]:
        torch.testing.assert_close(row, rows[0])
    assert torch.expm1(rows[0][0, 5]).round() == 4  # log1p(distinct texts)


def test_a_gpu_node_loading_a_checkpoint_onto_its_cpu_gets_sdpa(monkeypatch):
    """flash-attn installed and CUDA present, but the model is loaded with device=cpu (every inference command's
    default): flash attention was chosen and its kernels fail on CPU tensors at the first forward."""
    from qanchor.config import BackboneConfig
    from qanchor.model import backbone

    monkeypatch.setattr(backbone, "_has_flash_attention", lambda: True)
    named = BackboneConfig(attn_implementation="flash_attention_2", dtype="bfloat16")
    auto = BackboneConfig(attn_implementation="auto", dtype="bfloat16")
    assert backbone.resolve_attn_implementation(named, loading=True, device="cuda:0") == "flash_attention_2"
    assert backbone.resolve_attn_implementation(auto, loading=True, device="cuda") == "flash_attention_2"
    assert backbone.resolve_attn_implementation(auto, loading=True, device="cpu") == "sdpa"
    with pytest.warns(UserWarning, match="cannot run here.*sdpa"):
        assert backbone.resolve_attn_implementation(named, loading=True, device=torch.device("cpu")) == "sdpa"
    assert backbone.resolve_attn_implementation(auto) == "flash_attention_2"  # training: the device is CUDA's


def test_lora_target_modules_the_backbone_lacks_are_one_clear_error():
    """A mistyped target name ended in peft's NoMatchingPeftModuleError traceback."""
    from dataclasses import replace

    from qanchor.errors import ConfigError

    cfg = load_config(Path("configs/model/tiny.yaml"))
    lora = replace(cfg.backbone.lora, enabled=True, target_modules=["foo"])
    cfg = replace(cfg, backbone=replace(cfg.backbone, lora=lora))
    manifest = Manifest.from_dict({"name": "x", "cutoff": "2024-01-01", "modalities": [{"name": "app"}]})
    with pytest.raises(ConfigError, match=r"target_modules=\['foo'\]: no layer of the backbone has such a name; its linear "
                                          r"layers are named .*q_proj"):
        build_model(cfg, manifest, 384, [], load_weights=False)
