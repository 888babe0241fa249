from __future__ import annotations

from pathlib import Path

import pytest

from qanchor.config import SCHEMAS, ModelConfig, PretrainConfig, configs_root, load_config
from qanchor.errors import ConfigError

ALL_YAML = sorted(p for p in configs_root().rglob("*.yaml"))


def test_configs_exist():
    assert {p.parent.name for p in ALL_YAML} >= {"model", "data"}


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_yaml_loads(path: Path):
    cfg = load_config(path)
    assert isinstance(cfg, SCHEMAS[path.parent.name])


def test_unknown_key_names_dotted_path(tmp_path):
    bad = tmp_path / "pretrain" / "x.yaml"
    bad.parent.mkdir()
    bad.write_text("train:\n  max_stepz: 3\n")
    with pytest.raises(ConfigError, match=r"train\.max_stepz"):
        load_config(bad)


def test_mistyped_value_and_override():
    path = configs_root() / "model" / "tiny.yaml"
    with pytest.raises(ConfigError, match=r"backbone\.num_layers"):
        load_config(path, ["backbone.num_layers=two"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(path, ["backbone.num_layers"])
    cfg = load_config(path, ["backbone.num_layers=3"])
    assert isinstance(cfg, ModelConfig) and cfg.backbone.num_layers == 3


def test_preset_merged_under_model_and_overridable(tmp_path):
    f = tmp_path / "pretrain" / "p.yaml"
    f.parent.mkdir()
    f.write_text("model:\n  preset: tiny\ntrain:\n  max_steps: 7\n")
    cfg = load_config(f, ["model.backbone.hidden_size=96"])
    assert isinstance(cfg, PretrainConfig) and cfg.model.preset == "tiny"
    assert cfg.model.backbone.hidden_size == 96 and cfg.model.backbone.num_layers == 2 and cfg.train.max_steps == 7
    cfg = load_config(f, ["model.preset=qwen2.5-0.5b"])
    assert cfg.model.backbone.hidden_size == 896 and cfg.model.backbone.lora.enabled
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config(f, ["model.preset=gpt5"])


def test_post_init_validation(tmp_path):
    f = tmp_path / "pretrain" / "p.yaml"
    f.parent.mkdir()
    f.write_text("train:\n  batch_size: 1\n")
    with pytest.raises(ConfigError, match="batch_size"):
        load_config(f)


def test_text_lists_keep_words_yaml_would_turn_into_booleans_or_numbers():
    from qanchor.config import AskConfig

    cfg = load_config(None, ["options=[yes, no, 1.50, null]", "question=Which?"], schema=AskConfig)
    assert cfg.options == ["yes", "no", "1.50", "null"]
    assert load_config(None, ["options=yes"], schema=AskConfig).options == ["yes"]
    assert load_config(None, ["train.max_steps=7"], schema=PretrainConfig).train.max_steps == 7
