"""A user's own backbone weights: the tokenizer must be theirs, and a wrong folder is refused before any long setup."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qanchor.config import BackboneConfig, PretrainConfig, load_config
from qanchor.errors import CheckpointError, ConfigError, DataValidationError
from qanchor.model.backbone import build_backbone, check_backbone_weights, load_tokenizer
from tests.helpers import copy_dataset

SHAPE = dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=48, attn_implementation="eager",
             init_embeddings_from_minilm=False)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A Qwen2-shaped model with a 128-token vocabulary, saved as safetensors without tokenizer files."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    out = tmp_path_factory.mktemp("weights") / "small-qwen2"
    hf = Qwen2Config(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                     intermediate_size=48)
    AutoModelForCausalLM.from_config(hf).save_pretrained(out)
    return out


def test_a_tokenizer_larger_than_the_weights_vocabulary_is_refused(weights, tmp_path):
    """The folder has no tokenizer files, so the Qwen2.5 one (151k tokens) stood in for it, and 128 rows were grown to
    151,676 copies of one mean row: every token read the same vector, and training went on without a word."""
    cfg = BackboneConfig(name_or_path=str(weights), tokenizer="Qwen/Qwen2.5-0.5B-Instruct", **SHAPE)
    tokenizer = load_tokenizer(cfg)  # the offline Qwen2.5 tokenizer: the folder has none of its own
    assert len(tokenizer) > 128
    with pytest.raises(ConfigError, match=rf"has {len(tokenizer)} tokens, but the weights '{weights}' have 128 embedding rows"):
        check_backbone_weights(cfg, len(tokenizer))
    with pytest.raises(ConfigError, match="it is not their tokenizer"):
        build_backbone(cfg, len(tokenizer))
    check_backbone_weights(cfg, 120)  # a tokenizer that fits is fine
    assert build_backbone(cfg, 120).get_input_embeddings().weight.shape == (128, 32)


def test_the_default_minilm_tokenizer_never_reads_loaded_weights(weights):
    with pytest.raises(ConfigError, match=r"tokenizer=minilm \(the default\) with pretrained weights.*set "
                                          "model.backbone.tokenizer"):
        load_tokenizer(BackboneConfig(name_or_path=str(weights), **SHAPE))
    assert len(load_tokenizer(BackboneConfig(**SHAPE))) > 30_000  # built from scratch: MiniLM's vocabulary is the one


def test_a_tokenizer_path_that_does_not_exist_is_refused_not_replaced(weights, tmp_path):
    """A typo in a tokenizer path quietly became the weights folder's tokenizer (or Qwen2.5's); only the preset's
    hub id stands in for the local weights' own."""
    typo = tmp_path / "my_tokenizer_TYPO"
    for name in (str(typo), "./my_tokenizer_TYPO", "models/qwen/tokenizer"):
        with pytest.raises(ConfigError, match=f"model.backbone.tokenizer: no such directory '{name}'"):
            load_tokenizer(BackboneConfig(name_or_path=str(weights), tokenizer=name, **SHAPE))
    assert len(load_tokenizer(BackboneConfig(name_or_path=str(weights), tokenizer="Qwen/Qwen2.5-0.5B-Instruct",
                                             **SHAPE))) > 150_000


