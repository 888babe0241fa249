"""A checkpoint's id covers what it computes: its weights and the files that say what is done with them (config.yaml's
model section, backbone_config.json, qanchor.json); outputs recorded with the older weights-only id still load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from qanchor.data.io import file_sha256
from qanchor.data.schema import events_table
from qanchor.errors import CheckpointError, ConfigError
from qanchor.infer.api import QAnchor
from qanchor.infer.export import export_embeddings, read_embeddings
from qanchor.infer.index import LookalikeIndex
from qanchor.infer.update import init_state, update_state
from qanchor.model import factory
from qanchor.model.factory import checkpoint_hash
from qanchor.tune.head import ScenarioHead, load_heads
from tests.conftest import QUERIES

PAIRS = [(f"q{i}", q) for i, q in enumerate(QUERIES)]


def _edited_copy(ckpt: Path, out: Path, old: str, new: str) -> Path:
    shutil.copytree(ckpt, out)
    text = (out / "config.yaml").read_text()
    assert text.count(old) == 1
    (out / "config.yaml").write_text(text.replace(old, new))
    return out


@pytest.fixture(scope="module")
def twin(infer_env, tmp_path_factory) -> SimpleNamespace:
    """The fixture's checkpoint copied with its model's summary tokens turned off: the same weights, byte for byte (the
    switch adds or removes no parameter), computing other embeddings."""
    ckpt = _edited_copy(infer_env.ckpt, tmp_path_factory.mktemp("twin") / "ckpt", "summary_tokens: true",
                        "summary_tokens: false")
    qa = QAnchor.from_pretrained(ckpt, text_cache=infer_env.cache, batch_size=8)
    return SimpleNamespace(ckpt=ckpt, qa=qa)


def _legacy_id(ckpt: Path) -> str:
    """What qanchor recorded as a checkpoint's id before the id covered its config: the weights file's SHA-256."""
    return file_sha256(ckpt / "model.safetensors")


class Killed(Exception):
    pass


def _kill_after_first_shard(i: int) -> None:
    raise Killed  # the process dies right after shard 0 became final


def test_the_same_weights_under_another_model_config_are_another_model(infer_env, twin, tmp_path):
    """The id was the SHA-256 of model.safetensors alone: a checkpoint copied and its model.user_encoder.summary_tokens
    edited (or two untrained models of one seed) had the id of the original while it embedded users 0.2 apart."""
    qa = infer_env.qa
    assert file_sha256(infer_env.ckpt / "model.safetensors") == file_sha256(twin.ckpt / "model.safetensors")
    users = list(infer_env.ds.users())[:4]
    assert np.abs(qa.embed(users, QUERIES[:1]) - twin.qa.embed(users, QUERIES[:1])).max() > 0.05
    assert twin.qa.weights_id() != qa.weights_id() and checkpoint_hash(twin.ckpt) == twin.qa.checkpoint_hash
    assert checkpoint_hash(infer_env.ckpt) == qa.checkpoint_hash
    # a copy of the folder is the same model, and so is one whose config differs only where nothing is computed
    shutil.copytree(infer_env.ckpt, tmp_path / "copy")
    assert QAnchor.from_pretrained(tmp_path / "copy", text_cache=infer_env.cache).weights_id() == qa.weights_id()
    _edited_copy(infer_env.ckpt, tmp_path / "relearnt", "  lr: 0.0001\n", "  lr: 0.5\n")
    assert checkpoint_hash(tmp_path / "relearnt") == qa.checkpoint_hash
    # a head tuned on one is refused by the other
    head = ScenarioHead("churn", QUERIES[0], torch.zeros(2, qa.model.hidden_size), torch.eye(qa.embedding_dim)[:2],
                        torch.tensor([0, 1]), 0.1, qa.checkpoint_hash)
    with pytest.raises(CheckpointError, match="was tuned on checkpoint"):
        twin.qa.embed(users, [head.query], head=head)
    head.save(tmp_path / "heads" / "churn")
    with pytest.raises(CheckpointError, match="re-run `qanchor prompt-tune` with this checkpoint"):
        load_heads(tmp_path / "heads", checkpoint_hash=twin.qa.checkpoint_hash)


def test_an_export_is_not_resumed_by_the_same_weights_under_another_model_config(infer_env, twin, tmp_path):
    """An export killed after shard 0 and run again with a checkpoint of the same weights and another config resumed,
    and mixed rows of the two models in one export without a word."""
    out = tmp_path / "e"
    with pytest.raises(Killed):
        export_embeddings(infer_env.qa, infer_env.ds, PAIRS, out, rank=0, world=1, shard_users=7, progress=False,
                          on_shard_done=_kill_after_first_shard)
    with pytest.raises(ConfigError, match="holds an export with a different checkpoint"):
        export_embeddings(twin.qa, infer_env.ds, PAIRS, out, rank=0, world=1, shard_users=7, progress=False)
    assert sorted(p.name for p in out.glob("*.done")) == ["part-00000.done"]


def test_a_checkpoint_file_replaced_while_loading_is_refused(infer_env, tmp_path, monkeypatch):
    """The id must describe the files the model was built from: a config replaced between the build and the id (a run
    still saving there) would have named another model."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(infer_env.ckpt, ckpt)
    build = factory.build_model

    def build_then_publish(*args, **kwargs):
        built = build(*args, **kwargs)
        text = (ckpt / "config.yaml").read_text()
        (ckpt / "config.yaml.new").write_text(text.replace("summary_tokens: true", "summary_tokens: false"))
        (ckpt / "config.yaml.new").replace(ckpt / "config.yaml")
        return built

    monkeypatch.setattr(factory, "build_model", build_then_publish)
    with pytest.raises(CheckpointError, match=r"config.yaml changed while the checkpoint was being loaded"):
        QAnchor.from_pretrained(ckpt, text_cache=infer_env.cache)


