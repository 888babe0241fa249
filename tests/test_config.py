from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from qanchor.cli import main
from qanchor.config import SCHEMAS, ModelConfig, PretrainConfig, configs_root, load_config, require_file
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


def test_a_mistyped_value_names_where_it_was_written(tmp_path):
    """A bad value given on the command line is not blamed on the config file, and the reverse."""
    path = configs_root() / "model" / "tiny.yaml"
    with pytest.raises(ConfigError, match=r"^<command line>: key 'backbone\.num_layers'"):
        load_config(path, ["backbone.num_layers=two"])
    bad = tmp_path / "model" / "bad.yaml"
    bad.parent.mkdir()
    bad.write_text("backbone:\n  num_layers: two\n")
    with pytest.raises(ConfigError, match=rf"^{bad}: key 'backbone\.num_layers'"):
        load_config(bad, ["backbone.num_layers=3"])  # the file is broken, whatever overrides it


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


@pytest.mark.parametrize("setting, match", [("save_every: 0", "train.save_every must be >= 1"),
                                            ("log_every: 0", "train.log_every must be >= 1"),
                                            ("grad_accum_steps: 0", "train.grad_accum_steps must be >= 1"),
                                            ("uqa_fraction: 1.5", "train.uqa_fraction is a share"),
                                            ("uqa_fraction: -0.5", "train.uqa_fraction is a share"),
                                            ("lr: -0.001", "lr must be >= 0"), ("warmup_steps: -1", "warmup_steps >= 0")])
def test_nonsense_train_settings_stop_before_any_work(tmp_path, setting, match):
    """They used to end in a ZeroDivisionError or DeepSpeed's assertion after the model was built, or (uqa_fraction)
    train silently as if 1 or 0."""
    f = tmp_path / "pretrain" / "p.yaml"
    f.parent.mkdir()
    f.write_text(f"train:\n  {setting}\n")
    with pytest.raises(ConfigError, match=match):
        load_config(f)


def test_text_lists_keep_words_yaml_would_turn_into_booleans_or_numbers():
    from qanchor.config import AskConfig

    cfg = load_config(None, ["options=[yes, no, 1.50, null]", "question=Which?"], schema=AskConfig)
    assert cfg.options == ["yes", "no", "1.50", "null"]
    assert load_config(None, ["options=yes"], schema=AskConfig).options == ["yes"]
    assert load_config(None, ["train.max_steps=7"], schema=PretrainConfig).train.max_steps == 7
    # an item holding ': ' is a YAML mapping unless quoted: refused with how to quote, never passed on as a dict
    with pytest.raises(ConfigError, match=r"item \{'Film 0': 'drama'\} is not text; quote an item"):
        load_config(None, ["options=[Film 0: drama, Film 6: drama]"], schema=AskConfig)
    quoted = load_config(None, ['options=["Film 0: drama", "Film 6, drama"]'], schema=AskConfig).options
    assert quoted == ["Film 0: drama", "Film 6, drama"]


def test_text_settings_in_a_config_file_are_read_as_written(tmp_path):
    """A config file's unquoted `options: [yes, no]` are words and `user: 0012` is the text 0012, as on the command
    line; before, YAML 1.1 made them the booleans True / False and the octal number 10. Numbers, booleans, nulls and
    mappings of typed settings are unchanged."""
    from qanchor.config import AskConfig, DescribeConfig

    (tmp_path / "ask.yaml").write_text("options: [yes, no, 1.50, off]\nuser: 0012\njson: yes\nmax_new_tokens: 0x10\n"
                                       "question: on\ncutoff: null\ndata: {max_events: {app: 010}}\n")
    cfg = load_config(tmp_path / "ask.yaml", schema=AskConfig)
    assert cfg.options == ["yes", "no", "1.50", "off"] and cfg.user == "0012" and cfg.question == "on"
    assert cfg.json is True and cfg.max_new_tokens == 16 and cfg.cutoff is None and cfg.data.max_events == {"app": 8}
    (tmp_path / "d.yaml").write_text("user: 0012\naspects: [activity]\n")
    assert load_config(tmp_path / "d.yaml", schema=DescribeConfig).user == "0012"


# ------------------------------------------------------------------ settings that name another config file
def test_a_config_file_a_shipped_config_names_is_found_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a user's project, not the repository: `configs/...` does not exist here
    bench = load_config(configs_root() / "bench" / "tiny-cj.yaml")
    assert bench.prompt_tune_config == str(configs_root() / "prompt_tune" / "tiny-cj.yaml")
    paper = load_config(configs_root() / "pretrain" / "qwen2.5-0.5b.yaml")
    assert paper.train.deepspeed_config == str(configs_root() / "deepspeed" / "zero2.json")
    monkeypatch.chdir(configs_root().parent)  # from the repository root the path stays as written
    assert load_config(configs_root() / "bench" / "tiny-cj.yaml").prompt_tune_config == "configs/prompt_tune/tiny-cj.yaml"


