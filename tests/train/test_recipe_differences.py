"""What a resumed run or a reused retrained sub-run may differ in: where and how often it writes, nothing else."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from qanchor.bench import retrain
from qanchor.config import PretrainConfig, load_config, to_yaml
from qanchor.data.dataset import load_dataset
from qanchor.train.pretrain import (
    BACKBONE_FILE,
    DATA_FILE,
    DEEPSPEED_FILE,
    backbone_file_text,
    checkpoint_data_id,
    checkpoint_step,
    deepspeed_file_digest,
    recipe_differences,
    trained_data_id,
    with_files_compared,
)

CONFIG = Path(__file__).resolve().parents[2] / "configs/pretrain/tiny-synth.yaml"


@pytest.fixture()
def cfg(tmp_path) -> PretrainConfig:
    return load_config(CONFIG, [f"data.path={tmp_path / 'ds'}", f"output_dir={tmp_path / 'run'}"], schema=PretrainConfig)


def test_bookkeeping_is_not_a_recipe_change(cfg, tmp_path, monkeypatch):
    moved = replace(cfg, output_dir=str(tmp_path / "elsewhere"), resume=True,
                    train=replace(cfg.train, log_every=7, save_every=9), data=replace(cfg.data, cache_dir="/tmp/c"))
    assert recipe_differences(cfg, moved) == []
    monkeypatch.chdir(tmp_path)  # the same dataset named relatively
    assert recipe_differences(cfg, replace(cfg, data=replace(cfg.data, path="ds"))) == []


def test_budget_rate_and_model_are(cfg):
    assert cfg.train.schedule == "cosine"
    longer = replace(cfg, train=replace(cfg.train, max_steps=cfg.train.max_steps * 2))
    assert recipe_differences(cfg, longer) == [f"train.max_steps: {cfg.train.max_steps} -> {cfg.train.max_steps * 2}"]
    wider = replace(cfg, model=replace(cfg.model, embedding_dim=16), loss=replace(cfg.loss, ntp_weight=1.0))
    assert recipe_differences(cfg, wider) == [f"loss.ntp_weight: {cfg.loss.ntp_weight} -> 1.0",
                                              f"model.embedding_dim: {cfg.model.embedding_dim} -> 16"]
    # A constant rate does not depend on the budget, so a longer run only extends it.
    constant = replace(cfg, train=replace(cfg.train, schedule="constant"))
    assert recipe_differences(constant, replace(constant, train=replace(constant.train, max_steps=99))) == []


def test_a_deepspeed_file_is_compared_by_what_it_holds(cfg, tmp_path, monkeypatch):
    """The same file named from another working directory is the same recipe (it was refused); the file edited since
    the run trained with it is another (it resumed silently, with the new clipping)."""
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "zero0.json").write_text('{"gradient_clipping": 1.0}')
    ckpt = tmp_path / "run" / "checkpoint"
    ckpt.mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "cfg")
    trained = replace(cfg, train=replace(cfg.train, deepspeed_config="zero0.json"))
    (ckpt / DEEPSPEED_FILE).write_text(f"{deepspeed_file_digest(trained)}\n")  # as the run's save wrote it
    monkeypatch.chdir(tmp_path)
    elsewhere = replace(cfg, train=replace(cfg.train, deepspeed_config=str(tmp_path / "cfg" / "zero0.json")))
    diffs = recipe_differences(trained, elsewhere)
    assert diffs and diffs[0].startswith("train.deepspeed_config:")  # the paths differ...
    assert with_files_compared(diffs, ckpt, elsewhere) == []  # ...the settings do not
    (tmp_path / "cfg" / "zero0.json").write_text('{"gradient_clipping": 0.001}')
    edited = with_files_compared(recipe_differences(elsewhere, elsewhere), ckpt, elsewhere)
    assert len(edited) == 1 and "other DeepSpeed settings than the run trained with" in edited[0]
    assert with_files_compared([], ckpt, cfg)  # a run with a file resumed without one
    (ckpt / DEEPSPEED_FILE).unlink()  # saved before qanchor recorded it: the paths, as given
    assert with_files_compared(diffs, ckpt, elsewhere) == diffs


def test_a_backbone_is_compared_by_its_weights_and_vocabulary_not_its_path(cfg, tmp_path):
    """Weights copied to node-local storage (a new path) are the same recipe: resuming was refused and the advice was
    to start afresh. Weights or a tokenizer that changed since are another recipe, whatever the path."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from qanchor.data.text_cache import default_encoder_path

    first = tmp_path / "shared" / "weights"
    AutoModelForCausalLM.from_config(Qwen2Config(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                 num_key_value_heads=1, intermediate_size=48)).save_pretrained(first)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(default_encoder_path() / name, first / name)

    def on(weights: Path, tokenizer: str | None = None) -> PretrainConfig:
        backbone = replace(cfg.model.backbone, name_or_path=str(weights), tokenizer=tokenizer or str(weights))
        return replace(cfg, model=replace(cfg.model, backbone=backbone))

    ckpt = tmp_path / "run" / "checkpoint"
    ckpt.mkdir(parents=True)
    (ckpt / BACKBONE_FILE).write_text(backbone_file_text(on(first)))  # as the run's save wrote it
    local = tmp_path / "scratch" / "weights"
    shutil.copytree(first, local)
    diffs = recipe_differences(on(first), on(local))
    assert [d.split(":")[0] for d in diffs] == ["model.backbone.name_or_path", "model.backbone.tokenizer"]
    assert with_files_compared(diffs, ckpt, on(local)) == []
    other_vocabulary = with_files_compared(recipe_differences(on(first), on(local, "qwen2.5")), ckpt, on(local, "qwen2.5"))
    assert other_vocabulary == ["model.backbone.tokenizer: qwen2.5 holds other vocabulary than the run started from"]
    config = (local / "config.json").read_text()
    (local / "config.json").write_text(config.replace('"rope_theta"', '"rope_scaling": null, "rope_theta"'))
    assert with_files_compared(diffs, ckpt, on(local)) == [
        f"model.backbone.name_or_path: {local} holds other weights than the run started from"]
    (ckpt / BACKBONE_FILE).unlink()  # saved before qanchor recorded it: the paths, as given
    assert with_files_compared(diffs, ckpt, on(local)) == diffs