def test_a_tokenizer_without_an_end_token_is_refused_by_name(tmp_path):
    """qanchor closes every answer with the eos (or sep) token: a tokenizer with neither was a TypeError deep in the
    token layout, after the dataset and every event text had been read."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({"<unk>": 0, "user": 1, "buys": 2}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>").save_pretrained(tmp_path / "tok")
    with pytest.raises(ConfigError, match=r"'.*tok' has no end-of-text token \(eos_token or sep_token\).*tokenizer_config"):
        load_tokenizer(BackboneConfig(tokenizer=str(tmp_path / "tok"), **SHAPE))
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="buys").save_pretrained(tmp_path / "eos")
    tok = load_tokenizer(BackboneConfig(tokenizer=str(tmp_path / "eos"), **SHAPE))
    assert tok.pad_token == tok.eos_token == "buys"  # no pad token: the end token pads


def test_a_wrong_weights_folder_is_named_before_any_setup(weights, tmp_path):
    """Missing, pickle-only or another shape: each used to surface in build_model, after every event text had been
    encoded (hours at scale); ``check_backbone_weights`` reads config.json alone, and the pickle is never opened."""
    with pytest.raises(ConfigError, match="name_or_path: no such directory"):
        check_backbone_weights(BackboneConfig(name_or_path=str(tmp_path / "gone"), **SHAPE), 100)
    check_backbone_weights(BackboneConfig(name_or_path="someone/some-model", **SHAPE), 100)  # a hub id: loading decides
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(weights / "config.json", pickled / "config.json")
    (pickled / "pytorch_model.bin").write_bytes(b"not to be unpickled")
    with pytest.raises(CheckpointError, match="has no safetensors weights"):
        check_backbone_weights(BackboneConfig(name_or_path=str(pickled), **SHAPE), 100)
    with pytest.raises(CheckpointError, match="has no config.json"):
        check_backbone_weights(BackboneConfig(name_or_path=str(tmp_path), **SHAPE), 100)
    with pytest.raises(ConfigError, match=r"model.backbone.num_layers=24 but .* has 2 .*set them to the loaded model's"):
        check_backbone_weights(BackboneConfig(name_or_path=str(weights), **{**SHAPE, "num_layers": 24}), 100)
    assert json.loads((weights / "config.json").read_text())["vocab_size"] == 128


def test_pretraining_refuses_a_bad_backbone_before_encoding_event_texts(tiny_dataset, weights, tmp_path):
    """preflight (seconds, nothing written) names the folder and the pairs' question length; the limit is what to
    change, since the pairs' questions are not the user's to shorten."""
    from qanchor.train.pretrain import preflight

    ds = copy_dataset(tiny_dataset, tmp_path / "ds", with_userU=True)
    base = [f"data.path={ds}", f"output_dir={tmp_path / 'run'}", "train.batch_size=2"]
    cfg = load_config(None, [*base, f"model.backbone.name_or_path={tmp_path / 'gone'}", "model.backbone.tokenizer=qwen2.5",
                             "model.backbone.init_embeddings_from_minilm=false"], schema=PretrainConfig)
    with pytest.raises(ConfigError, match="name_or_path: no such directory"):
        preflight(cfg)
    # before the data, whose validation takes minutes per rank at paper scale: a damaged dataset is named second
    part = next((ds / "events").glob("*.parquet"))
    intact = part.read_bytes()
    part.write_bytes(intact[:100])
    with pytest.raises(ConfigError, match="name_or_path: no such directory"):
        preflight(cfg)
    part.write_bytes(intact)
    # but a mistyped data.path is said at once, not after the tokenizer's load (a hub id waits out a network timeout)
    typo = load_config(None, [*base[1:], f"data.path={tmp_path / 'dss'}", f"model.backbone.tokenizer={tmp_path / 'tok'}"],
                       schema=PretrainConfig)
    with pytest.raises(DataValidationError, match="dss: dataset directory not found"):
        preflight(typo)
    # random weights started from MiniLM's rows need MiniLM's vocabulary: said here, not after the text cache was
    # filled (minutes at scale) and the setup line printed
    minilm_start = load_config(None, [*base, "model.backbone.tokenizer=qwen2.5",
                                      "model.backbone.init_embeddings_from_minilm=true"], schema=PretrainConfig)
    part.write_bytes(intact[:100])  # (a damaged dataset, again: the refusal comes before the data are read)
    with pytest.raises(ConfigError, match="init_embeddings_from_minilm .* fits only tokenizer=minilm, not 'qwen2.5'"):
        preflight(minilm_start)
    part.write_bytes(intact)
    cfg = load_config(None, [*base, "model.max_query_tokens=4"], schema=PretrainConfig)
    with pytest.raises(ConfigError, match=r"a pretraining pair's question has \d+ tokens under this tokenizer, more than "
                                          r"model.max_query_tokens=4: .*raise model.max_query_tokens to at least \d+"):
        preflight(cfg)
    assert not (tmp_path / "run").exists()


def test_a_home_relative_weights_path_is_read_where_it_points(weights, tmp_path, monkeypatch):
    """`~/models/x` passed the preflight (which expanded it) and then failed to load after every event text was
    encoded (loading did not): both now read the same folder."""
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    shutil.copytree(weights, home / "models" / "small")
    monkeypatch.setenv("HOME", str(home))
    cfg = BackboneConfig(name_or_path="~/models/small", tokenizer="Qwen/Qwen2.5-0.5B-Instruct", **SHAPE)
    check_backbone_weights(cfg, 100)
    assert build_backbone(cfg, 100).get_input_embeddings().weight.shape == (128, 32)
    with pytest.raises(ConfigError, match="model.backbone.tokenizer: no such directory '~nosuchuser_qanchor/tok'"):
        load_tokenizer(BackboneConfig(tokenizer="~nosuchuser_qanchor/tok", **SHAPE))  # a typo: no such home, no traceback
    with pytest.raises(ConfigError, match="model.backbone.name_or_path: no such directory '~nosuchuser_qanchor/w'"):
        check_backbone_weights(BackboneConfig(name_or_path="~nosuchuser_qanchor/w", tokenizer="qwen2.5", **SHAPE), 100)


def test_the_minilm_start_is_computed_once_per_process_and_each_caller_gets_its_own_copy():
    """The token table's MiniLM start (a PCA of MiniLM's 30,522 word vectors: a second's SVD) was recomputed for every
    model built: a bench or a test session builds dozens. It is now kept per width; what a caller gets is its own."""
    import torch

    from qanchor.model import backbone

    backbone._minilm_projection.cache_clear()
    first = backbone._minilm_embedding_init(16, 40_000)
    second = backbone._minilm_embedding_init(16, 40_000)
    assert backbone._minilm_projection.cache_info().misses == 1 and torch.equal(first, second)
    first.zero_()  # a caller writing into its table (the model's embedding copy_) changes no other's
    assert torch.equal(backbone._minilm_embedding_init(16, 40_000), second) and second.abs().sum() > 0
    projection = backbone._minilm_projection(16)
    assert projection.dtype == torch.float64 and torch.equal(second[: projection.shape[0]], projection.float())
    assert float(projection.std()) == pytest.approx(0.02) and second[projection.shape[0]:].std() == pytest.approx(0.02, rel=0.05)