def test_a_head_recorded_with_the_weights_only_id_still_loads_with_a_warning(infer_env, tmp_path, capsys):
    """Heads tuned before the id covered the config record the weights' SHA-256: they keep loading and serving, and
    the warning (once per head) says a changed config cannot be told from them. A loaded head served by the model was
    warned about a second time (a bench run printed it twice per head): the load named it by its folder, the model by
    its query, and the warning is said once per name."""
    qa = infer_env.qa
    head = ScenarioHead("churn", QUERIES[0], torch.zeros(2, qa.model.hidden_size), torch.eye(qa.embedding_dim)[:2],
                        torch.tensor([0, 1]), 0.1, _legacy_id(infer_env.ckpt))
    head.save(tmp_path / "heads" / "churn")
    capsys.readouterr()
    loaded = load_heads(tmp_path / "heads", checkpoint_hash=qa.checkpoint_hash)["churn"].head
    ScenarioHead.load(tmp_path / "heads" / "churn", qa.checkpoint_hash)
    err = capsys.readouterr().err
    assert err.count("records its model by the weights alone") == 1 and "tune the head again" in err
    users = list(infer_env.ds.users())[:3]
    assert qa.embed(users, [loaded.query], head=loaded).shape == (3, 1, qa.embedding_dim)
    assert "records its model by the weights alone" not in capsys.readouterr().err  # said when it was loaded
    qa.embed(users, [head.query], head=head)  # the head built in memory, never loaded: named by its query, said once
    qa.embed(users, [head.query], head=head)
    assert capsys.readouterr().err.count(f"the head for query {head.query!r} records its model by the weights alone") == 1
    with pytest.raises(CheckpointError, match="was tuned on checkpoint"):  # other weights' record: refused as before
        ScenarioHead.load(tmp_path / "heads" / "churn", "0" * 64)


def test_an_export_state_and_index_recorded_with_the_weights_only_id_still_work_with_a_warning(infer_env, tmp_path,
                                                                                                capsys):
    """Exports, update states and indexes written before the id covered the config record the weights' SHA-256: an
    export resumes as it was begun, a state updates, an index searches, each saying its record cannot tell a config
    changed since."""
    qa, legacy = infer_env.qa, _legacy_id(infer_env.ckpt)
    out = tmp_path / "e"
    with pytest.raises(Killed):
        export_embeddings(qa, infer_env.ds, PAIRS, out, rank=0, world=1, shard_users=7, progress=False,
                          on_shard_done=_kill_after_first_shard)
    record = json.loads((out / "export.json").read_text())
    (out / "export.json").write_text(json.dumps({**record, "checkpoint": legacy}, indent=2))
    capsys.readouterr()
    export_embeddings(qa, infer_env.ds, PAIRS, out, rank=0, world=1, shard_users=7, progress=False)
    assert f"the export {out} records its model by the weights alone" in capsys.readouterr().err
    assert json.loads((out / "export.json").read_text())["checkpoint"] == legacy  # the begun export, resumed as it was
    users, _, vectors = read_embeddings(out, "q0")
    assert len(users) == infer_env.ds.num_users
    assert np.abs(vectors - qa.embed(infer_env.ds.users(), QUERIES[:1])[:, 0]).max() < 1e-5

    index = LookalikeIndex.from_embeddings(out, "q0")
    assert index.meta["checkpoint"] == legacy
    assert index.search(vectors[2], 1, made_by=qa.weights_id())[0][0][0] == users[2]
    assert "the index of" in capsys.readouterr().err

    init_state(qa, infer_env.ds, PAIRS, tmp_path / "s0", progress=False)
    meta = json.loads((tmp_path / "s0" / "state.json").read_text())
    assert meta["checkpoint"] == qa.weights_id()
    (tmp_path / "s0" / "state.json").write_text(json.dumps({**meta, "checkpoint": legacy}))
    empty = tmp_path / "quiet.parquet"
    pq.write_table(events_table(infer_env.ds.manifest, {c: [] for c in ("user_id", "modality", "ts", "text", "value")}),
                   empty)
    update_state(qa, tmp_path / "s0", [empty], tmp_path / "s1", progress=False)
    assert f"the state {tmp_path / 's0'} records its model by the weights alone" in capsys.readouterr().err
    assert json.loads((tmp_path / "s1" / "state.json").read_text())["checkpoint"] == legacy