def test_a_relative_config_file_is_read_from_the_working_directory_first_then_beside_the_config(tmp_path, monkeypatch):
    mine = tmp_path / "project" / "bench"
    mine.mkdir(parents=True)
    (mine / "heads.yaml").write_text("steps: 7\n")
    (mine / "run.yaml").write_text("prompt_tune_config: heads.yaml\n")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert load_config(mine / "run.yaml").prompt_tune_config == str(mine / "heads.yaml")
    (work / "heads.yaml").write_text("steps: 9\n")  # the working directory's file wins, as for every path
    assert load_config(mine / "run.yaml").prompt_tune_config == "heads.yaml"
    (work / "heads.yaml").unlink()
    # a value given on the command line is the user's own typing: relative to the working directory only
    given = load_config(mine / "run.yaml", ["prompt_tune_config=heads.yaml"]).prompt_tune_config
    assert given == "heads.yaml"
    with pytest.raises(ConfigError, match=r"prompt_tune_config: heads\.yaml not found .*prompt_tune_config=null"):
        require_file(given, "prompt_tune_config")
    (work / "heads.yaml").mkdir()
    with pytest.raises(ConfigError, match="is not a file"):
        require_file("heads.yaml", "prompt_tune_config")
    require_file(None, "prompt_tune_config")  # unset: nothing to check


def test_a_missing_config_file_stops_bench_and_pretrain_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    runs = [(["bench", "--config", str(configs_root() / "bench" / "tiny-cj.yaml"), "data.path=nowhere",
              "prompt_tune_config=heads.yaml", f"output_dir={tmp_path / 'r'}"], "prompt_tune_config: heads.yaml not found"),
            (["pretrain", "--config", str(configs_root() / "pretrain" / "tiny-cj.yaml"), "data.path=nowhere",
              "train.deepspeed_config=zero9.json", f"output_dir={tmp_path / 'p'}"], "train.deepspeed_config: zero9.json not found")]
    for argv, message in runs:
        capsys.readouterr()
        assert main(argv) == 2
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        # the first check that fails: before the (missing) dataset is opened, nothing written
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_a_section_given_one_value_is_an_error_line(tmp_path):
    """`model=tiny` (or `model: tiny` in a file) crashed with an AttributeError; it is a section, and the error says
    which key was meant."""
    with pytest.raises(ConfigError, match=r"'model' is a section of settings, not a value; set its keys, e\.g\. "
                                          r"model\.preset=tiny"):
        load_config(None, ["model=tiny"], schema=PretrainConfig)
    (tmp_path / "p.yaml").write_text("model: tiny\n")
    with pytest.raises(ConfigError, match=r"model\.preset=tiny"):
        load_config(tmp_path / "p.yaml", schema=PretrainConfig)
    with pytest.raises(ConfigError, match=r"'train' is a section of settings.*train\.\w+=\.\.\."):
        load_config(None, ["train=fast"], schema=PretrainConfig)


def test_a_deepspeed_config_file_merges_key_by_key_and_cannot_change_the_step_count(tmp_path):
    """"auto" at any depth keeps the train section's value; a file's batch shape that differs from the train section's
    would make DeepSpeed step every k micro-batches while qanchor's loop counts steps: refused by name."""
    import json

    from qanchor.config import TrainConfig
    from qanchor.errors import ConfigError
    from qanchor.train.engine import deepspeed_config

    def with_file(overrides, **train) -> dict:
        path = tmp_path / "ds.json"
        path.write_text(overrides if isinstance(overrides, str) else json.dumps(overrides))
        return deepspeed_config(TrainConfig(deepspeed_config=str(path), **train), world=2)

    merged = with_file({"optimizer": {"params": {"lr": "auto", "weight_decay": 0.1}}, "train_batch_size": "auto",
                        "zero_optimization": {"stage": "auto", "overlap_comm": True}}, weight_decay=0.1)
    params = merged["optimizer"]["params"]
    assert params["lr"] == TrainConfig().lr and params["weight_decay"] == 0.1 and params["torch_adam"] is True
    assert merged["train_batch_size"] == TrainConfig().batch_size * 2
    assert merged["zero_optimization"] == {"stage": 0, "overlap_comm": True}
    # a stage written as a string is the number DeepSpeed reads: it said "asks for ZeRO stage 2 and train.zero_stage is
    # 2; set train.zero_stage=2"
    assert with_file({"zero_optimization": {"stage": "2"}}, zero_stage=2)["zero_optimization"]["stage"] in (2, "2")
    with pytest.raises(ConfigError, match=r"asks for ZeRO stage 3 and train.zero_stage is 2"):
        with_file({"zero_optimization": {"stage": "3"}}, zero_stage=2)
    assert with_file({"gradient_accumulation_steps": 2}, grad_accum_steps=2)["gradient_accumulation_steps"] == 2
    with pytest.raises(ConfigError, match=r"gradient_accumulation_steps=2, and the train section gives 1 "
                                          r"\(train.grad_accum_steps\)"):
        with_file({"gradient_accumulation_steps": 2, "train_batch_size": 8})
    # another optimizer takes the file's params as given (AdamW's torch_adam and betas are not its keywords)
    lamb = with_file({"optimizer": {"type": "Lamb", "params": {"lr": "auto", "weight_decay": 0.01, "max_coeff": 0.3}}},
                     weight_decay=0.01)["optimizer"]
    assert lamb == {"type": "Lamb", "params": {"lr": TrainConfig().lr, "weight_decay": 0.01, "max_coeff": 0.3}}
    bare = with_file({"optimizer": {"type": "Lamb"}})["optimizer"]  # no params: the train section's lr and decay only
    assert bare == {"type": "Lamb", "params": {"lr": TrainConfig().lr, "weight_decay": TrainConfig().weight_decay}}
    # FusedAdam (torch_adam false) and a type spelled as DeepSpeed reads it (case-blind) are AdamW still: the train
    # section's betas and eps go with them (they were dropped, and torch's defaults 0.999 / 1e-8 trained unrecorded)
    adamw = {"lr": TrainConfig().lr, "betas": list(TrainConfig().betas), "eps": TrainConfig().eps,
             "weight_decay": TrainConfig().weight_decay}
    fused = with_file({"optimizer": {"params": {"torch_adam": False, "lr": "auto"}}})["optimizer"]
    assert fused == {"type": "AdamW", "params": {**adamw, "torch_adam": False}}
    lower = with_file({"optimizer": {"type": "adamw", "params": {"torch_adam": True}}})["optimizer"]
    assert lower == {"type": "adamw", "params": {**adamw, "torch_adam": True}}
    with pytest.raises(ConfigError, match=r"ds.json: not valid JSON"):
        with_file('{"zero_optimization": ')
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        with_file("[1, 2]")
    with pytest.raises(ConfigError, match=r"a \"scheduler\" section would be ignored .* train.schedule"):
        with_file({"scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": 0.05}}})