def _fake_run(out: Path, run_cfg: PretrainConfig, step: int) -> None:
    (out / "checkpoint").mkdir(parents=True)
    (out / "checkpoint" / "config.yaml").write_text(to_yaml(run_cfg))
    (out / "checkpoint" / "qanchor.json").write_text("{}")
    (out / "checkpoint" / "STEP").write_text(f"{step}\n")


def test_a_sub_run_is_reused_only_finished_and_with_the_same_recipe(cfg, tmp_path, monkeypatch):
    """``pretrain_variant`` reuses a finished sub-run of the same recipe, continues a killed one, and retrains one
    trained for another recipe (a checkpoint pretrained longer than the sub-run, say)."""
    base = tmp_path / "base"
    _fake_run(base, cfg, cfg.train.max_steps)
    calls: list[PretrainConfig] = []
    monkeypatch.setattr(retrain, "run_pretrain", lambda run, progress: calls.append(run))
    same = lambda c: c  # noqa: E731  (the recipe itself)
    sub = tmp_path / "sub"
    expected = replace(cfg, output_dir=str(sub), resume=True, overwrite=False)

    assert retrain.pretrain_variant(str(base), cfg.data.path, same, sub, False) == sub / "checkpoint"
    assert len(calls) == 1 and calls[-1].resume and not calls[-1].overwrite  # nothing there: trained

    _fake_run(sub, expected, cfg.train.max_steps)
    retrain.pretrain_variant(str(base), cfg.data.path, same, sub, False)
    assert len(calls) == 1  # finished with this recipe: reused

    (sub / "checkpoint" / "STEP").write_text(f"{cfg.train.max_steps // 2}\n")
    assert checkpoint_step(sub / "checkpoint") == cfg.train.max_steps // 2
    retrain.pretrain_variant(str(base), cfg.data.path, same, sub, False)
    assert len(calls) == 2 and calls[-1].resume  # killed half way: continued, not taken as finished

    longer = replace(cfg, train=replace(cfg.train, max_steps=cfg.train.max_steps * 2))
    (base / "checkpoint" / "config.yaml").write_text(to_yaml(longer))  # the checkpoint now has a longer budget
    (sub / "checkpoint" / "STEP").write_text(f"{cfg.train.max_steps}\n")
    retrain.pretrain_variant(str(base), cfg.data.path, same, sub, False)
    assert len(calls) == 3 and calls[-1].overwrite and not calls[-1].resume  # stale: retrained afresh
    assert calls[-1].train.max_steps == cfg.train.max_steps * 2

    # the checkpoint pretrained again, shorter, under a constant schedule (max_steps is then no recipe difference): the
    # sub-run is past its budget, which a resume refuses with advice (raise train.max_steps) no sub-run can take
    constant = replace(cfg, train=replace(cfg.train, schedule="constant"))
    (base / "checkpoint" / "config.yaml").write_text(to_yaml(replace(constant, train=replace(constant.train, max_steps=5))))
    _fake_run(sub2 := tmp_path / "sub2", replace(constant, output_dir=str(tmp_path / "sub2"), resume=True, overwrite=False), 8)
    retrain.pretrain_variant(str(base), cfg.data.path, same, sub2, False)
    assert len(calls) == 4 and calls[-1].overwrite and not calls[-1].resume and calls[-1].train.max_steps == 5