def test_one_modalitys_cap_on_the_command_line_keeps_the_others():
    """`data.max_events.mini=10` replaced tiny-synth's whole {bill: 32} mapping (bill fell back to the default cap);
    a mapping written whole still replaces, and {} clears, on load and in with_overrides alike."""
    from qanchor.config import DataConfig, DataOverrides, with_overrides

    path = Path(__file__).resolve().parents[1] / "configs/pretrain/tiny-synth.yaml"
    assert load_config(path).data.max_events == {"bill": 32}
    assert load_config(path, ["data.max_events.mini=10"]).data.max_events == {"bill": 32, "mini": 10}
    assert load_config(path, ["data.max_events={mini: 10}"]).data.max_events == {"mini": 10}
    assert load_config(path, ["data.max_events={}"]).data.max_events == {}
    assert load_config(path, ["data.max_events={}", "data.max_events.app=4"]).data.max_events == {"app": 4}
    cfg = load_config(path)
    assert with_overrides(cfg, ["data.max_events={}"]).data.max_events == {}
    assert with_overrides(cfg, ["data.max_events.mini=10"]).data.max_events == {"bill": 32, "mini": 10}
    trained = DataConfig(path="d", max_events={"bill": 32})
    assert DataOverrides(max_events={"mini": 10}).apply(trained).max_events == {"bill": 32, "mini": 10}
    assert DataOverrides(max_events={}).apply(trained).max_events == {}
    assert DataOverrides().apply(trained).max_events == {"bill": 32}


@pytest.mark.parametrize("override, message", [
    ("train.betas={a: 1}", "train.betas takes a list"),
    ("data.max_events=[bill]", "data.max_events takes a mapping"),
    ("train.lr=[1]", "train.lr takes one value"),
    ("train.betas=[0.9]", r"train.betas is Adam's two decay rates.*got \[0.9\]"),
    ("train.betas=[0.9, 1.5]", "each in \\[0, 1\\)"),
    ("model.backbone.num_heads=0", "num_heads and num_kv_heads must be >= 1"),
    ("model.backbone.num_kv_heads=0", "num_heads and num_kv_heads must be >= 1"),
])
def test_a_value_of_the_wrong_shape_is_a_config_error_not_a_traceback(override, message):
    """A list for a mapping gave OmegaConf's TypeError; num_heads=0 a ZeroDivisionError; one beta an IndexError in
    Adam 40 seconds into pretraining."""
    path = Path(__file__).resolve().parents[1] / "configs/pretrain/tiny-synth.yaml"
    with pytest.raises(ConfigError, match=message):
        load_config(path, [override])


def test_a_bare_value_is_a_list_of_one_for_every_list_and_a_list_config_file_is_refused(tmp_path):
    path = Path(__file__).resolve().parents[1] / "configs/bench/tiny-synth.yaml"
    assert load_config(path, ["ablation_prompt_tokens=4"]).ablation_prompt_tokens == [4]
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="list.yaml: a config file is a mapping of settings"):
        load_config(tmp_path / "bench" / "list.yaml")
    (tmp_path / "bench" / "mixed.yaml").write_text("methods: {a: 1}\n")
    with pytest.raises(ConfigError, match="mixed.yaml"):
        load_config(tmp_path / "bench" / "mixed.yaml")


def test_errors_name_the_layer_at_fault_and_preset_null_turns_the_preset_off(tmp_path):
    path = Path(__file__).resolve().parents[1] / "configs/pretrain/tiny-synth.yaml"
    with pytest.raises(ConfigError, match=r"^<command line>.*train.betas"):  # not tiny-synth.yaml's fault
        load_config(path, ["train.betas=[a, 0.9]"])
    preset = tmp_path / "mypreset.yaml"
    preset.write_text("hidden_sise: 8\n")
    with pytest.raises(ConfigError, match=r"mypreset.yaml.*hidden_sise"):
        load_config(path, [f"model.preset={preset}"])
    tiny = load_config(path)
    bare = load_config(path, ["model.preset=null"])
    assert tiny.model.preset == "tiny" and bare.model.preset is None
    assert bare.model.max_query_tokens == ModelConfig().max_query_tokens != tiny.model.max_query_tokens


def test_a_deepspeed_file_cannot_train_with_a_rate_or_clip_the_records_do_not_show(tmp_path):
    """A file's optimizer lr and gradient_clipping replaced the train section's while the start line and the saved
    config.yaml (what a resume is checked against) still said lr 0.001: the run's loss climbed to 9,653 at lr 0.5."""
    import json

    from qanchor.config import TrainConfig
    from qanchor.train.engine import deepspeed_config

    def with_file(overrides) -> dict:
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(overrides))
        return deepspeed_config(TrainConfig(deepspeed_config=str(path)), world=1)

    with pytest.raises(ConfigError, match=r'optimizer.params.lr=0.5, and train.lr is 0.0001.*train.lr=0.5 instead'):
        with_file({"optimizer": {"type": "AdamW", "params": {"lr": 0.5}}})
    with pytest.raises(ConfigError, match=r"gradient_clipping=0.5, and train.grad_clip is 1.0"):
        with_file({"gradient_clipping": 0.5})
    with pytest.raises(ConfigError, match="optimizer.params.lr=0.5"):  # another optimizer takes the file's params too
        with_file({"optimizer": {"type": "Lamb", "params": {"lr": 0.5}}})
    # betas, eps and weight decay likewise (the file's won, config.yaml said the train section's)
    with pytest.raises(ConfigError, match=r"optimizer.params.betas=\[0.5, 0.6\], and train.betas is \[0.9, 0.98\].*"
                                          r"train.betas=\[0.5, 0.6\] instead"):
        with_file({"optimizer": {"type": "AdamW", "params": {"torch_adam": True, "betas": [0.5, 0.6]}}})
    with pytest.raises(ConfigError, match=r"optimizer.params.eps=1e-08, and train.eps is 1e-06"):
        with_file({"optimizer": {"type": "Adam", "params": {"eps": 1e-8}}})
    with pytest.raises(ConfigError, match=r"optimizer.params.weight_decay=0.1, and train.weight_decay is 1e-05"):
        with_file({"optimizer": {"type": "Lamb", "params": {"weight_decay": 0.1}}})
    assert with_file({"optimizer": {"type": "Lamb", "params": {"betas": [0.5, 0.6]}}})["optimizer"]["params"]["betas"] == [
        0.5, 0.6]  # another optimizer's betas are its own
    # a section of another JSON type: one line naming it, not an AttributeError after the setup
    for section, shown in (({"zero_optimization": 2}, '"zero_optimization" must be a JSON object of settings, got 2'),
                           ({"optimizer": "AdamW"}, '"optimizer" must be a JSON object of settings, got "AdamW"'),
                           ({"optimizer": {"params": [1]}}, r'"optimizer"."params" must be a JSON object of settings, got \[1\]'),
                           ({"bf16": True}, '"bf16" must be a JSON object')):
        with pytest.raises(ConfigError, match=shown):
            with_file(section)
    assert with_file({"optimizer": {"params": {"lr": TrainConfig().lr}}, "gradient_clipping": "auto"})["gradient_clipping"] == 1.0
    # the precision likewise: the file's bf16 won over train.precision=fp32 past the CUDA check, and fp16 (not a qanchor
    # precision) failed in DeepSpeed after the whole setup
    with pytest.raises(ConfigError, match=r"bf16.enabled=True, and train.precision is fp32.*train.precision=bf16 instead"):
        with_file({"bf16": {"enabled": True}})
    with pytest.raises(ConfigError, match="fp16 is enabled"):
        with_file({"fp16": {"enabled": True}})
    with pytest.raises(ConfigError, match="torch_autocast is enabled"):
        with_file({"torch_autocast": {"enabled": True, "dtype": "bfloat16"}})
    assert with_file({"bf16": {"enabled": "auto"}, "fp16": {"enabled": False}})["bf16"] == {"enabled": False}
    # a whole section "auto" keeps the train section's (refused as "not a JSON object" for a while)
    assert with_file({"bf16": "auto", "zero_optimization": "auto"})["bf16"] == {"enabled": False}


def test_a_seed_numpy_cannot_take_and_other_bench_values_are_refused_at_the_door():
    """numpy's generators take no negative seed: pretraining failed at its first batch, after the whole setup, the
    bench and uqa in a traceback, and prompt-tune said "too few users to split". n_jobs 0 or -1 made LightGBM take
    every core; a negative head_steps was said after the other rows had run, as "steps"."""
    from qanchor.config import BenchConfig, PretrainConfig, PromptTuneConfig, UqaConfig

    with pytest.raises(ConfigError, match=r"train.seed must be in \[0, 2\*\*32\), got -1"):
        load_config(None, ["train.seed=-1"], schema=PretrainConfig)
    with pytest.raises(ConfigError, match=r"train.seed must be in \[0, 2\*\*32\)"):  # overflowed after overwrite
        load_config(None, ["train.seed=20000000000000000"], schema=PretrainConfig)
    with pytest.raises(ConfigError, match="train.grad_clip must be a number"):
        load_config(None, ["train.grad_clip=nan"], schema=PretrainConfig)
    for schema in (BenchConfig, PromptTuneConfig, UqaConfig):
        with pytest.raises(ConfigError, match=r"seed must be in \[0, 2\*\*32\), got -1"):
            load_config(None, ["seed=-1"], schema=schema)
    for override, match in (("n_jobs=0", "n_jobs must be >= 1"), ("head_steps=-1", "head_steps must be >= 0")):
        with pytest.raises(ConfigError, match=match):
            load_config(None, [override], schema=BenchConfig)
    with pytest.raises(ConfigError, match="temperature must be a finite number > 0, got nan"):
        load_config(None, ["temperature=nan"], schema=PromptTuneConfig)