def _id_by_file_times(ds_dir) -> str:
    """The data id qanchor recorded in checkpoints before it went by content (written out here, not imported: what
    those checkpoints hold must keep matching whatever the library's own function becomes)."""
    import hashlib

    h = hashlib.sha256()
    h.update(hashlib.sha256((ds_dir / "manifest.yaml").read_bytes()).digest())
    files = [*sorted((ds_dir / "events").glob("*.parquet")), ds_dir / "tabular.parquet",
             *sorted((ds_dir / "tasks").glob("*.parquet"))]
    for path in files:
        if path.exists():
            h.update(f"{path.name}:{path.stat().st_size}:{path.stat().st_mtime_ns};".encode())
    pairs = ds_dir / "userU.parquet"
    st = pairs.stat() if pairs.exists() else None
    blob = f"{h.hexdigest()[:16]}:{st.st_size if st else '-'}:{st.st_mtime_ns if st else '-'}"
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def test_a_sub_run_trained_on_data_changed_since_is_retrained(tiny_dataset, tmp_path, monkeypatch):
    """A finished sub-run of the same recipe is reused only on the data it was trained on: after an event file or the
    UserU pairs change, the random-init control and the ablations are retrained, not served from the old data."""
    ds_dir = tmp_path / "ds"
    shutil.copytree(tiny_dataset, ds_dir, ignore=shutil.ignore_patterns(".qanchor_cache"))
    cfg = load_config(CONFIG, [f"data.path={ds_dir}", f"output_dir={tmp_path / 'run'}"], schema=PretrainConfig)
    base, sub = tmp_path / "base", tmp_path / "sub"
    _fake_run(base, cfg, cfg.train.max_steps)
    _fake_run(sub, replace(cfg, output_dir=str(sub), resume=True, overwrite=False), cfg.train.max_steps)
    (sub / "checkpoint" / DATA_FILE).write_text(trained_data_id(load_dataset(ds_dir)) + "\n")
    calls: list[PretrainConfig] = []
    monkeypatch.setattr(retrain, "run_pretrain", lambda run, progress: calls.append(run))
    same = lambda c: c  # noqa: E731
    retrain.pretrain_variant(str(base), str(ds_dir), same, sub, False)
    assert calls == []  # the same recipe on the same data: reused
    # recorded by a qanchor whose id went by the files' names, sizes and times: the same data, still reused
    (sub / "checkpoint" / DATA_FILE).write_text(_id_by_file_times(ds_dir) + "\n")
    retrain.pretrain_variant(str(base), str(ds_dir), same, sub, False)
    assert calls == []
    part = sorted((ds_dir / "events").glob("*.parquet"))[0]
    table = pq.read_table(part)
    pq.write_table(table.slice(0, table.num_rows - 1), part)  # one event fewer
    retrain.pretrain_variant(str(base), str(ds_dir), same, sub, False)
    assert len(calls) == 1 and calls[-1].overwrite and not calls[-1].resume  # retrained afresh
    assert checkpoint_data_id(sub / "checkpoint") != trained_data_id(load_dataset(ds_dir))
    (sub / "checkpoint" / DATA_FILE).unlink()  # saved before qanchor recorded its data: not compared
    retrain.pretrain_variant(str(base), str(ds_dir), same, sub, False)
    assert len(calls) == 1