@pytest.mark.parametrize("override, match", [
    ("model.user_encoder.adapter_hidden=0", "adapter_hidden=0: the adapters' width must be at least 1"),
    ("model.user_encoder.tabular_tokens=0", "tabular_tokens=0: at least 1"),
    ("model.user_encoder.dropout=1.5", r"dropout=1.5: a probability in \[0, 1\)"),
    ("model.user_encoder.content_use=path", "content_use=path puts the content components in the statistics path"),
    ("loss.mode=ntp", "loss.answer_bank adds negatives to the contrastive loss, which loss.mode=ntp turns off"),
    ("model.answer_pooling=mean", "model.answer_pooling=mean pools the backbone tower's answer tokens"),
    # below 0 every negative was masked: the run trained without its contrastive loss, and said "contrastive 0.0000"
    ("loss.margin=-1", r"loss.margin must be >= 0 \(or null"),
    ("loss.ntp_weight=-1", "loss.ntp_weight must be a finite number >= 0"),
    ("loss.temperature=nan", "loss.temperature must be a finite number > 0"),
    # each of these failed in a traceback after the setup, or trained a backbone that reads no user
    ("train.eps=-1", "train: eps must be > 0"),
    ("train.weight_decay=-1", "weight_decay >= 0"),
    ("model.max_answer_tokens=0", "max_answer_tokens must be >= 1"),
    ("model.answer_max_length=0", "model.answer_max_length=0: the sentence encoder needs at least 4"),
    ("model.backbone.hidden_size=0", "model.backbone.hidden_size=0: must be at least 1"),
    ("model.backbone.num_layers=0", "model.backbone.num_layers=0: must be at least 1"),
    ("model.backbone.intermediate_size=0", "model.backbone.intermediate_size=0: must be at least 1"),
    ("model.backbone.lora.dropout=1.5", r"lora.dropout=1.5: a probability in \[0, 1\)"),
    ("data.default_max_events=0", "data.default_max_events: must be >= 1, got 0"),
])
def test_recipe_settings_that_cannot_work_or_do_nothing_are_refused(override, match):
    """Each was accepted: zero-width adapters trained a model that reads no user, 0 tabular tokens and a dropout of 1.5
    crashed after setup, and the rest changed nothing without a word."""
    extra = ["loss.answer_bank=8"] if override == "loss.mode=ntp" else []
    base = ["model.user_encoder.content_components=0"] if "content_use" in override else []
    with pytest.raises(ConfigError, match=match):
        load_config("configs/pretrain/tiny-synth.yaml", [*base, *extra, override], schema=PretrainConfig)


def test_text_settings_are_taken_as_written_even_with_dollar_braces(tmp_path):
    """OmegaConf resolved ``${...}`` inside text: "spent over ${100}?" failed as an unknown interpolation, and
    "${oc.env:HOME}" became the home folder, where the README promises a string setting is taken verbatim."""
    from qanchor.config import AskConfig, BenchConfig, to_yaml

    cfg = load_config(None, ["labels=w.csv", "query=Did this user spend over ${100}?", "tasks=[\"a${x}\"]"], schema=BenchConfig)
    assert cfg.query == "Did this user spend over ${100}?" and cfg.tasks == ["a${x}"]
    assert load_config(None, ["question=What about ${oc.env:HOME}?"], schema=AskConfig).question == "What about ${oc.env:HOME}?"
    (tmp_path / "c.yaml").write_text(to_yaml(cfg))  # as a run's saved config is read back
    assert load_config(tmp_path / "c.yaml", [], schema=BenchConfig).query == cfg.query
    # rebuilt with overrides (the bench's sub-runs), a bare list value, and a backslash just before "${"
    from qanchor.config import with_overrides

    assert with_overrides(cfg, ["folds=3"]).query == cfg.query and with_overrides(cfg, ["folds=3"]).tasks == ["a${x}"]
    assert load_config(None, ["tasks=a${x}"], schema=BenchConfig).tasks == ["a${x}"]
    assert load_config(None, ["question=C:\\${x}"], schema=AskConfig).question == "C:\\${x}"


def test_a_run_saved_before_a_training_check_was_added_still_loads(tmp_path):
    """Checks that keep a new run from training with a setting (a negative margin, a backbone without layers, a seed
    numpy refuses) made the config.yaml of a model trained before them "damaged": the model could no longer be used."""
    from qanchor.config import PretrainConfig, load_run_config, to_yaml

    saved = to_yaml(load_config("configs/pretrain/tiny-synth.yaml", [], schema=PretrainConfig))
    for key, value in (("margin", "-1.0"), ("ntp_weight", "-1.0"), ("num_layers", "0")):
        assert f"  {key}: " in saved, key
        saved = saved.replace(f"  {key}: ", f"  {key}: {value} #", 1)
    saved = saved.replace("  grad_clip: ", "  grad_clip: -1.0 #", 1)  # DeepSpeed: no clipping; always accepted
    (tmp_path / "config.yaml").write_text(saved)
    cfg = load_run_config(tmp_path / "config.yaml")
    assert (cfg.loss.margin, cfg.loss.ntp_weight, cfg.model.backbone.num_layers, cfg.train.grad_clip) == (-1, -1, 0, -1)
    # and stays usable: serving re-checks the recipe when it sets its packing (replace runs the checks again)
    from qanchor.config import DataOverrides
    from qanchor.config.sections import reading_saved_run

    with reading_saved_run():
        assert dataclasses.replace(cfg, data=DataOverrides(default_max_events=4).apply(cfg.data)).loss.margin == -1
    with pytest.raises(ConfigError, match="must be"):  # a new run with them is still refused
        load_config(tmp_path / "config.yaml", [], schema=PretrainConfig)



@pytest.mark.parametrize("text, match", [
    ("data: data/synth\n", "'data' is a section of settings, not a value"),
    ("data: {max_events: [a]}\n", r"'data.max_events' takes a mapping"),
    ("methods: {a: 1}\n", "'methods' takes a list"),
])
def test_a_config_files_section_or_mapping_given_the_wrong_shape_is_named(tmp_path, text, match):
    """OmegaConf's merge said "str is not a subclass of DataConfig" or "Cannot merge incompatible container types",
    without the key; `data: data/synth` is a likely slip for data.path."""
    from qanchor.config import BenchConfig

    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(tmp_path / "c.yaml", [], schema=BenchConfig)


def test_a_loss_weight_must_be_a_finite_number_for_a_new_run_and_a_saved_one_still_loads():
    """nan passed the "< 0" checks of the profile, future and path-free weights: the term was switched off (nan > 0
    is false) while config.yaml recorded .nan, and a check that needs the profile loss was bypassed; inf failed after
    the whole setup, blamed on the learning rate."""
    import math

    from qanchor.config import LossConfig
    from qanchor.config.sections import reading_saved_run

    for name in ("profile_weight", "future_weight", "path_free_weight", "ntp_weight"):
        for value in (math.nan, math.inf):
            with pytest.raises(ConfigError, match=rf"loss.{name} must be a finite number >= 0.*got {value}"):
                LossConfig(**{name: value})
        with reading_saved_run():  # a model a run saved so serves as it was trained
            assert math.isnan(getattr(LossConfig(**{name: math.nan}), name))
    with pytest.raises(ConfigError, match="loss.profile_weight must be >= 0"):
        LossConfig(profile_weight=-1)


def test_a_preset_file_builds_on_the_preset_it_names_itself(tmp_path, monkeypatch):
    """`model.preset=my.yaml`, where my.yaml says `preset: qwen2.5-0.5b`, built the tiny defaults: the file's own
    preset line was overwritten by the name given, while the same file loaded as a model config honoured it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my.yaml").write_text("preset: qwen2.5-0.5b\nembedding_dim: 64\n")
    (tmp_path / "mine.yaml").write_text("preset: my.yaml\nmax_query_tokens: 12\n")  # a chain of two
    cfg = load_config(None, ["model.preset=mine.yaml"], schema=PretrainConfig).model
    qwen = load_config(configs_root() / "model" / "qwen2.5-0.5b.yaml")
    assert (cfg.backbone.hidden_size, cfg.backbone.num_layers) == (qwen.backbone.hidden_size, qwen.backbone.num_layers) == (896, 24)
    assert cfg.embedding_dim == 64 and cfg.max_query_tokens == 12 and cfg.preset == "mine.yaml"  # the name given
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "direct.yaml").write_text("preset: mine.yaml\n")  # loaded directly: the same model
    direct = load_config(tmp_path / "model" / "direct.yaml")
    assert (direct.backbone, direct.embedding_dim, direct.max_query_tokens) == (cfg.backbone, 64, 12)
    (tmp_path / "a.yaml").write_text("preset: b.yaml\n")
    (tmp_path / "b.yaml").write_text("preset: a.yaml\n")
    with pytest.raises(ConfigError, match=r"model.preset: the presets name each other in a cycle \(a.yaml -> b.yaml -> "
                                          r"a.yaml\)"):
        load_config(None, ["model.preset=a.yaml"], schema=PretrainConfig)
    (tmp_path / "model" / "self.yaml").write_text("preset: model/self.yaml\n")
    with pytest.raises(ConfigError, match=r"cycle \(model/self.yaml -> model/self.yaml\)"):
        load_config(Path("model/self.yaml"))
    (tmp_path / "bad.yaml").write_text("preset: my.yaml\nhidden_sise: 8\n")  # a bad key is named in its own file
    with pytest.raises(ConfigError, match=r"bad.yaml.*hidden_sise"):
        load_config(None, ["model.preset=bad.yaml"], schema=PretrainConfig)


def test_a_preset_path_in_a_file_is_also_found_beside_that_file(tmp_path, monkeypatch):
    """A relative preset path written in a preset or config file was read from the working directory only: a team's
    presets folder that names its own files worked from one folder and failed from every other."""
    presets = tmp_path / "team" / "presets"
    presets.mkdir(parents=True)
    (presets / "base.yaml").write_text("preset: qwen2.5-0.5b\nembedding_dim: 64\n")
    (presets / "wide.yaml").write_text("preset: base.yaml\nmax_query_tokens: 12\n")
    (tmp_path / "team" / "pretrain.yaml").write_text("model:\n  preset: presets/wide.yaml\n")
    monkeypatch.chdir(tmp_path)  # neither base.yaml nor presets/wide.yaml is here
    cfg = load_config(tmp_path / "team" / "pretrain.yaml", schema=PretrainConfig).model
    assert (cfg.backbone.hidden_size, cfg.embedding_dim, cfg.max_query_tokens) == (896, 64, 12)
    given = load_config(None, [f"model.preset={presets / 'wide.yaml'}"], schema=PretrainConfig).model
    assert (given.backbone.hidden_size, given.embedding_dim) == (896, 64)
    with pytest.raises(ConfigError, match="unknown preset 'presets/wide.yaml'"):  # on the command line: from here only
        load_config(None, ["model.preset=presets/wide.yaml"], schema=PretrainConfig)


@pytest.mark.parametrize("text", ["r_${x", "Spend over ${50 a month?", "${a}", "${oc.env:HOME}", "C:\\${x}",
                                  "C:\\\\${x", "a\\b", "ends in \\", "\\${a}", "}"])
def test_text_with_dollar_braces_is_saved_and_read_back_exactly_as_given(tmp_path, text):
    """`output_dir=r_${x` trained, then died at its first save (to_yaml parsed the text as an interpolation:
    GrammarParseError), and the bench and prompt-tune likewise; a config file holding such a text did not load."""
    from omegaconf import OmegaConf

    from qanchor.config import BenchConfig, to_container, to_yaml
    from qanchor.train.pretrain import recipe_differences

    cfg = load_config(None, [f"output_dir={text}", f"data.path={text}"], schema=PretrainConfig)
    saved = to_yaml(cfg)
    (tmp_path / "config.yaml").write_text(saved)
    again = load_config(tmp_path / "config.yaml", schema=PretrainConfig)
    assert (again.output_dir, again.data.path) == (text, text) and again == cfg and to_yaml(again) == saved
    assert to_container(cfg)["output_dir"] == text and recipe_differences(cfg, again) == []
    bench = load_config(None, [f"generic_query={text}", f"query={text}", "labels=l.csv"], schema=BenchConfig)
    (tmp_path / "bench.yaml").write_text(to_yaml(bench))
    assert load_config(tmp_path / "bench.yaml", schema=BenchConfig) == bench
    # what has no "${" is saved as before (checkpoints, journals and heads compare these texts and digests)
    plain = load_config(configs_root() / "pretrain" / "tiny-synth.yaml")
    assert to_yaml(plain) == OmegaConf.to_yaml(OmegaConf.structured(plain))
    assert to_container(plain) == OmegaConf.to_container(OmegaConf.structured(plain))


@pytest.mark.parametrize("text, schema, match", [
    ("tasks: [churn, [x]]\n", "BenchConfig", r"c.yaml: 'tasks': item \['x'\] is not text; quote an item"),
    ("methods: [rfm_lr, [text_mean_lr]]\n", "BenchConfig", r"'methods': item \['text_mean_lr'\] is not text"),
    ("options: [yes, [no]]\n", "AskConfig", r"'options': item \['no'\] is not text"),
    ("events: [{a: 1}]\n", "UpdateConfig", r"'events': item \{'a': '1'\} is not text"),
    ("loss: {profile_sources: [[uqa]]}\n", "PretrainConfig", r"'loss.profile_sources': item \['uqa'\] is not text"),
])
def test_a_config_files_list_of_text_takes_only_text(tmp_path, text, schema, match):
    """An item that is itself a list or mapping was accepted from a file (the command line refuses it): the bench
    failed later in a TypeError (unhashable list), and ask read `options: [yes, [no]]` as ['yes', [False]]."""
    import qanchor.config

    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(tmp_path / "c.yaml", schema=getattr(qanchor.config, schema))


def test_a_bare_value_in_a_config_file_is_a_list_of_one_as_on_the_command_line(tmp_path):
    """`tasks: churn` in a file failed with OmegaConf's "Invalid value assigned: AnyNode is not a ListConfig"; on the
    command line `tasks=churn` is the list [churn]."""
    from qanchor.config import AskConfig, BenchConfig

    (tmp_path / "b.yaml").write_text("tasks: churn\nablation_prompt_tokens: 4\nmethods: 0012\n")
    bench = load_config(tmp_path / "b.yaml", schema=BenchConfig)
    cli = load_config(None, ["tasks=churn", "ablation_prompt_tokens=4", "methods=0012"], schema=BenchConfig)
    assert (bench.tasks, bench.ablation_prompt_tokens, bench.methods) == (cli.tasks, cli.ablation_prompt_tokens,
                                                                        cli.methods) == (["churn"], [4], ["0012"])
    (tmp_path / "a.yaml").write_text("options: yes\n")
    assert load_config(tmp_path / "a.yaml", schema=AskConfig).options == ["yes"]  # the word, as written
    (tmp_path / "p.yaml").write_text("loss: {profile_sources: uqa}\n")
    assert load_config(tmp_path / "p.yaml", schema=PretrainConfig).loss.profile_sources == ["uqa"]


@pytest.mark.parametrize("schema, override, match", [
    ("PretrainConfig", "train.dist_timeout_minutes=nan", "train.dist_timeout_minutes must be a finite number of minutes > 0"),
    ("PretrainConfig", "train.dist_timeout_minutes=inf", "train.dist_timeout_minutes must be a finite number"),
    ("PretrainConfig", "train.dist_timeout_minutes=1e300", "at most 1e9"),
    ("PretrainConfig", "train.lr=inf", "train.lr must be a finite number >= 0, got inf"),
    ("PretrainConfig", "train.eps=inf", "train: eps must be > 0 and weight_decay >= 0, both finite; got eps inf"),
    ("PretrainConfig", "train.weight_decay=inf", "both finite; got eps 1e-06, weight_decay inf"),
    ("PromptTuneConfig", "whitening_eps=nan", "whitening_eps must be a finite number > 0, or null for no whitening, got nan"),
    ("PromptTuneConfig", "whitening_eps=inf", "whitening_eps must be a finite number > 0, or null"),
    ("PromptTuneConfig", "lr=inf", "lr must be a finite number > 0, got inf"),
    ("PromptTuneConfig", "lr=nan", "lr must be a finite number > 0, got nan"),
    ("PromptTuneConfig", "prototype_lr=inf", "prototype_lr must be a finite number >= 0, got inf"),
    ("PromptTuneConfig", "lookup_lr=inf", "lookup_lr must be a finite number >= 0, got inf"),
    ("PromptTuneConfig", "temperature=inf", "temperature must be a finite number > 0, got inf"),
    ("BenchConfig", "coles_epochs=-1", "coles_epochs must be >= 1, got -1"),
    ("BenchConfig", "coles_hidden=0", "coles_hidden must be >= 1, got 0"),
    ("BenchConfig", "coles_max_events=0", "coles_max_events must be >= 1, got 0"),
    ("BenchConfig", "coles_max_events=-5", "coles_max_events must be >= 1, got -5"),
])
def test_a_number_that_is_not_finite_or_in_range_is_refused_at_the_door(schema, override, match):
    """nan passed the "<= 0" checks and inf every one: dist_timeout_minutes failed in the process group's setup,
    prompt-tune's whitening_eps=nan in scikit-learn, lr=inf in a traceback, whitening_eps=inf tuned to AUC 0.5 without
    a word. CoLES epochs -1 trained forever, a width of 0 failed in a traceback, 0 events used every event."""
    import qanchor.config

    with pytest.raises(ConfigError, match=match):
        load_config(None, [override], schema=getattr(qanchor.config, schema))


@pytest.mark.parametrize("text, match", [
    ("folds: 2\nseed: 1\nfolds: 3\n", r"c.yaml: not valid YAML: found duplicate key folds at line 3, column 1$"),
    ("folds: 2\n\tseed: 1\n", r"found a tab character that violates indentation at line 2, column 1"),
    ("tasks: [churn\n", r"did not find expected ',' or '\]' at line 2, column 1 \(while parsing a flow sequence from "
                        r"line 1, column 8\)"),
    ("query: 'unclosed\n", r"found unexpected end of stream at line 2, column 1 \(while scanning a quoted scalar from "
                           r"line 1, column 8\)"),
    ("a: b: c\n", r"mapping values are not allowed in this context at line 1, column 5"),
])
def test_a_yaml_syntax_error_says_the_problem_and_its_line(tmp_path, text, match):
    """Only the first line of PyYAML's message was kept: "not valid YAML (while constructing a mapping)", neither
    what was wrong (a key given twice, a tab, an unclosed bracket or quote) nor where."""
    from qanchor.config import BenchConfig

    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(tmp_path / "c.yaml", schema=BenchConfig)


def test_copies_of_a_saved_config_keep_what_an_earlier_qanchor_allowed():
    """Copying a config (to compare a resume's with the saved run's, to save it) re-ran the checks a new run gets: a
    saved run with loss.margin -0.1 (allowed before) made a resume say that the margin must be >= 0, not that the
    recipes differ; and a run saved with train.dist_timeout_minutes 1e10 (which trained) no longer loaded."""
    from dataclasses import replace

    from qanchor.config import LossConfig, TrainConfig, to_container
    from qanchor.config.sections import reading_saved_run
    from qanchor.train.pretrain import recipe_differences

    with reading_saved_run():
        saved = replace(PretrainConfig(), loss=LossConfig(margin=-0.1), train=TrainConfig(dist_timeout_minutes=1e10))
    assert to_container(saved)["loss"]["margin"] == -0.1
    assert "loss.margin: -0.1 -> 0.1" in recipe_differences(saved, replace(PretrainConfig(), loss=LossConfig(margin=0.1)))
    for value in (1e10, float("inf")):
        with pytest.raises(ConfigError, match="dist_timeout_minutes must be a finite number of minutes > 0"):
            TrainConfig(dist_timeout_minutes=value)
    with pytest.raises(ConfigError, match=r"dist_timeout_minutes must be a finite number of minutes > 0, got nan"):
        TrainConfig(dist_timeout_minutes=float("nan"))


@pytest.mark.parametrize("value", ["{a: [1]}", "{a: {b: 1}}"])
def test_a_mapping_of_numbers_in_a_file_refuses_a_list_or_mapping_value_naming_file_and_key(tmp_path, value):
    """`data: {max_events: {a: [1]}}` in a file reached the section's own check, which failed in a TypeError that
    OmegaConf reported as "Could not create instance of `DataConfig`: '<' not supported", blamed on the command line."""
    f = tmp_path / "pretrain" / "p.yaml"
    f.parent.mkdir()
    f.write_text(f"data:\n  max_events: {value}\n")
    with pytest.raises(ConfigError, match=rf"{f}: 'data.max_events.a' takes one int value, not .* e\.g\. "
                                          r"data.max_events: \{a: 32\}"):
        load_config(f, schema=PretrainConfig)
    f.write_text("data:\n  max_events: {a: 3}\n")
    assert load_config(f, schema=PretrainConfig).data.max_events == {"a": 3}
